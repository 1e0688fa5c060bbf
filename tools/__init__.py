"""Tooling around the two methods, no paper section of its own: grids of runs that regenerate the
paper's tables (``python -m tools.experiments``), running them in parallel or on a Slurm cluster
(``launch``), the exported scorer (``export``), TensorBoard logging (``tblog``) and the benchmarks
(``tools/bench/``, scripts printing ratios measured in the same run)."""

"""Baselines beside PIAD, on the same data, protocols and features (not in the paper).

* ``knn``: DN2's k nearest neighbours on PIAD's VGG-19 relu4_2 features (``--method knn``).

``train.py`` and ``evaluate.py`` reach them with ``--method``; PIAD's own modules never import
them. docs/knn.md describes and measures the k-NN.
"""

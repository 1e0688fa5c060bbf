"""Berg, Ahlberg and Felsberg, *Unsupervised Adversarial Learning of Anomaly Detection in the Wild*
(ECAI 2020): the second system of this repository, beside PIAD at the root.

* ``latent_norm``: their training variant (one critic, a cycle loss for E) and score ‖E(x)‖₂;
* ``pgan``: their progressive GAN's G, D, E (supplement Appendix A, §1);
* ``progressive``: progressive growing as their ``train.py`` (supplement §2);
* ``protocol``: ``--protocol berg``, their ``dataset_tool.py`` splits;
* ``system``: the seam, what a ``--method latent-norm`` run builds (networks, trainer) and evaluates.

``train.py`` and ``evaluate.py`` reach it with ``--method latent-norm``, through ``system`` and the
interface ``latent_norm.Networks``; PIAD's own modules
(``piad``, ``losses``, ``features``, ``weights_policy``) never import it. docs/berg.md and
docs/latent-norm.md describe and measure it.
"""

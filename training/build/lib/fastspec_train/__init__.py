"""fastspec_train: training pipeline of the fastspec CVAE (PyTorch) and the SYNSPEC grid builder.

Kept free of heavy imports (no torch here) so that `fastspec_train.grid` runs where torch is absent.
"""

__version__ = "0.1.0"

"""The evaluation suite: the paper's diagnostics of a model against SYNSPEC, as one call or `fastspec evaluate`.

    from fastspec import Decoder
    from fastspec.evaluate import evaluate
    metrics = evaluate(Decoder.load(), "testset.h5", "report/")

Needs matplotlib (the `plot` extra); the parameter-recovery part needs torch (the `train` extra) and is
skipped, with a note in the report, without it.
"""

from .data import DataError
from .pipeline import evaluate
from .recovery import RecoveryOptions

__all__ = ["evaluate", "DataError", "RecoveryOptions"]

"""The six model labels and their normalisation, taken from the model file format (single source of truth).

`normalise_labels` is the one function training uses to turn physical labels into network input, with the
numbers `fastspec.model_format.Label.normalisation()` writes into the file, so an exported decoder sees
exactly what it was trained on.
"""

from __future__ import annotations

import numpy as np
import torch

from fastspec import model_format as _mf

STANDARD_LABELS = _mf.STANDARD_LABELS
LABEL_NAMES = tuple(label.name for label in STANDARD_LABELS)  # teff, logg, vsini, mh, vmic, resolution
WAVELENGTH = _mf.STANDARD_WAVELENGTH
_OFFSET = np.array([label.normalisation()[0] for label in STANDARD_LABELS], dtype=np.float64)
_SCALE = np.array([label.normalisation()[1] for label in STANDARD_LABELS], dtype=np.float64)
_LOG10 = np.array([label.scaling == "log10" for label in STANDARD_LABELS])
if set(_mf.SCALINGS) != {"linear", "log10"}:
    raise RuntimeError(f"model_format knows scalings {sorted(_mf.SCALINGS)}; normalise_labels handles linear and log10")


def normalise_labels(labels: torch.Tensor) -> torch.Tensor:
    """Physical labels (B, 6) in LABEL_NAMES order -> network input (B, 6) float32, computed in float64:
    x_norm = (s(x) − offset) / scale, s = identity or log10, as in docs/model-format.md."""
    x = torch.as_tensor(labels, dtype=torch.float64)
    if x.ndim != 2 or x.shape[1] != len(LABEL_NAMES):
        raise ValueError(f"labels must have shape (B, {len(LABEL_NAMES)}) in order {LABEL_NAMES}, got {tuple(x.shape)}")
    log_cols = torch.as_tensor(_LOG10, device=x.device)
    x = torch.where(log_cols, torch.log10(x.clamp_min(1e-300)), x)
    off = torch.as_tensor(_OFFSET, device=x.device)
    scale = torch.as_tensor(_SCALE, device=x.device)
    return ((x - off) / scale).to(torch.float32)

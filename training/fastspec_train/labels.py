"""The six model labels and their normalisation, taken from the model file format (single source of truth).

Which of them the network sees depends on the model's target (`model.target` in the config):
`"intrinsic"` networks see (teff, logg, mh, vmic) and learn the spectrum at v sin i = 0, R = ∞, which the
inference core then broadens exactly; `"broadened"` networks (the paper's 6-label CVAE) see all six.

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
BROADENING_LABELS = ("vsini", "resolution")  # applied by the core's broadening stage for intrinsic targets
NETWORK_LABELS = {
    "broadened": LABEL_NAMES,
    "intrinsic": tuple(n for n in LABEL_NAMES if n not in BROADENING_LABELS),  # teff, logg, mh, vmic
}
if set(_mf.SCALINGS) != {"linear", "log10"}:
    raise RuntimeError(f"model_format knows scalings {sorted(_mf.SCALINGS)}; normalise_labels handles linear and log10")


def network_columns(target: str) -> list[int]:
    """Columns of the six physical labels that a network of this target takes, in input order."""
    if target not in NETWORK_LABELS:
        raise ValueError(f"model target must be one of {sorted(NETWORK_LABELS)}, got {target!r}")
    return [LABEL_NAMES.index(n) for n in NETWORK_LABELS[target]]


def normalise_labels(labels: torch.Tensor, target: str = "broadened", box: dict | None = None) -> torch.Tensor:
    """Physical labels (B, 6) in LABEL_NAMES order -> network input (B, 6 or 4) float32, computed in float64:
    x_norm = (s(x) − offset) / scale, s = identity or log10, as in docs/model-format.md; an intrinsic target
    keeps the columns of NETWORK_LABELS["intrinsic"]. box: the label box ({name: [min, max]}, the data file's
    label_box) whose ends map to ±1; None: the paper's (STANDARD_LABELS)."""
    x = torch.as_tensor(labels, dtype=torch.float64)
    if x.ndim != 2 or x.shape[1] != len(LABEL_NAMES):
        raise ValueError(f"labels must have shape (B, {len(LABEL_NAMES)}) in order {LABEL_NAMES}, got {tuple(x.shape)}")
    log_cols = torch.as_tensor(_LOG10, device=x.device)
    x = torch.where(log_cols, torch.log10(x.clamp_min(1e-300)), x)
    offset, scale = (_OFFSET, _SCALE) if box is None else np.array(
        [lab.normalisation() for lab in _mf.boxed_labels(box)], dtype=np.float64).T
    off = torch.as_tensor(offset, device=x.device)
    scale = torch.as_tensor(scale, device=x.device)
    return ((x - off) / scale).to(torch.float32)[:, network_columns(target)]


def network_ranges(box: dict | None, target: str) -> list[tuple]:
    """(name, min, max, scaling) of the labels a network of `target` takes, in the label box `box` (None: the
    paper's): the normalisation its weights are tied to. An intrinsic network never sees v sin i and R, so their
    ranges are not among these."""
    names = NETWORK_LABELS[target]
    return [(lab.name, lab.min, lab.max, lab.scaling) for lab in _mf.boxed_labels(box) if lab.name in names]

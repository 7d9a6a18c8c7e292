"""A small independent reader of model files (docs/model-format.md v1) and a float64 NumPy forward pass.

Training's own check of what it exported (and the fallback of `accuracy` where the C++ core is not built):
it parses the file with `struct` from the specification, not with the writer's code.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_DT = {1: np.dtype("<f4"), 2: np.dtype("<f2"), 3: np.dtype("<u2")}


@dataclass
class FsmModel:
    latent_dim: int
    labels: list[dict]
    layers: list[tuple[np.ndarray, np.ndarray, int]]  # (W float64 (out, in), b float64, activation)
    wavelength_start: float
    wavelength_step: float
    n_pixels: int
    output_scale: float
    output_offset: float
    weight_dtype: int
    provenance: dict

    def normalise(self, labels: np.ndarray) -> np.ndarray:
        x = np.asarray(labels, dtype=np.float64)
        out = np.empty_like(x)
        for j, lab in enumerate(self.labels):
            s = np.log10(x[:, j]) if lab["scaling"] == 2 else x[:, j]
            out[:, j] = (s - lab["offset"]) / lab["scale"]
        return out

    def forward(self, labels: np.ndarray, z: np.ndarray | None = None) -> np.ndarray:
        """Flux (N, n_pixels) in float64 for physical labels (N, n_labels); z defaults to 0."""
        x = self.normalise(np.atleast_2d(labels))
        z = np.zeros((x.shape[0], self.latent_dim)) if z is None else np.asarray(z, dtype=np.float64)
        h = np.concatenate([z, x], axis=1)
        for w, b, act in self.layers:
            h = h @ w.T + b
            h = np.maximum(h, 0.0) if act == 1 else 1.0 / (1.0 + np.exp(-h))
        return self.output_scale * h + self.output_offset


def read_fsm(path: str | Path) -> FsmModel:
    data = Path(path).read_bytes()
    if data[:8] != b"FSPECMDL" or data[-8:-4] != b"FEND":
        raise ValueError(f"{path}: not a fastspec model file (magic/trailer)")
    if struct.unpack("<I", data[-4:])[0] != zlib.crc32(data[:-8]) & 0xFFFFFFFF:
        raise ValueError(f"{path}: CRC-32 mismatch")
    version, hdr, fbytes, n_labels, latent, n_layers, wdt = struct.unpack_from("<IIQIIII", data, 8)
    if version != 1 or fbytes != len(data):
        raise ValueError(f"{path}: format version {version} / size {fbytes} vs {len(data)}")
    wl0, wstep, npix, _medium = struct.unpack_from("<ddII", data, 40)
    _transform, _r, oscale, ooff = struct.unpack_from("<IIdd", data, 64)
    prov_off, prov_len = struct.unpack_from("<QQ", data, 88)
    labels = []
    for i in range(n_labels):
        o = 128 + 80 * i
        name = data[o:o + 16].rstrip(b"\0").decode()
        lo, hi, scaling, _, off, scale = struct.unpack_from("<ddIIdd", data, o + 32)
        labels.append({"name": name, "min": lo, "max": hi, "scaling": scaling, "offset": off, "scale": scale})
    layers = []
    for k in range(n_layers):
        o = 128 + 80 * n_labels + 48 * k
        n_in, n_out, act, _, w_off, w_len, b_off, b_len = struct.unpack_from("<IIIIQQQQ", data, o)
        raw = np.frombuffer(data, dtype=_DT[wdt], count=n_in * n_out, offset=w_off)
        w = (raw.astype(np.uint32) << 16).view(np.float32) if wdt == 3 else raw
        b = np.frombuffer(data, dtype="<f4", count=n_out, offset=b_off)
        layers.append((w.astype(np.float64).reshape(n_out, n_in), b.astype(np.float64), act))
    prov = json.loads(data[prov_off:prov_off + prov_len].decode()) if prov_len else {}
    return FsmModel(latent, labels, layers, wl0, wstep, npix, oscale, ooff, wdt, prov)

"""Writer for the fastspec model file (docs/model-format.md, versions 1 to 3).

Pure NumPy: training imports it to export a decoder, tests use it to make random models. The C++
core is the only reader, so every check of a file's contents lives there.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"FSPECMDL"
TRAILER_MAGIC = b"FEND"
FORMAT_VERSION = 2  # the default for point-sample stages; pixel-mean stages need 3; 1 (no stage, no roles) on request
FORMAT_VERSIONS = (1, 2, 3)
HEADER_BYTES = 128
LABEL_RECORD_BYTES = 80
LAYER_RECORD_BYTES = 48
ALIGN = 64

DTYPES = {"f32": (1, np.dtype("<f4")), "f16": (2, np.dtype("<f2")), "bf16": (3, None)}
SCALINGS = {"linear": 1, "log10": 2}
ACTIVATIONS = {"relu": 1, "sigmoid": 2}
MEDIA = {"air": 1, "vacuum": 2}
ROLES = {"network": 0, "vsini": 1, "resolution": 2}
# header offset 68: what the network's pixels hold, and so which kernels the broadening stage uses
SAMPLINGS = {"point": 1, "pixel_mean": 2}


@dataclass(frozen=True)
class Label:
    name: str
    unit: str
    min: float
    max: float
    scaling: str = "linear"  # "linear" or "log10"
    role: str = "network"  # "network" (a network input), or "vsini" / "resolution" (the broadening stage's)

    def normalisation(self) -> tuple[float, float]:
        """(offset, scale) that map [min, max] onto [-1, 1] after the scaling."""
        lo, hi = (np.log10(self.min), np.log10(self.max)) if self.scaling == "log10" else (self.min, self.max)
        return (lo + hi) / 2.0, (hi - lo) / 2.0


# The labels of every shipped model, in input order.
STANDARD_LABELS = (
    Label("teff", "K", 4000.0, 11000.0),
    Label("logg", "dex", 2.0, 5.0),
    Label("vsini", "km/s", 0.0, 300.0),
    Label("mh", "dex", -1.5, 1.5),
    Label("vmic", "km/s", 0.0, 4.0),
    Label("resolution", "", 1000.0, 115000.0, "log10"),
)

# The same labels for an intrinsic network (teff, logg, mh, vmic in) followed by the exact broadening stage.
INTRINSIC_LABELS = tuple(
    Label(l.name, l.unit, l.min, l.max, l.scaling, l.name if l.name in ("vsini", "resolution") else "network")
    for l in STANDARD_LABELS)


def boxed_labels(box: dict | None, labels: tuple[Label, ...] = STANDARD_LABELS) -> tuple[Label, ...]:
    """`labels` with the ranges of `box` ({name: [min, max]}, e.g. a grid file's `label_box`); the labels it does
    not name keep theirs, None keeps them all (the paper's box)."""
    box = box or {}
    known = {lab.name: lab for lab in labels}
    unknown = sorted(set(box) - set(known))
    if unknown:
        raise ValueError(f"label box names {unknown}; the labels are {list(known)}")
    for name, value in box.items():
        lo, hi = (float(v) for v in value)
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi) or known[name].scaling == "log10" and lo <= 0:
            raise ValueError(f"label box {name} = [{lo:g}, {hi:g}] must be finite and increasing"
                             + (" and > 0 (a log10 label)" if known[name].scaling == "log10" else ""))
    return tuple(Label(lab.name, lab.unit, *(float(v) for v in box[lab.name]), lab.scaling, lab.role)
                 if lab.name in box else lab for lab in labels)


@dataclass(frozen=True)
class EmulatorError:
    """The model's own error, measured on held-out spectra: RMS of (model − truth) per pixel, rms[i, k, p] at
    v sin i = vsini[i] and R = resolution[k] (both increasing)."""

    vsini: np.ndarray
    resolution: np.ndarray
    rms: np.ndarray  # (len(vsini), len(resolution), n_pixels)

    def block(self, n_pixels: int) -> bytes:
        v, r = np.asarray(self.vsini, "<f8"), np.asarray(self.resolution, "<f8")
        rms = np.asarray(self.rms, "<f4")
        if rms.shape != (v.size, r.size, n_pixels):
            raise ValueError(f"emulator error rms must have shape ({v.size}, {r.size}, {n_pixels}), got {rms.shape}")
        return struct.pack("<IIII", v.size, r.size, n_pixels, 0) + v.tobytes() + r.tobytes() + rms.tobytes()


@dataclass(frozen=True)
class BroadeningStage:
    """Rotation (Gray's profile, linear limb darkening epsilon, half-width λ·vsini/c), then a Gaussian of
    FWHM = λ/R, with kernel widths taken at segments + 1 nodes and blended linearly in between. `sampling` says
    what the network's pixels hold: "point" samples (format version 2) or "pixel_mean"s, the flux integrated
    over each pixel (version 3); the stage's kernels are made for that input and return point samples."""

    epsilon: float = 0.6
    segments: int = 8
    sampling: str = "point"

    def __post_init__(self):
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"broadening sampling must be one of {sorted(SAMPLINGS)}, got {self.sampling!r}")


# The spectral grid of the SYNSPEC training data: 4450-5400 A in air, 0.05 A steps.
STANDARD_WAVELENGTH = (4450.0, 0.05, 19000, "air")


@dataclass(frozen=True)
class Layer:
    weight: np.ndarray  # (out, in), the layout of torch.nn.Linear.weight
    bias: np.ndarray  # (out,)
    activation: str  # "relu" for hidden layers, "sigmoid" for the last


def float_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the raw uint16 bits."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype("<u2")


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint32) << np.uint32(16)).view(np.float32)


def quantize(weight: np.ndarray, weight_dtype: str) -> np.ndarray:
    """The float32 values a weight matrix has once stored as `weight_dtype`."""
    w = np.asarray(weight, dtype=np.float32)
    if weight_dtype == "f32":
        return w
    if weight_dtype == "f16":
        return w.astype(np.float16).astype(np.float32)
    if weight_dtype == "bf16":
        return bf16_bits_to_float(float_to_bf16_bits(w))
    raise ValueError(f"unknown weight dtype {weight_dtype!r}; use one of {sorted(DTYPES)}")


def _weight_bytes(weight: np.ndarray, weight_dtype: str) -> bytes:
    if weight_dtype == "bf16":
        return float_to_bf16_bits(weight).tobytes()
    return np.ascontiguousarray(weight, dtype=DTYPES[weight_dtype][1]).tobytes()


def _fixed_ascii(text: str, size: int, what: str) -> bytes:
    raw = text.encode("ascii")
    if len(raw) >= size:
        raise ValueError(f"{what} {text!r} is longer than {size - 1} characters")
    return raw.ljust(size, b"\0")


def _pad_to(buf: bytearray, align: int) -> None:
    buf.extend(b"\0" * (-len(buf) % align))


def model_bytes(
    layers: list[Layer],
    *,
    latent_dim: int,
    labels: tuple[Label, ...] = STANDARD_LABELS,
    weight_dtype: str = "f32",
    wavelength: tuple[float, float, int, str] = STANDARD_WAVELENGTH,
    output_scale: float = 1.0,
    output_offset: float = 0.0,
    provenance: dict | None = None,
    broadening: BroadeningStage | None = None,
    format_version: int = FORMAT_VERSION,
    emulator_error: EmulatorError | None = None,
) -> bytes:
    """Serialise a decoder into the model format. With `broadening`, the labels must name one "vsini" and one
    "resolution" role and the network takes [z, the "network" labels]; format_version 1 allows neither."""
    if weight_dtype not in DTYPES:
        raise ValueError(f"unknown weight dtype {weight_dtype!r}; use one of {sorted(DTYPES)}")
    if format_version not in FORMAT_VERSIONS:
        raise ValueError(f"format_version must be one of {FORMAT_VERSIONS}, got {format_version}")
    roles = [label.role for label in labels]
    if any(r not in ROLES for r in roles):
        raise ValueError(f"label roles must be one of {sorted(ROLES)}, got {roles}")
    if broadening is None and any(r != "network" for r in roles):
        raise ValueError("labels with a vsini/resolution role need a broadening stage")
    if emulator_error is not None and format_version < 2:
        raise ValueError("an emulator-error block needs format version 2")
    if broadening is not None:
        if format_version < 2:
            raise ValueError("a broadening stage needs format version 2")
        if broadening.sampling == "pixel_mean" and format_version < 3:
            raise ValueError("a broadening stage for pixel means needs format version 3")
        if roles.count("vsini") != 1 or roles.count("resolution") != 1:
            raise ValueError(f"a broadening stage needs exactly one vsini and one resolution label, got roles {roles}")
    wl_start, wl_step, n_pixels, medium = wavelength
    expected_in = latent_dim + roles.count("network")
    for k, layer in enumerate(layers):
        w = np.asarray(layer.weight)
        if w.ndim != 2 or w.shape[1] != expected_in or np.shape(layer.bias) != (w.shape[0],):
            raise ValueError(f"layer {k}: weight {w.shape} / bias {np.shape(layer.bias)} do not chain from {expected_in} inputs")
        expected_in = w.shape[0]
    if expected_in != n_pixels:
        raise ValueError(f"last layer has {expected_in} outputs but the grid has {n_pixels} pixels")

    prov = json.dumps(provenance or {}, sort_keys=True, default=str).encode("utf-8")
    tables_end = HEADER_BYTES + LABEL_RECORD_BYTES * len(labels) + LAYER_RECORD_BYTES * len(layers)

    # Place the blocks first so that the layer table can point at them.
    blocks: list[bytes] = []
    placements: list[tuple[int, int, int, int]] = []
    cursor = tables_end + len(prov)
    for layer in layers:
        w = _weight_bytes(layer.weight, weight_dtype)
        b = np.ascontiguousarray(layer.bias, dtype="<f4").tobytes()
        cursor += -cursor % ALIGN
        w_off = cursor
        cursor += len(w)
        cursor += -cursor % ALIGN
        b_off = cursor
        cursor += len(b)
        placements.append((w_off, len(w), b_off, len(b)))
        blocks += [w, b]
    error_offset = 0
    if emulator_error is not None:
        eb = emulator_error.block(n_pixels)
        cursor += -cursor % ALIGN
        error_offset = cursor
        cursor += len(eb)
        blocks.append(eb)
    file_bytes = cursor + -cursor % ALIGN + 8

    buf = bytearray()
    buf += MAGIC
    buf += struct.pack(
        "<IIQIIII",
        format_version, HEADER_BYTES, file_bytes, len(labels), latent_dim, len(layers), DTYPES[weight_dtype][0],
    )
    buf += struct.pack("<ddII", wl_start, wl_step, n_pixels, MEDIA[medium])
    buf += struct.pack("<IIdd", 1, SAMPLINGS[broadening.sampling] if broadening else 0, output_scale, output_offset)
    buf += struct.pack("<QQ", tables_end, len(prov))
    buf += struct.pack("<dI4xQ", broadening.epsilon, broadening.segments, error_offset) if broadening is not None \
        else struct.pack("<16xQ", error_offset)
    for label in labels:
        offset, scale = label.normalisation()
        buf += _fixed_ascii(label.name, 16, "label name") + _fixed_ascii(label.unit, 16, "label unit")
        buf += struct.pack("<ddIIdd8x", label.min, label.max, SCALINGS[label.scaling], ROLES[label.role], offset, scale)
    for layer, (w_off, w_len, b_off, b_len) in zip(layers, placements):
        out_dim, in_dim = np.shape(layer.weight)
        buf += struct.pack("<IIIIQQQQ", in_dim, out_dim, ACTIVATIONS[layer.activation], 0, w_off, w_len, b_off, b_len)
    buf += prov
    for block in blocks:
        _pad_to(buf, ALIGN)
        buf += block
    _pad_to(buf, ALIGN)
    buf += TRAILER_MAGIC + struct.pack("<I", zlib.crc32(bytes(buf)) & 0xFFFFFFFF)
    assert len(buf) == file_bytes
    return bytes(buf)


def write_model(path: str | Path, layers: list[Layer], **kwargs) -> Path:
    """Write a model file atomically (a half-written file is never left under `path`)."""
    path = Path(path)
    data = model_bytes(layers, **kwargs)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def random_decoder(
    widths: list[int],
    *,
    latent_dim: int = 4,
    n_pixels: int = 19000,
    n_labels: int = 6,
    seed: int = 0,
) -> list[Layer]:
    """A decoder with random weights (He-scaled, so activations stay O(1)) for tests and benchmarks."""
    rng = np.random.default_rng(seed)
    dims = [latent_dim + n_labels, *widths, n_pixels]
    layers = []
    for k in range(len(dims) - 1):
        w = rng.normal(0.0, np.sqrt(2.0 / dims[k]), size=(dims[k + 1], dims[k])).astype(np.float32)
        b = rng.normal(0.0, 0.1, size=dims[k + 1]).astype(np.float32)
        layers.append(Layer(w, b, "sigmoid" if k == len(dims) - 2 else "relu"))
    return layers

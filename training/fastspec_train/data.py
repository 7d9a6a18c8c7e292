"""Reading the SYNSPEC HDF5 grids (layout of ../shared/README.md), the leak-free split, and epoch plans.

* `SpectraFile` opens any file of that layout (the path is a parameter; v1, v2 … are all the same):
  labels and attributes are read at once, flux lazily, by rows. `open_spectra` joins several such files
  (e.g. the shared grid plus spectra of your own `fastspec-grid build`) into one row space.
* `split_indices` assigns every spectrum to train/val/test from a hash of its four stellar labels: identical
  (teff, logg, mh, vmic) rows always land in the same split (no leakage through duplicates), the result
  does not depend on row order, and a spectrum keeps its split when a later file version adds rows.
* `FluxSource` serves rows of flux: from memory when the rows fit under a memory limit, else streamed
  from the file in blocks (so grids larger than memory train).
* `epoch_plan` draws, from (seed, epoch) alone, the order of the samples, their (v sin i, R) and the
  reparameterisation noise: the same on every DDP rank and after a resume, hence exact restarts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from fastspec.model_format import SAMPLINGS, boxed_labels

FILE_LABELS = ("teff", "logg", "mh", "vmic")


def _names(attr) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in attr]


class SpectraFile:
    """An intrinsic-spectra HDF5 file: `flux` (N, n_pixels), `labels` (N, 4) with attr names, wavelength attrs."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"training data {self.path} not found")
        with h5py.File(self.path, "r") as f:
            for key in ("flux", "labels"):
                if key not in f:
                    raise ValueError(f"{self.path}: dataset {key!r} missing (see shared/README.md for the layout)")
            names = _names(f["labels"].attrs.get("names", []))
            missing = [n for n in FILE_LABELS if n not in names]
            if missing:
                raise ValueError(f"{self.path}: labels attr 'names' = {names} lacks {missing}")
            labels = f["labels"][...].astype(np.float64)
            self.labels = labels[:, [names.index(n) for n in FILE_LABELS]]  # columns teff, logg, mh, vmic
            self.n, self.n_pixels = f["flux"].shape
            if self.labels.shape[0] != self.n:
                raise ValueError(f"{self.path}: {self.labels.shape[0]} label rows but {self.n} flux rows")
            # A file of `fastspec-grid build` marks finished rows in `done`; rows not (yet) computed hold no
            # spectrum and are left out (rows count the finished ones only).
            self._file_rows = None
            if "done" in f:
                done = f["done"][...].astype(bool)
                if done.shape != (self.n,):
                    raise ValueError(f"{self.path}: 'done' has shape {done.shape}, expected ({self.n},)")
                if not done.all():
                    self._file_rows = np.flatnonzero(done)
                    self.labels, self.n = self.labels[self._file_rows], int(done.sum())
            try:
                self.wavelength_start = float(f.attrs["wavelength_start"])
                self.wavelength_step = float(f.attrs["wavelength_step"])
                self.wavelength_medium = str(f.attrs.get("wavelength_medium", "air"))
            except KeyError as exc:
                raise ValueError(f"{self.path}: file attribute {exc} missing") from None
            # what the pixels hold: files without the attribute (the shared v1/v2 sets) are point samples
            self.sampling = str(f.attrs.get("sampling", "point"))
            if self.sampling not in SAMPLINGS:
                raise ValueError(f"{self.path}: attr sampling = {self.sampling!r} is unknown (expected one of {sorted(SAMPLINGS)})")
            broadening = str(f.attrs.get("broadening", "none"))
            if not broadening.startswith("none"):
                raise ValueError(f"{self.path}: holds broadened spectra (attr broadening = {broadening!r}); training "
                                 "takes intrinsic spectra (fastspec-grid build without --broaden)")
            # the label box the spectra were drawn in, {name: [min, max]} as JSON (none: the paper's box): training
            # normalises with it and the model file carries it
            box = f.attrs.get("label_box")
            self.label_box = json.loads(box) if box is not None else None
            if int(f.attrs.get("n_pixels", self.n_pixels)) != self.n_pixels:
                raise ValueError(f"{self.path}: attr n_pixels disagrees with flux shape {self.n_pixels}")
            # `fastspec-grid build --fine-step`: the same spectra on a fine mesh, the reference's input
            self.fine_wavelength = None
            self.fine_sampling = str(f.attrs.get("fine_sampling", "point"))  # builder: "pixel_mean" (cell means)
            if "flux_fine" in f:
                fine = f["flux_fine"]
                try:
                    start, step = float(f.attrs["fine_wavelength_start"]), float(f.attrs["fine_wavelength_step"])
                except KeyError as exc:
                    raise ValueError(f"{self.path}: has flux_fine but no attribute {exc}") from None
                if fine.shape[0] != f["flux"].shape[0]:
                    raise ValueError(f"{self.path}: flux_fine has {fine.shape[0]} rows, flux {f['flux'].shape[0]}")
                self.fine_wavelength = start + step * np.arange(fine.shape[1])
                lo, hi = self.wavelength_start - self.wavelength_step / 2, self.wavelength_start + self.wavelength_step * (self.n_pixels - 0.5)
                if not (self.fine_wavelength[0] <= lo + 1e-9 and self.fine_wavelength[-1] >= hi - 1e-9):
                    raise ValueError(f"{self.path}: the fine mesh {self.fine_wavelength[0]:.3f}-{self.fine_wavelength[-1]:.3f} Å "
                                     f"does not contain the output grid's pixels {lo:.3f}-{hi:.3f} Å")
        if not np.isfinite(self.labels).all():
            raise ValueError(f"{self.path}: labels contain non-finite values")
        if self.label_box is not None:
            try:
                box = {lab.name: lab for lab in boxed_labels(self.label_box)}
            except ValueError as exc:
                raise ValueError(f"{self.path}: attr label_box: {exc}") from None
            for j, name in enumerate(FILE_LABELS):
                lo, hi = box[name].min, box[name].max
                outside = (self.labels[:, j] < lo) | (self.labels[:, j] > hi)
                if outside.any():
                    raise ValueError(f"{self.path}: row {int(np.argmax(outside))} has {name} = "
                                     f"{self.labels[outside, j][0]:g}, outside the file's label_box [{lo:g}, {hi:g}]")
        self._h5 = None

    @property
    def wavelength(self) -> np.ndarray:
        return self.wavelength_start + self.wavelength_step * np.arange(self.n_pixels)

    @property
    def grid(self) -> tuple:
        """(wavelength_start, wavelength_step, n_pixels, wavelength_medium): files to be joined must agree."""
        return self.wavelength_start, self.wavelength_step, self.n_pixels, self.wavelength_medium

    @property
    def paths(self) -> list[Path]:
        return [self.path]

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Flux rows (any order, repeats allowed) as float32 (len(rows), n_pixels)."""
        return self._read("flux", rows, self.n_pixels)

    def read_fine(self, rows: np.ndarray) -> np.ndarray:
        """The same rows on the fine mesh (fine_wavelength), float32; the file must have one."""
        if self.fine_wavelength is None:
            raise ValueError(f"{self.path} has no fine mesh (build it with fastspec-grid build --fine-step 0.005)")
        return self._read("flux_fine", rows, self.fine_wavelength.size)

    def _read(self, name: str, rows: np.ndarray, width: int) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"rows outside 0..{self.n - 1}")
        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        if self._file_rows is not None:
            rows = self._file_rows[rows]
        uniq, inverse = np.unique(rows, return_inverse=True)  # h5py wants increasing indices
        block = self._h5[name][uniq] if uniq.size else np.empty((0, width), np.float32)
        return np.asarray(block, dtype=np.float32)[inverse]

    def close(self):
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __getstate__(self):  # picklable (h5py handles are not)
        state = dict(self.__dict__)
        state["_h5"] = None
        return state


class JoinedSpectra:
    """Several SpectraFiles on one wavelength grid, read as one: rows of the first file, then the second, ...

    `path` is the first (primary) file's: the evaluation split and the provenance's `training_data` refer to
    it; `paths` lists all of them."""

    def __init__(self, files: list[SpectraFile]):
        first = files[0]
        for sf in files[1:]:
            if sf.grid != first.grid:
                raise ValueError(f"{sf.path}: wavelength grid {sf.grid} differs from {first.path}'s {first.grid}")
            if sf.label_box != first.label_box:
                raise ValueError(f"{sf.path}: label box {sf.label_box} differs from {first.path}'s {first.label_box} "
                                 "(none: the paper's): a model is normalised in one box")
            if sf.sampling != first.sampling:
                raise ValueError(f"{sf.path} holds {sf.sampling} spectra but {first.path} holds {first.sampling} "
                                 "ones: a model learns one kind (fastspec-grid build --sampling)")
        self.files = files
        self.path, self.paths = first.path, [sf.path for sf in files]
        self.wavelength_start, self.wavelength_step = first.wavelength_start, first.wavelength_step
        self.n_pixels, self.wavelength_medium, self.sampling = first.n_pixels, first.wavelength_medium, first.sampling
        self.label_box = first.label_box
        self.labels = np.concatenate([sf.labels for sf in files])
        self.n = self.labels.shape[0]
        self._offsets = np.cumsum([0] + [sf.n for sf in files])

    wavelength, grid = SpectraFile.wavelength, SpectraFile.grid

    def read(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"rows outside 0..{self.n - 1}")
        out = np.empty((rows.size, self.n_pixels), np.float32)
        which = np.searchsorted(self._offsets, rows, side="right") - 1
        for k, sf in enumerate(self.files):
            sel = which == k
            if sel.any():
                out[sel] = sf.read(rows[sel] - self._offsets[k])
        return out

    def close(self):
        for sf in self.files:
            sf.close()


def open_spectra(paths) -> SpectraFile | JoinedSpectra:
    """One path: its SpectraFile. Several: their rows joined in order (the first is the primary file)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("no training data file given")
    files = [SpectraFile(p) for p in paths]
    return files[0] if len(files) == 1 else JoinedSpectra(files)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """The file's SHA-256, computed once per process for a file of one size and modification time (accuracy's
    unseen-split check and its report hashed a several-GB grid twice)."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, chunk)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _label_hash_unit(row: np.ndarray, seed: int) -> float:
    """A number in [0, 1) from the exact float64 labels and the seed (SHA-256; platform independent)."""
    digest = hashlib.sha256(np.asarray(row, dtype="<f8").tobytes() + int(seed).to_bytes(8, "little")).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """{'train','val','test'} -> sorted row indices. Rows with identical labels share a split."""
    u = np.array([_label_hash_unit(row, seed) for row in np.asarray(labels, dtype=np.float64)])
    test = u < test_fraction
    val = (u >= test_fraction) & (u < test_fraction + val_fraction)
    train = ~(test | val)
    return {"train": np.flatnonzero(train), "val": np.flatnonzero(val), "test": np.flatnonzero(test)}


def split_rows(sf, val_fraction: float, test_fraction: float, seed: int, max_spectra: int = 0) -> dict[str, np.ndarray]:
    """{'train','val','test'} -> rows of sf by the label hash (of its first max_spectra rows only, when > 0): the
    split training uses, and the one the evaluation recomputes from a model's provenance."""
    rows = np.arange(sf.n)
    if max_spectra:
        rows = rows[:max_spectra]
    return {k: rows[v] for k, v in split_indices(sf.labels[rows], val_fraction, test_fraction, seed).items()}


class FluxSource:
    """Rows of flux for a fixed set of file rows: in memory if they fit under `memory_limit_mb`, else read
    from the file on demand (callers ask for whole blocks so the file is read in large sorted chunks)."""

    def __init__(self, sf: SpectraFile, rows: np.ndarray, memory_limit_mb: float):
        self.sf = sf
        self.rows = np.asarray(rows, dtype=np.int64)
        need_mb = self.rows.size * sf.n_pixels * 4 / 2**20
        self.in_memory = need_mb <= memory_limit_mb
        self._flux = sf.read(self.rows) if self.in_memory else None

    def get(self, local: np.ndarray) -> np.ndarray:
        """Flux for positions `local` into `rows`."""
        local = np.asarray(local, dtype=np.int64)
        if self.in_memory:
            return self._flux[local]
        return self.sf.read(self.rows[local])


@dataclass
class Plan:
    """One epoch's samples: positions into the split's rows, their v sin i, R and noise eps (n, latent)."""

    local: np.ndarray
    vsini: np.ndarray
    resolution: np.ndarray
    eps: np.ndarray


def draw_broadening(rng: np.random.Generator, n: int, sampling) -> tuple[np.ndarray, np.ndarray]:
    """(vsini, R) draws: v sin i is a mixture (vsini_low_fraction uniform on [0, vsini_low_max], the rest
    uniform on [0, vsini_max]); R is log-uniform in [resolution_min, resolution_max]."""
    low = rng.random(n) < sampling.vsini_low_fraction
    vsini = rng.random(n) * np.where(low, sampling.vsini_low_max, sampling.vsini_max)
    lr0, lr1 = math.log10(sampling.resolution_min), math.log10(sampling.resolution_max)
    resolution = 10.0 ** (lr0 + (lr1 - lr0) * rng.random(n))
    return vsini, np.minimum(resolution, sampling.resolution_max)


def epoch_plan(n_rows: int, draws: int, batch_size: int, latent: int, sampling, seed: int, epoch: int) -> Plan:
    """Shuffled samples (each row `draws` times), padded to whole batches by wrapping around."""
    rng = np.random.default_rng([seed, epoch, 1])
    local = rng.permutation(np.repeat(np.arange(n_rows), draws))
    n = math.ceil(local.size / batch_size) * batch_size
    local = np.resize(local, n)  # np.resize repeats from the start
    vsini, resolution = draw_broadening(rng, n, sampling)
    eps = rng.standard_normal((n, latent)).astype(np.float32)
    return Plan(local, vsini, resolution, eps)


def fixed_plan(n_rows: int, draws: int, latent: int, sampling, seed: int) -> Plan:
    """Validation/test: every row `draws` times in order, with seeded (v sin i, R) that never change."""
    rng = np.random.default_rng([seed, 2**31 - 1, 2])
    local = np.repeat(np.arange(n_rows), draws)
    vsini, resolution = draw_broadening(rng, local.size, sampling)
    return Plan(local, vsini, resolution, np.zeros((local.size, latent), np.float32))


def physical_labels(file_labels: np.ndarray, vsini: np.ndarray, resolution: np.ndarray) -> np.ndarray:
    """(n, 6) labels in model order teff, logg, vsini, mh, vmic, resolution from file labels (n, 4)."""
    fl = np.asarray(file_labels, dtype=np.float64)
    return np.column_stack([fl[:, 0], fl[:, 1], vsini, fl[:, 2], fl[:, 3], resolution])

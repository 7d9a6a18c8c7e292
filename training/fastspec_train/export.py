"""Export the decoder of a trained CVAE to the flat model file of the C++ core (docs/model-format.md).

Only the decoder travels: its Linear layers (ReLU hidden, sigmoid last), the output transform the model
used in training (flux = output_scale·sigmoid(a) + output_offset), the six standard labels with the
normalisation training used (fastspec.model_format.STANDARD_LABELS), the wavelength grid of the training
data, and provenance (data file + SHA-256, config, epochs, validation loss, git revision, versions).
An intrinsic decoder (4 network labels) is written with the broadening stage (format version 2): the core
applies v sin i and R exactly, with the epsilon and segments of the training config.
"""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
from pathlib import Path

import numpy as np
import torch

from fastspec import model_format as mf
from .broadening import C_KMS, EPSILON
from .config import from_dict
from .labels import LABEL_NAMES, NETWORK_LABELS, STANDARD_LABELS, network_ranges
from .model import Decoder


def git_revision(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def decoder_layers(decoder: Decoder) -> list:
    n = len(decoder.layers)
    return [mf.Layer(layer.weight.detach().cpu().numpy().astype(np.float32),
                     layer.bias.detach().cpu().numpy().astype(np.float32),
                     "sigmoid" if k == n - 1 else "relu") for k, layer in enumerate(decoder.layers)]


# The fewest held-out stars a spread over stars is taken from without a warning: from n stars an RMS is uncertain by
# about 1/sqrt(2n) of itself (22 % at 10) and a MAD by about 1.2/sqrt(n) (37 % at 10); from one star the MAD is 0.
MIN_SPREAD_STARS = 10


class FewStarsWarning(UserWarning):
    """The emulator error or the label systematics come from fewer than MIN_SPREAD_STARS held-out stars."""


def _few_stars(n: int, what: str, split: str) -> str | None:
    """A warning (issued and returned) when `what` is taken from fewer than MIN_SPREAD_STARS stars, else None."""
    if n >= MIN_SPREAD_STARS:
        return None
    import warnings

    text = (f"{what} from {n} {split} star(s), fewer than {MIN_SPREAD_STARS}: a spread over so few stars is mostly "
            "noise (more stars: a larger grid or data.val_fraction, --emulator-error-stars of 10 or more)")
    warnings.warn(text, FewStarsWarning, stacklevel=3)
    return text


# Where the emulator error is measured: v sin i and R nodes spanning the label ranges (denser where the
# spectra change fastest, at small v sin i and high R).
ERROR_VSINI_NODES = (0.0, 5.0, 15.0, 40.0, 100.0, 200.0, 300.0)
ERROR_RESOLUTION_NODES = (1000.0, 3000.0, 10000.0, 30000.0, 60000.0, 115000.0)


def error_nodes(box: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (v sin i, R) nodes of the emulator error for a model's label box ({label: (min, max)}): the box's ends and
    the ERROR_*_NODES strictly inside it (the paper's box: exactly those). Nodes outside the box would ask the model
    for labels it refuses."""
    def inside(nodes, lo, hi):
        return tuple(sorted({float(lo), float(hi), *(v for v in nodes if lo < v < hi)}))

    return inside(ERROR_VSINI_NODES, *box["vsini"]), inside(ERROR_RESOLUTION_NODES, *box["resolution"])


def measure_emulator_error(model_path: str | Path, data: str | Path | None = None, split: str = "val",
                           vsini_nodes=None, resolution_nodes=None,
                           max_stars: int | None = None) -> mf.EmulatorError:
    """RMS over the held-out stars of (model at z = 0 − SYNSPEC broadened in float64) per pixel, at every
    (v sin i, R) node (None: error_nodes of the model's label box): the block `fit(model_error=True)` adds to the
    variance. Uses the validation split by default (the test split stays for checking the uncertainties it leads
    to). max_stars: an evenly spaced subset of the split (a fine-mesh truth costs ~1 s a spectrum and node: 42 nodes
    x 110 stars is over an hour)."""
    from fastspec import _core

    from .accuracy import _split_rows, broadened_truth, model_box

    box_vsini, box_resolution = error_nodes(model_box(model_path))
    vsini_nodes = box_vsini if vsini_nodes is None else vsini_nodes
    resolution_nodes = box_resolution if resolution_nodes is None else resolution_nodes
    sf, rows, _ = _split_rows(Path(model_path), data, split)
    if max_stars is not None and max_stars < 1:
        raise ValueError(f"max_stars must be >= 1, got {max_stars}")
    if max_stars is not None and max_stars < rows.size:
        rows = rows[np.linspace(0, rows.size - 1, max_stars).round().astype(int)]
    if rows.size == 0:
        raise ValueError(f"{sf.path}: the {split} split is empty: no star to measure the emulator error on")
    _few_stars(rows.size, "the emulator error (an RMS per pixel) is measured", split)
    model = _core.Model.load(str(model_path))
    dec = _core.Decoder(model)
    file_labels = sf.labels[rows]
    rms = np.zeros((len(vsini_nodes), len(resolution_nodes), sf.n_pixels))
    for i, v in enumerate(vsini_nodes):
        for k, r in enumerate(resolution_nodes):
            n = rows.size
            truth = broadened_truth(sf, rows, np.full(n, v), np.full(n, r), stage=model.broadening)[0]
            labels = np.column_stack([file_labels[:, 0], file_labels[:, 1], np.full(n, v), file_labels[:, 2],
                                      file_labels[:, 3], np.full(n, r)])
            rms[i, k] = np.sqrt(((dec.forward(labels) - truth) ** 2).mean(axis=0))
    return mf.EmulatorError(np.array(vsini_nodes), np.array(resolution_nodes), rms.astype(np.float32))


SYSTEMATICS_RV_BOUNDS = (-50.0, 50.0)  # km/s: the RV range the noise-free fits may use


def systematics_margin(wavelength_end: float, rv_bounds=SYSTEMATICS_RV_BOUNDS, vsini_max: float = 300.0) -> float:
    """Å left out at each end of the grid in the label-systematics fits: as far as the fastest rotation of the
    label box (vsini_max, the model's) and the RV bound move flux at the red end (6.3 Å on the standard grid: 127 of its 0.05 Å pixels).
    So the fitter trims nothing at any allowed RV, and the rotational wing of a line beyond the grid (in the
    truth's fine mesh, not in the model) stays out; the Gaussian's far wing at the lowest R (14 Å at R = 1000) is
    left in: both sides extend the edge values there."""
    return wavelength_end * (vsini_max + max(abs(v) for v in rv_bounds)) / C_KMS


def measure_label_systematics(model_path: str | Path, data: str | Path | None = None, split: str = "val",
                              n_stars: int = 80, seed: int = 5) -> dict:
    """What the emulator's error does to fitted labels: noise-free held-out spectra (broadened at stratified v sin i,
    R; RV and a quadratic continuum free, as `fastspec.fit` runs by default) are fitted, and the robust spread
    (1.4826 MAD) of fit − truth per label is returned ({label: σ}, R in dex of R as 'resolution_dex'). The pixel
    errors of the emulator are correlated (a star's residual pattern is fixed), so they do not average down
    over pixels as noise does: `fit(model_error=True)` adds these σ in quadrature to its uncertainties. From fewer
    than MIN_SPREAD_STARS stars no σ is given (the MAD of one star is 0), only n_stars and a warning (also issued)."""
    import warnings

    import fastspec

    from .accuracy import broadened_test_set, model_box

    sf, rows, labels, truth, *_ = broadened_test_set(Path(model_path), data, draws=1, seed=seed, split=split,
                                                     max_stars=n_stars)
    margin = systematics_margin(float(sf.wavelength[-1]), vsini_max=model_box(model_path)["vsini"][1])
    trim = int(np.ceil(margin / sf.wavelength_step - 1e-9))
    out = {"n_stars": len(rows), "split": split, "method": "1.4826 MAD of fit - truth, noise-free held-out spectra",
           "margin_angstrom": round(margin, 3)}
    warning = _few_stars(len(rows), "the label systematics are left out (fit adds none): they would be measured", split)
    if warning:
        return {**out, "warning": warning}
    if 2 * trim >= sf.n_pixels:
        raise ValueError(f"{sf.path}: a margin of {margin:.2f} Å ({trim} pixels) at each end for the label systematics "
                         f"leaves none of the grid's {sf.n_pixels} pixels to fit")
    dec = fastspec.Decoder.load(model_path)
    wl = sf.wavelength[trim:-trim]
    deltas = []
    for i in range(len(rows)):  # one draw a star: row i is star i
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = fastspec.fit(wl, truth[i, trim:-trim], 1e-3, dec, rv_bounds=SYSTEMATICS_RV_BOUNDS, model_error=False,
                              seed=i)
        got = np.array([r.labels[n] for n in LABEL_NAMES])
        d = got - labels[i]
        d[LABEL_NAMES.index("resolution")] = np.log10(got[-1]) - np.log10(labels[i, -1])
        deltas.append(d)
    deltas = np.array(deltas)
    sig = 1.4826 * np.median(np.abs(deltas - np.median(deltas, axis=0)), axis=0)
    sigmas = {n: float(v) for n, v in zip(LABEL_NAMES, sig)}
    sigmas["resolution_dex"] = sigmas.pop("resolution")
    return {**sigmas, **out}


def export_decoder(decoder: Decoder, path: str | Path, *, weight_dtype: str = "f32",
                   wavelength: tuple[float, float, int, str] | None = None, provenance: dict | None = None,
                   epsilon: float = EPSILON, segments: int = 8, emulator_error: mf.EmulatorError | None = None,
                   sampling: str = "point", label_box: dict | None = None) -> Path:
    """Write `decoder` as a model file. The decoder takes [z, 6 standard labels] (the paper's CVAE, format
    version 1) or [z, teff, logg, mh, vmic] (an intrinsic decoder: version 2 with the broadening stage, or 3 when it
    learnt pixel means, `sampling`). label_box: the box training normalised in (the data file's; None: the paper's),
    written as the labels' ranges."""
    n_pixels = decoder.layers[-1].out_features
    n_in = decoder.layers[0].in_features - decoder.latent
    targets = {len(names): t for t, names in NETWORK_LABELS.items()}
    if n_in not in targets:
        raise ValueError(f"decoder takes {decoder.layers[0].in_features} inputs, expected latent {decoder.latent} + "
                         f"{' or '.join(str(k) for k in sorted(targets))} labels")
    intrinsic = targets[n_in] == "intrinsic"
    if wavelength is None:
        wavelength = mf.STANDARD_WAVELENGTH
    if wavelength[2] != n_pixels:
        raise ValueError(f"decoder has {n_pixels} outputs but the wavelength grid has {wavelength[2]} pixels")
    prov = {"labels": list(LABEL_NAMES), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__, "git_revision": git_revision(),
            "broadening": (f"rotation (Gray profile, linear limb darkening eps={epsilon}, half-width lambda*vsini/c) "
                           "then Gaussian FWHM = lambda/R, on the native grid: "
                           + ("the model file's broadening stage, applied by the core" if intrinsic else
                              "learnt by the network from draws broadened by fastspec_train.broadening")),
            **(provenance or {})}
    # the training data's sampling matters to the stage only: a broadened decoder outputs the broadened spectrum
    stage = mf.BroadeningStage(epsilon=epsilon, segments=segments, sampling=sampling) if intrinsic else None
    version = 3 if intrinsic and sampling == "pixel_mean" else 2 if intrinsic or emulator_error is not None else 1
    return mf.write_model(path, decoder_layers(decoder), latent_dim=decoder.latent,
                          labels=mf.boxed_labels(label_box, mf.INTRINSIC_LABELS if intrinsic else STANDARD_LABELS),
                          weight_dtype=weight_dtype,
                          wavelength=tuple(wavelength), output_scale=decoder.output_scale,
                          output_offset=decoder.output_offset, provenance=prov, broadening=stage,
                          format_version=version,
                          emulator_error=emulator_error)


def load_model_file_weights(decoder: Decoder, path: str | Path, grid: tuple | None = None,
                            label_box: dict | None = None) -> None:
    """Copy the weights of a model file into `decoder` (the inverse of export): a warm start from a shipped model
    whose training checkpoint is gone. The file must hold the same architecture, latent size, network labels with
    the same normalisation (the ranges of the data's label box `label_box`; None: the paper's), output transform and
    pixel count; f16/bf16 weights arrive as the core widens them. An intrinsic network's v sin i and R ranges may
    differ: the broadening stage applies them, the network never sees them."""
    from fastspec import _core

    path = Path(path)
    m = _core.Model.load(str(path))
    n_in = decoder.layers[0].in_features - decoder.latent
    target = "intrinsic" if n_in == len(NETWORK_LABELS["intrinsic"]) else "broadened"
    have = [(l["name"], l["min"], l["max"], l["scaling"]) for l in m.labels if l["name"] in NETWORK_LABELS[target]]
    want = network_ranges(label_box, target)
    shapes = [(l.out_features, l.in_features) for l in decoder.layers]
    file_shapes = [(l["out"], l["in"]) for l in m.layers]
    problems = []
    if file_shapes != shapes:
        problems.append(f"layers {file_shapes}, the config's decoder {shapes}")
    if m.latent_dim != decoder.latent:
        problems.append(f"latent {m.latent_dim}, the config's {decoder.latent}")
    if have != want:
        problems.append(f"network label ranges {have}, the data's label box gives {want} (its weights were "
                        "normalised in other ranges)")
    if (m.output_scale, m.output_offset) != (decoder.output_scale, decoder.output_offset):
        problems.append(f"output transform {m.output_scale}*sigmoid+{m.output_offset}, the config's "
                        f"{decoder.output_scale}*sigmoid+{decoder.output_offset}")
    if grid is not None and not np.allclose((m.wavelength_start, m.wavelength_step), grid[:2]):
        problems.append(f"wavelengths from {m.wavelength_start} A in steps of {m.wavelength_step}, the data's from "
                        f"{grid[0]} in {grid[1]}")
    if problems:
        raise ValueError(f"train.init_from {path}: cannot start from this model file: " + "; ".join(problems))
    with torch.no_grad():
        for layer, (w, b) in zip(decoder.layers, m.weights()):
            layer.weight.copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)))
            layer.bias.copy_(torch.from_numpy(np.asarray(b, dtype=np.float32)))


def load_run_decoder(run: str | Path, which: str = "best") -> tuple[Decoder, dict, dict]:
    """(decoder, config dict, checkpoint state) of a run folder."""
    run = Path(run)
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    weights = ckpt["model"] if which == "last" else torch.load(run / "best.pt", map_location="cpu", weights_only=False)["model"]
    cfg = from_dict(ckpt["config"])
    n_pixels = weights["decoder.layers.%d.weight" % (len(cfg.model.decoder))].shape[0]
    dec = Decoder(cfg.model.latent, len(NETWORK_LABELS[cfg.model.target]), cfg.model.decoder, n_pixels,
                  cfg.model.output_scale, cfg.model.output_offset)
    dec.load_state_dict({k[len("decoder."):]: v for k, v in weights.items() if k.startswith("decoder.")})
    return dec.eval(), ckpt["config"], ckpt


def grid_recipe(path: str | Path) -> dict:
    """How a grid-builder file was made, for a model's provenance: its builder settings (seed, damping, sampling,
    fine mesh, ...) and which rows were done, so that the same command (`--n` covering those rows) remakes the data.
    Empty for files the builder did not write (the shared sets)."""
    import h5py

    with h5py.File(path, "r") as f:
        if "builder_config" not in f.attrs or "done" not in f:
            return {}
        done = np.flatnonzero(f["done"][...])
        rows = (f"{done[0]}-{done[-1]}" if done.size and done[-1] - done[0] + 1 == done.size
                else f"{done.size} rows, not contiguous")
        return {"builder_config": json.loads(f.attrs["builder_config"]), "rows_done": rows}


def export_run(run: str | Path, out: str | Path, *, weight_dtype: str = "f32", which: str = "best",
               emulator_error: bool = False, emulator_error_stars: int | None = None) -> Path:
    """Export a run's decoder; with emulator_error, measure its error on the validation split (as exported, in
    its dtype) and write the file again with that block."""
    from .data import SpectraFile, sha256_file, split_rows

    run = Path(run)
    dec, cfg, ckpt = load_run_decoder(run, which)
    state = ckpt["state"]
    data_path = Path(ckpt["data"])
    sf = SpectraFile(data_path)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    sha = summary.get("data_sha256") or sha256_file(data_path)
    best_epoch = state["best_epoch"] if which == "best" else state["epoch"]
    hist = {h["epoch"]: h for h in state["history"]}
    d = cfg["data"]
    primary_sizes = {k: int(v.size) for k, v in
                     split_rows(sf, d["val_fraction"], d["test_fraction"], d["split_seed"], d["max_spectra"]).items()}
    extra = summary.get("extra_data") or [{"path": p, "sha256": None} for p in ckpt.get("extra_data", [])]
    init_from = cfg["train"].get("init_from") or ""
    # absolute paths, so that accuracy and testset find the files from any folder (as given to training: the rest)
    as_given = {"path_as_given": str(data_path)} if not data_path.is_absolute() else {}
    prov = {"training_data": {"path": str(data_path.resolve()), **as_given, "sha256": sha, "n_spectra": sf.n,
                              **grid_recipe(data_path)},
            "split": {"val_fraction": cfg["data"]["val_fraction"], "test_fraction": cfg["data"]["test_fraction"],
                      "split_seed": cfg["data"]["split_seed"], "max_spectra": cfg["data"]["max_spectra"],
                      "sizes": primary_sizes,  # of the primary file: what accuracy/emulator error recompute
                      **({"sizes_with_extra_data": ckpt.get("split_sizes")} if extra else {})},
            # the other files' rows (n counted now: a file still being built may have grown since training)
            "extra_training_data": [{"path": str(Path(e["path"]).resolve()), "sha256": e["sha256"] or sha256_file(e["path"]),
                                     "n_spectra": SpectraFile(e["path"]).n, **grid_recipe(e["path"])} for e in extra],
            **({"init_from": {"path": init_from, "sha256": sha256_file(init_from) if Path(init_from).is_file() else None}}
               if init_from else {}),
            "config": cfg, "epochs": state["epoch"], "weights_epoch": best_epoch, "weights": which,
            "val_reconstruction_mse": hist.get(best_epoch, {}).get("val_mse"),
            "val_reconstruction_mse_z0": hist.get(best_epoch, {}).get("val_mse_z0"),
            "val_mae_z0": hist.get(best_epoch, {}).get("val_mae_z0"),
            "training_seconds": state.get("elapsed_s"), "weight_dtype": weight_dtype}
    try:
        from importlib.metadata import version
        prov["fastspec_version"] = version("fastspec")
    except Exception:
        prov["fastspec_version"] = "unknown"
    if sf.label_box is not None:
        prov["label_box"] = sf.label_box
    kw = dict(weight_dtype=weight_dtype, wavelength=sf.grid, epsilon=cfg["broadening"]["epsilon"],
              segments=cfg["broadening"]["segments"], sampling=sf.sampling, label_box=sf.label_box)
    path = export_decoder(dec, out, provenance=prov, **kw)
    if emulator_error:
        err = measure_emulator_error(path, max_stars=emulator_error_stars)
        n_err = min(primary_sizes["val"], emulator_error_stars or 10**9)
        prov["emulator_error"] = {"split": "val", "n_stars": n_err,
                                  "vsini_nodes": err.vsini.tolist(), "resolution_nodes": err.resolution.tolist(),
                                  "median_rms": float(np.median(err.rms))}
        if n_err < MIN_SPREAD_STARS:
            prov["emulator_error"]["warning"] = (f"an RMS over {n_err} stars, fewer than {MIN_SPREAD_STARS}: "
                                                 "mostly noise")
        prov["label_systematics"] = measure_label_systematics(path)
        path = export_decoder(dec, out, provenance=prov, emulator_error=err, **kw)
    return path

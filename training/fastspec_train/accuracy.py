"""Held-out accuracy of an exported model, and the broadened held-out test set for `fastspec evaluate`.

The test split is recomputed from the split settings in the model file's provenance (hash of the stellar
labels, so it is the split training used and never saw). Every test spectrum gets `draws` (v sin i, R)
pairs, seeded and stratified (Latin hypercube over the draws of one spectrum: v sin i uniform on
[0, 300] km/s, R log-uniform on [1000, 115000]), so both ranges are covered evenly. The truth: when the data file
has a fine mesh (`fastspec-grid build --fine-step`, `fastspec-grid from-fine`), that mesh broadened by the float64
reference (`fastspec_train.grid.reference`: exact in ln λ) and sampled at the pixel centres — SYNSPEC on its own
terms; otherwise the file's spectra through `fastspec_train.broadening` in float64, the model's own operator (a
consistency check, not correctness; reports say which). With a fine mesh the "perfect decoder" — the file's own
pixels through the model's broadening stage — is scored too: the floor the representation and operator set,
apart from the network's own error. The model runs at z = 0. Errors are
taken over the pixels more than `edge` Å from either end of the grid, where the broadened flux does not depend on
the spectrum outside the grid (`default_edge`: 30 Å, or the widest kernel's reach where that is more; on a grid too
short for that, the reach alone; a grid shorter than twice the reach is refused). `split="val"` scores the
validation split instead (for choosing between training runs; the test split is for the final numbers only);
`split="unseen"` scores every row of a file the model was never trained on (the shared fine set: an independent
check, refused for the training file or one made by the builder with the same seed and settings).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import torch

from .broadening import Broadener
from .data import SpectraFile, physical_labels, sha256_file, split_rows
from .grid import reference
from .labels import LABEL_NAMES, STANDARD_LABELS

VSINI_BINS = [0.0, 10.0, 50.0, 100.0, 200.0, 300.0]
R_BINS = [1000.0, 3000.0, 10000.0, 30000.0, 115000.0]
TEFF_BINS = [4000.0, 5500.0, 7000.0, 9000.0, 11000.0]
PAPER_BOX = {lab.name: (lab.min, lab.max) for lab in STANDARD_LABELS}  # a model file's labels may have their own
EDGE_ANGSTROM = 30.0  # the paper's edge (the reach below is 19.4 Å on its grid): numbers stay comparable


def z0_predictor(model_path: Path):
    """z = 0 flux of the model file, from the C++ core (the one reader of model files)."""
    from fastspec import _core

    d = _core.Decoder(_core.Model.load(str(model_path)), threads=1)
    return (lambda labels: np.asarray(d.forward(np.ascontiguousarray(labels, dtype=np.float64), z=None,
                                                clip=False), dtype=np.float64)), "fastspec._core"


def model_box(model_path) -> dict:
    """{label: (min, max)} of a model file: the box its test draws and broadening kernels stay in."""
    from fastspec import _core

    return {lab["name"]: (lab["min"], lab["max"]) for lab in _core.Model.load(str(model_path)).labels}


def test_draws(n_spectra: int, draws: int, seed: int, box: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row positions, vsini, R) for `draws` stratified draws per test spectrum, in the box's (v sin i, R) ranges
    (None: the paper's)."""
    (vs_lo, vs_hi), (r_lo, r_hi) = ((box or PAPER_BOX)[n] for n in ("vsini", "resolution"))
    rng = np.random.default_rng([seed, 3])
    pos, vs, rs = [], [], []
    for i in range(n_spectra):
        a = (rng.permutation(draws) + rng.random(draws)) / draws
        b = (rng.permutation(draws) + rng.random(draws)) / draws
        pos.append(np.full(draws, i))
        vs.append(vs_lo + (vs_hi - vs_lo) * a)
        lo, hi = math.log10(r_lo), math.log10(r_hi)
        rs.append(10.0 ** (lo + (hi - lo) * b))
    return np.concatenate(pos), np.concatenate(vs), np.clip(np.concatenate(rs), r_lo, r_hi)


TRUTH_REFERENCE = "reference: the fine mesh broadened in float64 (fastspec_train.grid.reference)"
TRUTH_OPERATOR = "consistency: the file's spectra through the model's broadening operator (fastspec_train.broadening)"


def _split_rows(model_path: Path, data: str | Path | None, which: str = "test"):
    from fastspec import _core

    model = _core.Model.load(str(model_path))
    prov = json.loads(model.provenance)
    if not data:
        data = Path(prov["training_data"]["path"])
        if not data.is_file():
            raise FileNotFoundError(f"{model_path} was trained on {data} (its provenance says), which is not there; "
                                    "give the file with --data")
    data = Path(data)
    sf = SpectraFile(data)
    stage = model.broadening
    # without a fine mesh the truth is the model's own operator on the file's pixels: they must be of its kind
    if stage is not None and stage["sampling"] != sf.sampling and sf.fine_wavelength is None:
        raise ValueError(f"{model_path} was made for {stage['sampling']} spectra but {sf.path} holds {sf.sampling} ones "
                         "and no fine mesh to broaden instead (fastspec-grid build --sampling, --fine-step)")
    if which == "unseen":  # a file the model was never trained on: every row is held out
        _refuse_training_file(sf, prov, model_path)
        return sf, np.arange(sf.n), prov
    sp = prov.get("split")
    if sp is None:
        raise ValueError(f"{model_path}: provenance has no 'split'; cannot tell which spectra are held out")
    split = split_rows(sf, sp["val_fraction"], sp["test_fraction"], sp["split_seed"], sp.get("max_spectra") or 0)
    return sf, split[which], prov


def _refuse_training_file(sf: SpectraFile, prov: dict, model_path) -> None:
    """split="unseen" scores every row, so the file must not be (a version of) one the model was trained on: same
    path, same bytes, or made by the builder with the same seed and settings (a file that grew since training)."""
    with h5py.File(sf.path, "r") as f:
        config = f.attrs.get("builder_config")
    config = json.loads(config) if config is not None else None
    for used in [prov.get("training_data") or {}] + list(prov.get("extra_training_data") or []):
        trained_config = dict(used.get("builder_config") or {})
        same_build = config is not None and trained_config and all(
            config.get(k) == v for k, v in trained_config.items() if k not in ("label_box",))
        if (used.get("path") and Path(used["path"]).resolve() == sf.path.resolve()) or same_build \
                or used.get("sha256") == sha256_file(sf.path):
            raise ValueError(f"{sf.path}: {model_path} was trained on rows of this file (its provenance names "
                             f"{used.get('path')}); score its held-out rows with split 'test', not 'unseen'")


def broadened_truth(sf: SpectraFile, rows: np.ndarray, vsini: np.ndarray, resolution: np.ndarray,
                    floor: bool = False, stage: dict | None = None) -> tuple[np.ndarray, str, np.ndarray | None]:
    """(truth (n, n_pixels) float64, which truth it is (TRUTH_REFERENCE or TRUTH_OPERATOR), and with `floor` and a
    fine mesh the perfect decoder's output: the file's pixels through the model's broadening stage) for file rows
    `rows` broadened by (vsini[k], resolution[k]). stage: the model's broadening stage ({'epsilon', 'segments'},
    as Model.broadening gives it; None: the defaults)."""
    n = len(rows)
    br = Broadener(sf.wavelength_start, sf.wavelength_step, sf.n_pixels, dtype=torch.float64, sampling=sf.sampling,
                   **({"epsilon": stage["epsilon"], "segments": stage["segments"]} if stage else {}))

    def through_stage():  # the file's own pixels through the model's operator
        out = np.empty((n, sf.n_pixels))
        for k in range(0, n, 64):
            sl = slice(k, k + 64)
            out[sl] = br(torch.from_numpy(sf.read(rows[sl])).double(), torch.from_numpy(vsini[sl]),
                         torch.from_numpy(resolution[sl])).numpy()
        return out

    if sf.fine_wavelength is None:
        return through_stage(), TRUTH_OPERATOR, None
    truth = np.empty((n, sf.n_pixels))
    uniq, inverse = np.unique(rows, return_inverse=True)
    for u, row in enumerate(uniq):  # one fine spectrum read per star, all its draws
        fine = sf.read_fine(np.array([row]))[0].astype(np.float64)
        for k in np.flatnonzero(inverse == u):
            truth[k] = reference.broaden(sf.fine_wavelength, fine, sf.wavelength, float(vsini[k]), float(resolution[k]),
                                         fine_sampling=sf.fine_sampling)
    return truth, TRUTH_REFERENCE, through_stage() if floor else None


def broadened_test_set(model_path, data, draws: int, seed: int, split: str = "test", max_stars: int | None = None,
                       floor: bool = False):
    """(SpectraFile, file rows (n,), labels (n, 6), broadened truth (n, n_pixels) float64, provenance, which truth,
    the perfect decoder's output or None: see broadened_truth); with max_stars, only the first stars of the split
    (row k*draws is star k)."""
    if split not in ("test", "val", "unseen"):
        raise ValueError(f"split must be 'test', 'val' or 'unseen', got {split!r}")
    sf, test_rows, prov = _split_rows(Path(model_path), data, split)
    if max_stars is not None:
        test_rows = test_rows[:max_stars]
    if test_rows.size == 0:
        raise ValueError(f"{sf.path}: the {split} split is empty")
    pos, vs, rs = test_draws(test_rows.size, draws, seed, model_box(model_path))
    from fastspec import _core

    stage = _core.Model.load(str(model_path)).broadening
    # the perfect decoder of this model's kind needs the file's pixels to be of that kind
    floor = floor and stage is not None and stage["sampling"] == sf.sampling
    truth, kind, perfect = broadened_truth(sf, test_rows[pos], vs, rs, floor, stage)
    labels = physical_labels(sf.labels[test_rows[pos]], vs, rs)
    return sf, test_rows[pos], labels, truth, prov, kind, perfect


def broadening_reach(sf: SpectraFile, box: dict | None = None) -> float:
    """Å: the half-width of the widest kernel in the label box (the model's; None: the paper's): rotation at the
    largest v sin i, then a Gaussian of the lowest R to 6σ, at the grid's red end, as the Broadener sizes it. Within
    this of either end the broadened flux depends on the spectrum beyond the grid."""
    box = box or PAPER_BOX
    br = Broadener(sf.wavelength_start, sf.wavelength_step, sf.n_pixels, max_vsini=box["vsini"][1],
                   min_resolution=box["resolution"][0])
    return (br.rot_half + br.gauss_half) * sf.wavelength_step


def default_edge(sf: SpectraFile, box: dict | None = None) -> float:
    """The edge (Å) accuracy leaves out at either end: EDGE_ANGSTROM, or the broadening's reach where that is more;
    the reach alone on a grid too short to keep half of its pixels that way; refused on a grid shorter than twice
    the reach (every pixel then depends on the spectrum beyond the grid)."""
    box = box or PAPER_BOX
    reach = broadening_reach(sf, box)
    length = sf.wavelength_step * (sf.n_pixels - 1)
    if 2 * reach >= length:
        raise ValueError(f"{sf.path}: the grid is {length:g} Å long ({sf.wavelength_start:g}-"
                         f"{sf.wavelength_start + length:g} Å), but the widest broadening kernel (v sin i "
                         f"{box['vsini'][1]:g} km/s, R {box['resolution'][0]:g}) reaches "
                         f"{reach:.1f} Å from each end: no pixel is free of the spectrum beyond the grid. Accuracy "
                         f"needs a grid longer than {2 * reach:.1f} Å, or an explicit smaller edge (--edge)")
    edge = max(EDGE_ANGSTROM, reach)
    return edge if 4 * edge <= length else reach  # half the grid kept, or as much as the reach allows


def kept_pixels(sf: SpectraFile, edge: float | None = None) -> slice:
    """The pixels more than `edge` Å (default_edge when None) from either end of the grid, where the accuracy is
    measured; an edge that leaves none is refused."""
    if edge is None:
        edge = default_edge(sf)
    k = int(math.ceil(edge / sf.wavelength_step))
    if 2 * k >= sf.n_pixels:
        raise ValueError(f"{sf.path}: an edge of {edge:g} Å ({k} pixels) at both ends leaves none of the grid's "
                         f"{sf.n_pixels} pixels ({sf.wavelength_step * (sf.n_pixels - 1):g} Å)")
    return slice(k, sf.n_pixels - k)


def subset_stats(err: np.ndarray, labels: np.ndarray) -> dict:
    """error_stats over all spectra, the slow+sharp ones (v sin i < 50, R > 20000), the cool (Teff < 5500 K) among
    those, and by v sin i, R and Teff bins."""
    vs, rs = labels[:, LABEL_NAMES.index("vsini")], labels[:, LABEL_NAMES.index("resolution")]
    teff = labels[:, LABEL_NAMES.index("teff")]
    slow_sharp = (vs < 50) & (rs > 20000)
    cool = slow_sharp & (teff < 5500)
    out = {"overall": error_stats(err),
           "vsini_below_50_R_above_20000": error_stats(err[slow_sharp]) if slow_sharp.any() else None,
           "cool_vsini_below_50_R_above_20000": error_stats(err[cool]) if cool.any() else None,
           "by_vsini": {}, "by_resolution": {}, "by_teff": {}}
    for name, values, edges in (("by_vsini", vs, VSINI_BINS), ("by_resolution", rs, R_BINS), ("by_teff", teff, TEFF_BINS)):
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = (values >= lo) & ((values < hi) | (hi == edges[-1]) & (values <= hi))
            if sel.any():
                out[name][f"{lo:g}-{hi:g}"] = error_stats(err[sel])
    return out


def error_stats(abs_err: np.ndarray) -> dict:
    """Median |ΔF| over all pixels and the p50 / p95 / max of the per-spectrum mean |ΔF|."""
    per_spec = abs_err.mean(axis=1)
    return {"n_spectra": int(abs_err.shape[0]), "median_abs_dF": float(np.median(abs_err)),
            "per_spectrum_mean_abs_dF_p50": float(np.percentile(per_spec, 50)),
            "per_spectrum_mean_abs_dF_p95": float(np.percentile(per_spec, 95)),
            "per_spectrum_mean_abs_dF_max": float(per_spec.max())}


def accuracy_report(model, data, out_dir, *, draws: int = 10, seed: int = 2026, compare=None, split: str = "test",
                    edge: float | None = None) -> dict:
    """edge: Å left out at either end (None: default_edge)."""
    model = Path(model)
    out = Path(out_dir)
    if edge is None:  # refused before any spectrum is broadened when the grid is too short
        sf, _, _ = _split_rows(model, data, split)
        edge = default_edge(sf, model_box(model))
    sf, rows, labels, truth, prov, truth_kind, perfect = broadened_test_set(model, data, draws, seed, split, floor=True)
    keep = kept_pixels(sf, edge)
    out.mkdir(parents=True, exist_ok=True)
    predict, backend = z0_predictor(model)
    pred = np.concatenate([predict(labels[k:k + 256]) for k in range(0, labels.shape[0], 256)])
    pred, truth = pred[:, keep], truth[:, keep]
    report = {"model": str(model), "backend": backend, "data": str(sf.path), "data_sha256": sha256_file(sf.path),
              "trained_on_sha256": prov.get("training_data", {}).get("sha256"), "split": split,
              "edge_angstrom": edge, "n_test_stars": int(np.unique(rows).size), "draws_per_star": draws,
              "seed": seed, "z": 0, "truth": truth_kind, **subset_stats(np.abs(pred - truth), labels)}
    if perfect is not None:  # the representation and operator alone: a perfect network's error
        report["perfect_decoder"] = subset_stats(np.abs(perfect[:, keep] - truth), labels)
    if compare:
        other, _ = z0_predictor(Path(compare))
        pred2 = np.concatenate([other(labels[k:k + 256]) for k in range(0, labels.shape[0], 256)])[:, keep]
        d = np.abs(pred - pred2)
        report["compare"] = {"model": str(compare), "max_abs_diff": float(d.max()), "median_abs_diff": float(np.median(d)),
                             "accuracy": error_stats(np.abs(pred2 - truth))}
    (out / "accuracy.json").write_text(json.dumps(report, indent=1))
    (out / "accuracy.md").write_text(markdown(report))
    return report


def markdown(r: dict) -> str:
    def row(name, s):
        return (f"| {name} | {s['n_spectra']} | {s['median_abs_dF']:.2e} | {s['per_spectrum_mean_abs_dF_p50']:.2e} | "
                f"{s['per_spectrum_mean_abs_dF_p95']:.2e} | {s['per_spectrum_mean_abs_dF_max']:.2e} |")

    def table(t):
        rows = [row("all", t["overall"])]
        if t.get("vsini_below_50_R_above_20000"):
            rows.append(row("v sin i < 50 km/s, R > 20000", t["vsini_below_50_R_above_20000"]))
        if t.get("cool_vsini_below_50_R_above_20000"):
            rows.append(row("... and Teff < 5500 K", t["cool_vsini_below_50_R_above_20000"]))
        rows += [row(f"v sin i {k} km/s", s) for k, s in t["by_vsini"].items()]
        rows += [row(f"R {k}", s) for k, s in t["by_resolution"].items()]
        rows += [row(f"Teff {k} K", s) for k, s in t.get("by_teff", {}).items()]
        return rows

    head = ("| subset | spectra | median \\|ΔF\\| (all pixels) | per-spectrum mean \\|ΔF\\|: p50 | p95 | max |\n"
            "|---|---|---|---|---|---|")
    lines = [f"Held-out accuracy of `{r['model']}` ({r['backend']}, z = 0) on {r['n_test_stars']} {r['split']} stars × "
             f"{r['draws_per_star']} (v sin i, R) draws, seed {r['seed']}; data `{r['data']}`; pixels more than "
             f"{r['edge_angstrom']:g} Å from the ends. Truth: {r.get('truth', TRUTH_OPERATOR)}.", "", head, *table(r)]
    if r.get("perfect_decoder"):
        lines += ["", "A perfect decoder (the file's own pixels through the model's broadening stage) against the same "
                      "truth: the floor the representation and the operator set, apart from the network.", "", head,
                  *table(r["perfect_decoder"])]
    if "compare" in r:
        c = r["compare"]
        lines += ["", f"Against `{c['model']}`: max |ΔF| between the two {c['max_abs_diff']:.2e}, median "
                      f"{c['median_abs_diff']:.2e}; its accuracy: median {c['accuracy']['median_abs_dF']:.2e}."]
    return "\n".join(lines) + "\n"


def write_testset(model, data, out, *, draws: int = 10, seed: int = 2026, split: str = "test") -> Path:
    """Broadened held-out spectra in the shared layout with 6 labels (teff, logg, vsini, mh, vmic, resolution)."""
    sf, rows, labels, truth, prov, truth_kind, perfect = broadened_test_set(Path(model), data, draws, seed, split,
                                                                            floor=True)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("flux", data=truth.astype(np.float32), chunks=(1, sf.n_pixels), compression="gzip")
        if perfect is not None:  # what a perfect network would give through the model's stage: the operator floor
            f.create_dataset("perfect_decoder", data=perfect.astype(np.float32), chunks=(1, sf.n_pixels),
                             compression="gzip")
        f.attrs["truth"] = truth_kind
        d = f.create_dataset("labels", data=labels)
        d.attrs["names"] = np.array(LABEL_NAMES, dtype=object)
        d.attrs["units"] = np.array([lab.unit for lab in STANDARD_LABELS], dtype=object)
        f.create_dataset("source_rows", data=rows)
        f.attrs["wavelength_start"] = sf.wavelength_start
        f.attrs["wavelength_step"] = sf.wavelength_step
        f.attrs["n_pixels"] = sf.n_pixels
        f.attrs["wavelength_medium"] = sf.wavelength_medium
        f.attrs["source"] = str(sf.path)
        f.attrs["source_sha256"] = sha256_file(sf.path)
        held_out = "every row (a file the model was never trained on)" if split == "unseen" else f"the {split} split"
        f.attrs["note"] = (f"held-out spectra (never trained on): {held_out} of {sf.path.name}; each spectrum broadened "
                           f"(rotation eps=0.6 then Gaussian FWHM=lambda/R; truth: {truth_kind}), "
                           f"{draws} stratified (vsini, R) draws per star, seed {seed}")
    tmp.replace(out)
    return out

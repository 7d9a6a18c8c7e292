"""`evaluate(decoder, data_path, out_dir)`: every diagnostic of the model against SYNSPEC in one call."""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

import numpy as np

from . import stats
from .data import EvalData
from .recovery import RecoveryOptions

# Labels the model takes in log10; used for log-spaced bins when the decoder does not say.
LOG_LABELS = {"resolution"}
GROUP_LABELS = ("teff", "logg", "mh", "vmic")  # what identifies one intrinsic spectrum


def _log_flags(decoder, names) -> list[bool]:
    """Which labels the model takes in log10 (from the model file's label table when the decoder has it)."""
    table = {lab.get("name"): str(lab.get("scaling", "")) for lab in (getattr(decoder, "info", {}) or {}).get("labels", [])
             if isinstance(lab, dict)}
    return [("log" in table[n]) if n in table else (n in LOG_LABELS) for n in names]


def evaluate(
    decoder,
    data_path,
    out_dir,
    *,
    chunk_size: int = 128,
    max_spectra: int | None = None,
    bins: int = 10,
    n_worst: int = 10,
    recovery: bool = True,
    recovery_options: RecoveryOptions | dict | None = None,
    pca_fit_max: int = 2000,
    dpi: int = 100,
    progress: bool = True,
    log=print,
) -> dict:
    """Compare `decoder` with the SYNSPEC spectra in `data_path`; write figures, report.md, metrics.json.

    decoder: a `fastspec.Decoder` (or anything with its interface: `decoder(params, clip=True)`,
    `wavelength`, `label_names`, `label_ranges`, `info`). data_path: an HDF5 file of broadened SYNSPEC
    spectra with six labels (`fastspec-train testset`). Returns the metrics (the content of metrics.json).
    """
    from tqdm.auto import tqdm

    from . import figures, report  # matplotlib is checked here, before hours of work are spent

    t_start = time.perf_counter()
    out = Path(out_dir)
    names = tuple(decoder.label_names)
    wavelength = np.asarray(decoder.wavelength, dtype=np.float64)
    ranges = {n: tuple(float(v) for v in decoder.label_ranges[n]) for n in names}
    log_flags = _log_flags(decoder, names)
    if isinstance(recovery_options, dict):
        recovery_options = RecoveryOptions(**recovery_options)
    ropts = recovery_options or RecoveryOptions()

    medium = (getattr(decoder, "info", {}) or {}).get("medium")
    with EvalData(data_path, names, wavelength, max_spectra, medium=medium) as data:
        out.mkdir(parents=True, exist_ok=True)  # only once the data opened: a bad input leaves no folder behind
        labels = data.labels
        n = data.n
        lo = np.array([ranges[k][0] for k in names])
        hi = np.array([ranges[k][1] for k in names])
        outside = np.any((labels < lo) | (labels > hi), axis=1)
        if outside.any():
            log(f"note: {int(outside.sum())} of {n} spectra have labels outside the model's range; the model is "
                "evaluated at the clipped labels and these spectra count like the others")

        # Split by intrinsic spectrum for the recovery test (and record it, so that the split is reproducible).
        gcols = [names.index(g) for g in GROUP_LABELS if g in names]
        group_keys = data.source_rows if data.source_rows is not None else labels[:, gcols]
        split = None
        rec_note = None
        if recovery:
            try:
                split = _split_or_none(group_keys, ropts)
            except ValueError as exc:
                rec_note = f"skipped: {exc}"
        pca = None
        if split is not None:
            pca = _fit_pca(data, split, ropts, pca_fit_max, chunk_size, progress, tqdm)
            syn_coeffs = np.empty((n, pca.components.shape[0]))
            gen_coeffs = np.full((n, pca.components.shape[0]), np.nan)  # model spectra, test rows only

        acc = stats.ResidualAccumulator(wavelength.size)
        floor_acc = stats.ResidualAccumulator(wavelength.size) if data.has_floor else None
        t_model = 0.0
        with tqdm(total=n, unit="spectra", desc="evaluate", disable=not progress) as bar:
            for s, e, syn in data.chunks(chunk_size):
                t0 = time.perf_counter()
                model = np.asarray(decoder(labels[s:e], clip=True))
                t_model += time.perf_counter() - t0
                if model.shape != syn.shape:
                    raise RuntimeError(f"decoder returned {model.shape} for {e - s} label rows; expected {syn.shape}")
                acc.add(model, syn)
                if floor_acc is not None:
                    floor_acc.add(data.read_floor(s, e), syn)
                if pca is not None:
                    syn_coeffs[s:e] = pca.transform(syn)
                    is_test = split[s:e] == 2
                    if is_test.any():
                        gen_coeffs[s:e][is_test] = pca.transform(model[is_test])
                bar.update(e - s)
        res = acc.result()
        per_spec = res["per_spectrum"]

        # Best, median and worst spectra (by <|ΔF|>) for the overlays.
        order = np.argsort(per_spec["mean_abs"])
        picks = {"best": int(order[0]), "median": int(order[len(order) // 2]), "worst": int(order[-1])}
        rows = list(picks.values())
        overlay = {
            "picks": picks,
            "synspec": data.read_rows(rows),
            "model": np.asarray(decoder(labels[rows], clip=True)),
        }
        data_has_sources = data.source_rows is not None
        data_info = {"path": str(Path(data_path).resolve()), "n_spectra_in_file": data.n_total,
                     "n_spectra_used": n, "attrs": {k: _jsonable(v) for k, v in data.attrs.items()},
                     "label_units": data.units}

    # Heat maps over every label pair and marginals against each label, of the per-spectrum <|ΔF|>.
    edges = {k: stats.label_edges(*ranges[k], bins, log=lg) for k, lg in zip(names, log_flags)}
    y = per_spec["mean_abs"]
    heat = {}
    for a, b in itertools.combinations(range(len(names)), 2):
        heat[f"{names[a]}__{names[b]}"] = stats.binned_2d(labels[:, a], labels[:, b], y, edges[names[a]], edges[names[b]])
    marg = {k: stats.binned_1d(labels[:, i], y, edges[k]) for i, k in enumerate(names)}
    varexp = {k: stats.variance_explained(labels[:, i], y, edges[k]) for i, k in enumerate(names)}

    # Parameter recovery.
    rec = {"status": rec_note or "disabled (--no-recovery)"}
    if pca is not None:
        from .recovery import LabelScaler, TorchMissing, run_recovery

        scaler = LabelScaler([ranges[k] for k in names], log_flags)
        cf = {"train": syn_coeffs[split == 0], "val": syn_coeffs[split == 1],
              "test": syn_coeffs[split == 2], "generated": gen_coeffs[split == 2]}
        lab = {"train": labels[split == 0], "val": labels[split == 1], "test": labels[split == 2],
               "generated": labels[split == 2]}
        try:
            rec = run_recovery(cf, lab, scaler, ropts, names, log=log)
            rec["pca_explained_variance"] = float(pca.explained_variance_ratio.sum())
            rec["split_sizes"] = {k: int(v.shape[0]) for k, v in lab.items() if k != "generated"}
            keys2d = np.asarray(group_keys, dtype=np.float64).reshape(n, -1)
            rec["n_groups"] = {k: int(len(np.unique(keys2d[split == i], axis=0)))
                               for i, k in enumerate(("train", "val", "test"))}
            rec["grouped_by"] = "source_rows" if data_has_sources else "teff, logg, mh, vmic"
        except TorchMissing as exc:
            rec = {"status": f"skipped: {exc}; torch (the `train` extra) is not installed"}
            log(f"recovery {rec['status']}")

    floor = None
    if floor_acc is not None:  # the model's error and the floor a perfect network would reach, by subset
        fres = floor_acc.result()
        floor = {"pixels": {k: fres[k] for k in ("abs_median", "abs_mean", "abs_max", "abs_percentiles")},
                 "subsets": subset_table(labels, names, per_spec["mean_abs"], fres["per_spectrum"]["mean_abs"])}
    metrics = {
        "truth": data_info["attrs"].get("truth"),
        "operator_floor": floor,
        "model": _model_info(decoder),
        "data": data_info,
        "pixels": {k: res[k] for k in ("n_spectra", "n_pixels_total", "abs_median", "abs_mean", "abs_max",
                                        "abs_percentiles", "residual_mean", "residual_rms",
                                        "percentile_relative_resolution")},
        "labels_outside_model_range": int(outside.sum()),
        "worst_spectra": _worst(per_spec, labels, names, n_worst),
        "overlay_rows": overlay["picks"],
        "per_pixel_1A": _per_pixel_binned(wavelength, res["per_pixel"], 1.0),
        "heatmaps": {k: _binned_json(v) for k, v in heat.items()},
        "marginals": {k: _binned_json(v) for k, v in marg.items()},
        "variance_explained": varexp,
        "recovery": {k: v for k, v in rec.items() if k not in ("predictions", "truth")},
        "per_spectrum": {"index": list(range(n)), "labels": {k: labels[:, i].tolist() for i, k in enumerate(names)},
                         **{k: v.tolist() for k, v in per_spec.items()}},
        "timing": {"model_seconds": t_model, "model_spectra_per_second": n / t_model if t_model > 0 else None},
    }

    # Figures, then the report that links them.
    ctx = {"names": names, "ranges": ranges, "log_flags": log_flags, "units": data_info["label_units"],
           "wavelength": wavelength, "labels": labels, "dpi": dpi}
    fig_files = figures.make_all(out, ctx, res, heat, marg, varexp, overlay, rec)
    metrics["figures"] = fig_files
    metrics["timing"]["total_seconds"] = time.perf_counter() - t_start
    np.savez_compressed(out / "per_pixel.npz", wavelength=wavelength,
                        **{k: v.astype(np.float32) for k, v in res["per_pixel"].items()})
    (out / "metrics.json").write_text(_dumps(_jsonable(metrics)) + "\n")
    (out / "report.md").write_text(report.markdown(metrics, ctx))
    log(f"wrote {out / 'report.md'}, metrics.json and {len(fig_files)} figures")
    return _jsonable(metrics)


def subset_table(labels, names, model_err, floor_err) -> list[dict]:
    """Median and 95th percentile of the per-spectrum mean |ΔF| of the model and of the perfect decoder: all
    spectra, slow rotators at high R (v sin i < 50 km/s, R > 20000), the cool ones among those, and by Teff, v sin i
    and R bins."""
    col = {n: labels[:, i] for i, n in enumerate(names)}
    rows = [("all", np.ones(len(labels), bool))]
    if "vsini" in col and "resolution" in col:
        slow = (col["vsini"] < 50) & (col["resolution"] > 20000)
        rows += [("v sin i < 50, R > 20000", slow)]
        if "teff" in col:
            rows += [("... and Teff < 5500 K", slow & (col["teff"] < 5500))]
    for name, edges in (("teff", (4000, 5500, 7000, 9000, 11000)), ("vsini", (0, 10, 50, 100, 200, 300)),
                        ("resolution", (1000, 3000, 10000, 30000, 115000))):
        if name in col:
            for lo, hi in zip(edges[:-1], edges[1:]):
                rows.append((f"{name} {lo:g}-{hi:g}", (col[name] >= lo) & (col[name] <= hi)))
    out = []
    for label, sel in rows:
        if sel.any():
            out.append({"subset": label, "n": int(sel.sum()),
                        "model_median": float(np.median(model_err[sel])), "model_p95": float(np.percentile(model_err[sel], 95)),
                        "floor_median": float(np.median(floor_err[sel])), "floor_p95": float(np.percentile(floor_err[sel], 95))})
    return out


def _split_or_none(group_keys, ropts):
    from .recovery import group_split

    return group_split(group_keys, ropts.fractions, ropts.seed)


def _fit_pca(data, split, ropts, pca_fit_max, chunk_size, progress, tqdm):
    """Fit the PCA on (at most pca_fit_max, chosen at random) training-split SYNSPEC spectra."""
    from .recovery import PCA

    train_rows = np.nonzero(split == 0)[0]
    if train_rows.size > pca_fit_max:
        train_rows = np.sort(np.random.default_rng(ropts.seed).choice(train_rows, pca_fit_max, replace=False))
    keep = np.zeros(data.n, dtype=bool)
    keep[train_rows] = True
    parts = []
    with tqdm(total=data.n, unit="spectra", desc="PCA fit (read)", disable=not progress) as bar:
        for s, e, syn in data.chunks(chunk_size):
            parts.append(syn[keep[s:e]])
            bar.update(e - s)
    return PCA(ropts.n_components).fit(np.concatenate(parts))


def _model_info(decoder) -> dict:
    info = dict(getattr(decoder, "info", {}) or {})
    path = info.get("path", getattr(decoder, "path", None))
    return {"path": str(path) if path is not None else None, "label_names": list(decoder.label_names),
            "label_ranges": {k: list(v) for k, v in decoder.label_ranges.items()}, "info": info}


def _worst(per_spec, labels, names, k):
    order = np.argsort(per_spec["mean_abs"])[::-1][:k]
    return [{"index": int(i), "mean_abs": float(per_spec["mean_abs"][i]), "max_abs": float(per_spec["max_abs"][i]),
             "mean_residual": float(per_spec["mean_res"][i]),
             "labels": {n: float(labels[i, j]) for j, n in enumerate(names)}} for i in order]


def _per_pixel_binned(wavelength, per_pixel, width):
    """Per-pixel curves averaged in bins of `width` Å (the full resolution goes to per_pixel.npz)."""
    m = stats.pixels_per_bin(wavelength, width)
    n = wavelength.size // m * m
    out = {"wavelength": wavelength[:n].reshape(-1, m).mean(axis=1).tolist()}
    for k, v in per_pixel.items():
        out[k] = v[:n].reshape(-1, m).mean(axis=1).tolist()
    return out


def _binned_json(b):
    return {k: np.asarray(v).tolist() for k, v in b.items()}


def _jsonable(x):
    """Plain JSON types; NaN and infinities become null (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        # 7 significant digits: more than any statistic here can claim, and half the size of repr().
        return float(f"{x:.7g}") if np.isfinite(x) else None
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, bytes):
        return x.decode(errors="replace")
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)


# Only lists that json.dumps(indent=...) broke over lines: a raw newline never occurs inside a JSON string,
# so text in strings is never touched.
_NUMBER_LIST = re.compile(r"\[\n\s*((?:-?[\d.eE+-]+|null)(?:,\n\s*(?:-?[\d.eE+-]+|null))*)\n\s*\]")


def _dumps(obj) -> str:
    """Indented JSON with every list of plain numbers on one line (per-spectrum lists run to thousands)."""
    text = json.dumps(obj, indent=1, allow_nan=False)
    return _NUMBER_LIST.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)

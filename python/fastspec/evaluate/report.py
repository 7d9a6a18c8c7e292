"""The markdown report: the key numbers as tables, each figure with a line on how to read it."""

from __future__ import annotations

import datetime as _dt
import json

from .stats import pixels_per_bin, zoom_width


def _f(v, digits=3):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"  # 1234, not 1.23e+03
    return str(v)


UNITS = {"teff": "K", "logg": "dex", "vsini": "km/s", "mh": "dex", "vmic": "km/s", "resolution": ""}


def _name(n):
    u = UNITS.get(n, "")
    return f"{n} [{u}]" if u else n


def markdown(m: dict, ctx: dict) -> str:
    names = list(ctx["names"])
    px = m["pixels"]
    figs = set(m.get("figures", []))
    model = m["model"]
    info = model.get("info") or {}
    L = []
    L.append("# fastspec model evaluation against SYNSPEC\n")
    prov = info.get("provenance") or {}
    arch = "-".join(str(layer.get("out")) for layer in info.get("layers", []) if isinstance(layer, dict))
    # Network inputs: labels of role "network" (all of them in a version-1 file); then the broadening stage, if any.
    n_in = sum(1 for lab in info.get("labels", []) if isinstance(lab, dict) and lab.get("role", "network") == "network")
    stage = " + broadening stage" if info.get("broadening") else ""
    L.append(f"- model: `{model.get('path') or 'embedded default'}`"
             + (f", decoder {info.get('latent_dim')}+{n_in or len(names)} → {arch}{stage} ({info.get('weight_dtype')})"
                if arch else "")
             + (f", created {prov.get('created')}" if prov.get("created") else "")
             + (f", git {prov.get('git_revision')}" if prov.get("git_revision") else ""))
    L.append(f"- data: `{m['data']['path']}`: {m['data']['n_spectra_used']} spectra used of {m['data']['n_spectra_in_file']}")
    L.append(f"- written {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; every number is in "
             "`metrics.json`, the per-pixel curves at full resolution in `per_pixel.npz`")
    wl = ctx["wavelength"]
    L.append(f"- ΔF = F_model − F_SYNSPEC, in continuum-normalised flux; ⟨|ΔF|⟩ = mean |ΔF| over the {len(wl)} pixels "
             f"of one spectrum ({wl[0]:.2f}–{wl[-1]:.2f} Å)")
    if m.get("labels_outside_model_range"):
        L.append(f"- {m['labels_outside_model_range']} spectra have labels outside the model's trained range (evaluated at clipped labels)")
    t = m.get("timing", {})
    if t.get("model_spectra_per_second"):
        L.append(f"- model generation: {t['model_spectra_per_second']:.0f} spectra/s on this machine (total run {t.get('total_seconds', 0):.0f} s)")
    L.append("")

    if m.get("truth"):
        L.append(f"Truth: {m['truth']}.\n")
    fl = m.get("operator_floor")
    if fl:
        L.append("## 0. The model's error and the operator's floor\n")
        L.append("The test set carries, beside each SYNSPEC spectrum, its own pixels through the model's broadening "
                 "stage (a perfect network): the floor the representation and the operator set. Per-spectrum "
                 "⟨|ΔF|⟩, median and 95th percentile over the spectra of each subset.\n")
        L.append("| subset | spectra | model median | model p95 | floor median | floor p95 |\n|---|---|---|---|---|---|")
        for r in fl["subsets"]:
            L.append(f"| {r['subset']} | {r['n']} | {_f(r['model_median'])} | {_f(r['model_p95'])} | "
                     f"{_f(r['floor_median'])} | {_f(r['floor_p95'])} |")
        L.append(f"\nOver all pixels the floor's median \\|ΔF\\| is {_f(fl['pixels']['abs_median'])} (the model's: "
                 f"{_f(px['abs_median'])}).\n")
    L.append("## 1. Pixel statistics\n")
    L.append("| statistic | value |\n|---|---|")
    L.append(f"| pixels (spectra × pixels) | {px['n_pixels_total']:,} ({px['n_spectra']} × {px['n_pixels_total'] // max(px['n_spectra'], 1)}) |")
    for k, v in px["abs_percentiles"].items():
        L.append(f"| {k[1:]}th percentile of \\|ΔF\\| | {_f(v)} |")
    L.append(f"| mean \\|ΔF\\| | {_f(px['abs_mean'])} |")
    L.append(f"| max \\|ΔF\\| | {_f(px['abs_max'])} |")
    L.append(f"| mean residual (bias) | {_f(px['residual_mean'])} |")
    L.append(f"| RMS residual | {_f(px['residual_rms'])} |")
    L.append(f"\nPercentiles come from a streaming histogram, exact to a relative {px['percentile_relative_resolution']:.1e}.\n")
    for f, cap in [("pixels_histogram.png", "Distribution of |ΔF| over all pixels, percentiles marked."),
                   ("pixels_wavelength.png", "Mean |ΔF| and mean residual against wavelength (grey: per pixel; blue: "
                    f"{pixels_per_bin(wl) * float(wl[1] - wl[0]):.3g} Å bins; band: ±1 std over spectra). A "
                    "wavelength-dependent bias shows as structure in the lower panel.")]:
        if f in figs:
            L.append(f"![{f}]({f})\n\n{cap}\n")
    L.append("### Worst spectra (largest ⟨|ΔF|⟩)\n")
    L.append("| row | ⟨\\|ΔF\\|⟩ | max \\|ΔF\\| | mean ΔF | " + " | ".join(_name(n) for n in names) + " |")
    L.append("|---" * (4 + len(names)) + "|")
    for w in m["worst_spectra"]:
        L.append(f"| {w['index']} | {_f(w['mean_abs'])} | {_f(w['max_abs'])} | {_f(w['mean_residual'])} | "
                 + " | ".join(_f(w["labels"][n], 4) for n in names) + " |")
    L.append("")

    L.append("## 2. Heat maps over the label space\n")
    for f, cap in [("heatmap_teff_logg.png", "Mean ⟨|ΔF|⟩ per bin of the Teff–log g plane (Kiel diagram orientation)."),
                   ("heatmaps_all_pairs.png", "The same for every pair of labels, on one colour scale.")]:
        if f in figs:
            L.append(f"![{f}]({f})\n\n{cap}\n")

    L.append("## 3. Marginals and variance explained\n")
    L.append("Fraction of the variance of the per-spectrum ⟨|ΔF|⟩ explained by each label's bins (correlation ratio "
             "η²; the adjusted ε² removes the part expected from chance with this many bins and spectra). Several "
             "(v sin i, R) draws of one star share its teff, logg, mh and vmic, so for those four labels the "
             "number of independent points is the number of stars and η² is less certain than N suggests:\n")
    L.append("| label | η² | adjusted | bins used |\n|---|---|---|---|")
    for n in names:
        v = m["variance_explained"][n]
        L.append(f"| {_name(n)} | {_f(v['eta2'])} | {_f(v['eta2_adjusted'])} | {v['bins_used']} |")
    L.append("")
    if "marginals.png" in figs:
        L.append("![marginals.png](marginals.png)\n\nBinned mean of ⟨|ΔF|⟩ against each label; bars span the 16th to "
                 "84th percentiles of the spectra in the bin (the std is in metrics.json), grey points are the "
                 "individual spectra.\n")

    L.append("## 4. Parameter recovery (Table 3 of the paper)\n")
    rec = m["recovery"]
    if rec.get("status") != "ok":
        L.append(f"Parameter recovery was **{rec.get('status')}**.\n")
    else:
        o = rec["options"]
        L.append(f"PCA to {o['n_components']} components (explaining {rec['pca_explained_variance']:.4%} of the variance "
                 f"of the training spectra) + dense ReLU network {'-'.join(map(str, o['widths']))} → {len(names)}, "
                 f"{o['optimizer']}, {o['loss']}, batch {o['batch_size']}, up to {o['epochs']} epochs "
                 f"(best validation at epoch {rec['best_epoch']} of {rec['epochs_run']}, {rec['train_seconds']:.0f} s). "
                 f"Trained on SYNSPEC spectra with noise: {o['noise']}, SNR {o['snr_range'][0]:g}–{o['snr_range'][1]:g}, "
                 f"{o['noise_draws_per_epoch']} fresh draws per spectrum per epoch. Split by intrinsic spectrum "
                 f"({rec.get('grouped_by', 'teff, logg, mh, vmic')}), seed {o['seed']}: "
                 + ", ".join(f"{k} {rec['n_groups'][k]} intrinsic spectra ({rec['split_sizes'][k]} rows)"
                             for k in ("train", "val", "test")) + ".\n")
        L.append("RMSE on noisy spectra (test SYNSPEC and generated spectra share the same noise draws):\n")
        L.append("| spectra | N | " + " | ".join(_name(n) for n in names) + " |")
        L.append("|---" * (2 + len(names)) + "|")
        for title, k in [("train (SYNSPEC)", "train"), ("validation (SYNSPEC)", "val"), ("test (SYNSPEC)", "test"),
                         ("**generated** at the test labels", "generated")]:
            s = rec["splits"][k]
            L.append(f"| {title} | {s['n']} | " + " | ".join(_f(s["rmse"][n]) for n in names) + " |")
        L.append("| test, always predicting the training mean | — | "
                 + " | ".join(_f(rec["baseline_test_rmse_predict_mean"][n]) for n in names) + " |")
        logs = list(rec["splits"]["test"].get("rmse_log10", {}))
        if logs:
            L.append("\nIn dex for the labels the model takes in log10: "
                     + "; ".join(f"log10 {n}: " + ", ".join(f"{k} {_f(rec['splits'][k]['rmse_log10'][n])}"
                                                         for k in ("train", "val", "test", "generated")) for n in logs)
                     + ".")
        L.append("\nNoise-free spectra:\n")
        L.append("| spectra | " + " | ".join(_name(n) for n in names) + " |")
        L.append("|---" * (1 + len(names)) + "|")
        for title, k in [("test (SYNSPEC)", "test"), ("generated at the test labels", "generated")]:
            L.append(f"| {title} | " + " | ".join(_f(rec["splits"][k]["rmse_noise_free"][n]) for n in names) + " |")
        L.append("\nGenerated ≈ test means that, for inference, the surrogate is as good as the radiative transfer.\n")
        for f in ("recovery_table.png", "recovery_scatter.png"):
            if f in figs:
                L.append(f"![{f}]({f})\n")

    L.append("## 5. Spectra compared\n")
    if "overlays.png" in figs:
        L.append("![overlays.png](overlays.png)\n\nThe best, median and worst spectra by ⟨|ΔF|⟩: SYNSPEC (black) and "
                 f"model (red), residual below, and a {zoom_width(wl):.3g} Å zoom where the residuals inside lines "
                 "are largest "
                 "(largest Σ |ΔF|·(1 − F_SYNSPEC)).\n")
    L.append("## Model provenance\n")
    prov = info.get("provenance", info)
    text = json.dumps(prov, indent=1, default=str)
    L.append("```json\n" + (text if len(text) < 6000 else text[:6000] + "\n… (cut; all of it is in metrics.json)") + "\n```\n")
    return "\n".join(L)

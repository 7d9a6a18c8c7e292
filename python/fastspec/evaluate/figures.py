"""PNG figures of the evaluation.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly, not through pyplot:
no global backend switch, no window, safe inside a user's interactive session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .stats import pixels_per_bin, zoom_width

try:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
except ImportError as exc:  # matplotlib is the `plot` extra
    raise ImportError("fastspec evaluate draws figures with matplotlib: pip install 'fastspec[plot]'") from exc

PRETTY = {
    "teff": (r"$T_\mathrm{eff}$", "K"),
    "logg": (r"$\log g$", "dex"),
    "vsini": (r"$v \sin i$", "km/s"),
    "mh": ("[M/H]", "dex"),
    "vmic": (r"$v_\mathrm{mic}$", "km/s"),
    "resolution": (r"$R = \lambda/\Delta\lambda$", ""),
}
FLUX_UNIT = "continuum-normalised flux"
ABS_LABEL = r"$\langle|\Delta F|\rangle$ per spectrum"
CMAP = "viridis"
C_SYN, C_MODEL, C_RES = "#222222", "#d62728", "#1f77b4"


def axis_label(name: str, units: dict | None = None) -> str:
    sym, unit = PRETTY.get(name, (name, (units or {}).get(name, "")))
    return f"{sym} [{unit}]" if unit else sym


def _save(fig: Figure, path: Path, dpi: int) -> str:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return path.name


def _rebin(x: np.ndarray, width: int) -> np.ndarray:
    n = x.size // width * width
    return x[:n].reshape(-1, width).mean(axis=1)


def fig_wavelength(path, wl, per_pixel, pixels, dpi):
    """Mean |ΔF| and mean residual (± spread over spectra) against wavelength."""
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    m = pixels_per_bin(wl)  # bins of about 1 Å
    bins = f"{m * float(wl[1] - wl[0]):.3g} Å bins"
    wl_b = _rebin(wl, m)
    ax1.plot(wl, per_pixel["mean_abs"], lw=0.3, color="0.6", label="per pixel")
    ax1.plot(wl_b, _rebin(per_pixel["mean_abs"], m), lw=1.2, color=C_RES, label=bins)
    ax1.axhline(pixels["abs_mean"], color="k", ls="--", lw=0.8, label=f"mean over all pixels {pixels['abs_mean']:.2e}")
    ax1.set_ylabel(f"mean |ΔF| over spectra\n[{FLUX_UNIT}]")
    ax1.set_title(f"|ΔF| = |F_model − F_SYNSPEC| against wavelength ({pixels['n_spectra']} spectra)")
    ax1.set_ylim(bottom=0)
    ax1.legend(loc="upper right", fontsize=8)
    mr, sd = per_pixel["mean_residual"], per_pixel["std_residual"]
    ax2.fill_between(wl_b, _rebin(mr - sd, m), _rebin(mr + sd, m), color=C_RES, alpha=0.2, lw=0,
                     label=f"± 1 std over spectra ({bins})")
    ax2.plot(wl, mr, lw=0.3, color="0.6", label="per pixel")
    ax2.plot(wl_b, _rebin(mr, m), lw=1.2, color=C_RES, label=bins)
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_ylabel(f"mean F_model − F_SYNSPEC\n[{FLUX_UNIT}]")
    ax2.set_xlabel("wavelength (air) [Å]")
    ax2.set_title("mean residual against wavelength: a systematic bias shows as an offset from 0")
    ax2.legend(loc="lower right", fontsize=8, ncol=3)
    ax2.set_xlim(wl[0], wl[-1])
    return _save(fig, path, dpi)


def fig_histogram(path, res, dpi):
    """Distribution of |ΔF| over all test pixels, percentiles marked."""
    edges, counts = res["hist_edges"], res["hist_counts"]
    # Merge the fine percentile bins into 50 per decade for display.
    k = 20
    n = counts.size // k * k
    c = counts[:n].reshape(-1, k).sum(axis=1)
    e = edges[: n + 1 : k]
    nz = np.nonzero(c)[0]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    if nz.size:
        sl = slice(max(nz[0] - 2, 0), min(nz[-1] + 3, c.size))
        frac = c[sl] / res["n_pixels_total"]
        ax.stairs(frac, e[sl.start : sl.stop + 1], fill=True, color=C_RES, alpha=0.6)
    ax.set_xscale("log")
    for (name, v), ls in zip(res["abs_percentiles"].items(), ["-", "--", ":", "-.", "--", ":"]):
        ax.axvline(v, color="k", ls=ls, lw=0.9, label=f"{name[1:]}th percentile: {v:.2e}")
    ax.set_xlabel(f"|ΔF| = |F_model − F_SYNSPEC| [{FLUX_UNIT}]")
    ax.set_ylabel("fraction of pixels per bin (50 bins/decade)")
    ax.set_title(f"|ΔF| over all {res['n_pixels_total']:,} test pixels")
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path, dpi)


def _heat_panel(ax, h, names, a, b, ctx, norm):
    x_e, y_e = h["x_edges"], h["y_edges"]
    mesh = ax.pcolormesh(x_e, y_e, np.ma.masked_invalid(h["mean"]).T, cmap=CMAP, norm=norm, shading="flat")
    ax.set_xlabel(axis_label(names[a], ctx["units"]), fontsize=9)
    ax.set_ylabel(axis_label(names[b], ctx["units"]), fontsize=9)
    if ctx["log_flags"][a]:
        ax.set_xscale("log")
    if ctx["log_flags"][b]:
        ax.set_yscale("log")
    ax.tick_params(labelsize=8)
    ax.set_facecolor("0.92")  # empty bins
    return mesh


def _heat_norm(heat):
    vals = np.concatenate([np.ravel(h["mean"]) for h in heat.values()])
    vals = vals[np.isfinite(vals) & (vals > 0)]
    if vals.size == 0:
        return None
    lo, hi = np.percentile(vals, [1, 99])
    if hi <= lo * 1.5:
        return matplotlib.colors.Normalize(vmin=lo * 0.95, vmax=hi * 1.05)
    return LogNorm(vmin=lo, vmax=hi)


def fig_heat_teff_logg(path, heat, ctx, dpi):
    names = ctx["names"]
    key = "teff__logg"
    fig = Figure(figsize=(7.5, 5.8), layout="constrained")
    ax = fig.subplots()
    h = heat[key]
    norm = _heat_norm({key: h})
    mesh = _heat_panel(ax, h, names, names.index("teff"), names.index("logg"), ctx, norm)
    ax.invert_xaxis()  # Kiel diagram: hot stars left, dwarfs at the bottom
    ax.invert_yaxis()
    for i in range(h["count"].shape[0]):
        for j in range(h["count"].shape[1]):
            if h["count"][i, j]:
                ax.text((h["x_edges"][i] + h["x_edges"][i + 1]) / 2, (h["y_edges"][j] + h["y_edges"][j + 1]) / 2,
                        str(h["count"][i, j]), ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(mesh, ax=ax, label=f"{ABS_LABEL} [{FLUX_UNIT}]")
    ax.set_title("mean per-spectrum ⟨|ΔF|⟩ in bins of the Kiel diagram\n(number = spectra in the bin; grey = none)")
    return _save(fig, path, dpi)


def fig_heat_pairs(path, heat, ctx, dpi):
    names = ctx["names"]
    pairs = [(a, b) for a in range(len(names)) for b in range(a + 1, len(names))]
    ncol = 5
    nrow = -(-len(pairs) // ncol)
    fig = Figure(figsize=(3.3 * ncol, 2.9 * nrow + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    norm = _heat_norm(heat)
    mesh = None
    for ax, (a, b) in zip(axes, pairs):
        mesh = _heat_panel(ax, heat[f"{names[a]}__{names[b]}"], names, a, b, ctx, norm)
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    fig.colorbar(mesh, ax=axes.tolist(), label=f"{ABS_LABEL} [{FLUX_UNIT}]", shrink=0.8, aspect=40)
    fig.suptitle("mean per-spectrum ⟨|ΔF|⟩ in bins of every pair of labels (one colour scale; grey = no spectra)")
    return _save(fig, path, dpi)


def fig_marginals(path, marg, varexp, ctx, per_spec_abs, dpi):
    names = ctx["names"]
    ncol = 3
    nrow = -(-len(names) // ncol)
    fig = Figure(figsize=(13, 3.6 * nrow + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol, sharey=True)).ravel()
    for i, (ax, n) in enumerate(zip(axes, names)):
        b = marg[n]
        centres = np.sqrt(b["edges"][:-1] * b["edges"][1:]) if ctx["log_flags"][i] else (b["edges"][:-1] + b["edges"][1:]) / 2
        ax.scatter(ctx["labels"][:, i], per_spec_abs, s=3, color="0.7", alpha=0.5, lw=0, label="spectra", rasterized=True)
        ok = b["count"] > 0
        yerr = np.array([b["mean"][ok] - b["p16"][ok], b["p84"][ok] - b["mean"][ok]]).clip(min=0)
        ax.errorbar(centres[ok], b["mean"][ok], yerr=yerr, fmt="o-", color=C_RES, ms=4, capsize=3,
                    label="bin mean, bar: 16th–84th percentile")
        if ctx["log_flags"][i]:
            ax.set_xscale("log")
        ax.set_yscale("log")
        pos = per_spec_abs[per_spec_abs > 0]
        if pos.size:
            ax.set_ylim(pos.min() / 1.3, pos.max() * 1.3)
        ax.set_xlabel(axis_label(n, ctx["units"]))
        v = varexp[n]
        ax.set_title(f"η² = {v['eta2']:.3f} (adjusted {v['eta2_adjusted']:.3f})", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    for r in range(nrow):
        axes[r * ncol].set_ylabel(f"{ABS_LABEL}\n[{FLUX_UNIT}]")
    axes[0].legend(fontsize=8)
    fig.suptitle("per-spectrum ⟨|ΔF|⟩ against each label; η² = fraction of its variance explained by the label's bins")
    return _save(fig, path, dpi)


def _zoom_window(wl, res, syn, edge=30.0):
    """The window with the largest residuals inside lines: max of Σ |ΔF| · (1 − F_SYNSPEC) over zoom_width Å.

    Weighting by the line depth keeps the zoom on lines (a residual in a smooth wing or the continuum
    shows as well in the full-range panel). The first and last `edge` Å are left out when the grid is wide
    enough: there the broadened flux depends on the spectrum beyond the grid and is a convention."""
    half_width = zoom_width(wl) / 2
    k = max(1, int(round(2 * half_width / (wl[1] - wl[0]))))
    score = np.abs(res) * np.clip(1.0 - syn, 0.0, None)
    if wl[-1] - wl[0] > 4 * (edge + half_width):
        score = np.where((wl < wl[0] + edge) | (wl > wl[-1] - edge), 0.0, score)
    sm = np.convolve(score, np.ones(k), mode="same")
    c = wl[int(np.argmax(sm))]
    lo = min(max(c - half_width, wl[0]), wl[-1] - 2 * half_width)
    return lo, lo + 2 * half_width


def fig_overlays(path, overlay, ctx, per_spec_abs, dpi):
    wl, names, labels = ctx["wavelength"], ctx["names"], ctx["labels"]
    picks = overlay["picks"]
    fig = Figure(figsize=(14, 3.3 * len(picks)), layout="constrained")
    outer = fig.add_gridspec(len(picks), 1)
    for r, (kind, row) in enumerate(picks.items()):
        syn, mod = overlay["synspec"][r], overlay["model"][r]
        res = mod.astype(np.float64) - syn
        inner = outer[r].subgridspec(2, 2, height_ratios=[3, 1.3], width_ratios=[2.2, 1], hspace=0.05)
        zoom = _zoom_window(wl, res, syn)
        lab = ", ".join(f"{PRETTY.get(n, (n,))[0]}={labels[row, j]:.4g}" for j, n in enumerate(names))
        for c, (xlim, title) in enumerate([((wl[0], wl[-1]), f"{kind} spectrum (#{row}, ⟨|ΔF|⟩ = {per_spec_abs[row]:.2e}): {lab}"),
                                           (zoom, f"zoom {zoom[0]:.0f}–{zoom[1]:.0f} Å (largest residuals in lines)")]):
            ax = fig.add_subplot(inner[0, c])
            axr = fig.add_subplot(inner[1, c], sharex=ax)
            sel = (wl >= xlim[0]) & (wl <= xlim[1])
            # SYNSPEC broader underneath, the model thinner on top: both stay visible where they agree. The
            # full range may hold 19000 pixels in ~1000 screen pixels, so thin lines there or dense line forests
            # turn into a solid block.
            w_syn, w_mod = (0.5, 0.35) if c == 0 else (2.2, 0.8)
            ax.plot(wl[sel], syn[sel], color=C_SYN, lw=w_syn, label="SYNSPEC")
            ax.plot(wl[sel], mod[sel], color=C_MODEL, lw=w_mod, alpha=0.8 if c == 0 else 1.0, label="model")
            axr.plot(wl[sel], res[sel], color=C_RES, lw=0.35 if c == 0 else 0.9)
            axr.axhline(0, color="k", lw=0.6)
            ax.set_xlim(*xlim)
            ax.tick_params(labelbottom=False, labelsize=8)
            axr.tick_params(labelsize=8)
            ax.set_title(title, fontsize=9, loc="left")
            if c == 0:
                ax.set_ylabel("F / F_cont", fontsize=9)
                axr.set_ylabel("model −\nSYNSPEC", fontsize=9)
                ax.legend(fontsize=8, loc="lower left", ncol=2)
                ax.axvspan(*zoom, color="orange", alpha=0.15, lw=0)
            if r == len(picks) - 1:
                axr.set_xlabel("wavelength (air) [Å]", fontsize=9)
    return _save(fig, path, dpi)


def fig_recovery_table(path, rec, names, dpi):
    rows = [("train (SYNSPEC)", "train"), ("validation (SYNSPEC)", "val"), ("test (SYNSPEC)", "test"),
            ("generated at test labels", "generated")]
    cell = [[f"{rec['splits'][k]['n']}"] + [_fmt(rec["splits"][k]["rmse"][n]) for n in names] for _, k in rows]
    cell.append(["—"] + [_fmt(rec["baseline_test_rmse_predict_mean"][n]) for n in names])
    logs = list(rec["splits"]["test"].get("rmse_log10", {}))
    for r, (_, k) in zip(cell, rows):  # the log-scaled labels (R) also in dex
        r += [_fmt(rec["splits"][k]["rmse_log10"][n]) for n in logs]
    cell[-1] += ["—"] * len(logs)
    row_labels = [r for r, _ in rows] + ["test, predicting the mean"]
    col_labels = ["N"] + [axis_label(n) for n in names] + [("log$_{10}$ R" if n == "resolution" else f"log$_{{10}}$ {n}") + " [dex]" for n in logs]
    fig = Figure(figsize=(13, 2.2), layout="constrained")
    ax = fig.subplots()
    ax.axis("off")
    t = ax.table(cellText=cell, rowLabels=row_labels, colLabels=col_labels, loc="center", cellLoc="center")
    t.auto_set_font_size(False)
    t.set_fontsize(9)
    t.scale(1, 1.5)
    o = rec["options"]
    ax.set_title(f"parameter recovery RMSE (noisy spectra, SNR {o['snr_range'][0]:g}–{o['snr_range'][1]:g}); "
                 f"PCA {o['n_components']} + dense {'-'.join(map(str, o['widths']))}, best epoch {rec['best_epoch']}",
                 fontsize=10)
    return _save(fig, path, dpi)


def fig_recovery_scatter(path, rec, ctx, dpi):
    names = ctx["names"]
    truth, pt, pg = rec["truth"]["test"], rec["predictions"]["test"], rec["predictions"]["generated"]
    ncol = 3
    nrow = -(-len(names) // ncol)
    fig = Figure(figsize=(13, 3.9 * nrow), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    for i, (ax, n) in enumerate(zip(axes, names)):
        ax.scatter(truth[:, i], pt[:, i], s=22, facecolors="none", edgecolors=C_SYN, lw=0.7,
                   label=f"test SYNSPEC (RMSE {_fmt(rec['splits']['test']['rmse'][n])})")
        ax.scatter(truth[:, i], pg[:, i], s=5, color=C_MODEL, lw=0,
                   label=f"model-generated (RMSE {_fmt(rec['splits']['generated']['rmse'][n])})")
        lo, hi = ctx["ranges"][n]
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
        if ctx["log_flags"][i]:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(f"true {axis_label(n, ctx['units'])}")
        ax.set_ylabel("recovered")
        ax.legend(fontsize=8, loc="upper left")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle("labels recovered from noisy test spectra: SYNSPEC vs model-generated at the same labels and noise")
    return _save(fig, path, dpi)


def _fmt(v):
    if v is None or not np.isfinite(v):
        return "—"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def make_all(out: Path, ctx, res, heat, marg, varexp, overlay, rec) -> list[str]:
    dpi = ctx["dpi"]
    abs_ps = res["per_spectrum"]["mean_abs"]
    files = [
        fig_wavelength(out / "pixels_wavelength.png", ctx["wavelength"], res["per_pixel"], res, dpi),
        fig_histogram(out / "pixels_histogram.png", {**res, "abs_percentiles": res["abs_percentiles"]}, dpi),
    ]
    if "teff__logg" in heat:
        files.append(fig_heat_teff_logg(out / "heatmap_teff_logg.png", heat, ctx, dpi))
    files.append(fig_heat_pairs(out / "heatmaps_all_pairs.png", heat, ctx, dpi))
    files.append(fig_marginals(out / "marginals.png", marg, varexp, ctx, abs_ps, dpi))
    files.append(fig_overlays(out / "overlays.png", overlay, ctx, abs_ps, dpi))
    if rec.get("status") == "ok":
        files.append(fig_recovery_table(out / "recovery_table.png", rec, ctx["names"], dpi))
        files.append(fig_recovery_scatter(out / "recovery_scatter.png", rec, ctx, dpi))
    return files

"""Statistics of model-vs-SYNSPEC residuals, computed chunk by chunk (NumPy only).

Sign convention everywhere: residual = F_model − F_SYNSPEC, |ΔF| its absolute value.
"""

from __future__ import annotations

import numpy as np


def pixels_per_bin(wavelength: np.ndarray, width: float = 1.0) -> int:
    """How many pixels of the (uniform) grid make a bin of about `width` Å (at least one)."""
    return max(1, int(round(width / float(wavelength[1] - wavelength[0]))))


def zoom_width(wavelength: np.ndarray, width: float = 30.0) -> float:
    """The width (Å) of the overlays' zoom: `width`, or half the grid (in whole Å where it is one or more) if less."""
    half = float(wavelength[-1] - wavelength[0]) / 2
    return min(width, float(np.floor(half)) if half >= 1 else half)


class LogHistogram:
    """Streaming histogram of non-negative values on log-spaced bins, for percentiles of |ΔF|.

    All test pixels can be far too many to hold (N × 19000), so percentiles come from a histogram with
    `per_decade` bins per decade, interpolated linearly inside a bin: the error of any percentile is below
    one bin width, a relative 10**(1/per_decade) − 1 (0.23 % for 1000 bins per decade). Values below
    `lo` (zeros included) are counted in an underflow bin and reported as 0; values above `hi` in an
    overflow bin reported as the largest value seen.
    """

    def __init__(self, lo: float = 1e-10, hi: float = 10.0, per_decade: int = 1000):
        n = int(round(np.log10(hi / lo) * per_decade))
        self.edges = np.logspace(np.log10(lo), np.log10(hi), n + 1)
        self.counts = np.zeros(n, dtype=np.int64)
        self.under = 0
        self.over = 0
        self.max = 0.0
        self.total = 0

    @property
    def relative_resolution(self) -> float:
        return float(self.edges[1] / self.edges[0] - 1.0)

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        if not np.all(np.isfinite(v)) or v.min() < 0:
            raise ValueError("LogHistogram takes finite non-negative values")
        self.total += v.size
        self.max = max(self.max, float(v.max()))
        lo, hi = self.edges[0], self.edges[-1]
        self.under += int(np.count_nonzero(v < lo))
        self.over += int(np.count_nonzero(v >= hi))
        inside = v[(v >= lo) & (v < hi)]
        # Bin index from the log directly: np.histogram on 10^4 uneven edges would search per value anyway.
        idx = np.floor(np.log10(inside / lo) / np.log10(self.edges[1] / lo)).astype(np.int64)
        np.clip(idx, 0, self.counts.size - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.counts.size)

    def percentile(self, q) -> np.ndarray:
        """Percentiles (0–100) of everything added, like np.percentile up to the bin resolution."""
        if self.total == 0:
            raise ValueError("no values were added")
        q = np.atleast_1d(np.asarray(q, dtype=np.float64))
        cum = np.concatenate([[self.under], self.under + np.cumsum(self.counts)]).astype(np.float64)
        out = np.empty_like(q)
        for k, qq in enumerate(q):
            target = qq / 100.0 * self.total
            if target <= self.under:
                out[k] = 0.0 if self.under else self.edges[0]
            elif target > cum[-1]:
                out[k] = self.max
            else:
                i = int(np.searchsorted(cum, target, side="left")) - 1  # bin i holds the target
                frac = (target - cum[i]) / max(cum[i + 1] - cum[i], 1.0)
                out[k] = self.edges[i] + frac * (self.edges[i + 1] - self.edges[i])
        return np.minimum(out, self.max)


class ResidualAccumulator:
    """Everything the report needs from (model, synspec) spectra, fed in chunks of rows."""

    PERCENTILES = (50.0, 68.27, 90.0, 95.0, 99.0, 99.9)

    def __init__(self, n_pixels: int):
        self.n_pixels = n_pixels
        self.n_spectra = 0
        # Per-pixel sums over spectra (float64: 1e4+ spectra of float32 would lose digits).
        self.sum_res = np.zeros(n_pixels)
        self.sum_res2 = np.zeros(n_pixels)
        self.sum_abs = np.zeros(n_pixels)
        self.hist = LogHistogram()
        self.per_spectrum: dict[str, list[np.ndarray]] = {"mean_abs": [], "mean_res": [], "max_abs": [], "rms": []}

    def add(self, model: np.ndarray, synspec: np.ndarray) -> None:
        model = np.asarray(model)
        synspec = np.asarray(synspec)
        if model.shape != synspec.shape or model.ndim != 2 or model.shape[1] != self.n_pixels:
            raise ValueError(f"model {model.shape} and SYNSPEC {synspec.shape} chunks must both be (n, {self.n_pixels})")
        res = model.astype(np.float64) - synspec.astype(np.float64)
        if not np.all(np.isfinite(res)):
            bad = np.unique(np.nonzero(~np.isfinite(res))[0])
            raise ValueError(f"non-finite flux in rows {bad[:10].tolist()} of this chunk (model or SYNSPEC)")
        a = np.abs(res)
        self.n_spectra += res.shape[0]
        self.sum_res += res.sum(axis=0)
        self.sum_res2 += (res * res).sum(axis=0)
        self.sum_abs += a.sum(axis=0)
        self.hist.add(a)
        self.per_spectrum["mean_abs"].append(a.mean(axis=1))
        self.per_spectrum["mean_res"].append(res.mean(axis=1))
        self.per_spectrum["max_abs"].append(a.max(axis=1))
        self.per_spectrum["rms"].append(np.sqrt((res * res).mean(axis=1)))

    def result(self) -> dict:
        n = self.n_spectra
        if n == 0:
            raise ValueError("no spectra were added")
        mean_res = self.sum_res / n
        # Population std per pixel; clip tiny negative round-off before the square root.
        std_res = np.sqrt(np.maximum(self.sum_res2 / n - mean_res**2, 0.0))
        per_spec = {k: np.concatenate(v) for k, v in self.per_spectrum.items()}
        pct = self.hist.percentile(self.PERCENTILES)
        return {
            "n_spectra": n,
            "n_pixels_total": int(self.hist.total),
            "abs_percentiles": {f"p{q:g}": float(v) for q, v in zip(self.PERCENTILES, pct)},
            "abs_median": float(pct[0]),
            "abs_mean": float(self.sum_abs.sum() / self.hist.total),
            "abs_max": float(self.hist.max),
            "residual_mean": float(self.sum_res.sum() / self.hist.total),
            "residual_rms": float(np.sqrt(self.sum_res2.sum() / self.hist.total)),
            "percentile_relative_resolution": self.hist.relative_resolution,
            "per_pixel": {"mean_residual": mean_res, "std_residual": std_res, "mean_abs": self.sum_abs / n},
            "per_spectrum": per_spec,
            "hist_edges": self.hist.edges,
            "hist_counts": self.hist.counts,
        }


def label_edges(lo: float, hi: float, n_bins: int, log: bool = False) -> np.ndarray:
    """Bin edges over a label's range, log-spaced for labels the model takes as log10 (R)."""
    if log:
        return np.logspace(np.log10(lo), np.log10(hi), n_bins + 1)
    return np.linspace(lo, hi, n_bins + 1)


def _bin_index(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each x, with the top edge included in the last bin; −1 outside [edges[0], edges[-1]]."""
    i = np.searchsorted(edges, x, side="right") - 1
    i[x == edges[-1]] = len(edges) - 2
    i[(x < edges[0]) | (x > edges[-1])] = -1
    return i


def binned_1d(x: np.ndarray, y: np.ndarray, edges: np.ndarray) -> dict:
    """Mean, population std, 16th/84th percentiles and count of y in bins of x (NaN where a bin is empty)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    nb = len(edges) - 1
    i = _bin_index(x, edges)
    ok = i >= 0
    count = np.bincount(i[ok], minlength=nb)
    s = np.bincount(i[ok], weights=y[ok], minlength=nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s / count
        # Second pass around the bin means: exact, and no cancellation as with E[y²] − E[y]².
        dev = np.bincount(i[ok], weights=(y[ok] - mean[i[ok]]) ** 2, minlength=nb)
        std = np.sqrt(dev / count)
    # The 16th and 84th percentiles: a scatter bar that stays positive on a log axis, unlike mean ± std.
    p16, p84 = np.full(nb, np.nan), np.full(nb, np.nan)
    for k in np.nonzero(count)[0]:
        p16[k], p84[k] = np.percentile(y[ok][i[ok] == k], [16, 84])
    return {"edges": np.asarray(edges, dtype=np.float64), "mean": mean, "std": std, "p16": p16, "p84": p84,
            "count": count}


def binned_2d(x: np.ndarray, y: np.ndarray, v: np.ndarray, x_edges: np.ndarray, y_edges: np.ndarray) -> dict:
    """Mean and count of v in the (x, y) bins; mean is NaN in empty bins. Arrays are indexed [ix, iy]."""
    ix = _bin_index(np.asarray(x, dtype=np.float64), x_edges)
    iy = _bin_index(np.asarray(y, dtype=np.float64), y_edges)
    ok = (ix >= 0) & (iy >= 0)
    nx, ny = len(x_edges) - 1, len(y_edges) - 1
    flat = ix[ok] * ny + iy[ok]
    count = np.bincount(flat, minlength=nx * ny).reshape(nx, ny)
    s = np.bincount(flat, weights=np.asarray(v, dtype=np.float64)[ok], minlength=nx * ny).reshape(nx, ny)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s / count
    return {"x_edges": np.asarray(x_edges, float), "y_edges": np.asarray(y_edges, float), "mean": mean, "count": count}


def variance_explained(x: np.ndarray, y: np.ndarray, edges: np.ndarray) -> dict:
    """Fraction of the variance of y that bins of x explain: the correlation ratio η² and its adjusted form.

    η² = SS_between / SS_total, where SS_between = Σ_bins n_b (ȳ_b − ȳ)². With few spectra per bin η² is
    biased upwards (pure noise gives ≈ (k − 1)/(N − 1) for k bins), so the adjusted
    ε² = 1 − [SS_within / (N − k)] / [SS_total / (N − 1)] is reported as well (≈ 0 for no dependence).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    b = binned_1d(x, y, edges)
    inside = _bin_index(x, edges) >= 0
    yy = y[inside]
    n = yy.size
    occupied = b["count"] > 0
    k = int(occupied.sum())
    ss_total = float(((yy - yy.mean()) ** 2).sum())
    ss_between = float((b["count"][occupied] * (b["mean"][occupied] - yy.mean()) ** 2).sum())
    if n < 2 or ss_total == 0.0:
        return {"eta2": float("nan"), "eta2_adjusted": float("nan"), "n": n, "bins_used": k}
    eta2 = ss_between / ss_total
    adj = 1.0 - ((ss_total - ss_between) / max(n - k, 1)) / (ss_total / (n - 1)) if n > k else float("nan")
    return {"eta2": eta2, "eta2_adjusted": adj, "n": n, "bins_used": k}

"""The "perfect decoder" floor of representation + broadening operator candidates against the float64 truth.

Truth: a spectrum of ../shared/data/synspec_fine_v4.h5 (0.005 Å mesh, read as piecewise-linear) broadened by
training/fastspec_train/grid/reference.py (exact in ln λ), sampled at λ_i = 4450 + 0.05·i Å. A perfect decoder
outputs the representation exactly (point samples at λ_i, or pixel means over [λ_i ± h/2]); the candidate operator
(segment nodes as in training/fastspec_train/broadening.py: 8 segments, one kernel per node, node results blended
linearly) turns it into the broadened spectrum at λ_i. |ΔF| is pooled over pixels > 30 Å from the ends.

  nice -n 5 python benchmarks/operator_floor.py --spectra 120 --draws 2 --out benchmarks/results/operator-floor-2026-12-03

Candidates (w = rotation half-width, σ = Gaussian std, both in pixels at the node; ω in rad/pixel):
  A   point samples, hat-integrated rotation then hat-integrated Gaussian (today's stage)
  B   pixel means, today's hat weights
  C   pixel means, hat rotation, Gaussian sampled at integer offsets with variance σ² − 1/12, renormalised
      (the lead's first pixel-mean stage); Cb: box-integrated rotation instead of hat
  D   pixel means, band-limited ideal: H(ω) = Rot̂(ω)·Ĝ(ω)/sinc(ω/2π) on |ω| ≤ π, applied exactly (FFT);
      Dt: the same with its taps truncated to today's kernel reach
  W*  pixel means, aliasing-aware (Wiener) kernel for a spectrum whose power falls as S(ν) = exp(−(sν)²):
      H(ω) = Σ_k ĝ(ω_k)·b(ω_k)·S(ω_k) / Σ_k b(ω_k)²·S(ω_k), ω_k = ω + 2πk, b = sinc(·/2π) the pixel box,
      ĝ = Rot̂·Ĝ; s → ∞ is D, s → 0 the box-integrated composite kernel. Taps truncated to today's reach.
  E   pixel means at h = 0.025 Å (38,000 values), today's hat weights, output at the even pixels;
      E-W: the same with the best W kernel.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from fastspec_train.grid.reference import (C_KMS, EPSILON, FWHM_PER_SIGMA, _rot_coeffs,  # noqa: E402
                                           broaden, pixel_means, rotation_ft)

START, STEP, NPIX, SEGMENTS = 4450.0, 0.05, 19000, 8
FINE = Path(__file__).resolve().parents[2] / "shared" / "data" / "synspec_fine_v4.h5"
HIST = np.linspace(-10.0, 0.0, 4001)  # log10 |ΔF| bins for pooled medians


# ---------------------------------------------------------------- taps ------------------------------------------
def hat_taps(cdf, mom, half):
    m = np.arange(-half - 1, half + 2, dtype=np.float64)
    c, d = cdf(m), mom(m)
    i0, i1, mm = np.diff(c), np.diff(d), m[1:-1]
    k = (i1[:-1] - (mm - 1) * i0[:-1]) + ((mm + 1) * i0[1:] - i1[1:])
    return k / k.sum()


def box_taps(cdf, half):
    m = np.arange(-half, half + 1, dtype=np.float64)
    k = cdf(m + 0.5) - cdf(m - 0.5)
    return k / k.sum()


def rot_cdf_mom(w, eps=EPSILON):
    c1, c2 = _rot_coeffs(eps)
    w = max(w, 1e-30)

    def cdf(x):
        t = np.clip(x / w, -1, 1)
        return 0.5 + c1 * 0.5 * (t * np.sqrt(1 - t * t) + np.arcsin(t)) + c2 * (t - t**3 / 3)

    def mom(x):
        t = np.clip(x / w, -1, 1)
        return w * (-c1 * (1 - t * t) ** 1.5 / 3 + c2 * (t * t / 2 - t**4 / 4))
    return cdf, mom


def gauss_cdf_mom(s):
    from scipy.special import erf
    s = max(s, 1e-30)
    return (lambda x: 0.5 * (1 + erf(x / (s * math.sqrt(2)))),
            lambda x: -s / math.sqrt(2 * math.pi) * np.exp(-0.5 * (x / s) ** 2))


def sampled_gauss(var, half):
    m = np.arange(-half, half + 1, dtype=np.float64)
    if var <= 1e-6:
        return (m == 0).astype(float)
    k = np.exp(-0.5 * m * m / var)
    return k / k.sum()


def taps_from_transfer(hfun, half, nq=2048):
    """h_m = (1/π)∫_0^π H(ω)cos(ωm)dω by the midpoint rule (nq nodes), |m| ≤ half, renormalised to Σ = 1."""
    om = (np.arange(nq) + 0.5) * math.pi / nq
    hv = hfun(om)
    m = np.arange(-half, half + 1)
    k = (np.cos(np.outer(m, om)) @ hv) / nq
    return k / k.sum()


def ghat(om, w, s):
    out = np.exp(-0.5 * (s * om) ** 2)
    return out * rotation_ft(om, w) if w > 0 else out


def wiener_transfer(om, w, s, scale, kmax=4):
    num = np.zeros_like(om)
    den = np.zeros_like(om)
    for k in range(-kmax, kmax + 1):
        ok = om + 2 * math.pi * k
        b = np.sinc(ok / (2 * math.pi))
        sp = np.exp(-(scale * ok) ** 2 + (scale * om) ** 2)  # S(ω_k)/S(ω), stable
        num += ghat(ok, w, s) * b * sp
        den += b * b * sp
    return num / den


# ------------------------------------------------------------- operator -----------------------------------------
class Operator:
    """Segment nodes and blending as fastspec_train.broadening.Broadener; `kernel(w, s)` returns either taps
    (2H+1,) or a callable transfer H(ω) applied exactly in the FFT domain."""

    def __init__(self, npix, step, start, kernel, stride=1):
        self.npix, self.step, self.start, self.kernel, self.stride = npix, step, start, kernel, stride
        self.nodes = np.round(np.linspace(0, npix - 1, SEGMENTS + 1)).astype(int)
        lam_max = start + step * (npix - 1)
        self.half = int(math.ceil(300.0 / C_KMS * lam_max / step)) + 2 + \
            int(math.ceil(6.0 * lam_max / (FWHM_PER_SIGMA * 1000.0 * step))) + 2
        self.pad = self.half + 8
        n = npix + 2 * self.pad
        self.nfft = n + (n % 2)
        self.omega = 2 * math.pi * np.fft.rfftfreq(self.nfft)

    def __call__(self, x, vsini, res):
        pad, n = self.pad, self.npix
        xp = np.concatenate([np.full(pad, x[0]), x, np.full(self.nfft - n - pad, x[-1])])
        spec = np.fft.rfft(xp)
        idx = np.arange(n)
        out = np.zeros(n)
        for s, c in enumerate(self.nodes):
            lam = self.start + self.step * c
            w = vsini * lam / C_KMS / self.step
            sig = lam / (FWHM_PER_SIGMA * res * self.step)
            k = self.kernel(w, sig, self.half)
            if callable(k):
                tr = k(self.omega)
            else:
                h = k.size // 2
                buf = np.zeros(self.nfft)
                buf[:h + 1], buf[self.nfft - h:] = k[h:], k[:h]
                tr = np.fft.rfft(buf)
            y = np.fft.irfft(spec * tr, n=self.nfft)[pad:pad + n]
            lo = self.nodes[s - 1] if s > 0 else c
            hi = self.nodes[s + 1] if s < SEGMENTS else c
            wgt = np.where(idx <= c, (idx - lo) / max(c - lo, 1) if s > 0 else 1.0,
                           (hi - idx) / max(hi - c, 1) if s < SEGMENTS else 1.0)
            wgt = np.where((idx >= lo) & (idx <= hi), wgt, 0.0)
            out += wgt * y
        return out[::self.stride]


def k_today(w, s, half):
    a = hat_taps(*rot_cdf_mom(w), half) if w > 0 else np.array([1.0])
    b = hat_taps(*gauss_cdf_mom(s), half)
    return np.convolve(a, b)


def k_C(w, s, half, rot="hat"):
    if w <= 0:
        a = np.array([1.0])
    elif rot == "hat":
        a = hat_taps(*rot_cdf_mom(w), half)
    else:
        a = box_taps(rot_cdf_mom(w)[0], half)
    return np.convolve(a, sampled_gauss(s * s - 1 / 12, half))


def k_D(w, s, half):
    return lambda om: ghat(om, w, s) / np.sinc(om / (2 * math.pi))


def reach(w, s, half):
    return min(half, int(math.ceil(w + 7 * s)) + 16)


def k_Dt(w, s, half):
    half = reach(w, s, half)
    return taps_from_transfer(lambda om: ghat(om, w, s) / np.sinc(om / (2 * math.pi)), half)


def k_W(scale):
    return lambda w, s, half: taps_from_transfer(lambda om: wiener_transfer(om, w, s, scale), reach(w, s, half))


# ---------------------------------------------------------------- main ------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fine", default=str(FINE))
    ap.add_argument("--spectra", type=int, default=120)
    ap.add_argument("--draws", type=int, default=2, help="draws per spectrum, each for full and for slow+sharp")
    ap.add_argument("--seed", type=int, default=3301)
    ap.add_argument("--scales", default="0.3,0.5,0.8", help="Wiener s values (pixels of 0.05 Å)")
    ap.add_argument("--out", default=None, help="path stem: writes STEM.json (the tables, printed, go into STEM.md)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    lam = START + STEP * np.arange(NPIX)
    inner = (lam > lam[0] + 30) & (lam < lam[-1] - 30)
    lam2 = START + 0.025 * np.arange(2 * NPIX)
    scales = [float(v) for v in args.scales.split(",")]
    cands = {"A": ("point", Operator(NPIX, STEP, START, k_today)),
             "B": ("mean", Operator(NPIX, STEP, START, k_today)),
             "C": ("mean", Operator(NPIX, STEP, START, k_C)),
             "Cb": ("mean", Operator(NPIX, STEP, START, lambda w, s, h: k_C(w, s, h, "box"))),
             "D": ("mean", Operator(NPIX, STEP, START, k_D)),
             "Dt": ("mean", Operator(NPIX, STEP, START, k_Dt))}
    for sc in scales:
        cands[f"W{sc:g}"] = ("mean", Operator(NPIX, STEP, START, k_W(sc)))
    cands["E"] = ("mean2", Operator(2 * NPIX, 0.025, START, k_today, stride=2))
    cands["E-D"] = ("mean2", Operator(2 * NPIX, 0.025, START, k_D, stride=2))
    groups = ["full", "slow", "coolslow"]
    vbins, rbins = [0, 10, 50, 150, 300.01], [1e3, 5e3, 2e4, 6e4, 1.16e5]
    tbins = [4000, 5000, 6000, 8000, 11001]
    hist = {c: {} for c in cands}
    per_draw = {c: {"full": [], "slow": []} for c in cands}
    draws = []

    def add(c, key, ad):
        h = hist[c].setdefault(key, np.zeros(HIST.size + 1, np.int64))
        h += np.bincount(np.searchsorted(HIST, np.log10(np.maximum(ad, 1e-12))), minlength=HIST.size + 1)

    with h5py.File(args.fine, "r") as f:
        fstart, fstep = float(f.attrs["wavelength_start"]), float(f.attrs["wavelength_step"])
        n = f["flux"].shape[0]
        rows = np.sort(rng.choice(n, size=min(args.spectra, n), replace=False))
        labels = f["labels"][...][rows]
        fwave = fstart + fstep * np.arange(f["flux"].shape[1])
        t0 = time.time()
        for j, row in enumerate(rows):
            fine = f["flux"][row].astype(np.float64)
            teff = labels[j, 0]
            reps = {"point": np.interp(lam, fwave, fine), "mean": pixel_means(fwave, fine, lam, STEP),
                    "mean2": pixel_means(fwave, fine, lam2, 0.025)}
            for kind in ("full", "slow"):
                for _ in range(args.draws):
                    if kind == "full":
                        v, r = rng.uniform(0, 300), math.exp(rng.uniform(math.log(1e3), math.log(1.15e5)))
                    else:
                        v, r = rng.uniform(0, 50), math.exp(rng.uniform(math.log(2e4), math.log(1.15e5)))
                    truth = broaden(fwave, fine, lam, v, r)
                    draws.append(dict(row=int(row), teff=float(teff), kind=kind, vsini=v, R=r))
                    vb = int(np.searchsorted(vbins, v, side="right") - 1)
                    rb = int(np.searchsorted(rbins, r, side="right") - 1)
                    tb = int(np.searchsorted(tbins, teff, side="right") - 1)
                    for c, (rep, op) in cands.items():
                        ad = np.abs(op(reps[rep], v, r) - truth)[inner]
                        per_draw[c][kind].append(float(ad.mean()))
                        add(c, kind, ad)
                        if kind == "slow" and teff < 5500:
                            add(c, "coolslow", ad)
                        if kind == "full":
                            add(c, f"v{vb}r{rb}", ad)
                        add(c, f"{kind}-t{tb}", ad)
            print(f"{j + 1}/{rows.size} spectra, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

    def median(h):
        cum = np.cumsum(h)
        k = int(np.searchsorted(cum, cum[-1] / 2))
        return float(10 ** HIST[min(max(k - 1, 0), HIST.size - 1)] * 10 ** (0.5 * (HIST[1] - HIST[0])))

    res = {"config": vars(args), "n_spectra": int(rows.size), "draws": draws, "candidates": {}}
    for c in cands:
        d = {g: median(hist[c][g]) for g in groups if g in hist[c]}
        d["p95_full"] = float(np.percentile(per_draw[c]["full"], 95))
        d["p95_slow"] = float(np.percentile(per_draw[c]["slow"], 95))
        d["bins_vsini_R"] = {k: median(h) for k, h in hist[c].items() if k.startswith("v")}
        d["bins_teff"] = {k: median(h) for k, h in hist[c].items() if "-t" in k}
        res["candidates"][c] = d
        print(f"{c:6s} full {d['full']:.2e} slow {d['slow']:.2e} coolslow {d.get('coolslow', float('nan')):.2e} "
              f"p95 {d['p95_full']:.2e} / {d['p95_slow']:.2e}")
    res["bins"] = {"vsini": vbins, "R": rbins, "teff": tbins}
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=1))
    print(tables_md(res))



# ------------------------------------------------ the recommended operator, for the lead -------------------------
def rot_ft_and_dk(k, eps=EPSILON):
    """R(k) = c1·πJ1(k)/k + c2·4(sin k − k cos k)/k³ and dR/dk = −c1·πJ2(k)/k + c2·4[sin k/k² − 3(sin k − k cos k)/k⁴]
    (series below k = 1e-2: R = 1 − (c1π/16 + 2c2/15)k², dR/dk = −(c1π/8 + 4c2/15)k)."""
    from scipy.special import j1, jv
    c1, c2 = _rot_coeffs(eps)
    small = k < 1e-2
    ks = np.where(small, 1.0, k)
    sc = np.sin(ks) - ks * np.cos(ks)
    r = np.where(small, 1 - (c1 * math.pi / 16 + 2 * c2 / 15) * k * k,
                 c1 * math.pi * j1(ks) / ks + 4 * c2 * sc / ks**3)
    dr = np.where(small, -(c1 * math.pi / 8 + 4 * c2 / 15) * k,
                  -c1 * math.pi * jv(2, ks) / ks + 4 * c2 * (np.sin(ks) / ks**2 - 3 * sc / ks**4))
    return r, dr


def taps_D(w, s, half, nfft=2048):
    """Candidate D's taps h_m, |m| ≤ half, and their derivatives with respect to w and σ (pixels):
    H(ω) = Rot̂(ωw)·exp(−σ²ω²/2)/sinc(ω/2π) sampled at ω_j = 2πj/nfft, j = 0..nfft/2, real inverse FFT (the
    trapezoid rule of (1/π)∫_0^π H cos(ωm) dω), cut to |m| ≤ half, divided by their sum (so Σh = 1 exactly);
    dH/dw = ω·Rot̂'(ωw)·Ĝ/sinc, dH/dσ = −σω²·H, through the same transform and the quotient rule."""
    om = 2 * math.pi * np.fft.rfftfreq(nfft)
    r, dr = rot_ft_and_dk(om * w)
    g = np.exp(-0.5 * (s * om) ** 2) / np.sinc(om / (2 * math.pi))
    hs = [r * g, om * dr * g, -s * om * om * r * g]
    t = [np.fft.irfft(h, n=nfft) for h in hs]
    t = [np.concatenate([x[nfft - half:], x[:half + 1]]) for x in t]
    tot = t[0].sum()
    return t[0] / tot, t[1] / tot - t[0] * t[1].sum() / tot**2, t[2] / tot - t[0] * t[2].sum() / tot**2


def tables_md(res) -> str:
    """Markdown tables of a result dict (the .json): headline, then bins (rows) × candidates (columns)."""
    c = res["candidates"]
    b = res["bins"]
    lines = ["| candidate | full | slow+sharp | cool slow+sharp | p95 full | p95 slow+sharp |", "|---|---|---|---|---|---|"]
    for k, d in c.items():
        lines.append(f"| {k} | {d['full']:.2e} | {d['slow']:.2e} | {d.get('coolslow', float('nan')):.2e} | "
                     f"{d['p95_full']:.2e} | {d['p95_slow']:.2e} |")
    head = "| bin | " + " | ".join(c) + " |\n" + "|---" * (len(c) + 1) + "|"
    vb, rb, tb = b["vsini"], b["R"], b["teff"]
    full = [d for d in res["draws"] if d["kind"] == "full"]
    out = ["\n".join(lines), "", "Median |ΔF| by (v sin i, R) bin, full draws (n = draws in the bin):", "", head]
    for i in range(len(vb) - 1):
        for j in range(len(rb) - 1):
            cnt = sum(vb[i] <= d["vsini"] < vb[i + 1] and rb[j] <= d["R"] < rb[j + 1] for d in full)
            out.append(f"| v sin i {vb[i]:g}-{vb[i + 1]:.0f}, R {rb[j]:.0e}-{rb[j + 1]:.2g} (n = {cnt}) | "
                       + " | ".join(f"{d['bins_vsini_R'].get(f'v{i}r{j}', float('nan')):.1e}" for d in c.values()) + " |")
    out += ["", "Median |ΔF| by Teff bin:", "", head]
    for g in ("full", "slow"):
        for t in range(len(tb) - 1):
            cnt = sum(d["kind"] == g and tb[t] <= d["teff"] < tb[t + 1] for d in res["draws"])
            out.append(f"| {'full' if g == 'full' else 'slow+sharp'}, Teff {tb[t]}-{min(tb[t + 1], 11000)} K (n = {cnt}) | "
                       + " | ".join(f"{d['bins_teff'].get(f'{g}-t{t}', float('nan')):.1e}" for d in c.values()) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()

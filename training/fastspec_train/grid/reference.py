"""Float64 reference broadening ("the truth") of a spectrum given on a fine uniform mesh, and exact pixel means.

`broaden(fine_wave, fine_flux, out_wave, vsini, resolution)`: the spectrum is the piecewise-linear (PL) function
through (fine_wave, fine_flux) (e.g. ../shared/data/synspec_fine_v4.h5, 0.005 Å), broadened by
  1. Gray's rotational profile, linear limb darkening ε (0.6 as in ROTIN), half-width v sin i / c in ln λ;
  2. a Gaussian of FWHM = λ/R, i.e. σ = 1/(R·2√(2 ln 2)) in ln λ,
and evaluated at `out_wave`. Both kernels have a constant width in ln λ, so the convolution is done exactly on
a uniform ln λ mesh instead of with per-segment kernels:

  - take the exact means of the PL function over the cells [u_j ± du/2] of u_j = ln λ_0 + j·du,
    du = (fine step / λ_max) / oversample (oversample = 4: finer than the fine mesh everywhere; the band then
    holds the PL function's first spectral image, its corners, which a coarse fine mesh needs);
  - convolve, reading the cell means as those of a band-limited function: FFT with the transfer function
    Rot̂(ω)·Ĝ(ω)/sinc(ω/2π) on |ω| ≤ π (ω in rad/sample; 1/sinc undoes the cell box), Rot̂(ν) = c1·π·J1(k)/k +
    c2·4(sin k − k cos k)/k³ (k = ν·w, w the half-width in samples), Ĝ(ν) = exp(−σ²ν²/2); edge values extend
    both ends (the first/last kernel half-width depends on that guess). Equivalent widths are kept exactly (the
    cell means integrate the PL function exactly, the transfer is 1 at ω = 0) and no width is added (reading point
    samples as PL would add du²/6, what hat weights do); the kernels in the label range are far wider than du;
  - evaluate the result at ln(out_wave) by 6-point Lagrange interpolation (linear interpolation would err by
    du²/8·F'', ~1e-3 in line cores at R = 1e5). vsini = 0 and R = inf return the PL function at out_wave.

So the truth is the PL fine function (which itself carries variance h²/6 of the fine step h over SYNSPEC's)
convolved exactly with the profiles, to ~1e-6 (tests/test_reference_broadening.py), for kernels wider than a few
du (R ≲ 1e6, v sin i ≳ 0.3 km/s for the 0.005 Å mesh: the whole label range); narrower ones give the band-limited
reading of the PL function, which differs from it by its corner error (h²/8·F''). Half-widths are v/c in ln λ
(λ·v/c in λ at the line, as ROTIN; ln(1 + v/c) would differ by v/2c, 5e-4 of the width at 300 km/s).

`fwhm=` (Å) replaces the λ/R Gaussian by ROTIN's constant-FWHM-in-Å one (for ../shared/data/rotin_reference_v1.h5):
rotation as above, then the result is resampled (Lagrange) on a uniform λ mesh of step (fine step)/oversample and
convolved there the same way (the cell means of the PL function directly when vsini = 0).

`vmac=` (km/s) then convolves with Gray's radial–tangential macroturbulence profile in *real space*, independently of
the closed-form transform the stages use: the profile computed numerically (macroturbulence_profile: the disk
average of the radial and tangential Gaussians by Gauss–Legendre quadrature), sampled on the ln λ mesh refined
(6-point Lagrange) to a step ≤ ζ/400 and applied as trapezoid weights (normalised to 1) out to 6ζ. The profile has a
kink at 0, which the trapezoid rule resolves to (h/ζ)²/3 of the local depth, < 1e-6.

`gaussian_lsf(fine_wave, fine_flux, out_wave, resolution)`: a line-spread function that varies along the range, in
real space: each output wavelength λ_i gets its own Gaussian of FWHM λ_i/R_i, integrated exactly against the PL
function (for the broadening stage's per-node resolution factors; with a constant R it is the stage's constant-R
truth in the same frame: a Gaussian symmetric in λ, as the stage's kernels are).

`band_limited_lsf(means, sigma_px)`: pixel means read as band-limited, as the pixel-mean broadening stage reads them,
under each output pixel's own Gaussian (σ_i pixels): the stage's operator without its node blend, so that the stage
minus this is the blend's own error, apart from the representation's.

`pixel_means(fine_wave, fine_flux, centres, step)`: the exact mean of the PL function over [c − step/2, c + step/2].

numpy only, except scipy.special.j1 (the rotation's transform), imported when needed.
"""

from __future__ import annotations

import math

import numpy as np

C_KMS = 299792.458
EPSILON = 0.6
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _rot_coeffs(epsilon: float) -> tuple[float, float]:
    """Gray's profile G(t) = c1·√(1−t²) + c2·(1−t²), |t| ≤ 1, unit area."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    return 2.0 * (1.0 - epsilon) / (math.pi * (1.0 - epsilon / 3.0)), epsilon / (2.0 * (1.0 - epsilon / 3.0))


def rotation_ft(nu: np.ndarray, w: float, epsilon: float = EPSILON) -> np.ndarray:
    """Fourier transform ∫G_rot(x)cos(νx)dx of the unit-area rotational profile of half-width w."""
    from scipy.special import j1

    c1, c2 = _rot_coeffs(epsilon)
    k = np.abs(np.asarray(nu, dtype=np.float64)) * w
    small = k < 1e-2
    ks = np.where(small, 1.0, k)
    big = c1 * math.pi * j1(ks) / ks + c2 * 4.0 * (np.sin(ks) - ks * np.cos(ks)) / ks**3
    k2 = k * k  # series: πJ1(k)/k = π/2(1 − k²/8 + k⁴/192), 4(sin k − k cos k)/k³ = 4/3(1 − k²/10 + k⁴/280)
    ser = c1 * math.pi / 2 * (1 - k2 / 8 + k2 * k2 / 192) + c2 * 4 / 3 * (1 - k2 / 10 + k2 * k2 / 280)
    return np.where(small, ser, big)


def _convolve(y: np.ndarray, w: float, sigma: float, epsilon: float) -> np.ndarray:
    """Cell means y (..., n) of a function read as band-limited → that function convolved with rotation (half-width
    w) ∗ Gaussian (std sigma), both in samples, at the cell centres: transfer Rot̂(ω)·Ĝ(ω)/sinc(ω/2) on |ω| ≤ π;
    edge values extend the ends."""
    if w <= 0 and sigma <= 0:
        return y.copy()
    pad = int(math.ceil(w + 9.0 * sigma)) + 8
    n = y.shape[-1]
    nfft = n + 2 * pad
    nfft += nfft % 2
    lead = y.shape[:-1]
    yp = np.concatenate([np.broadcast_to(y[..., :1], lead + (pad,)), y,
                         np.broadcast_to(y[..., -1:], lead + (nfft - n - pad,))], axis=-1)
    omega = 2.0 * math.pi * np.fft.rfftfreq(nfft)
    transfer = np.exp(-0.5 * (sigma * omega) ** 2) / np.sinc(omega / (2 * math.pi))
    if w > 0:
        transfer = transfer * rotation_ft(omega, w, epsilon)
    out = np.fft.irfft(np.fft.rfft(yp, axis=-1) * transfer, n=nfft, axis=-1)
    return out[..., pad:pad + n]


def macroturbulence_profile(v, zeta: float, nodes: int = 64) -> np.ndarray:
    """Gray's radial–tangential macroturbulence profile (equal radial and tangential areas, no limb darkening) at
    velocities v (km/s), unit area, numerically. At disk position μ the radial motions give the line-of-sight
    Gaussian N(v; ζμ), the tangential ones N(v; ζ√(1−μ²)), N(v; b) = exp(−v²/b²)/(√π b); the flux averages them
    over the disk with weight 2μ dμ, half each. With t = √(1−μ²) (2μ dμ = −2t dt) the tangential average is the same
    integral as the radial one, so Θ(v) = ∫₀¹ 2t N(v; ζt) dt = (2/√π ζ) ∫₀¹ exp(−(v/ζt)²) dt, here by Gauss–Legendre
    quadrature (`nodes` points) on [0, t_b] and, in ln t, on [t_b, 1], t_b = min(1, 3|v|/ζ): the integrand steps up
    near t = |v|/ζ, on the scale of t itself, which both panels resolve (relative error < 1e-12)."""
    if not zeta > 0:
        raise ValueError(f"zeta must be > 0, got {zeta}")
    x, w = np.polynomial.legendre.leggauss(nodes)
    x, w = 0.5 * (x + 1.0), 0.5 * w
    v = np.abs(np.asarray(v, dtype=np.float64))[..., None]
    tb = np.where(v > 0, np.clip(3.0 * v / zeta, 1e-30, 1.0), 1.0)  # v = 0: the integrand is 1, one panel

    def integrand(t):
        with np.errstate(divide="ignore", over="ignore", under="ignore"):
            return np.exp(-((v / (zeta * t)) ** 2))

    low = np.sum(tb * w * integrand(tb * x + 1e-300), axis=-1)
    lt = np.log(tb) * (1.0 - x)  # ln t from ln t_b to 0; dt = t d(ln t)
    t = np.exp(lt)
    high = np.sum(-np.log(tb) * w * t * integrand(t), axis=-1)
    return 2.0 / (math.sqrt(math.pi) * zeta) * (low + high)


def _macroturbulence(g: np.ndarray, u0: float, du: float, zeta: float) -> tuple[np.ndarray, float, float]:
    """g (..., n) point values on the ln λ mesh u0 + j·du, convolved with the RT profile of ζ km/s in real space on
    that mesh refined to a step ≤ ζ/400 (6-point Lagrange); edge values extend the ends. Returns (values, u0', du')."""
    from scipy.signal import fftconvolve

    dv = C_KMS * du
    k = max(1, int(math.ceil(dv / (zeta / 400.0))))
    n = g.shape[-1]
    fine_du = du / k
    uf = u0 + fine_du * np.arange((n - 1) * k + 1)
    gf = _lagrange(uf, u0, du, g) if k > 1 else g
    half = int(math.ceil(6.0 * zeta / (C_KMS * fine_du)))
    weights = macroturbulence_profile(C_KMS * fine_du * np.arange(-half, half + 1), zeta)
    weights /= weights.sum()
    lead = gf.shape[:-1]
    padded = np.concatenate([np.broadcast_to(gf[..., :1], lead + (half,)), gf,
                             np.broadcast_to(gf[..., -1:], lead + (half,))], axis=-1)
    out = fftconvolve(padded, np.broadcast_to(weights, lead + weights.shape), mode="valid", axes=-1)
    return out, u0, fine_du


def pl_antiderivative(x: np.ndarray, f: np.ndarray, t: np.ndarray) -> np.ndarray:
    """∫_{x0}^{t} of the PL function through (x (n,) increasing, f (..., n)), exactly; beyond the mesh the function
    is its end value. Returns (..., len(t))."""
    x, f, t = (np.asarray(a, dtype=np.float64) for a in (x, f, t))
    cum = np.concatenate([np.zeros(f.shape[:-1] + (1,)),
                          np.cumsum(0.5 * (f[..., 1:] + f[..., :-1]) * np.diff(x), axis=-1)], axis=-1)
    tc = np.clip(t, x[0], x[-1])
    k = np.clip(np.searchsorted(x, tc, side="right") - 1, 0, x.size - 2)
    s = (tc - x[k]) / (x[k + 1] - x[k])
    inside = cum[..., k] + (tc - x[k]) * (f[..., k] + 0.5 * s * (f[..., k + 1] - f[..., k]))
    return inside + np.minimum(t - x[0], 0.0) * f[..., :1] + np.maximum(t - x[-1], 0.0) * f[..., -1:]


def pl_integral(x: np.ndarray, f: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """∫_lo^hi of the PL function through (x, f (..., n)) (pl_antiderivative's conventions), exactly."""
    return pl_antiderivative(x, f, hi) - pl_antiderivative(x, f, lo)


def _cell_means(x: np.ndarray, f: np.ndarray, edges: np.ndarray, sampling: str = "point") -> np.ndarray:
    """Means over the cells between consecutive edges of the spectrum the fine mesh holds: the PL function through
    point samples, or (sampling="pixel_mean", f the means over cells of width dx centred on x, as the grid builder's
    `flux_fine`) the function whose integral over those cells is exact: its antiderivative, known exactly at the
    cells' edges, is read between them by the 6-point Lagrange polynomial (reading the means as PL points would
    blur by dx²/4)."""
    if sampling == "point":
        return np.diff(pl_antiderivative(x, f, edges), axis=-1) / np.diff(edges)
    if sampling != "pixel_mean":
        raise ValueError(f"fine sampling must be 'point' or 'pixel_mean', got {sampling!r}")
    dx = (x[-1] - x[0]) / (x.size - 1)
    # the antiderivative at the cell edges x0 - dx/2 + k dx, less the continuum's share (smaller numbers)
    cum = np.concatenate([np.zeros(f.shape[:-1] + (1,)), np.cumsum((f - 1.0) * dx, axis=-1)], axis=-1)
    e = np.clip(edges, x[0] - dx / 2, x[-1] + dx / 2)
    a = _lagrange(e, x[0] - dx / 2, dx, cum) + (e - (x[0] - dx / 2))
    # beyond the mesh: its end values
    a = a + np.minimum(edges - e, 0.0) * f[..., :1] + np.maximum(edges - e, 0.0) * f[..., -1:]
    return np.diff(a, axis=-1) / np.diff(edges)


def _lagrange(t: np.ndarray, t0: float, dt: float, y: np.ndarray, order: int = 6) -> np.ndarray:
    """Interpolate samples y (..., n) at t0 + j·dt to the points t (m,) with the local Lagrange polynomial through
    `order` (even) neighbours (error ∝ (dt/width)^order for a function of that width)."""
    s = (np.asarray(t, dtype=np.float64) - t0) / dt
    j0 = np.clip(np.floor(s).astype(np.int64) - order // 2 + 1, 0, y.shape[-1] - order)
    x = s - j0  # position within the stencil j0 .. j0+order-1
    out = 0.0
    for a in range(order):
        wa = np.ones_like(x)
        for b in range(order):
            if b != a:
                wa *= (x - b) / (a - b)
        out = out + wa * y[..., j0 + a]
    return out


def broaden(fine_wave, fine_flux, out_wave, vsini: float = 0.0, resolution: float = math.inf, *,
            fwhm: float | None = None, epsilon: float = EPSILON, oversample: int = 4,
            fine_sampling: str = "point", vmac: float = 0.0) -> np.ndarray:
    """Reference broadening of the PL spectrum (fine_wave (n,) uniform, Å; fine_flux (..., n)) at out_wave (m,).

    vsini (km/s) ≥ 0, resolution R (FWHM = λ/R; inf = none) or fwhm (Å, constant; ROTIN's profile, then
    `resolution` must stay inf). fine_sampling="pixel_mean": fine_flux holds means over cells of the mesh's step
    centred on fine_wave (the grid builder's `flux_fine`), read exactly (_cell_means). vmac (km/s, ≥ 0): Gray's
    radial–tangential macroturbulence, convolved in real space after rotation and the λ/R Gaussian (not with fwhm).
    Returns (..., m) float64.
    """
    x = np.asarray(fine_wave, dtype=np.float64)
    f = np.asarray(fine_flux, dtype=np.float64)
    out = np.asarray(out_wave, dtype=np.float64)
    if fwhm is not None and math.isfinite(resolution):
        raise ValueError("give either resolution or fwhm, not both")
    if vsini < 0 or resolution <= 0 or (fwhm is not None and fwhm < 0) or not vmac >= 0:
        raise ValueError("need vsini >= 0, resolution > 0, fwhm >= 0, vmac >= 0")
    if vmac > 0 and fwhm is not None:
        raise ValueError("vmac goes with resolution, not with fwhm")
    dx = (x[-1] - x[0]) / (x.size - 1)
    interp = np.vectorize(np.interp, signature="(m),(n),(n)->(m)")
    gauss_u = 0.0 if fwhm is not None or math.isinf(resolution) else 1.0 / (resolution * FWHM_PER_SIGMA)
    if vsini == 0 and gauss_u == 0 and not fwhm and vmac == 0:
        return interp(out, x, f)
    du = dx / x[-1] / oversample
    u = math.log(x[0]) + du * np.arange(int(math.floor(math.log(x[-1] / x[0]) / du)) + 1)
    dl = dx / oversample
    lam = x[0] + dl * np.arange(int(math.floor((x[-1] - x[0]) / dl)) + 1)
    if vsini == 0 and fwhm:  # ROTIN's constant-Å Gaussian alone: directly on a uniform λ mesh
        return _lagrange(out, lam[0], dl, _convolve(_cell_means(x, f, lam[0] - dl / 2 + dl * np.arange(lam.size + 1)), 0.0, fwhm / FWHM_PER_SIGMA / dl, epsilon))
    g = _convolve(_cell_means(x, f, np.exp(u[0] - du / 2 + du * np.arange(u.size + 1)), fine_sampling),
                  vsini / C_KMS / du, gauss_u / du, epsilon)
    if vmac > 0:
        g, u0, du_m = _macroturbulence(g, u[0], du, vmac)
        return _lagrange(np.log(out), u0, du_m, g)
    if not fwhm:
        return _lagrange(np.log(out), u[0], du, g)
    # then ROTIN's Gaussian on a uniform λ mesh
    h = _convolve(_lagrange(np.log(lam), u[0], du, g), 0.0, fwhm / FWHM_PER_SIGMA / dl, epsilon)
    return _lagrange(out, lam[0], dl, h)


def gaussian_lsf(fine_wave, fine_flux, out_wave, resolution, *, chunk: int = 1024) -> np.ndarray:
    """The PL spectrum through (fine_wave (n,) uniform, fine_flux (n,)) seen through a Gaussian line-spread function
    that varies along the range: out_wave[i] (Å) gets its own Gaussian of FWHM out_wave[i]/resolution[i] (resolution
    a scalar or one R per output wavelength). Exact for the PL function: on each fine interval it is c0 + b·t
    (t = x − λ), and ∫(c0 + b t) φ_σ(t) dt = c0·ΔΦ(t/σ) − b·σ·Δφ(t/σ) in closed form, summed over the intervals within
    8σ (the tail beyond is < 2e-15). The Gaussians must lie inside the mesh. Returns (m,) float64."""
    from scipy.special import ndtr

    x = np.asarray(fine_wave, dtype=np.float64)
    f = np.asarray(fine_flux, dtype=np.float64)
    lam = np.asarray(out_wave, dtype=np.float64)
    res = np.broadcast_to(np.asarray(resolution, dtype=np.float64), lam.shape)
    if not (np.all(np.isfinite(res)) and np.all(res > 0)):
        raise ValueError("resolution must be finite and > 0")
    dx = (x[-1] - x[0]) / (x.size - 1)
    sigma = lam / (res * FWHM_PER_SIGMA)
    if np.any(lam - 8 * sigma < x[0]) or np.any(lam + 8 * sigma > x[-1]):
        raise ValueError("the Gaussians reach beyond the fine mesh")
    slope = np.diff(f) / dx  # b of each fine interval
    out = np.empty_like(lam)
    for a in range(0, lam.size, chunk):
        lm, sg = lam[a:a + chunk, None], sigma[a:a + chunk, None]
        first = np.floor((lm - 8 * sg - x[0]) / dx).astype(np.int64)
        width = int((np.ceil((lm + 8 * sg - x[0]) / dx).astype(np.int64) - first).max())
        j = np.minimum(first + np.arange(width)[None, :], x.size - 2)  # intervals [x_j, x_j+1]
        t0, t1 = x[j] - lm, x[j + 1] - lm
        u0, u1 = t0 / sg, t1 / sg
        c0 = f[j] - slope[j] * t0  # the PL function at t = 0 of the interval's line
        pdf = lambda u: np.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)  # noqa: E731
        mass = c0 * (ndtr(u1) - ndtr(u0)) + slope[j] * sg * (pdf(u0) - pdf(u1))
        last = j == x.size - 2  # clamped repeats of the last interval (only past a window's end): counted once
        mass[:, 1:][last[:, 1:] & last[:, :-1]] = 0.0
        out[a:a + chunk] = mass.sum(axis=1)
    return out


def band_limited_lsf(means, sigma_px, *, chunk: int = 2048) -> np.ndarray:
    """Pixel means (n,) → the spectrum at the pixel centres under a Gaussian of σ_i pixels at pixel i (sigma_px (n,)),
    the means read as band-limited: pixel i's taps are those of the pixel-mean stage's kernel for σ_i alone
    (docs/model-format.md: the inverse real DFT, nfft = 1024, of exp(−σ²ω²/2)/sinc(ω/2), kept to |m| ≤ ⌈7σ⌉ + 16 and
    divided by their sum), in float64; edge values extend both ends. Returns (n,) float64."""
    x = np.asarray(means, dtype=np.float64)
    sigma = np.asarray(sigma_px, dtype=np.float64)
    nfft = 1024
    reach = np.ceil(7.0 * sigma).astype(np.int64) + 16
    top = int(reach.max())
    if 4 * top > nfft:
        raise ValueError("kernels this wide need a longer transform than band_limited_lsf's 1024")
    om = 2.0 * math.pi * np.arange(nfft // 2 + 1) / nfft
    inv_box = np.ones_like(om)
    inv_box[1:] = 0.5 * om[1:] / np.sin(0.5 * om[1:])
    m = np.arange(-top, top + 1)
    padded = np.concatenate([np.full(top, x[0]), x, np.full(top, x[-1])])
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * top + 1)  # row i: x[i + top .. i - top]
    out = np.empty_like(x)
    for a in range(0, x.size, chunk):
        sg, rc = sigma[a:a + chunk, None], reach[a:a + chunk, None]
        taps = np.fft.irfft(np.exp(-0.5 * (sg * om) ** 2) * inv_box, n=nfft, axis=1)[:, np.abs(m)]
        taps = np.where(np.abs(m) <= rc, taps, 0.0)
        taps /= taps.sum(axis=1, keepdims=True)
        out[a:a + chunk] = np.sum(taps[:, ::-1] * windows[a:a + chunk], axis=1)  # y_i = sum_m k(m) x[i - m]
    return out


def pixel_means(fine_wave, fine_flux, centres, step: float) -> np.ndarray:
    """Exact mean of the PL function through (fine_wave (n,) increasing, fine_flux (..., n)) over each pixel
    [c − step/2, c + step/2] (centres (m,)); the pixels must lie inside the mesh. Returns (..., m)."""
    x = np.asarray(fine_wave, dtype=np.float64)
    f = np.asarray(fine_flux, dtype=np.float64)
    c = np.asarray(centres, dtype=np.float64)
    lo, hi = c - 0.5 * step, c + 0.5 * step
    if lo.min() < x[0] or hi.max() > x[-1]:
        raise ValueError("pixels reach beyond the fine mesh")
    return pl_integral(x, f, lo, hi) / step

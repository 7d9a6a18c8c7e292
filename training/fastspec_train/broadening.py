"""Rotational and instrumental broadening in torch, batched, on the training device (like SYNSPEC's ROTIN).

Physics. A spectrum is broadened by
  1. a rotational profile of half-width Δλ_L = λ·vsini/c with linear limb darkening ε (ε = 0.6, as in
     ROTIN): G(x) = [2(1−ε)√(1−x²) + (πε/2)(1−x²)] / [π(1−ε/3)], x = Δλ/Δλ_L, |x| ≤ 1 (Gray's profile);
  2. then a Gaussian instrumental profile of FWHM = λ/R.

Both widths grow with λ (by 21 % over 4450–5400 Å). Instead of resampling to a ln λ grid (which we tried:
linear interpolation forth and back alone changes unresolved line cores of the 0.05 Å SYNSPEC spectra by
up to 0.2, median 9e-5, so v sin i = 0 and R = ∞ would not be the identity), the convolution stays on the
native λ grid: the grid is cut into `segments` pieces, at every segment node λ_s the kernels are built
for the widths at λ_s, and between two nodes the two convolutions are blended linearly (a partition of
unity). The kernel width then varies smoothly and piecewise-linearly with λ; with 8 segments neighbouring
widths differ by 2.5 %, and a blend of two profiles 2.5 % apart equals the profile of the mean width to
~1e-4 of its second moment.

Kernels. A spectrum given on pixels is taken as its piecewise-linear interpolant (what ROTIN does when it
regrids); convolving that with a profile p and sampling at the pixels is a discrete convolution with the
weights K(m) = ∫ Λ(x − m) p(x) dx, Λ the unit triangle. K is computed in closed form from the profile's
antiderivatives (CDF and first moment), in float64, so kernels narrower than a pixel are exact: width → 0
gives K = δ (the identity, no NaN), and Σ K = 1 whatever the width. The convolution runs as FFT
(torch.fft.rfft/irfft) with per-sample kernel spectra, batched; a direct grouped conv1d is in
`direct_convolve` for the speed comparison (numbers in training/README.md).

Pixel means (sampling="pixel_mean", what the decoder of a version-3 model outputs). The input is the spectrum
integrated over each pixel, i.e. convolved with a one-pixel box and sampled; lines narrower than a pixel keep their
strength there, which point samples lose. One composite kernel per node then has the transform
Rot̂(ωw)·Ĝ(ω)/sinc(ω/2) on |ω| ≤ π (the box divided out, the spectrum read as band-limited), taps by an inverse
real FFT (band_limited_kernel). Against SYNSPEC's fine mesh its floor is 5.6e-6 (median |ΔF|, v sin i < 50, R > 2e4)
where hat weights on the same pixel means give 1.5e-4 (benchmarks/results/operator-floor-2026-12-03.md).

Macroturbulence (pixel means only; `vmac=` ζ in km/s). Gray's radial–tangential profile with equal radial and
tangential areas and no limb darkening: at disk position μ the radial motions give a Gaussian exp(−(v/ζμ)²) along
the line of sight, the tangential ones exp(−(v/ζ√(1−μ²))²); averaged over the disk with weight 2μ dμ, each part's
transform is ∫₀¹ 2μ exp(−a μ²) dμ = (1 − e^{−a})/a, a = (π ζ s)² (s in cycles per km/s), and so is their sum's. It is
one more factor M(ω) = (1 − e^{−a})/a, a = (ω z/2)², z = ζ in pixels at the node, of the composite kernel; it
widens the taps' reach by 5z (the profile's mass beyond 5ζ is < 1.5e-12). A point-sample stage refuses ζ > 0.

Line-spread function varying along the range (`resolution_factors=`, one g_s per node, shared by the batch): node s
takes the Gaussian of R_s = R·g_s, R the label (the LSF's scale), g its shape; between nodes the blend interpolates
like every width. g = None is all ones, the same numbers. Check it against SYNSPEC's fine mesh broadened with a
Gaussian of FWHM λ/R(λ) per output pixel (tests/test_lsf.py, benchmarks/results/lsf-*.md).

Edges. Each window is extended by its edge value (continuum-normalised flux, so constant extension is the
least-surprising guess) over the widest kernel, so the circular FFT convolution never wraps around.
Within one kernel half-width of either end the true broadened flux depends on the spectrum outside the
grid and is undefined anyway (≤ 5.4 Å for v sin i = 300 km/s, ≤ 14 Å = 6σ for R = 1000).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastspec.model_format import SAMPLINGS  # what the input pixels hold

C_KMS = 299792.458
EPSILON = 0.6  # linear limb-darkening coefficient of the rotational profile, as in ROTIN
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _next_fast_len(n: int) -> int:
    """Smallest 2^a·3^b·5^c ≥ n (sizes pocketfft/cuFFT handle fastest)."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _hat_weights(cdf, moment, half: int, device) -> torch.Tensor:
    """K(m) = ∫ Λ(x − m) p(x) dx for m = −half..half from the antiderivatives C (cdf) and D (moment,
    D' = x·p) of the profile; cdf/moment map an (1, M) offset tensor to (B, M)."""
    m = torch.arange(-half - 1, half + 2, device=device, dtype=torch.float64)[None, :]
    c, d = cdf(m), moment(m)
    i0 = c[:, 1:] - c[:, :-1]  # ∫_{m}^{m+1} p
    i1 = d[:, 1:] - d[:, :-1]  # ∫_{m}^{m+1} x p
    mm = m[:, 1:-1]
    # ∫_{m−1}^{m} (x − m + 1) p + ∫_{m}^{m+1} (m + 1 − x) p
    k = (i1[:, :-1] - (mm - 1) * i0[:, :-1]) + ((mm + 1) * i0[:, 1:] - i1[:, 1:])
    # Renormalise: removes the (< 1e-8) Gaussian tail beyond `half`, so equivalent widths are conserved.
    return k / k.sum(dim=1, keepdim=True)


def gaussian_kernel(sigma_px: torch.Tensor, half: int) -> torch.Tensor:
    """Pixel weights (B, 2·half+1) of a unit-area Gaussian of std sigma_px (B,) pixels; sigma 0 → δ."""
    s = sigma_px.to(torch.float64).clamp_min(1e-30)[:, None]

    def cdf(x):
        return 0.5 * (1.0 + torch.erf(x / (s * math.sqrt(2.0))))

    def moment(x):  # ∫ x φ dx = −σ² φ
        return -s / math.sqrt(2.0 * math.pi) * torch.exp(-0.5 * (x / s) ** 2)

    return _hat_weights(cdf, moment, half, sigma_px.device)


def rotation_transform(k: torch.Tensor, epsilon: float = EPSILON) -> torch.Tensor:
    """Fourier transform of Gray's unit-area rotational profile at k = ω·w: c1·π·J1(k)/k + 4·c2·(sin k − k cos k)/k³
    (series below k = 1e-2, where the closed form cancels)."""
    c1 = 2.0 * (1.0 - epsilon) / (math.pi * (1.0 - epsilon / 3.0))
    c2 = epsilon / (2.0 * (1.0 - epsilon / 3.0))
    small = k < 1e-2
    ks = torch.where(small, torch.ones_like(k), k)
    closed = c1 * math.pi * torch.special.bessel_j1(ks) / ks + 4.0 * c2 * (torch.sin(ks) - ks * torch.cos(ks)) / ks**3
    return torch.where(small, 1.0 - (c1 * math.pi / 16.0 + 2.0 * c2 / 15.0) * k * k, closed)


MAX_VMAC = 50.0  # km/s: the largest radial-tangential macroturbulence the stage takes (the C++ kMaxVmac)


def macroturbulence_transform(a: torch.Tensor) -> torch.Tensor:
    """Fourier transform of Gray's radial–tangential profile (equal areas, no limb darkening) at a = (π ζ s)²:
    (1 − e^{−a})/a (series below a = 1e-2, as the C++ stage)."""
    small = a < 1e-2
    a_s = torch.where(small, torch.ones_like(a), a)
    closed = -torch.expm1(-a_s) / a_s
    series = 1.0 - a * (1 / 2 - a * (1 / 6 - a * (1 / 24 - a * (1 / 120 - a * (1 / 720 - a / 5040)))))
    return torch.where(small, series, closed)


def band_limited_reach(w: float, sigma: float, z: float = 0.0) -> int:
    """How far the pixel-mean kernel's taps are kept (pixels), as the C++ stage: ⌈w + 7σ⌉ + 16, plus ⌈5z⌉ for a
    macroturbulence of z pixels."""
    return int(math.ceil(w + 7.0 * sigma)) + 16 + (int(math.ceil(5.0 * z)) if z > 0 else 0)


def band_limited_kernel(halfwidth_px: torch.Tensor, sigma_px: torch.Tensor, half: int,
                        epsilon: float = EPSILON, vmac_px: torch.Tensor | None = None,
                        base_half: int | None = None) -> torch.Tensor:
    """Taps (B, 2·half+1) that turn pixel means into the point-sampled spectrum broadened by rotation (half-width
    w), a Gaussian (σ) and radial–tangential macroturbulence (ζ = vmac_px, default 0), all in pixels: the inverse
    real DFT (nfft = the power of two ≥ 4·reach, at least 1024) of H(ω) = Rot̂(ωw)·exp(−σ²ω²/2)·M(ω)/sinc(ω/2)
    (M = macroturbulence_transform((ωζ/2)²)), the spectrum read as band-limited; kept to |m| ≤ reach (⌈w + 7σ⌉ + 16,
    at most `base_half` (default `half`), plus ⌈5ζ⌉) and divided by their sum. w = σ = ζ = 0: the identity. As the
    C++ stage."""
    w_all = halfwidth_px.to(torch.float64)
    s_all = sigma_px.to(torch.float64)
    z_all = torch.zeros_like(w_all) if vmac_px is None else vmac_px.to(torch.float64)
    base_half = half if base_half is None else base_half
    out = torch.zeros(w_all.shape[0], 2 * half + 1, dtype=torch.float64, device=halfwidth_px.device)
    for b in range(w_all.shape[0]):
        w, s, z = float(w_all[b]), float(s_all[b]), float(z_all[b])
        if w == 0 and s == 0 and z == 0:
            out[b, half] = 1.0
            continue
        reach = min(base_half, band_limited_reach(w, s)) + band_limited_reach(0.0, 0.0, z) - 16
        if reach > half:
            raise ValueError(f"the kernel reaches {reach} pixels, beyond half = {half}")
        nfft = 1024  # a short transform wraps a sharp kernel's 1/m ringing onto its taps (as the C++ stage)
        while nfft < 4 * reach:
            nfft *= 2
        om = 2.0 * math.pi * torch.arange(nfft // 2 + 1, dtype=torch.float64, device=out.device) / nfft
        box = torch.ones_like(om)
        box[1:] = torch.sin(0.5 * om[1:]) / (0.5 * om[1:])
        h = rotation_transform(om * w, epsilon) * torch.exp(-0.5 * (s * om) ** 2) / box
        if z > 0:
            h = h * macroturbulence_transform((0.5 * om * z) ** 2)
        taps = torch.fft.irfft(h, n=nfft)[: reach + 1]
        row = torch.cat([taps.flip(0)[:-1], taps])
        out[b, half - reach:half + reach + 1] = row / row.sum()
    return out


def rotation_kernel(halfwidth_px: torch.Tensor, half: int, epsilon: float = EPSILON) -> torch.Tensor:
    """Pixel weights (B, 2·half+1) of Gray's rotational profile of half-width halfwidth_px (B,) pixels and
    linear limb darkening ε; half-width 0 → δ."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"limb-darkening coefficient epsilon must be in [0, 1], got {epsilon}")
    c1 = 2.0 * (1.0 - epsilon) / (math.pi * (1.0 - epsilon / 3.0))  # G = c1·√(1−t²) + c2·(1−t²)
    c2 = epsilon / (2.0 * (1.0 - epsilon / 3.0))
    w = halfwidth_px.to(torch.float64).clamp_min(1e-30)[:, None]

    def cdf(x):
        t = (x / w).clamp(-1.0, 1.0)
        return 0.5 + c1 * 0.5 * (t * torch.sqrt(1.0 - t * t) + torch.asin(t)) + c2 * (t - t**3 / 3.0)

    def moment(x):  # ∫ x p(x) dx = w ∫ t G(t) dt
        t = (x / w).clamp(-1.0, 1.0)
        return w * (-c1 * (1.0 - t * t) ** 1.5 / 3.0 + c2 * (t * t / 2.0 - t**4 / 4.0))

    return _hat_weights(cdf, moment, half, halfwidth_px.device)


def _as_batch(x, batch: int, name: str, device) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    if torch.isnan(t).any():
        raise ValueError(f"{name} has NaN values")
    return t


def _kernel_spectrum(kernel: torch.Tensor, n_fft: int) -> torch.Tensor:
    """rfft of centred kernels (B, 2h+1) placed circularly around index 0 of a length-n_fft signal."""
    b, k = kernel.shape
    h = k // 2
    buf = kernel.new_zeros(b, n_fft)
    buf[:, : h + 1] = kernel[:, h:]
    buf[:, n_fft - h:] = kernel[:, :h]
    return torch.fft.rfft(buf, dim=1)


def fft_convolve(x: torch.Tensor, kernels: list[torch.Tensor]) -> torch.Tensor:
    """Convolve each row of x (B, N) with its kernels (each (B, 2h+1), applied one after the other),
    with edge extension; the result has x's shape and dtype."""
    b, n = x.shape
    pad = sum(k.shape[1] // 2 for k in kernels)  # the reach of all kernels applied in turn
    n_fft = _next_fast_len(n + 2 * pad)
    xp = torch.cat([x[:, :1].expand(b, pad), x, x[:, -1:].expand(b, n_fft - n - pad)], dim=1)
    spec = torch.fft.rfft(xp, dim=1)
    for k in kernels:
        spec = spec * _kernel_spectrum(k.to(x.dtype), n_fft)
    return torch.fft.irfft(spec, n=n_fft, dim=1)[:, pad:pad + n]


def direct_convolve(x: torch.Tensor, kernels: list[torch.Tensor]) -> torch.Tensor:
    """Same as fft_convolve with a direct grouped conv1d (for the speed comparison and as a cross-check)."""
    b, n = x.shape
    y = x
    for k in kernels:
        h = k.shape[1] // 2
        yp = torch.cat([y[:, :1].expand(b, h), y, y[:, -1:].expand(b, h)], dim=1)
        # conv1d is a correlation; the kernels are symmetric, so no flip is needed.
        y = torch.nn.functional.conv1d(yp[None], k.to(x.dtype)[:, None, :], groups=b)[0]
    return y


class Broadener:
    """Apply v sin i (km/s) and resolving power R to a batch of spectra on a uniform λ grid.

    >>> br = Broadener(4450.0, 0.05, 19000, device="cpu")
    >>> out = br(flux, vsini, resolution)    # flux (B, 19000); vsini, resolution (B,) or scalars

    R = inf switches the Gaussian off, vsini = 0 the rotation; both off is the identity. ``br(flux, vsini, resolution,
    vmac=ζ)`` adds radial–tangential macroturbulence (km/s, in [0, MAX_VMAC]; pixel means only, as the C++ stage).
    ``resolution_factors=g`` (len(br.node_wavelength) values, shared by the batch): node s takes R·g_s, as the C++
    stage (finite R, every g_s finite and > 0, R·g_s >= min_resolution). `sampling` says what the
    input pixels hold ("point" samples or "pixel_mean"s); the output is the broadened spectrum at the pixel centres. `max_vsini` and
    `min_resolution` size the kernels: wider kernels are refused rather than silently truncated.
    """

    def __init__(self, wavelength_start: float, wavelength_step: float, n_pixels: int, *,
                 epsilon: float = EPSILON, segments: int = 8, max_vsini: float = 300.0,
                 min_resolution: float = 1000.0, device="cpu", dtype=torch.float32, method: str = "fft",
                 sampling: str = "point"):
        if wavelength_start <= 0 or wavelength_step <= 0 or n_pixels < 2:
            raise ValueError("need wavelength_start > 0, wavelength_step > 0 and n_pixels >= 2")
        if method not in ("fft", "direct"):
            raise ValueError(f"method must be 'fft' or 'direct', got {method!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {sorted(SAMPLINGS)}, got {sampling!r}")
        self.sampling = sampling
        self.epsilon = float(epsilon)
        self.device = torch.device(device)
        self.dtype = dtype
        self.method = method
        self.n_pixels = int(n_pixels)
        self.max_vsini = float(max_vsini)
        self.min_resolution = float(min_resolution)
        self.step = float(wavelength_step)
        segments = max(1, min(int(segments), n_pixels - 1))
        self.nodes = np.round(np.linspace(0, n_pixels - 1, segments + 1)).astype(np.int64)
        self.node_wavelength = wavelength_start + wavelength_step * self.nodes
        lam_max = wavelength_start + wavelength_step * (n_pixels - 1)
        self.rot_half = int(math.ceil(self.max_vsini / C_KMS * lam_max / self.step)) + 2
        self.gauss_half = int(math.ceil(6.0 * lam_max / (FWHM_PER_SIGMA * self.min_resolution * self.step))) + 2
        # the widest kernel (the C++ stage's max_half): pixel means' band-limited kernels reach w + 7σ + 16, plus 5ζ
        # for macroturbulence up to MAX_VMAC
        self.base_half = self.rot_half + self.gauss_half + (self.gauss_half // 6 + 16 if sampling == "pixel_mean" else 0)
        vmac_half = int(math.ceil(5.0 * MAX_VMAC / C_KMS * lam_max / self.step))
        self.max_half = self.base_half + (vmac_half if sampling == "pixel_mean" else 0)
        # Hat weights of each segment node over its window [node_{s−1}, node_{s+1}].
        self._hats = []
        for s, c in enumerate(self.nodes):
            lo = self.nodes[s - 1] if s > 0 else c
            hi = self.nodes[s + 1] if s < segments else c
            idx = np.arange(lo, hi + 1)
            left = (idx - lo) / max(c - lo, 1)
            right = (hi - idx) / max(hi - c, 1)
            w = np.where(idx <= c, left if s > 0 else 1.0, right if s < segments else 1.0)
            self._hats.append((int(lo), int(hi), torch.as_tensor(w, dtype=dtype, device=self.device)))

    def kernels(self, vsini: torch.Tensor, resolution: torch.Tensor, wavelength: float,
                vmac: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Rotation and Gaussian pixel kernels for the widths at `wavelength` (both float64, (B, ·)); pixel means:
        one composite kernel, with macroturbulence when vmac (km/s, (B,)) is given."""
        halfwidth = vsini * (wavelength / C_KMS / self.step)
        sigma = wavelength / (FWHM_PER_SIGMA * resolution * self.step)  # 0 for R = inf
        if self.sampling == "pixel_mean":
            vmac_px = None if vmac is None else vmac * (wavelength / C_KMS / self.step)
            return [band_limited_kernel(halfwidth, sigma, self.max_half, self.epsilon, vmac_px, self.base_half)]
        return [rotation_kernel(halfwidth, self.rot_half, self.epsilon), gaussian_kernel(sigma, self.gauss_half)]

    def _check_factors(self, factors, resolution: torch.Tensor) -> torch.Tensor | None:
        """resolution_factors as float64 (nodes,), validated as the C++ stage does (check_resolution_factors)."""
        if factors is None:
            return None
        g = torch.as_tensor(factors, dtype=torch.float64, device=self.device)
        if g.shape != (len(self.nodes),):
            raise ValueError(f"resolution_factors must have shape ({len(self.nodes)},), one per node, got {tuple(g.shape)}")
        if not bool(torch.isfinite(g).all() & (g > 0).all()):
            raise ValueError(f"resolution factors must be finite and > 0, got {g.tolist()}")
        if not bool(torch.isfinite(resolution).all()):
            raise ValueError("resolution factors scale a finite R; got R = inf")
        lowest = float((resolution.min() * g).min())
        if lowest < self.min_resolution * (1 - 1e-9):
            raise ValueError(f"R·g = {lowest:g} is below min_resolution {self.min_resolution:g}")
        return g

    def __call__(self, flux, vsini, resolution, vmac=None, resolution_factors=None) -> torch.Tensor:
        flux = torch.as_tensor(flux)
        if flux.ndim != 2 or flux.shape[1] != self.n_pixels:
            raise ValueError(f"flux must have shape (B, {self.n_pixels}), got {tuple(flux.shape)}")
        flux = flux.to(device=self.device, dtype=self.dtype)
        b = flux.shape[0]
        vsini = _as_batch(vsini, b, "vsini", self.device)
        resolution = _as_batch(resolution, b, "resolution", self.device)
        if (vsini < 0).any() or (vsini > self.max_vsini * (1 + 1e-9)).any():
            raise ValueError(f"vsini must lie in [0, {self.max_vsini:g}] km/s, got {float(vsini.min()):g}..{float(vsini.max()):g}")
        if (resolution < self.min_resolution * (1 - 1e-9)).any():
            raise ValueError(f"resolution must be >= {self.min_resolution:g} (inf allowed), got {float(resolution.min()):g}")
        if vmac is not None:
            vmac = _as_batch(vmac, b, "vmac", self.device)
            if not bool(((vmac >= 0) & (vmac <= MAX_VMAC)).all()):
                raise ValueError(f"vmac must lie in [0, {MAX_VMAC:g}] km/s, got {float(vmac.min()):g}..{float(vmac.max()):g}")
            if self.sampling != "pixel_mean" and bool((vmac > 0).any()):
                raise ValueError("vmac > 0: macroturbulence needs sampling='pixel_mean' (the format-3 stage); "
                                 "the point-sample stage has none")
        factors = self._check_factors(resolution_factors, resolution)
        conv = fft_convolve if self.method == "fft" else direct_convolve
        out = torch.zeros_like(flux)
        for s, ((lo, hi, hat), lam) in enumerate(zip(self._hats, self.node_wavelength)):
            node_resolution = resolution if factors is None else resolution * factors[s]
            ks = self.kernels(vsini, node_resolution, float(lam), vmac)
            # The window plus the kernel reach on both sides, so interior pixels see the real neighbours.
            reach = self.max_half
            a, z = max(lo - reach, 0), min(hi + reach + 1, self.n_pixels)
            y = conv(flux[:, a:z], ks)
            out[:, lo:hi + 1] += hat * y[:, lo - a:hi + 1 - a]
        return out


def gaussian_constant_fwhm(flux: torch.Tensor, fwhm_px, method: str = "fft") -> torch.Tensor:
    """A Gaussian of constant FWHM in *pixels* (ROTIN's instrumental profile is constant in Å); used to
    compare against ROTIN's reference output. flux (B, N); fwhm_px scalar or (B,)."""
    b = flux.shape[0]
    sigma = _as_batch(fwhm_px, b, "fwhm", flux.device) / FWHM_PER_SIGMA
    half = int(math.ceil(6 * float(sigma.max()))) + 2
    conv = fft_convolve if method == "fft" else direct_convolve
    return conv(flux, [gaussian_kernel(sigma, half)])

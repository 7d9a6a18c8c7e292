"""`fastspec.fit`: least-squares fit of the six labels (plus a radial velocity and a continuum polynomial) to
an observed spectrum, with the decoder's analytic Jacobian.

Model of the observation at wavelength λ (Å, in the model's medium, air for the shipped models):

    m(λ) = C(x) · F(λ / (1 + v/c); labels),   C(x) = Σ_k c_k P_k(x),  x ∈ [−1, 1] across the fitted pixels

F is the decoder's spectrum (z = 0) interpolated linearly from the model grid at the rest wavelength, P_k
are Legendre polynomials. The residuals (m − flux)/error go to `scipy.optimize.least_squares` ('trf', with
bounds) together with their exact Jacobian: the core's dF/d(labels) interpolated the same way as F, the
RV column from the model spectrum's wavelength gradient, and the polynomial basis for the continuum.

Labels are optimised in a normalised coordinate u ∈ [−1, 1] over the allowed range (log10 for R, as the
model's input scaling), so the six directions have comparable scales; results are reported in physical units.

The emulator's own error, in two parts (``model_error``, on by default when the model file has them):
the variance per pixel is σ_obs² + (C · σ_model)², σ_model the file's emulator error (its measured RMS against
SYNSPEC on held-out spectra at the current v sin i and R, interpolated like F; re-evaluated at each run's start
and at the solution); and because that error is correlated over pixels (a star's residual pattern is fixed, so
it does not average down like noise), the label systematics measured at export (the spread of noise-free fits
of held-out spectra) are added in quadrature to the label covariance. Without them the reported uncertainties
were 1.3-2.6× smaller than the actual scatter of Teff, log g and [M/H] at SNR 50-100 with the shipped
default (benchmarks/results/fit-2026-12-02.md; 3-6× with the less accurate model of commit 2d8ffae).

Observations as they come: vacuum wavelengths (``medium="vacuum"``) are converted to the model's medium;
pixels that no allowed RV maps into the model grid are trimmed (and counted); a scalar error applies to every
pixel; masked arrays' masks are honoured.
No error at all: a first fit with one error for every pixel gives the residuals, their RMS is taken as the noise
of every pixel, and the fit is repeated with it (``error_estimate``). Flux in any unit: the fit runs on flux
divided by its median (the continuum polynomial carries the unit). v sin i = 0 is a physical limit: a fit there
is no failure, and where the data cannot tell v sin i from 0 a 95 % upper limit is reported. Outliers (cosmic rays, bad pixels): ``clip`` rejects pixels whose
normalised residual exceeds clip·σ and refits, ``loss`` passes a robust loss to least_squares.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .decoder import Decoder
from .observations import sigma_from_ivar
from .wavelength import air_to_vacuum, vacuum_to_air

C_KMS = 299792.458
LOSSES = ("linear", "soft_l1", "huber", "cauchy", "arctan")
MAX_CONTINUUM_DEGREE = 10  # higher degrees bend into the wings of strong lines (Hβ, Mg b) over this 950 Å range
AT_REST = "vsini"  # a label whose lower bound 0 is physical (a star that does not rotate), not a failed fit
SQUARED_FLOOR = 1e-3  # km/s: the lowest v sin i at which the core's Jacobian is taken when v sin i² is fitted


class FitQualityWarning(UserWarning):
    """The fit converged but its result should not be trusted as is (see FitResult.quality)."""


@functools.lru_cache(maxsize=4)
def _cached_decoder(path: str | None) -> Decoder:
    """Decoders loaded by fit() itself, kept for the next call (loading the default model takes ~0.3 s)."""
    return Decoder.load(path)


def _from_specutils(spectrum):
    """(wavelength Å, flux, error or None, bad-pixel mask or None) of a specutils Spectrum (or Spectrum1D)."""
    import astropy.units as u
    from astropy.nddata import InverseVariance, StdDevUncertainty, VarianceUncertainty

    wave = spectrum.spectral_axis.to(u.AA, equivalencies=u.spectral()).value
    flux = np.asarray(spectrum.flux.value, dtype=np.float64)
    unc, error = spectrum.uncertainty, None
    if isinstance(unc, StdDevUncertainty):
        error = np.asarray(unc.array, dtype=np.float64)
    elif isinstance(unc, VarianceUncertainty):
        error = np.sqrt(np.asarray(unc.array, dtype=np.float64))
    elif isinstance(unc, InverseVariance):
        error = sigma_from_ivar(unc.array)
    elif unc is not None:
        raise ValueError(f"unsupported uncertainty type {type(unc).__name__}: use StdDev, Variance or InverseVariance")
    if isinstance(unc, StdDevUncertainty) and unc.unit is not None:  # in the flux's unit
        error = np.asarray(unc.quantity.to_value(spectrum.flux.unit), dtype=np.float64)
    bad = None if spectrum.mask is None else np.asarray(spectrum.mask, bool)  # specutils: True = bad
    return wave, flux, error, bad


def model_spectrum(result: "FitResult", spectrum):
    """The best-fit model on the grid of a specutils Spectrum, as a specutils Spectrum (NaN where not fitted)."""
    from specutils import Spectrum

    return Spectrum(flux=result.model_flux * spectrum.flux.unit, spectral_axis=spectrum.spectral_axis,
                    mask=~result.mask)


def _as_decoder(decoder) -> Decoder:
    if decoder is None:
        return _cached_decoder(None)
    if isinstance(decoder, (str, Path)):
        return _cached_decoder(str(Path(decoder).resolve()))
    if not isinstance(decoder, Decoder):
        raise TypeError(f"decoder must be a fastspec.Decoder, a model file path or None, not {type(decoder).__name__}")
    return decoder




@dataclass
class FitResult:
    """The best of the least-squares runs.

    labels / uncertainties: physical units, from the covariance (J^T J)^-1 at the solution, with the
    variance σ_obs² + (emulator error)² when ``model_error`` was used. covariance: over ``parameter_names``
    (the free labels, then 'rv' if fitted, then the continuum coefficients 'c0', 'c1', ...).

    success: the optimiser converged AND no quality check failed; converged: the optimiser's own verdict;
    quality: what failed (reduced χ² far from 1, a label on a bound of its range — v sin i = 0 is not one, a
    star may not rotate —, an RV on a bound of rv_bounds, a degenerate covariance), each also issued as a
    FitQualityWarning. A label on a bound has an uncertainty that only describes the curvature there.
    upper_limits: {"vsini": 95 % upper limit} when the fitted v sin i is below 2σ (the data cannot tell it from 0).
    With a pixel-mean stage (format 3) and v sin i below the instrumental width, both come from χ² along v sin i
    with the rest refitted: a limit where χ² at 0 is less than 4 above the minimum, at Δχ² = 2.71; σ(v sin i) is
    then the distance up to Δχ² = 1, and the other labels' covariance includes their drift along that interval.
    """

    labels: dict
    uncertainties: dict
    rv: float | None
    rv_uncertainty: float | None
    continuum: np.ndarray
    covariance: np.ndarray
    parameter_names: list
    chi2: float
    reduced_chi2: float
    n_pixels_used: int
    success: bool
    message: str
    n_evaluations: int  # model (decoder) evaluations for residuals, over all starts
    n_jacobian_evaluations: int
    model_flux: np.ndarray = field(repr=False)  # best-fit model on the observed grid (NaN where masked)
    mask: np.ndarray = field(repr=False)  # the pixels that were fitted
    runs: list = field(repr=False, default_factory=list)  # (end labels, rv, chi2) of every least-squares run
    converged: bool = True
    quality: list = field(default_factory=list)  # failed quality checks (empty: none)
    medium: str = "air"  # of the observed wavelengths as given
    n_pixels_trimmed: int = 0  # outside what the model grid covers at the allowed RVs
    n_pixels_clipped: int = 0  # rejected as outliers by `clip`
    error_estimate: float | None = None  # the noise estimated from the spectrum, when no error was given
    model_error: bool = False  # whether the emulator error was added to the variance
    upper_limits: dict = field(default_factory=dict)  # {label: 95 % upper limit} where the data cannot tell it from 0
    integrate_pixels: float = 1.0  # observed pixel width in model pixels that the model was averaged over (1: none)
    n_pixels_invalid: int = 0  # left out for NaN/inf flux, or an error that is NaN/inf or <= 0
    n_pixels_masked: int = 0  # left out by a mask (the `mask` argument, a masked array's or a Spectrum's)

    def __str__(self) -> str:
        lines = [f"chi2 = {self.chi2:.6g} on {self.n_pixels_used} pixels (reduced {self.reduced_chi2:.4g}), "
                 f"success={self.success}" + ("" if not self.quality else " (" + "; ".join(self.quality) + ")")]
        for name, value in self.labels.items():
            lines.append(f"  {name:>10} = {value:.6g} ± {self.uncertainties[name]:.3g}"
                         + (f"  (< {self.upper_limits[name]:.3g}, 95 % upper limit)" if name in self.upper_limits else ""))
        if self.rv is not None:
            lines.append(f"  {'rv':>10} = {self.rv:.4f} ± {self.rv_uncertainty:.3g} km/s")
        return "\n".join(lines)


class _Problem:
    """The observed spectrum, the parameterisation and the residual / Jacobian functions."""

    def __init__(self, decoder, wavelength, flux, error, mask, fit_rv, continuum_degree, bounds, rv_bounds,
                 medium="air", model_error=False, integrate="auto"):
        self.decoder = decoder
        self.names = list(decoder.label_names)
        nl = len(self.names)
        scalings = {lab["name"]: lab["scaling"] for lab in decoder.info["labels"]}
        self.is_log = np.array([scalings[n] == "log10" for n in self.names])

        # allowed label ranges: the model's, optionally narrowed
        lo = np.array([decoder.label_ranges[n][0] for n in self.names], dtype=np.float64)
        hi = np.array([decoder.label_ranges[n][1] for n in self.names], dtype=np.float64)
        self.model_lo, self.model_hi = lo.copy(), hi.copy()
        for name, pair in (bounds or {}).items():
            if name not in self.names:
                raise ValueError(f"bounds: unknown label {name!r}; labels are {', '.join(self.names)}")
            try:
                b_lo, b_hi = (float(x) for x in pair)
            except (TypeError, ValueError):
                raise ValueError(f"bounds[{name!r}] = {pair!r} must be two numbers (lo, hi)") from None
            j = self.names.index(name)
            if not (lo[j] <= b_lo < b_hi <= hi[j]):
                raise ValueError(f"bounds[{name!r}] = ({b_lo}, {b_hi}) must satisfy {lo[j]} <= lo < hi <= {hi[j]} "
                                 "(the model's trained range)")
            lo[j], hi[j] = b_lo, b_hi
        # v sin i of a pixel-mean stage (format 3) is fitted as v sin i²: that stage's flux is an even function of
        # v sin i (dF/dv sin i = 0 at 0, F ≈ F(0) + g·v sin i² up to a third of the instrumental width: |F − F(0)|
        # at 1 / 2 / 3 / 5 km/s, R 20000, grows 1 : 3.97 : 8.85 : 23.8), so in v sin i the Jacobian column
        # vanishes at 0 and a fit that reaches 0 cannot leave it (true 5 km/s at R 20000 ended at 0, R 7 % low),
        # while in v sin i² the gradient there is finite. Away from 0 the covariance maps back to v sin i by
        # d v sin i / d v sin i², exactly as if v sin i were fitted; near 0 see _profile. Point-sample stages
        # (format 2) respond linearly at 0 and keep v sin i itself.
        stage = decoder.info.get("broadening") or {}
        self.is_squared = np.array([stage.get("sampling") == "pixel_mean" and n == stage.get("vsini_label")
                                    and lo[j] == 0.0 for j, n in enumerate(self.names)], dtype=bool)
        self.s_lo, self.s_hi = self.scaled(lo), self.scaled(hi)
        self.lo, self.hi = lo, hi

        # the data: masked arrays' masks, a scalar error or none (estimated), wavelengths in the model's medium
        masked = [np.ma.getmaskarray(a) for a in (wavelength, flux) if np.ma.isMaskedArray(a)]
        if np.ma.isMaskedArray(error):
            masked.append(np.ma.getmaskarray(error))
        wl = np.ma.getdata(np.asarray(wavelength) if not np.ma.isMaskedArray(wavelength) else wavelength).astype(np.float64)
        fl = np.ma.getdata(flux).astype(np.float64) if np.ma.isMaskedArray(flux) else np.asarray(flux, dtype=np.float64)
        if wl.ndim != 1 or fl.shape != wl.shape:
            raise ValueError(f"wavelength and flux must be 1-D arrays of one length; got shapes {wl.shape}, {fl.shape}")
        er = np.ma.getdata(error).astype(np.float64) if np.ma.isMaskedArray(error) else np.asarray(error, dtype=np.float64)
        if er.ndim == 0:
            if not (np.isfinite(er) and er > 0):
                raise ValueError(f"error must be a finite number > 0 (one error for every pixel), got {float(er)}")
            er = np.full(wl.shape, float(er))
        if er.shape != wl.shape:
            raise ValueError(f"error must be a scalar or a 1-D array like flux; got shape {er.shape} for {wl.shape}")
        if not np.all(np.isfinite(wl)):
            raise ValueError("wavelength contains NaN or infinite values")
        if medium not in ("air", "vacuum"):
            raise ValueError(f"medium must be 'air' or 'vacuum', not {medium!r}")
        model_medium = decoder.info["medium"]
        if medium != model_medium:  # the fit runs in the model's medium; RV is unaffected (both scale alike)
            wl = vacuum_to_air(wl) if model_medium == "air" else air_to_vacuum(wl)
        # A wavelength given twice would count twice in χ² (orders merged by concatenation, a repeated export).
        values, counts = np.unique(wl, return_counts=True)
        if counts.max(initial=1) > 1:
            raise ValueError(f"{int((counts - 1).sum())} duplicated wavelengths (the first at {values[counts > 1][0]:.4f} Å): "
                             "each would be fitted twice; merge or drop the repeats")
        valid = np.isfinite(fl) & np.isfinite(er) & (er > 0)
        good = np.ones(wl.shape, bool)
        for m_ in masked:
            good &= ~m_
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != wl.shape or mask.dtype != bool:
                raise ValueError(f"mask must be a boolean array of shape {wl.shape} (True = fit this pixel)")
            good &= mask
        self.n_invalid, self.n_masked = int((~valid).sum()), int((valid & ~good).sum())
        good &= valid
        self.fit_rv = bool(fit_rv)
        self.degree = -1 if continuum_degree is None else int(continuum_degree)
        if not -1 <= self.degree <= MAX_CONTINUUM_DEGREE:
            raise ValueError(f"continuum_degree must be 0-{MAX_CONTINUUM_DEGREE}, or None for no continuum polynomial; "
                             f"got {continuum_degree}")
        self.n_params = nl + int(self.fit_rv) + self.degree + 1

        # Trim the pixels that some allowed RV would map outside the model grid (reported, not an error).
        self.w0, self.dw, self.n_model = decoder._model.wavelength_start, decoder._model.wavelength_step, decoder.n_pixels
        w_end = self.w0 + self.dw * (self.n_model - 1)
        self.rv_bounds = (float(rv_bounds[0]), float(rv_bounds[1])) if self.fit_rv else (0.0, 0.0)
        if self.fit_rv and not (-C_KMS / 10 < self.rv_bounds[0] < self.rv_bounds[1] < C_KMS / 10):
            raise ValueError(f"rv_bounds = {rv_bounds} must be increasing and within ±{C_KMS / 10:.0f} km/s")
        reach = (wl / (1 + self.rv_bounds[1] / C_KMS) >= self.w0) & (wl / (1 + self.rv_bounds[0] / C_KMS) <= w_end)
        self.n_trimmed = int((good & ~reach).sum())
        good &= reach
        min_pixels = max(10, 2 * self.n_params)
        if good.sum() < min_pixels:
            allowed = (self.w0 * (1 + self.rv_bounds[1] / C_KMS), w_end * (1 + self.rv_bounds[0] / C_KMS))
            raise ValueError(f"only {int(good.sum())} usable pixels (finite flux, finite error > 0, inside the mask "
                             f"and within {allowed[0]:.3f}-{allowed[1]:.3f} Å ({model_medium}), where the model "
                             f"covers every RV in {self.rv_bounds} km/s); at least {min_pixels} are needed")
        self.mask = good
        # Flux in any unit: the fit runs on flux / scale (the continuum polynomial takes the unit back), so that
        # tolerances, starting scales and the degeneracy test see numbers near 1 whatever the unit.
        scale = float(np.median(np.abs(fl[good]))) if self.degree >= 0 else 1.0
        self.scale = scale if np.isfinite(scale) and scale > 0 else 1.0
        self.wl, self.flux, self.sigma_obs = wl[good], fl[good] / self.scale, er[good] / self.scale
        self.ivar_sqrt = 1.0 / self.sigma_obs
        self.model_error = bool(model_error)
        # Pixel integration: each observed pixel as the mean of the model over its width (its distance to the
        # nearer neighbour); "auto": when the pixels are 1.5 model pixels wide or more (median).
        if integrate not in (True, False, "auto"):
            raise ValueError(f"integrate must be True, False or 'auto', not {integrate!r}")
        order = np.argsort(wl)
        gaps = np.diff(wl[order]) if wl.size > 1 else np.array([self.dw])
        spacing = np.empty_like(wl)
        spacing[order] = np.minimum(np.r_[gaps[:1], gaps], np.r_[gaps, gaps[-1:]])
        self.width = float(np.median(spacing[good]) / self.dw)
        self.half = 0.5 * spacing[good] if integrate is True or (integrate == "auto" and self.width >= 1.5) else None
        if self.half is None:
            self.width = 1.0

        # continuum basis on the fitted pixels
        span = self.wl.max() - self.wl.min()
        x = 2.0 * (self.wl - self.wl.min()) / span - 1.0 if span > 0 else np.zeros_like(self.wl)
        self.basis = np.polynomial.legendre.legvander(x, self.degree) if self.degree >= 0 else np.ones((x.size, 0))
        self.basis_products = (self.basis[:, :, None] * self.basis[:, None, :]).reshape(x.size, -1)
        self.n_model_calls = 0
        self.n_jac_calls = 0

    # -- parameter vector: [u (labels in [-1, 1] of the allowed range), rv?, c_0..c_d]
    def scaled(self, labels):
        """The coordinate s that u is linear in: the label, its log10, or its square (v sin i, pixel-mean stage)."""
        s = np.array(labels, dtype=np.float64)
        s[..., self.is_log] = np.log10(s[..., self.is_log])
        s[..., self.is_squared] = s[..., self.is_squared] ** 2
        return s

    def labels_of(self, u):
        # u outside [-1, 1] only from finite-difference probes: stay inside the range
        s = self.s_lo + (np.clip(u, -1.0, 1.0) + 1.0) * 0.5 * (self.s_hi - self.s_lo)
        v = np.array(s, dtype=np.float64)
        v[..., self.is_log] = 10.0 ** v[..., self.is_log]
        v[..., self.is_squared] = np.sqrt(np.maximum(v[..., self.is_squared], 0.0))
        return np.clip(v, self.lo, self.hi)  # rounding at the ends must not leave the range

    def ds_du(self):
        return 0.5 * (self.s_hi - self.s_lo)

    def dlabel_du(self, u):
        """d label / d u; for a squared label at the core's labels_for_jacobian (v sin i >= SQUARED_FLOOR)."""
        lab = self.labels_of(u)
        return np.where(self.is_log, lab * np.log(10.0), 1.0) * np.where(
            self.is_squared, 0.5 / np.maximum(lab, SQUARED_FLOOR), 1.0) * self.ds_du()

    def labels_for_jacobian(self, u):
        """Labels at which the core's Jacobian is taken: a squared label no lower than SQUARED_FLOOR, where
        dF/dv sin i / (2 v sin i) is dF/d(v sin i²) (to 6e-7 of it at 1e-3 km/s against 1e-2 km/s, R 20000;
        F itself differs from F(0) by ~1e-7 there, below the float32 model's rounding)."""
        lab = self.labels_of(u)
        lab[..., self.is_squared] = np.maximum(lab[..., self.is_squared], SQUARED_FLOOR)
        return lab

    def u_of(self, labels):
        return 2.0 * (self.scaled(labels) - self.s_lo) / (self.s_hi - self.s_lo) - 1.0

    def u_of_box(self, u_box):
        """Fit coordinates of points drawn uniformly in the label box (u_box linear in the label or its log10):
        a squared label's candidates stay uniform in v sin i, not in its square (which would leave a few in
        128 below 20 km/s)."""
        if not self.is_squared.any():
            return u_box
        s = self.s_lo + (u_box + 1.0) * 0.5 * (self.s_hi - self.s_lo)
        lin_lo, lin_hi = self.lo[self.is_squared], self.hi[self.is_squared]
        s[..., self.is_squared] = (lin_lo + (u_box[..., self.is_squared] + 1.0) * 0.5 * (lin_hi - lin_lo)) ** 2
        return 2.0 * (s - self.s_lo) / (self.s_hi - self.s_lo) - 1.0

    def split(self, theta):
        nl = len(self.names)
        rv = theta[nl] if self.fit_rv else 0.0
        return theta[:nl], rv, theta[nl + int(self.fit_rv):]

    def _interp(self, rv):
        """Indices and weights of the linear interpolation at the rest wavelengths (rv scalar or (R, 1))."""
        rest = self.wl / (1.0 + rv / C_KMS)
        pos = (rest - self.w0) / self.dw
        k = np.clip(np.floor(pos).astype(np.int64), 0, self.n_model - 2)
        return k, pos - k

    def sample(self, spec, rv):
        """The model spec (n_model, ...) at the observed pixels, (P, ...); rv a scalar, or (R, 1) for a 1-D spec,
        giving (R, P). Point samples: linear interpolation at the rest wavelength. Pixel integration: the mean
        over the pixel of the model samples read as bins one model pixel wide (exact for bin-averaged data)."""
        expand = (1,) * (spec.ndim - 1)
        if self.half is None:
            k, w = self._interp(rv)
            w = w.reshape(w.shape + expand)
            return (1 - w) * spec[k] + w * spec[k + 1]
        a, b = self._edges(rv)
        cum = np.concatenate([np.zeros((1,) + spec.shape[1:]), np.cumsum(spec, axis=0)])

        def integral(x):  # of the bins from the grid's start (x = -0.5) to x
            k = np.clip(np.floor(x + 0.5).astype(np.int64), 0, self.n_model - 1)
            return cum[k] + spec[k] * (x - k + 0.5).reshape(x.shape + expand)

        return (integral(b) - integral(a)) / (b - a).reshape(a.shape + expand)

    def rv_derivative(self, spec, rv):
        """d(sample(spec, rv))/d rv for a 1-D spec, (P,)."""
        if self.half is None:
            k, _ = self._interp(rv)
            slope = (spec[k + 1] - spec[k]) / self.dw  # the segment each pixel falls in (the interpolant's exact slope)
            return slope * (-self.wl / C_KMS / (1.0 + rv / C_KMS) ** 2)
        a, b = self._edges(rv)
        bins = lambda x: spec[np.clip(np.floor(x + 0.5).astype(np.int64), 0, self.n_model - 1)]  # noqa: E731
        mean = self.sample(spec, rv)
        # each edge x = (λ_edge / (1 + v/c) − w0) / dw moves by −(x + w0/dw) / (c + v); so does b − a, by −(b − a) / (c + v)
        da, db = -(a + self.w0 / self.dw) / (C_KMS + rv), -(b + self.w0 / self.dw) / (C_KMS + rv)
        return (bins(b) * db - bins(a) * da) / (b - a) + mean / (C_KMS + rv)

    def _edges(self, rv):
        """The observed pixels' edges in model pixels (the rest frame at rv)."""
        shift = 1.0 + np.asarray(rv) / C_KMS
        return (((self.wl - self.half) / shift - self.w0) / self.dw, ((self.wl + self.half) / shift - self.w0) / self.dw)

    def reweight(self, theta):
        """Variance σ_obs² + (C·σ_model)² with the emulator error at these labels (no-op without model_error)."""
        if not self.model_error:
            return
        u, rv, c = self.split(theta)
        lab = self.labels_of(u)
        err = self.decoder._model.emulator_error(float(lab[self.names.index("vsini")]),
                                                 float(lab[self.names.index("resolution")])).astype(np.float64)
        k, w = self._interp(rv)
        cont = self.basis @ c if self.degree >= 0 else 1.0
        sig_model = cont * ((1 - w) * err[k] + w * err[k + 1])
        self.ivar_sqrt = 1.0 / np.sqrt(self.sigma_obs**2 + sig_model**2)

    def chi2_at(self, theta):
        """χ² with the variance at theta itself (runs started elsewhere weighted the emulator error there)."""
        self.reweight(theta)
        r = self.residuals(theta)
        return float(r @ r)

    def drop(self, reject):
        """Leave out fitted pixels (indices into the fitted set), e.g. outliers."""
        keep = np.ones(self.wl.size, bool)
        keep[reject] = False
        where = np.flatnonzero(self.mask)
        self.mask[where[~keep]] = False
        self.wl, self.flux, self.sigma_obs = self.wl[keep], self.flux[keep], self.sigma_obs[keep]
        self.ivar_sqrt, self.basis = self.ivar_sqrt[keep], self.basis[keep]
        self.half = None if self.half is None else self.half[keep]
        self.basis_products = (self.basis[:, :, None] * self.basis[:, None, :]).reshape(self.wl.size, -1)

    def residuals(self, theta):
        u, rv, c = self.split(theta)
        self.n_model_calls += 1
        f = self.sample(self.decoder(self.labels_of(u)).astype(np.float64), rv)
        cont = self.basis @ c if self.degree >= 0 else 1.0
        return (cont * f - self.flux) * self.ivar_sqrt

    def jacobian(self, theta):
        u, rv, c = self.split(theta)
        self.n_jac_calls += 1
        spec, jac = self.decoder.jacobian(self.labels_for_jacobian(u))
        spec = spec.astype(np.float64)
        f = self.sample(spec, rv)
        cont = self.basis @ c if self.degree >= 0 else np.ones_like(f)
        scale = cont * self.ivar_sqrt
        cols = [self.sample(jac.astype(np.float64), rv) * self.dlabel_du(u)[None, :] * scale[:, None]]
        if self.fit_rv:
            cols.append((self.rv_derivative(spec, rv) * scale)[:, None])
        if self.degree >= 0:
            cols.append(self.basis * (f * self.ivar_sqrt)[:, None])
        return np.concatenate(cols, axis=1)

    def continuum_for(self, model_flux):
        """Best continuum coefficients for model spectra on the fitted pixels, (N, M) -> (N, d+1), and the χ²."""
        # Normal equations by GEMMs: A = basis * (f / σ), AᵀA = (f/σ)² @ (basis_i basis_j), Aᵀb = (f/σ) @ (basis b)
        fw = model_flux * self.ivar_sqrt[None, :]
        b = self.flux * self.ivar_sqrt
        nb = self.degree + 1
        ata = ((fw * fw) @ self.basis_products).reshape(-1, nb, nb) + 1e-12 * np.eye(nb)
        atb = fw @ (self.basis * b[:, None])
        c = np.linalg.solve(ata, atb[:, :, None])[:, :, 0]
        return c, np.maximum(b @ b - np.einsum("ni,ni->n", atb, c), 0.0)

    def chi2_of_spectra(self, spectra, rv):
        """χ² of model spectra (N, n_model) at one RV, each with its best continuum."""
        return self._chi2_interpolated(self.sample(spectra.T, rv).T)

    def chi2_of_rvs(self, spectrum, rvs):
        """χ² of one model spectrum (n_model,) at each RV of rvs (R,), with its best continuum."""
        return self._chi2_interpolated(self.sample(spectrum, np.asarray(rvs, dtype=np.float64)[:, None]))[0]

    def _chi2_interpolated(self, f):
        if self.degree >= 0:
            c, chi2 = self.continuum_for(f)
            return chi2, c
        return (((f - self.flux) * self.ivar_sqrt) ** 2).sum(axis=1), np.zeros((len(f), 0))


def fit(wavelength, flux=None, error=None, decoder: Decoder | str | Path | None = None, *, rv: bool = True,
        continuum_degree: int | None = 2, n_starts: int = 3, n_candidates: int = 128, bounds: dict | None = None,
        rv_bounds=(-300.0, 300.0), mask=None, initial: dict | None = None, seed: int | None = 0,
        jac: str = "analytic", diff_step: float | None = None, max_nfev: int | None = 200, medium: str = "air",
        model_error="auto", loss: str = "linear", f_scale: float = 1.0, clip: float | None = 5.0,
        clip_iterations: int = 5, integrate="auto") -> FitResult:
    """Fit the six labels (and an RV shift and a continuum polynomial) to an observed spectrum.

    wavelength: Å, any order, in ``medium`` ("air" or "vacuum"; converted to the model's medium, air for the
    shipped models); or a specutils ``Spectrum`` (its spectral axis in any unit, its uncertainty and mask are
    used; `fastspec.fit.model_spectrum(result, spectrum)` returns the model likewise). flux: same shape (NumPy or masked array). error: same shape, a scalar for every pixel, or
    None to estimate the noise from the residuals of a first fit (reported as ``error_estimate``; the reduced-χ²
    check is then left out, χ² ≈ dof by construction). Pixels with NaN/inf
    flux, NaN/inf or non-positive error, masked, or ``mask`` False are left out, and so are pixels that some RV in
    ``rv_bounds`` would move outside the model grid (counted in ``n_pixels_trimmed``: with the default ±300 km/s
    the usable range of the shipped grid is 4454.5-5394.6 Å). ``decoder``: a `fastspec.Decoder`, a model file
    path, or None for the embedded model (loaded once and reused).
    ``rv``: fit a radial velocity [km/s] (λ_obs = λ_rest (1 + v/c)); ``continuum_degree``: degree of the
    multiplicative Legendre polynomial (None: none, the spectrum is taken as continuum-normalised).
    ``bounds``: {label: (lo, hi)} to narrow the model's label ranges. ``initial``: {label: value} of a
    start to include (every label; it replaces the middle of the box among the candidates).
    ``model_error``: add the model file's emulator error to the variance ("auto": when the file has one; True:
    required; False: never). ``loss``/``f_scale``: a robust loss of scipy.optimize.least_squares ("soft_l1",
    "huber", "cauchy", "arctan"; residuals in units of σ). ``clip``: reject pixels whose normalised residual
    lies more than clip robust standard deviations from the median, then refit (up to ``clip_iterations``); on
    by default (5): on 24 clean held-out spectra it clipped a median of 0 pixels and changed neither scatter nor
    bias, with 30 cosmic rays per spectrum it restored the clean-data scatter
    (benchmarks/results/fit-2026-12-02.md); None turns it off.
    ``integrate``: model each observed pixel as the mean of the model over its width (the distance to its nearer
    neighbour; the model's samples read as 0.05 Å bins) instead of sampling the model at the pixel centre:
    True, False, or "auto" (default: when the median pixel is at least 1.5 model pixels wide; coarse pixels
    sampled at their centres bias R). ``integrate_pixels`` reports the median width used (1: none).

    Starts: ``n_candidates`` seeded random label vectors are ranked by χ² (each with its best continuum,
    and its best RV on a scan when ``rv``); least squares runs from the best ``n_starts`` to a loose
    tolerance, and the lowest χ² of those is then converged fully. ``jac``: "analytic"
    (the core's Jacobian) or a finite-difference scheme of least_squares ("2-point", "3-point") for
    comparison, with its relative step ``diff_step`` (the model is float32: steps below ~1e-3 of the
    normalised label range drown in its rounding).
    """
    try:
        from scipy.optimize import least_squares  # scipy is needed for fitting only
    except ImportError:
        raise ImportError("fastspec.fit needs SciPy (scipy.optimize.least_squares): pip install scipy") from None

    decoder = _as_decoder(decoder)
    if hasattr(wavelength, "spectral_axis") and hasattr(wavelength, "flux"):  # a specutils Spectrum
        if flux is not None:
            raise TypeError("fit(spectrum): with a specutils Spectrum, give no separate flux")
        wavelength, flux, spec_error, bad = _from_specutils(wavelength)
        error = spec_error if error is None else error
        mask = ~bad if mask is None and bad is not None else mask if bad is None else np.asarray(mask, bool) & ~bad
    if n_starts < 1 or n_candidates < n_starts:
        raise ValueError("need 1 <= n_starts <= n_candidates")
    if jac not in ("analytic", "2-point", "3-point"):
        raise ValueError(f"jac must be 'analytic', '2-point' or '3-point', not {jac!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, not {loss!r}")
    if not f_scale > 0:
        raise ValueError(f"f_scale must be > 0, got {f_scale}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be None or > 0 (in robust standard deviations), got {clip}")
    has_error_model = decoder._model.has_emulator_error
    if model_error not in (True, False, "auto"):
        raise ValueError(f"model_error must be True, False or 'auto', not {model_error!r}")
    if model_error is True and not has_error_model:
        raise ValueError(f"model_error=True but {decoder.info['path']} carries no emulator error (format version 2 "
                         "files exported with it do); pass model_error=False")
    if error is None:
        return _fit_estimating_the_noise(wavelength, flux, decoder, locals())
    prob = _Problem(decoder, wavelength, flux, error, mask, rv, continuum_degree, bounds, rv_bounds,
                    medium=medium, model_error=bool(model_error) and has_error_model, integrate=integrate)
    nl = len(prob.names)
    rng = np.random.default_rng(seed)

    # candidate starts: random points of the allowed label box, one batched decoder call
    u_cand = rng.uniform(-1.0, 1.0, size=(n_candidates, nl))
    u_cand[0] = 0.0  # the middle of the box
    u_cand = prob.u_of_box(u_cand)
    if initial is not None:
        if set(initial) != set(prob.names):
            raise ValueError(f"initial must give every label: {', '.join(prob.names)}")
        start = np.array([initial[n] for n in prob.names], dtype=np.float64)
        if not np.all((start >= prob.lo) & (start <= prob.hi)):
            raise ValueError(f"initial = {initial} lies outside the allowed ranges")
        u_cand[0] = prob.u_of(start)
    spectra = decoder(prob.labels_of(u_cand)).astype(np.float64)
    prob.n_model_calls += n_candidates
    chi2, _ = prob.chi2_of_spectra(spectra, 0.0)
    rv_cand = np.zeros(n_candidates)
    if prob.fit_rv:
        # RV scan for the most promising candidates: 3 km/s steps over the bounds (narrower than the
        # narrowest lines of the grid: thermal + micro-turbulent widths), then 0.5 km/s around the best
        for i in np.argsort(chi2)[:n_starts]:
            for grid_step, half in ((3.0, None), (0.5, 3.0)):
                grid = (np.arange(prob.rv_bounds[0], prob.rv_bounds[1] + 1e-9, grid_step) if half is None
                        else np.clip(np.arange(rv_cand[i] - half, rv_cand[i] + half + 1e-9, grid_step), *prob.rv_bounds))
                scan = prob.chi2_of_rvs(spectra[i], grid)
                rv_cand[i], chi2[i] = grid[np.argmin(scan)], scan.min()

    lb = np.concatenate([-np.ones(nl), [prob.rv_bounds[0]] if prob.fit_rv else [], np.full(prob.degree + 1, -np.inf)])
    ub = np.concatenate([np.ones(nl), [prob.rv_bounds[1]] if prob.fit_rv else [], np.full(prob.degree + 1, np.inf)])
    # typical scales: labels 0.1 of their box, RV 1 km/s, continuum 1e-2
    x_scale = np.concatenate([0.1 * np.ones(nl), [1.0] if prob.fit_rv else [], 1e-2 * np.ones(prob.degree + 1)])

    def solve(theta0, tol, upper=ub, lower=lb, reweight=True):
        if reweight:
            prob.reweight(theta0)  # the emulator error at this start's v sin i and R
        return least_squares(prob.residuals, theta0, jac=prob.jacobian if jac == "analytic" else jac,
                             bounds=(lower, upper), method="trf", x_scale=x_scale, max_nfev=max_nfev, loss=loss,
                             f_scale=f_scale, ftol=tol, xtol=tol, gtol=tol,
                             diff_step=None if jac == "analytic" else diff_step)

    # Each start runs to a loose tolerance (enough to tell the basins apart), then the best is polished.
    runs = []
    for i in np.argsort(chi2)[:n_starts]:
        _, c0 = prob.chi2_of_spectra(spectra[i:i + 1], rv_cand[i])
        theta0 = np.concatenate([np.clip(u_cand[i], -0.999, 0.999), [rv_cand[i]] if prob.fit_rv else [], c0[0]])
        runs.append(solve(theta0, 1e-4))
    # Each run's cost used the emulator error at its own start: compare them at their solutions.
    best = solve(min(runs, key=lambda r: prob.chi2_at(r.x)).x, 1e-8)
    runs.append(best)
    # A slow rotator: χ² along v sin i can have a second, local minimum a few km/s above 0 (the rotation kernel
    # changes shape where it becomes one model pixel wide, v sin i ≈ 3 km/s), at the end of a valley in which
    # a higher R makes up for the rotation; runs that come down from the random starts stop there. So: fit the
    # other parameters with v sin i held at 0 (R slides back down the valley), release v sin i, polish, and
    # keep the lower χ².
    jv = prob.names.index(AT_REST) if AT_REST in prob.names and prob.lo[prob.names.index(AT_REST)] == 0.0 else None
    def slow(x):  # v sin i within the instrumental FWHM
        lab = prob.labels_of(prob.split(x)[0])
        return lab[jv] < max(10.0, C_KMS / lab[prob.names.index("resolution")])

    if jv is not None and "resolution" in prob.names:
        if 0.0 < prob.labels_of(prob.split(best.x)[0])[jv] and slow(best.x):
            theta, held = best.x.copy(), ub.copy()
            theta[jv], held[jv] = -1.0 + 5e-7, -1.0 + 1e-6  # least_squares needs lb < ub
            at_rest = solve(solve(theta, 1e-8, held).x, 1e-8)
            runs.append(at_rest)
            if prob.chi2_at(at_rest.x) < prob.chi2_at(best.x):
                best = at_rest
    # Outliers: reject pixels far out in the robust spread of the normalised residuals, then polish again.
    n_clipped = 0
    for _ in range(clip_iterations if clip is not None else 0):
        prob.reweight(best.x)
        r = prob.residuals(best.x)
        prob.n_model_calls -= 1
        med = np.median(r)
        spread = 1.482602 * np.median(np.abs(r - med))
        reject = np.flatnonzero(np.abs(r - med) > clip * spread)
        if reject.size == 0 or prob.wl.size - reject.size < max(10, 2 * prob.n_params):
            break
        prob.drop(reject)
        n_clipped += reject.size
        best = solve(best.x, 1e-8)
        runs.append(best)
    if prob.model_error:  # weights at the solution; polish once more if they moved it
        best = solve(best.x, 1e-8)
        runs.append(best)
    # v sin i of a pixel-mean stage below the instrumental width: rotation broadens a line like the instrument
    # to first order in v sin i² (both add to the profile's second moment), so R makes up for it and the
    # curvature is near-singular along (v sin i², 1/R²): at v sin i ~0.2 km/s, R 20000, σ(v sin i) came out
    # 85-140 km/s and σ(R) 4e5. What separates them is the profiles' shape, of higher order: χ² along v sin i
    # (the others refitted) is flat to ~5 km/s at R 20000, then steep (Δχ² 2 → 60 from 5.5 to 7.7 km/s). So
    # whether 0 is allowed, the upper limit and σ(v sin i) come from that profile, and the other labels'
    # covariance is the one at the fitted v sin i (see _profile).
    profile = None
    if jv is not None and prob.is_squared[jv] and "resolution" in prob.names and slow(best.x):
        profile = _profile(prob, solve, best, jv, lb, ub)
        if profile is not None and profile["best"] is not best:  # a refit along the profile went lower
            best = profile["best"]
            runs.append(best)
        if profile is not None and profile["limit"] is None:  # rotation detected after all
            profile = None
    prob.reweight(best.x)
    u, rv_best, c = prob.split(best.x)
    labels = prob.labels_of(u)
    # Covariance from the analytic Jacobian at the solution (whatever jac= drove the fit), inverted in the
    # fit coordinates, where J^T J is well conditioned (in physical units its eigenvalues span > 1e15 and a
    # pseudo-inverse would discard the weak R direction), then scaled to physical units.
    j_theta = prob.jacobian(best.x)
    jtj = j_theta.T @ j_theta
    if profile is None:
        cov = np.linalg.pinv(jtj, hermitian=True)
    else:  # given v sin i: the others' covariance with it held; its own variance from the profile below
        keep = np.flatnonzero(np.arange(jtj.shape[0]) != jv)
        jtj = jtj[np.ix_(keep, keep)]
        cov = np.zeros((j_theta.shape[1],) * 2)
        cov[np.ix_(keep, keep)] = np.linalg.pinv(jtj, hermitian=True)
    to_phys = np.concatenate([prob.dlabel_du(u), np.ones(j_theta.shape[1] - nl)])
    cov = cov * np.outer(to_phys, to_phys)
    cov = 0.5 * (cov + cov.T)
    if profile is not None:
        cov += np.outer(profile["valley"], profile["valley"])
        cov[jv, jv] = profile["sigma"] ** 2
    # The emulator's error is correlated over pixels (a star's residual pattern is fixed), so beyond its share
    # of the variance it biases the labels by an amount that does not average down: the model file's measured
    # label systematics (noise-free held-out fits) are added in quadrature.
    if prob.model_error:
        _add_systematics(cov, prob.names, labels, decoder)
    # back to the flux unit of the data: the continuum coefficients (and their covariance) carry it
    c_unit = np.concatenate([np.ones(nl + int(prob.fit_rv)), np.full(prob.degree + 1, prob.scale)])
    cov *= np.outer(c_unit, c_unit)
    sig = np.sqrt(np.clip(np.diag(cov), 0, None))
    resid = prob.residuals(best.x)
    chi2_best = float(resid @ resid)
    dof = max(prob.flux.size - prob.n_params, 1)
    names = prob.names + (["rv"] if prob.fit_rv else []) + [f"c{k}" for k in range(prob.degree + 1)]

    # Quality: success must not mean "good" when it is not.
    quality = []
    if best.status <= 0:
        quality.append(f"the optimiser did not converge ({best.message})")
    red = chi2_best / dof
    if red > 2.0:
        quality.append(f"reduced chi2 = {red:.3g}: the model does not describe the data within the errors "
                       "(errors too small, outliers that clipping left in, or a star outside the model's grid)")
    elif red < 0.3:
        quality.append(f"reduced chi2 = {red:.3g}: the errors look overestimated")
    for j, name in enumerate(prob.names):
        at_rest = name == AT_REST and u[j] < 0 and prob.lo[j] == 0.0  # v sin i = 0: a star that does not rotate
        if abs(u[j]) > 1 - 1e-3 and prob.s_hi[j] > prob.s_lo[j] and not at_rest:
            quality.append(f"{name} = {labels[j]:.6g} is on a bound of its allowed range "
                           f"[{prob.lo[j]:.6g}, {prob.hi[j]:.6g}]: its uncertainty is not meaningful")
    lo_rv, hi_rv = prob.rv_bounds
    if prob.fit_rv and min(rv_best - lo_rv, hi_rv - rv_best) < 1e-3 * (hi_rv - lo_rv):
        quality.append(f"rv = {float(rv_best):.2f} km/s is on a bound of rv_bounds ({lo_rv:g}, {hi_rv:g}): the star "
                       "may move faster; widen rv_bounds (--rv-bounds)")
    eig = np.linalg.eigvalsh(jtj)
    if not np.all(np.isfinite(sig)) or eig[0] <= eig[-1] * 1e-14:
        quality.append("degenerate: some parameter combination is not constrained by the data "
                       "(uncertainties are not meaningful)")
    for q in quality:
        warnings.warn(q, FitQualityWarning, stacklevel=2)
    # An RV within a few km/s of the air/vacuum offset (~83.5 km/s on this grid) most often means the wavelengths
    # are in the other medium. A warning only: a star may really move at that speed.
    if prob.fit_rv:
        lam = 0.5 * (prob.wl.min() + prob.wl.max())
        offset = C_KMS * (air_to_vacuum(lam) / lam - 1.0)
        sign = 1.0 if medium == "air" else -1.0  # vacuum data taken for air show +offset, and the reverse
        if abs(float(rv_best) - sign * offset) < 3.0:
            warnings.warn(f"RV = {float(rv_best):.2f} km/s is the air/vacuum offset ({sign * offset:+.1f} km/s here): "
                          f"are the wavelengths in {'vacuum' if medium == 'air' else 'air'}? Pass medium="
                          f"'{'vacuum' if medium == 'air' else 'air'}' if so", FitQualityWarning, stacklevel=2)

    upper_limits = {}
    if profile is not None:
        upper_limits[AT_REST] = profile["limit"]
    elif jv is not None and labels[jv] < 2 * sig[jv]:
        upper_limits[AT_REST] = _upper_limit(labels[jv], sig[jv])

    model_flux = np.full(prob.mask.shape, np.nan)
    model_flux[prob.mask] = (resid / prob.ivar_sqrt + prob.flux) * prob.scale
    prob.n_model_calls -= 1  # that call was bookkeeping, not part of the fit
    return FitResult(
        labels={n: float(v) for n, v in zip(prob.names, labels)},
        uncertainties={n: float(s) for n, s in zip(prob.names, sig[:nl])},
        rv=float(rv_best) if prob.fit_rv else None,
        rv_uncertainty=float(sig[nl]) if prob.fit_rv else None,
        continuum=np.asarray(c, dtype=np.float64) * prob.scale,
        covariance=cov,
        parameter_names=names,
        chi2=chi2_best,
        reduced_chi2=float(red),
        n_pixels_used=int(prob.flux.size),
        success=bool(best.status > 0 and not quality),
        message=str(best.message),
        n_evaluations=int(prob.n_model_calls),
        n_jacobian_evaluations=int(prob.n_jac_calls - 1),
        model_flux=model_flux,
        mask=prob.mask,
        runs=[(dict(zip(prob.names, map(float, prob.labels_of(prob.split(r.x)[0])))), float(prob.split(r.x)[1]),
               float(2 * r.cost)) for r in runs],
        converged=bool(best.status > 0),
        quality=quality,
        medium=medium,
        n_pixels_trimmed=prob.n_trimmed,
        n_pixels_clipped=int(n_clipped),
        model_error=prob.model_error,
        upper_limits=upper_limits,
        integrate_pixels=prob.width,
        n_pixels_invalid=prob.n_invalid,
        n_pixels_masked=prob.n_masked,
    )


def _add_systematics(cov, names, labels, decoder) -> None:
    """Add the model file's label systematics (noise-free held-out fits) to the label variances of cov."""
    systematics = decoder.info["provenance"].get("label_systematics") or {}
    for j, name in enumerate(names):
        s_sys = systematics.get(name)
        if name == "resolution" and "resolution_dex" in systematics:
            s_sys = systematics["resolution_dex"] * labels[j] * np.log(10.0)
        if s_sys:
            cov[j, j] += float(s_sys) ** 2


def _upper_limit(value: float, sigma: float, level: float = 0.95) -> float:
    """The `level` quantile of N(value, sigma²) cut to >= 0: a label that the data cannot tell from its physical
    limit 0 (a flat prior on >= 0, the Gaussian likelihood of the fit's covariance)."""
    from scipy.stats import norm

    below = norm.cdf(-value / sigma)  # the likelihood's mass under 0, cut away
    return float(value + sigma * norm.ppf(below + level * (1.0 - below)))


DCHI2_LIMIT = 2.705543  # χ²₁ one-sided 95 % (1.645²): the profile's rise at the upper limit
DCHI2_TWO_SIGMA = 4.0  # Δχ² at v sin i = 0 below which the data cannot tell v sin i from 0 (2σ)


def _profile(prob, solve, best, jv, lb, ub, n_bisect: int = 3) -> dict | None:
    """χ² along v sin i with every other parameter refitted (v sin i held in a 1e-6-wide box of the fit
    coordinate), at 0 and above the best fit, for a pixel-mean stage's slow rotator; one variance throughout, the
    best fit's. None when 0 lies DCHI2_TWO_SIGMA or more above the minimum (rotation detected: the curvature
    describes it), {"best": ..., "limit": None} when that shows only once a refit found a lower minimum (the
    result at it). Otherwise {"best": the least-squares result at the minimum (the run held at 0 where that is
    lower), "limit": the v sin i above the minimum where χ² has risen by DCHI2_LIMIT (95 % one-sided), "sigma":
    the distance from the minimum to where χ² has risen by 1 (upward, the side the data bound; the curvature
    there describes neither side), "points": {v sin i: Δχ²}}. Bracketing by doubling steps from a tenth of the
    instrumental FWHM, then n_bisect bisections and linear interpolation: ~6-8 refits from warm starts."""
    lab = prob.labels_of(prob.split(best.x)[0])
    fwhm = C_KMS / float(lab[prob.names.index("resolution")])
    # One variance for the whole profile, the best fit's: the emulator error changes with v sin i (and R) by
    # enough to move χ² by several units over a few km/s, which would swamp the profile's rise.
    prob.reweight(best.x)

    def chi2(x):
        r = prob.residuals(x)
        return float(r @ r)

    solutions = {float(lab[jv]): (chi2(best.x), best)}

    def at(v):
        start = solutions[min(solutions, key=lambda w: abs(w - v))][1].x.copy()
        u_v = float(prob.u_of(np.where(np.arange(lab.size) == jv, v, lab))[jv])
        lower, upper = lb.copy(), ub.copy()
        lower[jv] = max(u_v - 5e-7, -1.0)
        upper[jv] = lower[jv] + 1e-6  # least_squares needs lb < ub
        start[jv] = 0.5 * (lower[jv] + upper[jv])
        run = solve(start, 1e-6, upper, lower, reweight=False)
        solutions[v] = (chi2(run.x), run)
        return solutions[v][0]

    if 0.0 not in solutions:
        at(0.0)
    v_min = min(solutions, key=lambda w: solutions[w][0])
    chi2_min = solutions[v_min][0]
    if solutions[0.0][0] - chi2_min >= DCHI2_TWO_SIGMA:
        return None  # before any further refit: rotation detected
    hi = float(prob.hi[jv])
    below, above, step = v_min, None, max(0.1 * fwhm, 0.2)
    while above is None and below < hi:
        v = min(below + step, hi)
        if at(v) - chi2_min >= DCHI2_LIMIT:
            above = v
        else:
            below, step = v, 2.0 * step
    for _ in range(n_bisect if above is not None else 0):
        mid = 0.5 * (below + above)
        below, above = (mid, above) if at(mid) - chi2_min < DCHI2_LIMIT else (below, mid)
    # a refit may have found a lower χ² still (a sample between the minimum and the limit): measure from it
    v_min = min(solutions, key=lambda w: solutions[w][0])
    chi2_min = solutions[v_min][0]
    if solutions[0.0][0] - chi2_min >= DCHI2_TWO_SIGMA:
        return {"best": solutions[v_min][1], "limit": None}  # rotation detected from the lower minimum
    nl = lab.size
    vs = sorted(solutions)
    dchi2 = np.array([solutions[v][0] - chi2_min for v in vs])
    params = np.array([np.concatenate([prob.labels_of(solutions[v][1].x[:nl]), solutions[v][1].x[nl:]]) for v in vs])
    limit, _ = _crossing(vs, dchi2, params, DCHI2_LIMIT, v_min, +1)
    one_up, p_up = _crossing(vs, dchi2, params, 1.0, v_min, +1)
    one_down, p_down = _crossing(vs, dchi2, params, 1.0, v_min, -1)
    # Along the valley the other parameters move with v sin i (R most): the change over its Δχ² = 1 interval,
    # halved, is added to their covariance (rank one, the valley's direction); v sin i's own entries stay apart.
    valley = 0.5 * (p_up - p_down)
    valley[jv] = 0.0
    return {"best": solutions[v_min][1], "limit": hi if limit is None else limit,
            "sigma": (hi if one_up is None else one_up) - v_min, "valley": valley,
            "points": dict(zip(vs, dchi2.tolist()))}


def _crossing(vs, dchi2, params, level: float, v_from: float, direction: int):
    """Where the sampled Δχ² (at increasing vs) first reaches `level` going up (+1) or down (-1) from v_from,
    linear between samples: (v sin i, the parameters there), or (None, the last sample's) if it never does."""
    order = [k for k in range(len(vs)) if (vs[k] - v_from) * direction >= 0]
    order = order if direction > 0 else order[::-1]
    for a, b in zip(order, order[1:]):
        if dchi2[b] >= level:
            t = 1.0 if dchi2[a] >= level else (level - dchi2[a]) / (dchi2[b] - dchi2[a])
            return float(vs[a] + t * (vs[b] - vs[a])), params[a] + t * (params[b] - params[a])
    return None, params[order[-1]]


def _fit_estimating_the_noise(wavelength, flux, decoder, args: dict) -> FitResult:
    """fit(error=None): fit with one error for every pixel, take the RMS of the residuals as every pixel's noise,
    and fit again from that solution with it.

    The residuals about the model include the emulator's error, so it is not added to the variance again; its
    label systematics still go into the covariance (``model_error``). The χ² of the second fit is ~dof by
    construction, so it says nothing about the errors: the reduced-χ² check is left out. A floor of 1e-6 of the
    flux scale (ten times the float32 model's rounding) keeps a noise-free spectrum fittable."""
    kw = {k: args[k] for k in inspect.signature(fit).parameters if k not in ("wavelength", "flux", "error", "decoder")}
    data = np.ma.getdata(flux).astype(np.float64)
    finite = np.abs(data[np.isfinite(data)])
    unit = float(np.median(finite)) if finite.size and np.median(finite) > 0 else 1.0  # an error of the data's scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitQualityWarning)  # made-up errors: the χ² of this pass means nothing
        first = fit(wavelength, flux, unit, decoder, **{**kw, "model_error": False})
    resid = (data - first.model_flux)[first.mask]
    sigma = max(float(np.sqrt(resid @ resid / max(resid.size - len(first.parameter_names), 1))), 1e-6 * unit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(wavelength, flux, sigma, decoder, **{**kw, "initial": first.labels, "n_starts": 1,
                                                          "model_error": False})
    chi2_check = "reduced chi2"
    for w in caught:
        if not str(w.message).startswith(chi2_check):
            warnings.warn(w.message, w.category, stacklevel=3)
    result.quality = [q for q in result.quality if not q.startswith(chi2_check)]
    result.success = result.converged and not result.quality
    if args["model_error"] is not False and decoder._model.has_emulator_error:
        _add_systematics(result.covariance, list(result.labels), list(result.labels.values()), decoder)
        result.uncertainties = {n: float(np.sqrt(result.covariance[j, j])) for j, n in enumerate(result.labels)}
        result.model_error = True
    result.error_estimate = sigma
    return result


# `fastspec.fit` is the function (the package exports it under the module's name): the helper documented as
# `fastspec.fit.model_spectrum` must be reachable from it.
fit.model_spectrum = model_spectrum

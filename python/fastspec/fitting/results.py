"""What a fit returns: `FitResult`, the quality checks that decide its `success` (each also issued as a
`FitQualityWarning`), and the best-fit model as a specutils Spectrum."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .parameters import AT_REST, PHYSICAL_ZERO, VMAC


class FitQualityWarning(UserWarning):
    """The fit converged but its result should not be trusted as is (see FitResult.quality)."""


def model_spectrum(result: "FitResult", spectrum):
    """The best-fit model on the grid of a specutils Spectrum, as a specutils Spectrum (NaN where not fitted)."""
    from specutils import Spectrum

    return Spectrum(flux=result.model_flux * spectrum.flux.unit, spectral_axis=spectrum.spectral_axis,
                    mask=~result.mask)


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
    upper_limits: {"vsini": 95 % upper limit} when the fitted v sin i is below 2σ (the data cannot tell it from 0);
    likewise {"vmac": ...} for a fitted macroturbulence.
    vmac: the radial-tangential macroturbulence of the model (km/s): the fixed value (``vmac_fitted`` False), or
    the fitted one, which is then also in labels, uncertainties and the covariance as 'vmac'.
    With a pixel-mean stage (format 3) and v sin i below the instrumental width, both come from χ² along v sin i
    with the rest refitted: a limit where χ² at 0 is less than 4 above the minimum, at Δχ² = 2.71; σ(v sin i) is
    then the longer side of its Δχ² = 1 interval, and the other labels' covariance includes their drift along it.
    Where χ² at 0 is 4 or more above the minimum (rotation detected), the curvature's covariance is widened by the
    step from 0 to the fit per σ of that rise, (θ − θ(0))/√Δχ²(0): 0 then lies at most √Δχ²(0) σ away.
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
    vmac: float = 0.0  # km/s: macroturbulence, fixed (vmac_fitted False) or fitted (then also in labels)
    vmac_fitted: bool = False
    # per segment (one for a single spectrum): name, n_pixels_used, chi2, continuum (its coefficients, data unit),
    # resolution (the R its model used: the fitted label, or its line-spread function's median R, then lsf True),
    # integrate_pixels, model_flux and mask (on its given pixels); model_flux and mask above are these end to end
    segments: list = field(repr=False, default_factory=list)

    def __str__(self) -> str:
        lines = [f"chi2 = {self.chi2:.6g} on {self.n_pixels_used} pixels (reduced {self.reduced_chi2:.4g}), "
                 f"success={self.success}" + ("" if not self.quality else " (" + "; ".join(self.quality) + ")")]
        for name, value in self.labels.items():
            lines.append(f"  {name:>10} = {value:.6g} ± {self.uncertainties[name]:.3g}"
                         + (f"  (< {self.upper_limits[name]:.3g}, 95 % upper limit)" if name in self.upper_limits else ""))
        if not self.vmac_fitted:
            lines.append(f"  {VMAC:>10} = {self.vmac:.6g}  (fixed)")
        for seg in self.segments:  # a resolving power not fitted: the line-spread function's
            if seg["lsf"]:
                where = f" of {seg['name']}" if len(self.segments) > 1 else ""
                lines.append(f"  {'R':>10} = {seg['resolution']:.6g}  (held{where}: its line-spread function, the "
                             "median over its pixels)")
        if self.rv is not None:
            lines.append(f"  {'rv':>10} = {self.rv:.4f} ± {self.rv_uncertainty:.3g} km/s")
        return "\n".join(lines)


def quality_checks(prob, best, u, labels, rv_best, red: float, sig, jtj) -> list:
    """What fails at the solution (success must not mean "good" when it is not): the optimiser's convergence
    (`best`, a least_squares result), the reduced χ² `red`, labels on a bound of their range (v sin i = 0 is not
    one), an uncertainty wider than a label's whole range, an RV on one of rv_bounds (`u`, `labels`, `rv_best` in the coordinates of the Likelihood `prob`), a
    degenerate covariance (`sig` the uncertainties, `jtj` the normal matrix)."""
    quality = []
    if best.status <= 0:
        quality.append(f"the optimiser did not converge ({best.message})")
    if red > 2.0:
        quality.append(f"reduced chi2 = {red:.3g}: the model does not describe the data within the errors "
                       "(errors too small, outliers that clipping left in, or a star outside the model's grid)")
    elif red < 0.3:
        quality.append(f"reduced chi2 = {red:.3g}: the errors look overestimated")
    for j, name in enumerate(prob.names):
        # v sin i = 0: a star that does not rotate; vmac = 0: no macroturbulence
        at_rest = name in PHYSICAL_ZERO and u[j] < 0 and prob.lo[j] == 0.0
        if abs(u[j]) > 1 - 1e-3 and prob.s_hi[j] > prob.s_lo[j] and not at_rest:
            quality.append(f"{name} = {labels[j]:.6g} is on a bound of its allowed range "
                           f"[{prob.lo[j]:.6g}, {prob.hi[j]:.6g}]: its uncertainty is not meaningful")
        if sig[j] > prob.hi[j] - prob.lo[j]:  # the data do not narrow the label down from its whole range
            quality.append(f"{name} = {labels[j]:.6g} ± {sig[j]:.3g}: the uncertainty is wider than the whole allowed "
                           f"range [{prob.lo[j]:.6g}, {prob.hi[j]:.6g}]; the data do not constrain it (a short or "
                           "line-poor window?)")
    lo_rv, hi_rv = prob.rv_bounds
    if prob.fit_rv and min(rv_best - lo_rv, hi_rv - rv_best) < 1e-3 * (hi_rv - lo_rv):
        quality.append(f"rv = {float(rv_best):.2f} km/s is on a bound of rv_bounds ({lo_rv:g}, {hi_rv:g}): the star "
                       "may move faster; widen rv_bounds (--rv-bounds)")
    eig = np.linalg.eigvalsh(jtj)
    if not np.all(np.isfinite(sig)) or eig[0] <= eig[-1] * 1e-14:
        quality.append("degenerate: some parameter combination is not constrained by the data "
                       "(uncertainties are not meaningful)")
    return quality

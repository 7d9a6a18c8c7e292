"""The solver: the least-squares driver behind `fastspec.fit` — starts, bounds, the run that holds v sin i at 0,
outlier clipping, the χ² profile of slow rotators, the covariance and upper limits — and the fit without errors
(the noise estimated from a first fit's residuals)."""

from __future__ import annotations

import functools
import inspect
import warnings
from pathlib import Path

import numpy as np

from ..decoder import Decoder
from ..wavelength import air_to_vacuum
from .likelihood import Likelihood, add_systematics
from .observation import C_KMS, DEFAULT, Segment, from_specutils
from .parameters import AT_REST, VMAC
from .results import FitQualityWarning, FitResult, quality_checks

LOSSES = ("linear", "soft_l1", "huber", "cauchy", "arctan")
DCHI2_LIMIT = 2.705543  # χ²₁ one-sided 95 % (1.645²): the profile's rise at the upper limit
DCHI2_TWO_SIGMA = 4.0  # Δχ² at v sin i = 0 below which the data cannot tell v sin i from 0 (2σ)


@functools.lru_cache(maxsize=4)
def _cached_decoder(path: str | None) -> Decoder:
    """Decoders loaded by fit() itself, kept for the next call (loading the default model takes ~0.3 s)."""
    return Decoder.load(path)


def _as_decoder(decoder) -> Decoder:
    if decoder is None:
        return _cached_decoder(None)
    if isinstance(decoder, (str, Path)):
        return _cached_decoder(str(Path(decoder).resolve()))
    if not isinstance(decoder, Decoder):
        raise TypeError(f"decoder must be a fastspec.Decoder, a model file path or None, not {type(decoder).__name__}")
    return decoder


def fit(wavelength, flux=None, error=None, decoder: Decoder | str | Path | None = None, *, rv: bool = True,
        continuum_degree: int | None = 2, n_starts: int = 3, n_candidates: int = 128, bounds: dict | None = None,
        rv_bounds=(-300.0, 300.0), mask=None, initial: dict | None = None, seed: int | None = 0,
        jac: str = "analytic", diff_step: float | None = None, max_nfev: int | None = 200, medium: str = "air",
        model_error="auto", loss: str = "linear", f_scale: float = 1.0, clip: float | None = 5.0,
        clip_iterations: int = 5, integrate="auto", vmac=0.0, lsf=None) -> FitResult:
    """Fit the six labels (and an RV shift and a continuum polynomial) to an observed spectrum, or to several
    segments of one (a list of `fastspec.Segment`, each with its own pixels, errors, mask, continuum polynomial and
    line-spread function; they share the labels and the RV).

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

    ``vmac``: radial-tangential macroturbulence (Gray's profile, in the model's broadening stage): a number, held
    fixed (km/s, 0-20; default 0, the spectra without it), or "fit" to fit it in 0-20 km/s (``bounds`` may narrow
    it: bounds={"vmac": (2, 8)}); it is then reported with the labels ("vmac") and, where the data cannot tell it
    from 0, with a 95 % upper limit. Only format-3 models (the shipped one) apply it. Without it, v sin i and R
    take up a star's macroturbulence (benchmarks/results/ for the HARPS Sun).

    ``lsf``: the instrument's line-spread function (a `fastspec.LSF`: R or the FWHM in Å, constant, tabulated or a
    callable of λ; or a number, R): the model takes it in its broadening stage, and R is then not fitted (nor
    reported). With segments, each Segment's own ``lsf`` instead; segments without one share the fitted R.

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
    segments = _segments(wavelength, flux, error, mask, continuum_degree, medium, integrate)
    if segments is None and hasattr(wavelength, "spectral_axis") and hasattr(wavelength, "flux"):  # a specutils Spectrum
        if flux is not None:
            raise TypeError("fit(spectrum): with a specutils Spectrum, give no separate flux")
        wavelength, flux, spec_error, bad = from_specutils(wavelength)
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
    if segments is None and error is None:
        return _fit_estimating_the_noise(wavelength, flux, decoder, locals())
    if segments is None:
        segments = [Segment(wavelength, flux, error, mask, lsf, continuum_degree, medium, integrate, "the spectrum")]
    elif lsf is not None:
        raise TypeError("fit(segments, lsf=...): give each Segment its own lsf")
    prob = Likelihood(decoder, segments, rv, bounds, rv_bounds, model_error=bool(model_error) and has_error_model,
                      vmac=vmac)
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
    spectra = prob.model_flux(prob.labels_of(u_cand)).astype(np.float64)
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

    nc = prob.n_continuum
    lb = np.concatenate([-np.ones(nl), [prob.rv_bounds[0]] if prob.fit_rv else [], np.full(nc, -np.inf)])
    ub = np.concatenate([np.ones(nl), [prob.rv_bounds[1]] if prob.fit_rv else [], np.full(nc, np.inf)])
    # typical scales: labels 0.1 of their box, RV 1 km/s, continuum 1e-2
    x_scale = np.concatenate([0.1 * np.ones(nl), [1.0] if prob.fit_rv else [], 1e-2 * np.ones(nc)])

    def solve(theta0, tol, upper=ub, lower=lb, reweight=True, hold=None):
        """least_squares from theta0; hold: {parameter index: fit coordinate} held there exactly, out of the problem
        (a narrow box instead stops trf early: its steps shrink to the box, and xtol reads that as converged)."""
        if reweight:
            prob.reweight(theta0)  # the emulator error at this start's v sin i and R
        full = np.asarray(theta0, dtype=np.float64).copy()
        for j, value in (hold or {}).items():
            full[j] = value
        free = np.setdiff1d(np.arange(full.size), list(hold or {}))

        def expand(x_free):
            x = full.copy()
            x[free] = x_free
            return x

        run = least_squares(lambda x: prob.residuals(expand(x)), full[free],
                            jac=(lambda x: prob.jacobian(expand(x))[:, free]) if jac == "analytic" else jac,
                            bounds=(lower[free], upper[free]), method="trf", x_scale=x_scale[free], max_nfev=max_nfev,
                            loss=loss, f_scale=f_scale, ftol=tol, xtol=tol, gtol=tol,
                            diff_step=None if jac == "analytic" else diff_step)
        run.x = expand(run.x)
        return run

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
        return lab[jv] < max(10.0, C_KMS / prob.instrument_resolution(lab))

    if jv is not None and prob.r_column is not None:
        if 0.0 < prob.labels_of(prob.split(best.x)[0])[jv] and slow(best.x):
            at_rest = solve(solve(best.x, 1e-8, hold={jv: -1.0}).x, 1e-8)
            runs.append(at_rest)
            if prob.chi2_at(at_rest.x) < prob.chi2_at(best.x):
                best = at_rest
    # A fitted macroturbulence trades with R and v sin i (all three widen the lines): the random starts may end in the
    # basin where it does the widening when a lower χ² has R or v sin i do it with vmac at 0 (or the reverse). So,
    # as for v sin i: fit the rest with vmac held at 0, release it, polish, and keep the lower χ².
    if prob.fit_vmac and prob.lo[prob.names.index(VMAC)] == 0.0:
        jm = prob.names.index(VMAC)
        if prob.labels_of(prob.split(best.x)[0])[jm] > 0.0:
            no_vmac = solve(solve(best.x, 1e-8, hold={jm: -1.0}).x, 1e-8)
            runs.append(no_vmac)
            if prob.chi2_at(no_vmac.x) < prob.chi2_at(best.x):
                best = no_vmac
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
    if jv is not None and prob.is_squared[jv] and prob.r_column is not None and slow(best.x):
        profile = _profile(prob, solve, best, jv, lb, ub)
        if profile is not None and profile["best"] is not best:  # a refit along the profile went lower
            best = profile["best"]
            runs.append(best)
    detected = None  # a slow rotation the profile tells from 0: the curvature's covariance, widened towards 0
    if profile is not None and profile["limit"] is None:
        detected, profile = profile, None
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
    elif detected is not None:
        cov += np.outer(detected["to_zero"], detected["to_zero"])
    # The emulator's error is correlated over pixels (a star's residual pattern is fixed), so beyond its share
    # of the variance it biases the labels by an amount that does not average down: the model file's measured
    # label systematics (noise-free held-out fits) are added in quadrature.
    if prob.model_error:
        add_systematics(cov, prob.names, labels, decoder)
    # back to the flux unit of the data: the continuum coefficients (and their covariance) carry it
    c_scale = np.concatenate([np.full(d + 1, prob.scales[k]) for k, d in enumerate(prob.degrees)] + [np.zeros(0)])
    c_unit = np.concatenate([np.ones(nl + int(prob.fit_rv)), c_scale])
    cov *= np.outer(c_unit, c_unit)
    sig = np.sqrt(np.clip(np.diag(cov), 0, None))
    resid = prob.residuals(best.x)
    chi2_best = float(resid @ resid)
    dof = max(prob.flux.size - prob.n_params, 1)
    several = len(prob.degrees) > 1  # the coefficients of segment k: "s1.c0", "s1.c1", ...; of one: "c0", ...
    names = prob.names + (["rv"] if prob.fit_rv else []) + [
        f"s{k + 1}.c{j}" if several else f"c{j}" for k, d in enumerate(prob.degrees) for j in range(d + 1)]

    red = chi2_best / dof
    quality = quality_checks(prob, best, u, labels, rv_best, red, sig, jtj)
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
    if prob.fit_vmac:
        jm = prob.names.index(VMAC)
        if labels[jm] < 2 * sig[jm] and prob.lo[jm] == 0.0:
            upper_limits[VMAC] = _upper_limit(labels[jm], sig[jm])

    model_flux = np.full(prob.mask.shape, np.nan)
    model_flux[prob.mask] = (resid / prob.ivar_sqrt + prob.flux) * prob.pixel_scale
    prob.n_model_calls -= 1  # that call was bookkeeping, not part of the fit
    return FitResult(
        labels={n: float(v) for n, v in zip(prob.names, labels)},
        uncertainties={n: float(s) for n, s in zip(prob.names, sig[:nl])},
        rv=float(rv_best) if prob.fit_rv else None,
        rv_uncertainty=float(sig[nl]) if prob.fit_rv else None,
        continuum=np.asarray(c, dtype=np.float64) * c_scale,
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
        vmac=float(labels[prob.names.index(VMAC)]) if prob.fit_vmac else float(prob.vmac_fixed),
        vmac_fitted=prob.fit_vmac,
        segments=_segment_results(prob, resid, model_flux, np.asarray(c, dtype=np.float64) * c_scale, labels),
    )


def _segments(wavelength, flux, error, mask, continuum_degree, medium, integrate) -> list | None:
    """fit()'s first argument as a list of Segments with fit()'s options where they say "default", or None when it
    is one spectrum."""
    if isinstance(wavelength, (list, tuple)) and not wavelength:
        raise ValueError("fit([]): no segments given")
    if not isinstance(wavelength, (list, tuple)) or not all(isinstance(s, Segment) for s in wavelength):
        if isinstance(wavelength, (list, tuple)) and any(isinstance(s, Segment) for s in wavelength):
            raise TypeError("fit(segments): every item must be a fastspec.Segment")
        return None
    for given, what in ((flux, "flux"), (error, "error"), (mask, "mask")):
        if given is not None:
            raise TypeError(f"fit(segments): give the {what} in each Segment, not as an argument")
    segments = []
    for k, seg in enumerate(wavelength):
        name = seg.name or f"segment {k + 1}"
        if seg.error is None:
            raise ValueError(f"{name}: a segment needs its errors (fit() estimates the noise of one spectrum only)")
        pick = lambda value, default: default if isinstance(value, str) and value == DEFAULT else value  # noqa: E731
        segments.append(Segment(seg.wavelength, seg.flux, seg.error, seg.mask, seg.lsf,
                                pick(seg.continuum_degree, continuum_degree), pick(seg.medium, medium),
                                pick(seg.integrate, integrate), name))
    names = [s.name for s in segments]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"fit(segments): {names.count(name)} segments are named {name!r} (give each its own name)")
    return segments


def _segment_results(prob, resid, model_flux, continuum, labels) -> list:
    """Per segment: its name, pixels used, χ², continuum coefficients (data unit), the resolving power its model
    used (the fitted R, or its line-spread function's reference R), its pixel integration, and its model flux and
    fitted-pixel mask on its given pixels."""
    out, col, given = [], 0, 0
    r_name = prob.model_names[prob.r_column] if prob.r_column is not None else None
    for k, name in enumerate(prob.segment_names):
        rows = prob.segment == k
        mask = prob.masks[k]
        group = prob.groups[prob.group_of[k]]
        fitted_r = labels[prob.names.index(r_name)] if r_name in prob.names else None
        out.append({"name": name, "n_pixels_used": int(rows.sum()), "chi2": float(resid[rows] @ resid[rows]),
                    "continuum": continuum[col:col + prob.degrees[k] + 1].copy(),
                    "resolution": float(fitted_r if group["r_ref"] is None else group["r_ref"]),
                    "lsf": group["r_ref"] is not None, "integrate_pixels": prob.widths[k],
                    "model_flux": model_flux[given:given + mask.size], "mask": mask.copy()})
        col += prob.degrees[k] + 1
        given += mask.size
    return out


def _upper_limit(value: float, sigma: float, level: float = 0.95) -> float:
    """The `level` quantile of N(value, sigma²) cut to >= 0: a label that the data cannot tell from its physical
    limit 0 (a flat prior on >= 0, the Gaussian likelihood of the fit's covariance)."""
    from scipy.stats import norm

    below = norm.cdf(-value / sigma)  # the likelihood's mass under 0, cut away
    return float(value + sigma * norm.ppf(below + level * (1.0 - below)))


def _profile(prob, solve, best, jv, lb, ub, n_bisect: int = 3) -> dict | None:
    """χ² along v sin i with every other parameter refitted (v sin i held exactly: `solve`'s hold), at 0 and
    above the best fit, for a pixel-mean stage's slow rotator; one variance throughout, the
    best fit's. When 0 lies DCHI2_TWO_SIGMA or more above the minimum (rotation detected; checked first, and again
    once the refits may have found a lower minimum): {"best": the result at the minimum, "limit": None, "to_zero":
    the step from 0 to it in σ of Δχ²(0), a rank-one widening of the curvature's covariance}. Otherwise {"best": the least-squares result at the minimum (the run held at 0 where that is
    lower), "limit": the v sin i above the minimum where χ² has risen by DCHI2_LIMIT (95 % one-sided), "sigma":
    the longer side of the Δχ² = 1 interval about the minimum (the curvature there describes neither side: the
    profile is flat towards 0 and steep above; a minimum at the far end of the flat part, 4.9 km/s for a star
    that does not rotate at R 20000, has 0.8 km/s up and 4.9 km/s down), "valley", "points": {v sin i: Δχ²}}. Bracketing by doubling steps from a tenth of the
    instrumental FWHM, then n_bisect bisections and linear interpolation: ~6-8 refits from warm starts."""
    lab = prob.labels_of(prob.split(best.x)[0])
    fwhm = C_KMS / prob.instrument_resolution(lab)
    # One variance for the whole profile, the best fit's: the emulator error changes with v sin i (and R) by
    # enough to move χ² by several units over a few km/s, which would swamp the profile's rise.
    prob.reweight(best.x)

    def chi2(x):
        r = prob.residuals(x)
        return float(r @ r)

    solutions = {float(lab[jv]): (chi2(best.x), best)}
    # The refits must place χ² to well under the Δχ² = 1 the profile reads: least_squares' tolerances are relative,
    # and 1e-6 of a χ² of 3e6 (the HARPS Sun, reduced χ² 59) is 3 units, enough to call a flat profile detected.
    tol = min(1e-6, 0.05 / max(solutions[float(lab[jv])][0], 1.0))

    def at(v):
        start = solutions[min(solutions, key=lambda w: abs(w - v))][1].x.copy()
        u_v = float(prob.u_of(np.where(np.arange(lab.size) == jv, v, lab))[jv])
        run = solve(start, tol, reweight=False, hold={jv: u_v})
        solutions[v] = (chi2(run.x), run)
        return solutions[v][0]

    nl = lab.size

    def point(v):  # the labels (physical) and the rest of the parameters of the refit at v
        return np.concatenate([prob.labels_of(solutions[v][1].x[:nl]), solutions[v][1].x[nl:]])

    def detected(v_min):
        # Rotation told from 0 at Δχ²(0) ≥ 4, yet on this profile the curvature at the minimum says little about
        # how far 0 is: steep near the minimum and flat towards 0, it gave a non-rotating star at R 20000
        # 5.9 ± 0.6 km/s (R +12 %, 3.4σ) where χ² at 0, the others refitted, was only 5.0 higher. The step to 0
        # scaled to one σ of that likelihood ratio, (θ(v_min) − θ(0)) / √Δχ²(0), is added to the covariance
        # (rank one, along the valley; R moves with v sin i): the distance to 0 in σ is then at most √Δχ²(0).
        dchi2_zero = solutions[0.0][0] - solutions[v_min][0]
        return {"best": solutions[v_min][1], "limit": None,
                "to_zero": (point(v_min) - point(0.0)) / np.sqrt(dchi2_zero)}

    if 0.0 not in solutions:
        at(0.0)
    v_min = min(solutions, key=lambda w: solutions[w][0])
    chi2_min = solutions[v_min][0]
    if solutions[0.0][0] - chi2_min >= DCHI2_TWO_SIGMA:
        return detected(v_min)  # before any further refit
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
        return detected(v_min)  # from the lower minimum
    vs = sorted(solutions)
    dchi2 = np.array([solutions[v][0] - chi2_min for v in vs])
    params = np.array([point(v) for v in vs])
    limit, _ = _crossing(vs, dchi2, params, DCHI2_LIMIT, v_min, +1)
    one_up, p_up = _crossing(vs, dchi2, params, 1.0, v_min, +1)
    one_down, p_down = _crossing(vs, dchi2, params, 1.0, v_min, -1)
    # Along the valley the other parameters move with v sin i (R most): the change over its Δχ² = 1 interval,
    # halved, is added to their covariance (rank one, the valley's direction); v sin i's own entries stay apart.
    valley = 0.5 * (p_up - p_down)
    # Where 0 itself lies beyond that interval (1 <= Δχ²(0) < 4), the step to 0 per σ of its likelihood ratio can be
    # the longer drift (a draw at 5.6 km/s with R 3.2σ high on the interval's drift alone): the longer of the two.
    dchi2_zero = solutions[0.0][0] - chi2_min
    if dchi2_zero >= 1.0:
        to_zero = (point(v_min) - point(0.0)) / np.sqrt(dchi2_zero)
        if abs(to_zero[jv]) > abs(valley[jv]):
            valley = to_zero
    valley[jv] = 0.0
    return {"best": solutions[v_min][1], "limit": hi if limit is None else limit,
            "sigma": max((hi if one_up is None else one_up) - v_min, v_min - (vs[0] if one_down is None else one_down)),
            "valley": valley,
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
        add_systematics(result.covariance, list(result.labels), list(result.labels.values()), decoder)
        result.uncertainties = {n: float(np.sqrt(result.covariance[j, j])) for j, n in enumerate(result.labels)}
        result.model_error = True
    result.error_estimate = sigma
    return result

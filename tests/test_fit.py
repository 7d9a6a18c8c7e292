"""fastspec.fit: self-consistent recovery on spectra the model itself generates (known labels, RV and continuum,
Gaussian noise at SNR 100), the residual Jacobian's chain rule against finite differences, masking, and the
errors for unusable input.

Models: random-weight decoders on the full 19000-pixel grid (conftest.small_model and a wider one here), so
the tests do not depend on the trained default model. Recovery is checked against the fit's own uncertainties
(|fit − true| ≤ 5σ for every label and the RV) and reduced χ² ≈ 1: both fail if the Jacobian, the covariance
or the noise model is wrong, and neither is a hard-coded number. The recovery on real SYNSPEC spectra is in
benchmarks/bench_fit.py (benchmarks/results/fit-*.md).
"""

from __future__ import annotations


import numpy as np
import pytest

import fastspec
from fastspec import Decoder
from fastspec import model_format as mf
from fastspec.fitting import C_KMS, Segment
from fastspec.fitting.likelihood import Likelihood as _Problem
from test_jacobian import hidden_signs

TRUTH_BOX = {"teff": (4500, 10500), "logg": (2.3, 4.7), "vsini": (5, 250), "mh": (-1.2, 1.2), "vmic": (0.3, 3.7),
             "resolution": (3000, 100000)}




@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("fit") / "wide.fsm"
    mf.write_model(path, mf.random_decoder([64, 256], latent_dim=6, seed=11), latent_dim=6)
    return Decoder.load(path)


def observe(decoder, truth, rv, cont_coeffs, snr, rng, wavelength):
    """The model spectrum at `truth`, Doppler shifted, times a Legendre continuum, with noise at `snr`."""
    model = decoder([truth[n] for n in decoder.label_names]).astype(np.float64)
    flux = np.interp(wavelength / (1 + rv / C_KMS), decoder.wavelength, model)
    x = 2 * (wavelength - wavelength.min()) / np.ptp(wavelength) - 1
    flux = flux * np.polynomial.legendre.legval(x, cont_coeffs)
    error = np.abs(flux) / snr
    return flux + rng.normal(size=flux.size) * error, error


def random_truth(rng):
    truth = {n: float(rng.uniform(*TRUTH_BOX[n])) for n in TRUTH_BOX}
    truth["resolution"] = float(10 ** rng.uniform(*np.log10(TRUTH_BOX["resolution"])))
    return truth


def check_recovery(result, truth, rv, n_sigma=5.0):
    assert result.success, result.message
    for name, value in truth.items():
        sigma = result.uncertainties[name]
        assert np.isfinite(sigma) and sigma > 0, f"{name}: uncertainty {sigma}"
        assert abs(result.labels[name] - value) <= n_sigma * sigma, \
            f"{name}: fit {result.labels[name]:.6g} ± {sigma:.3g}, true {value:.6g}\n{result}"
    if rv is not None:
        assert abs(result.rv - rv) <= n_sigma * result.rv_uncertainty, f"rv: {result.rv} vs {rv}\n{result}"


@pytest.mark.parametrize("model", ["small", "wide"])
def test_recovers_labels_rv_and_continuum_at_snr_100(small_model, wide_model, rng, model):
    decoder = Decoder.load(small_model) if model == "small" else wide_model
    wl = decoder.wavelength[300:-300:2]  # an observed grid coarser than the model's, inside it
    truth, rv = random_truth(rng), float(rng.uniform(-80, 80))
    cont = [1.0, float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.03, 0.03))]
    flux, error = observe(decoder, truth, rv, cont, 100.0, rng, wl)
    # point samples of the model, not pixel means: integrate=False (the default integrates pixels this coarse)
    result = fastspec.fit(wl, flux, error, decoder, seed=int(rng.integers(1 << 31)), integrate=False)
    check_recovery(result, truth, rv)
    # the noise is exactly Gaussian with the given errors: χ²/dof ~ 1 ± sqrt(2/dof) = 1 ± 0.015
    assert 0.93 < result.reduced_chi2 < 1.07, result
    np.testing.assert_allclose(result.continuum, cont, atol=0.01)
    assert result.covariance.shape == (10, 10) and result.parameter_names[6:] == ["rv", "c0", "c1", "c2"]
    np.testing.assert_allclose(result.covariance, result.covariance.T, rtol=1e-8, atol=0)
    assert np.all(np.linalg.eigvalsh(result.covariance) > 0)
    assert result.n_evaluations > 0 and result.n_jacobian_evaluations > 0


def test_finite_difference_jacobian_option_agrees(small_model, rng):
    decoder = Decoder.load(small_model)
    wl = decoder.wavelength[150:-150]
    truth = random_truth(rng)
    flux, error = observe(decoder, truth, 12.0, [1.0, 0.02, 0.0], 100.0, rng, wl)
    # Started from the truth (among the candidates): this checks the Jacobian option, not the global search,
    # which on a random-weight model can stop both fits in the same local minimum (1 seed in ~20).
    analytic = fastspec.fit(wl, flux, error, decoder, initial=truth)
    fd = fastspec.fit(wl, flux, error, decoder, initial=truth, jac="2-point", diff_step=1e-3)
    check_recovery(fd, truth, 12.0)
    # both reach the same minimum (χ² equal to well within its 1σ scatter of sqrt(2 · dof) ≈ 190)
    assert abs(fd.chi2 - analytic.chi2) < 1.0, (fd.chi2, analytic.chi2)


@pytest.mark.parametrize("integrate", [False, True])
def test_residual_jacobian_matches_finite_differences(tmp_path, rng, integrate):
    """The chain rule through interpolation (or pixel integration), RV shift and continuum, against central
    differences."""
    # a narrow model: few ReLU units, so label steps rarely cross a kink
    layers = mf.random_decoder([16, 32], latent_dim=4, seed=int(rng.integers(1 << 31)))
    path = mf.write_model(tmp_path / "narrow.fsm", layers, latent_dim=4)
    decoder = Decoder.load(path)
    wl = np.sort(rng.uniform(4470, 5380, 3000))  # an irregular observed grid
    truth = random_truth(rng)
    flux, error = observe(decoder, truth, 5.0, [1.0, 0.05, 0.01], 100.0, rng, wl)
    prob = _Problem(decoder, [Segment(wl, flux, error, None, None, 2, "air", integrate, "spectrum")], True, None,
                    (-300, 300))
    assert (prob.half is not None) == integrate
    theta = np.concatenate([prob.u_of(np.array([truth[n] for n in prob.names])), [5.0], [1.0, 0.05, 0.01]])
    jac = prob.jacobian(theta)
    names = prob.names + ["rv", "c0", "c1", "c2"]
    # steps: 1e-3 of the label box (float32 model: smaller steps drown in its rounding, measured error
    # ~2e-4); 1e-3 km/s for the RV; 1e-4 for the continuum coefficients (linear: exact to rounding)
    steps = np.concatenate([np.full(6, 1e-3), [1e-3], np.full(3, 1e-4)])
    for i, h in enumerate(steps):
        up, down = theta.copy(), theta.copy()
        up[i] += h
        down[i] -= h
        if i < 6 and not np.array_equal(*(hidden_signs(layers, prob.labels_of(t[:6])[None], None, 4, "f32")
                                            for t in (up, down))):
            continue  # the step crosses a ReLU kink: central differences do not apply (rare)
        fd = (prob.residuals(up) - prob.residuals(down)) / (2 * h)
        use = np.ones(wl.size, bool)
        if names[i] == "rv":  # piecewise linear: leave out pixels whose step crosses a node (or an edge a bin's)
            def pieces(rv):
                if not integrate:
                    return prob._interp(rv)[0]
                return np.floor(np.stack(prob._edges(rv)) + 0.5)
            use = np.all(np.atleast_2d(pieces(up[i]) == pieces(down[i])), axis=0)
            assert use.mean() > 0.99
        err = np.linalg.norm(jac[use, i] - fd[use]) / np.linalg.norm(fd[use])
        assert err < 2e-3, f"column {i} ({names[i]}): relative error {err:.3g}"


def test_bad_pixels_are_masked_not_fatal(small_model, rng):
    decoder = Decoder.load(small_model)
    wl = decoder.wavelength[200:-200]
    truth = random_truth(rng)
    flux, error = observe(decoder, truth, 0.0, [1.0], 100.0, rng, wl)
    bad = rng.choice(wl.size, 500, replace=False)
    flux[bad[:200]] = np.nan
    flux[bad[200:250]] = np.inf
    error[bad[250:350]] = 0.0
    error[bad[350:400]] = np.nan
    mask = np.ones(wl.size, bool)
    mask[bad[400:]] = False
    flux[bad[400:]] = 1e6  # garbage under the user's mask must not matter
    # clip=None: this is about masking; a 5-sigma clip also drops a genuine noise pixel in ~1 % of draws of
    # 18,100 Gaussian pixels (seed 2623671381: one at 5.09 sigma), which the count below would call a failure.
    result = fastspec.fit(wl, flux, error, decoder, rv=False, continuum_degree=0, mask=mask, clip=None)
    assert result.n_pixels_used == wl.size - 500 and result.n_pixels_clipped == 0
    assert np.array_equal(result.mask, np.isin(np.arange(wl.size), bad, invert=True))
    assert np.all(np.isnan(result.model_flux[bad])) and np.all(np.isfinite(result.model_flux[result.mask]))
    check_recovery(result, truth, None)
    assert result.rv is None and result.parameter_names[-1] == "c0"


def test_noiseless_spectrum_is_recovered_tightly(small_model, rng):
    decoder = Decoder.load(small_model)
    truth = random_truth(rng)
    flux = decoder([truth[n] for n in decoder.label_names]).astype(np.float64)
    error = np.full(flux.size, 1e-3)
    result = fastspec.fit(decoder.wavelength, flux, error, decoder, rv=False, continuum_degree=None)
    assert result.chi2 < 1e-3 * flux.size  # float32 rounding of the model is ~1e-7, error 1e-3
    for name, value in truth.items():
        lo, hi = decoder.label_ranges[name]
        assert abs(result.labels[name] - value) <= 1e-3 * (hi - lo), (name, result.labels[name], value)


def test_clear_errors(small_model):
    decoder = Decoder.load(small_model)
    wl = decoder.wavelength
    flux, error = np.ones(wl.size), np.full(wl.size, 0.01)
    # Pixels that some allowed RV moves off the model grid are trimmed, not refused: at ±300 km/s the usable
    # range is 4454.50-5394.50 Å (90 pixels at the blue end, 109 at the red).
    one = lambda wl: [Segment(wl, flux, error, None, None, 2, "air", "auto", "spectrum")]  # noqa: E731
    prob = _Problem(decoder, one(wl), True, None, (-300.0, 300.0))
    assert prob.n_trimmed == 90 + 109 and prob.wl.min() == pytest.approx(4454.5) and prob.wl.max() == pytest.approx(5394.5)
    assert _Problem(decoder, one(wl + 100), False, None, (0, 0)).n_trimmed == 2000
    with pytest.raises(ValueError, match=r"only 0 usable pixels .* within 4454.4\d+-5394.5\d+ Å \(air\)"):
        fastspec.fit(wl + 1000, flux, error, decoder)
    with pytest.raises(ValueError, match=r"bounds\['teff'\] = 'hot' must be two numbers"):
        fastspec.fit(wl, flux, error, decoder, rv=False, bounds={"teff": "hot"})
    with pytest.raises(ValueError, match="medium must be 'air' or 'vacuum'"):
        fastspec.fit(wl, flux, error, decoder, medium="water")
    with pytest.raises(ValueError, match="model_error=True but .* carries no emulator error"):
        fastspec.fit(wl, flux, error, decoder, model_error=True)
    with pytest.raises(ValueError, match="loss must be one of"):
        fastspec.fit(wl, flux, error, decoder, loss="l1")
    with pytest.raises(TypeError, match="decoder must be a fastspec.Decoder, a model file path or None"):
        fastspec.fit(wl, flux, error, decoder=3)
    with pytest.raises(ValueError, match="only 5 usable pixels"):
        fastspec.fit(wl[:5], flux[:5], error[:5], decoder, rv=False)
    nan_flux = np.full(wl.size, np.nan)
    nan_flux[:12] = 1.0
    with pytest.raises(ValueError, match="only 12 usable pixels"):
        fastspec.fit(wl, nan_flux, error, decoder, rv=False)
    with pytest.raises(ValueError, match="1-D arrays of one length|scalar or a 1-D array"):
        fastspec.fit(wl, flux[:-1], error, decoder, rv=False)
    with pytest.raises(ValueError, match="wavelength contains NaN"):
        fastspec.fit(np.where(np.arange(wl.size) == 3, np.nan, wl), flux, error, decoder, rv=False)
    with pytest.raises(ValueError, match=r"bounds\['logg'\] = \(1.0, 3.0\)"):
        fastspec.fit(wl, flux, error, decoder, rv=False, bounds={"logg": (1.0, 3.0)})
    with pytest.raises(ValueError, match="unknown label 'age'"):
        fastspec.fit(wl, flux, error, decoder, rv=False, bounds={"age": (1.0, 3.0)})
    with pytest.raises(ValueError, match="mask must be a boolean array"):
        fastspec.fit(wl, flux, error, decoder, rv=False, mask=np.ones(wl.size))
    with pytest.raises(ValueError, match="jac must be"):
        fastspec.fit(wl, flux, error, decoder, rv=False, jac="exact")


def test_bounds_and_initial_are_honoured(small_model, rng):
    decoder = Decoder.load(small_model)
    wl = decoder.wavelength[200:-200]
    truth = random_truth(rng)
    flux, error = observe(decoder, truth, 0.0, [1.0], 100.0, rng, wl)
    # a box that excludes the truth: the fit must end on the edge nearest to it
    below = truth["teff"] > 7500
    lo, hi = (truth["teff"] - 800, truth["teff"] - 300) if below else (truth["teff"] + 300, truth["teff"] + 800)
    result = fastspec.fit(wl, flux, error, decoder, rv=False, continuum_degree=0, bounds={"teff": (lo, hi)},
                          initial=truth | {"teff": (lo + hi) / 2})
    assert result.labels["teff"] == pytest.approx(hi if below else lo, abs=1.0), result


def test_uncertainties_match_the_scatter_of_repeated_fits(small_model, rng):
    """The reported σ (from the covariance) against the scatter of fits to independent noise draws of one
    spectrum. With K = 24 draws the sample standard deviation / σ has a 1σ spread of ~15 %: accept 0.45-1.8
    (a false alarm: ~1e-4 over the six labels)."""
    decoder = Decoder.load(small_model)
    wl = decoder.wavelength[200:-200]
    truth = random_truth(rng)
    fits, sigmas = [], []
    for _ in range(24):
        flux, error = observe(decoder, truth, 0.0, [1.0, 0.02], 50.0, rng, wl)
        r = fastspec.fit(wl, flux, error, decoder, rv=False, continuum_degree=1, n_starts=1, n_candidates=1,
                         initial=truth)
        fits.append([r.labels[n] for n in truth])
        sigmas.append([r.uncertainties[n] for n in truth])
    ratio = np.std(fits, axis=0, ddof=1) / np.median(sigmas, axis=0)
    assert np.all((ratio > 0.45) & (ratio < 1.8)), dict(zip(truth, ratio.round(3)))

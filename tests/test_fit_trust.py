"""fastspec.fit must not mislead (issue 24): slow rotators, flux units, coarse pixels, an RV on its bound, bad
errors, noise-free spectra, duplicated wavelengths, the pixels left out. The first three use the shipped model:
the defects came from its broadening stage, which random-weight test models do not have."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastspec
from fastspec import Decoder
from fastspec.fitting import C_KMS, FitQualityWarning
from test_fit import observe, random_truth

FAST = dict(n_starts=1, n_candidates=16)


@pytest.fixture(scope="module")
def shipped():
    return Decoder.load()


def quiet_fit(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitQualityWarning)
        return fastspec.fit(*args, **kwargs)


# ------------------------------------------------------------------------------------- 1: slow rotators


def test_non_rotating_star_is_not_given_a_false_rotation(shipped, rng):
    """v sin i = 0 at R = 20000, SNR 100 (the issue's case): before, every draw ended at v sin i 4-5.5 km/s,
    2-6σ from 0, with R 8-13 % high, success=True. The fit must reach v sin i consistent with 0, give an upper
    limit, keep R at the truth, and not call the physical bound 0 a failure."""
    truth = dict(teff=5800, logg=4.3, vsini=0.0, mh=-0.2, vmic=1.2, resolution=20000)
    clean = shipped(**truth).astype(np.float64)
    for _ in range(2):
        r = quiet_fit(shipped.wavelength, clean + rng.normal(size=clean.size) * 0.01, 0.01, shipped)
        v, sv = r.labels["vsini"], r.uncertainties["vsini"]
        # consistent with 0: beyond 3σ in 0.1 % of noise draws (2σ, the first bound, failed CI seed 1131830969
        # with 2.46 ± 1.15 km/s: a 2σ draw happens a few % of the time)
        assert v <= 3 * sv, r
        assert abs(r.labels["resolution"] - 20000) <= 3 * r.uncertainties["resolution"], r
        assert r.success and not r.quality, r
        if v <= 2 * sv:  # the data cannot tell it from 0: an upper limit, shown
            assert "vsini" in r.upper_limits and v <= r.upper_limits["vsini"] < 15, r.upper_limits
            assert "upper limit" in str(r)


def test_clear_rotation_gets_no_upper_limit(shipped, rng):
    truth = dict(teff=6200, logg=4.2, vsini=25.0, mh=0.0, vmic=1.5, resolution=20000)
    clean = shipped(**truth).astype(np.float64)
    r = quiet_fit(shipped.wavelength, clean + rng.normal(size=clean.size) * 0.01, 0.01, shipped)
    assert abs(r.labels["vsini"] - 25) <= 4 * r.uncertainties["vsini"] and not r.upper_limits, r


# ----------------------------------------------------------------------------------------- 2: flux units


@pytest.mark.parametrize("scale", [1e-15, 1e-6, 1e15])
@pytest.mark.parametrize("with_errors", [True, False])
def test_result_does_not_depend_on_the_flux_unit(small_model, rng, scale, with_errors):
    decoder = Decoder.load(small_model)
    wl = decoder.wavelength[300:-300]
    truth = random_truth(rng)
    flux, error = observe(decoder, truth, 12.0, [1.0, 0.02, -0.01], 100.0, rng, wl)
    err = error if with_errors else None
    ref = quiet_fit(wl, flux, err, decoder, **FAST)
    r = quiet_fit(wl, flux * scale, None if err is None else err * scale, decoder, **FAST)
    assert r.success == ref.success and r.quality == ref.quality, (r.quality, ref.quality)
    assert r.reduced_chi2 == pytest.approx(ref.reduced_chi2, rel=1e-6)
    for name in truth:
        assert abs(r.labels[name] - ref.labels[name]) <= 1e-3 * ref.uncertainties[name], name
        assert r.uncertainties[name] == pytest.approx(ref.uncertainties[name], rel=1e-4)
    assert r.rv == pytest.approx(ref.rv, abs=1e-3 * ref.rv_uncertainty)
    np.testing.assert_allclose(r.continuum, ref.continuum * scale, rtol=1e-5)
    np.testing.assert_allclose(r.model_flux[r.mask], ref.model_flux[ref.mask] * scale, rtol=1e-5)
    if not with_errors:
        assert r.error_estimate == pytest.approx(ref.error_estimate * scale, rel=1e-5)


# ---------------------------------------------------------------------------------------- 3: coarse pixels


def test_coarse_pixels_do_not_bias_the_resolution(shipped):
    """Noise-free 0.2 Å pixels (the mean of 4 model pixels), true R 30000, errors 0.01: before, the default
    (point samples) gave R 8.6σ low and integrate=True (a 5-pixel box) 2.7σ high. Both must now be within 1σ."""
    truth = dict(teff=6000, logg=4.2, vsini=10.0, mh=0.0, vmic=1.0, resolution=30000)
    model = shipped(**truth).astype(np.float64)[200:-200]
    flux = model[: model.size // 4 * 4].reshape(-1, 4).mean(axis=1)
    wl = shipped.wavelength[200:-200][: model.size // 4 * 4].reshape(-1, 4).mean(axis=1)
    for kw in ({}, {"integrate": True}):
        r = quiet_fit(wl, flux, 0.01, shipped, **kw)
        assert abs(r.labels["resolution"] - 30000) <= r.uncertainties["resolution"], (kw, r)
        assert r.integrate_pixels == pytest.approx(4.0, rel=1e-3)
    point = quiet_fit(wl, flux, 0.01, shipped, integrate=False)
    assert point.integrate_pixels == 1.0


# ----------------------------------------------------------------------------------------- 4: RV on bound


def test_rv_on_its_bound_is_reported(shipped, rng):
    """True RV 5 km/s beyond rv_bounds (lines 15 km/s wide at R 20000: χ² falls all the way to the bound)."""
    truth = dict(teff=5800, logg=4.3, vsini=3.0, mh=0.0, vmic=1.2, resolution=20000)
    wl = shipped.wavelength[400:-400]
    flux, error = observe(shipped, truth, 105.0, [1.0], 100.0, rng, wl)
    with pytest.warns(FitQualityWarning, match=r"rv = 100.* bound"):
        r = fastspec.fit(wl, flux, error, shipped, rv_bounds=(-100.0, 100.0))
    assert not r.success and any("rv" in q and "rv_bounds" in q for q in r.quality), r.quality


# --------------------------------------------------------------------------------- 8, 9, 11, 12: input


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_scalar_error_must_be_positive(small_model, bad):
    decoder = Decoder.load(small_model)
    with pytest.raises(ValueError, match="error must be a finite number > 0"):
        fastspec.fit(decoder.wavelength, np.ones(decoder.n_pixels), bad, decoder)


def test_noise_free_spectrum_without_errors_is_a_success(shipped):
    """The quick start's noise-free Sun, no errors given: before, reduced χ² ~ 0 -> "errors look overestimated",
    success False; and the noise estimate changed tenfold with model_error=False."""
    labels = dict(teff=5777, logg=4.44, vsini=2.0, mh=0.0, vmic=1.0, resolution=50000)
    flux = shipped(**labels).astype(np.float64)
    r = quiet_fit(shipped.wavelength, flux, None, shipped)
    assert r.success and not r.quality, r.quality
    plain = quiet_fit(shipped.wavelength, flux, None, shipped, model_error=False)
    assert plain.error_estimate == pytest.approx(r.error_estimate, rel=1e-6)


def test_model_spectrum_is_reachable_as_documented():
    assert callable(fastspec.fit.model_spectrum)


def test_duplicated_wavelengths_are_refused(small_model):
    decoder = Decoder.load(small_model)
    wl = np.concatenate([decoder.wavelength[1000:2000], decoder.wavelength[1500:1600]])
    with pytest.raises(ValueError, match="100 duplicated wavelengths"):
        fastspec.fit(wl, np.ones(wl.size), 0.01, decoder)


@pytest.mark.parametrize("degree", [11, 50])
def test_continuum_degree_out_of_range(small_model, degree):
    decoder = Decoder.load(small_model)
    with pytest.raises(ValueError, match="continuum_degree"):
        fastspec.fit(decoder.wavelength, np.ones(decoder.n_pixels), 0.01, decoder, continuum_degree=degree)


def test_left_out_pixels_are_counted(small_model, rng):
    decoder = Decoder.load(small_model)
    wl = decoder.wavelength[400:-400]
    flux, error = observe(decoder, random_truth(rng), 0.0, [1.0], 100.0, rng, wl)
    flux[:30] = np.nan
    error[30:50] = 0.0
    mask = np.ones(wl.size, bool)
    mask[50:60] = False
    r = quiet_fit(wl, flux, error, decoder, mask=mask, rv=False, clip=None, **FAST)
    assert r.n_pixels_invalid == 50 and r.n_pixels_masked == 10 and r.n_pixels_used == wl.size - 60


# ------------------------------------------------------------------- an uncertainty wider than the label range

def test_an_uncertainty_wider_than_the_label_range_is_not_a_success(tmp_path):
    """A 20 Å model that hardly sees v sin i (as a short window with few lines): the fit converges with v sin i
    ± ~1000 km/s, more than the whole 0-300 range, and must not report that as a success."""
    from fastspec.model_format import random_decoder, write_model

    layers = random_decoder([16, 32], latent_dim=4, n_pixels=400, seed=3)
    layers[0].weight[:, 4 + 2] *= 1e-3  # the v sin i input (after the 4 latent ones) barely reaches the spectrum
    dec = Decoder.load(write_model(tmp_path / "short.fsm", layers, latent_dim=4, wavelength=(5150.0, 0.05, 400, "air")))
    truth = np.array([[6000.0, 4.0, 20.0, 0.0, 1.5, 20000.0]])
    wl = 5150.0 + 0.05 * np.arange(400)
    flux = dec(truth)[0] + 0.02 * np.random.default_rng(0).standard_normal(400)
    r = quiet_fit(wl, flux, 0.02, dec, rv=False)
    lo, hi = dec.label_ranges["vsini"]
    assert r.uncertainties["vsini"] > hi - lo  # what the check is about (measured ~1100 km/s)
    assert not r.success and any("vsini" in q and "range" in q for q in r.quality), r.quality

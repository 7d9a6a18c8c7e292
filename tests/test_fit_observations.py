"""fastspec.fit on observations as they come: vacuum wavelengths, scalar or absent errors, masked arrays, cosmic
rays, quality flags, the emulator error in the variance; and the air/vacuum conversion itself."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastspec
from fastspec import Decoder
from fastspec import model_format as mf
from fastspec.fitting import FitQualityWarning
from fastspec.fitting.solver import _as_decoder
from fastspec.wavelength import air_to_vacuum, vacuum_to_air
from test_fit import C_KMS, observe, random_truth

FAST = dict(n_starts=1, n_candidates=16)


def test_air_vacuum_conversion(test_seed):
    # Hα: 6564.61 Å in vacuum is 6562.80 Å in air (IAU standard, Morton 2000); 5000 Å vacuum -> 4998.606 Å air.
    assert vacuum_to_air(6564.614) == pytest.approx(6562.801, abs=2e-3)
    assert vacuum_to_air(5000.0) == pytest.approx(4998.6055, abs=1e-3)
    w = np.random.default_rng(test_seed).uniform(2000, 30000, 1000)
    np.testing.assert_allclose(air_to_vacuum(vacuum_to_air(w)), w, rtol=1e-14)
    np.testing.assert_allclose(vacuum_to_air(air_to_vacuum(w)), w, rtol=1e-14)
    assert np.isnan(vacuum_to_air(np.array([np.nan, 5000.0]))[0])
    with pytest.raises(ValueError, match="below 2000 Å"):
        vacuum_to_air(500.0)


def test_vacuum_wavelengths_give_the_right_rv(small_model, rng):
    decoder = Decoder.load(small_model)
    truth = random_truth(rng)
    wl_air = decoder.wavelength[300:-300]
    flux, error = observe(decoder, truth, 40.0, [1.0], 100.0, rng, wl_air)
    wl_vac = air_to_vacuum(wl_air)
    right = fastspec.fit(wl_vac, flux, error, decoder, medium="vacuum", **FAST)
    assert right.medium == "vacuum" and abs(right.rv - 40.0) < 5 * right.rv_uncertainty, right
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitQualityWarning)
        wrong = fastspec.fit(wl_vac, flux, error, decoder, **FAST)  # vacuum data taken for air: ~ +83 km/s off
    assert abs(wrong.rv - 40.0) > 50
    # at rest, vacuum data taken for air sit at the air/vacuum offset: a warning names the likely cause
    flux0, error0 = observe(decoder, truth, 0.0, [1.0], 100.0, rng, wl_air)
    with pytest.warns(FitQualityWarning, match="air/vacuum offset"):
        fastspec.fit(wl_vac, flux0, error0, decoder, **FAST)


def test_scalar_and_absent_errors(small_model, rng):
    decoder = Decoder.load(small_model)
    truth = random_truth(rng)
    wl = decoder.wavelength[300:-300]
    clean = np.interp(wl, decoder.wavelength, decoder([truth[n] for n in decoder.label_names]))
    sigma = 0.01
    flux = clean + rng.normal(0, sigma, wl.size)
    scalar = fastspec.fit(wl, flux, sigma, decoder, rv=False, continuum_degree=0, initial=truth, **FAST)
    array = fastspec.fit(wl, flux, np.full(wl.size, sigma), decoder, rv=False, continuum_degree=0, initial=truth, **FAST)
    assert scalar.labels == array.labels and scalar.error_estimate is None
    absent = fastspec.fit(wl, flux, None, decoder, rv=False, continuum_degree=0, initial=truth, **FAST)
    assert absent.error_estimate == pytest.approx(sigma, rel=0.05)
    for name in truth:
        assert absent.uncertainties[name] == pytest.approx(array.uncertainties[name], rel=0.1)


def test_masked_arrays_are_honoured(small_model, rng):
    decoder = Decoder.load(small_model)
    truth = random_truth(rng)
    wl = decoder.wavelength[300:-300]
    flux, error = observe(decoder, truth, 0.0, [1.0], 100.0, rng, wl)
    bad = rng.choice(wl.size, 300, replace=False)
    garbage = flux.copy()
    garbage[bad] = 50.0
    masked = np.ma.array(garbage, mask=np.isin(np.arange(wl.size), bad))
    r = fastspec.fit(wl, masked, error, decoder, rv=False, continuum_degree=0, initial=truth, **FAST)
    ref = fastspec.fit(wl, flux, error, decoder, rv=False, continuum_degree=0, initial=truth, mask=~masked.mask, **FAST)
    assert r.n_pixels_used == wl.size - 300 and r.labels == ref.labels and r.success


def test_cosmic_rays_clipped_and_flagged(small_model, rng):
    """30 spikes of +5..+20 σ·SNR: without clip the fit is flagged (reduced χ² far above 1, success False);
    with clip=5 they are rejected and the labels come back within their uncertainties."""
    decoder = Decoder.load(small_model)
    truth = random_truth(rng)
    wl = decoder.wavelength[300:-300]
    flux, error = observe(decoder, truth, 0.0, [1.0], 100.0, rng, wl)
    hit = rng.choice(wl.size, 30, replace=False)
    flux[hit] += rng.uniform(0.5, 2.0, 30)
    with pytest.warns(FitQualityWarning, match="reduced chi2"):
        raw = fastspec.fit(wl, flux, error, decoder, rv=False, continuum_degree=0, initial=truth, clip=None, **FAST)
    assert not raw.success and raw.converged and raw.quality
    clipped = fastspec.fit(wl, flux, error, decoder, rv=False, continuum_degree=0, initial=truth, **FAST)  # clip=5
    assert clipped.success and clipped.n_pixels_clipped >= 30 and 0.8 < clipped.reduced_chi2 < 1.2
    assert not clipped.mask[np.flatnonzero(np.isin(np.arange(wl.size), hit))].any()
    for name, value in truth.items():
        assert abs(clipped.labels[name] - value) <= 5 * clipped.uncertainties[name], (name, clipped)


def test_default_decoder_is_loaded_once():
    assert _as_decoder(None) is _as_decoder(None)
    path = fastspec.default_model_path()
    assert _as_decoder(str(path)) is _as_decoder(path)


def test_emulator_error_widens_the_uncertainties(tmp_path, rng):
    """A model file with an emulator-error block: fit adds it to the variance (model_error="auto"), so the
    uncertainties grow as the error model says, and reduced χ² of a spectrum with that much extra scatter is ~1."""
    layers = mf.random_decoder([32, 64], latent_dim=4, n_pixels=19000, n_labels=4, seed=3)
    rms = np.full((2, 2, 19000), 0.01, np.float32)
    ee = mf.EmulatorError(np.array([0.0, 300.0]), np.array([1000.0, 115000.0]), rms)
    path = mf.write_model(tmp_path / "e.fsm", layers, latent_dim=4, labels=mf.INTRINSIC_LABELS,
                          broadening=mf.BroadeningStage(), emulator_error=ee)
    decoder = Decoder.load(path)
    truth = random_truth(rng)
    wl = decoder.wavelength[300:-300]
    clean = np.interp(wl, decoder.wavelength, decoder([truth[n] for n in decoder.label_names]))
    flux = clean + rng.normal(0, 0.01, wl.size) * np.sqrt(2)  # noise 0.01 plus "emulator" scatter 0.01
    with_err = fastspec.fit(wl, flux, 0.01, decoder, rv=False, continuum_degree=None, initial=truth, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitQualityWarning)
        without = fastspec.fit(wl, flux, 0.01, decoder, rv=False, continuum_degree=None, initial=truth,
                               model_error=False, **FAST)
    assert with_err.model_error and not without.model_error
    assert 0.9 < with_err.reduced_chi2 < 1.1 and 1.8 < without.reduced_chi2 < 2.2
    for name in truth:
        assert with_err.uncertainties[name] == pytest.approx(np.sqrt(2) * without.uncertainties[name], rel=0.05)
    # label systematics measured at export (provenance) are added in quadrature to the covariance
    sys_ = {"teff": 40.0, "logg": 0.05, "vsini": 0.3, "mh": 0.02, "vmic": 0.04, "resolution_dex": 0.01}
    path2 = mf.write_model(tmp_path / "s.fsm", layers, latent_dim=4, labels=mf.INTRINSIC_LABELS,
                           broadening=mf.BroadeningStage(), emulator_error=ee, provenance={"label_systematics": sys_})
    with_sys = fastspec.fit(wl, flux, 0.01, Decoder.load(path2), rv=False, continuum_degree=None, initial=truth, **FAST)
    for name in truth:
        extra = sys_[name] if name != "resolution" else sys_["resolution_dex"] * with_sys.labels[name] * np.log(10)
        assert with_sys.uncertainties[name] == pytest.approx(np.hypot(with_err.uncertainties[name], extra), rel=0.02)


def test_specutils_spectrum_in_and_out(small_model, rng):
    u = pytest.importorskip("astropy.units", reason="needs astropy (the test extra has it)")
    specutils = pytest.importorskip("specutils", reason="needs specutils (the test extra has it)")
    from astropy.nddata import StdDevUncertainty

    from fastspec.fitting import model_spectrum

    decoder = Decoder.load(small_model)
    truth = random_truth(rng)
    wl = decoder.wavelength[300:-300]
    flux, error = observe(decoder, truth, 0.0, [1.0], 100.0, rng, wl)
    bad = np.zeros(wl.size, bool)
    bad[rng.choice(wl.size, 200, replace=False)] = True
    garbage = np.where(bad, 40.0, flux)
    spec = specutils.Spectrum(flux=garbage * u.dimensionless_unscaled, spectral_axis=(wl / 10) * u.nm,
                              uncertainty=StdDevUncertainty(error), mask=bad)
    r = fastspec.fit(spec, decoder=decoder, rv=False, continuum_degree=0, initial=truth, **FAST)
    ref = fastspec.fit(wl, flux, error, decoder, rv=False, continuum_degree=0, initial=truth, mask=~bad, **FAST)
    assert r.n_pixels_used == wl.size - 200
    for name in truth:
        assert r.labels[name] == pytest.approx(ref.labels[name], rel=1e-6, abs=1e-9)
    m = model_spectrum(r, spec)
    assert isinstance(m, specutils.Spectrum) and np.allclose(m.spectral_axis.to_value(u.nm), wl / 10)
    np.testing.assert_array_equal(np.isnan(m.flux.value), bad)


def test_pixel_integration_for_coarse_data(small_model, rng):
    """Data binned to 0.55 Å pixels (11 model pixels each): integrate=True models them (reduced χ² ~ 1, labels
    within their errors), and so does the default ("auto": pixels this coarse are integrated); sampling the model at
    the pixel centres does not."""
    decoder = Decoder.load(small_model)
    truth = random_truth(rng)
    model = decoder([truth[n] for n in decoder.label_names]).astype(np.float64)
    centres = np.arange(400, decoder.n_pixels - 400, 11)
    flux = np.array([model[a - 5:a + 6].mean() for a in centres])
    wl = decoder.wavelength[centres]
    error = np.full(wl.size, 0.003)
    flux = flux + rng.normal(size=wl.size) * error
    r = fastspec.fit(wl, flux, error, decoder, rv=False, continuum_degree=0, initial=truth, integrate=True, **FAST)
    assert 0.8 < r.reduced_chi2 < 1.25 and r.integrate_pixels == pytest.approx(11), r
    assert fastspec.fit(wl, flux, error, decoder, rv=False, continuum_degree=0, initial=truth, **FAST).labels == r.labels
    for name, value in truth.items():
        assert abs(r.labels[name] - value) <= 5 * r.uncertainties[name], (name, r)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitQualityWarning)
        point = fastspec.fit(wl, flux, error, decoder, rv=False, continuum_degree=0, initial=truth, integrate=False,
                             **FAST)
    assert point.reduced_chi2 > 3 * r.reduced_chi2

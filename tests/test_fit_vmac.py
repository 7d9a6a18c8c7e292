"""fastspec.fit and `fastspec fit` / `fastspec generate` with radial-tangential macroturbulence: held fixed
(vmac=4.0, --vmac 4) or fitted (vmac="fit", --vmac fit), reported in FitResult and the JSON; bad values and models
that cannot apply it refused. Spectra are made by the shipped (format-3) model itself, on a 200 Å window to keep
the fits short, so the numbers measure the fitter, not the emulator."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import fastspec
from fastspec.cli import main
from fastspec.fitting import FitQualityWarning
from test_broadening_core import _write_model

TRUE = [5800.0, 4.4, 2.0, 0.0, 1.0, 80000.0]
WINDOW = slice(11000, 15000)  # 5000-5200 Å


@pytest.fixture(scope="module")
def decoder():
    d = fastspec.Decoder.load(device="cpu")
    assert d.info["broadening"]["sampling"] == "pixel_mean", "these tests need a format-3 default model"
    return d


@pytest.fixture(scope="module")
def star(decoder):
    """A 4 km/s macroturbulence star, SNR 100, from the model itself (seeded noise: one fixed draw)."""
    wave = decoder.wavelength[WINDOW]
    flux = decoder(TRUE, vmac=4.0)[WINDOW]
    noisy = flux + np.random.default_rng(7).normal(0.0, 0.01, flux.size)
    return wave, noisy


def quiet_fit(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitQualityWarning)
        return fastspec.fit(*args, **kwargs)


def test_vmac_fitted_and_fixed(decoder, star):
    """Fitted: vmac comes back with the labels, within 3σ of the truth, R within 3σ of its truth. Fixed at the truth:
    reported as fixed, not among the labels. Held at 0 on the same data, R takes the macroturbulence up (it comes out
    low by several σ) -- what the HARPS Sun showed before macroturbulence existed."""
    wave, flux = star
    fitted = quiet_fit(wave, flux, 0.01, decoder, vmac="fit", model_error=False)
    assert fitted.vmac_fitted and "vmac" in fitted.labels and "vmac" in fitted.parameter_names
    assert fitted.vmac == fitted.labels["vmac"]
    assert abs(fitted.labels["vmac"] - 4.0) < 3 * fitted.uncertainties["vmac"], fitted
    assert abs(fitted.labels["resolution"] - TRUE[5]) < 3 * fitted.uncertainties["resolution"], fitted
    assert fitted.covariance.shape[0] == len(fitted.parameter_names)
    fixed = quiet_fit(wave, flux, 0.01, decoder, vmac=4.0, model_error=False)
    assert not fixed.vmac_fitted and fixed.vmac == 4.0 and "vmac" not in fixed.labels
    assert "vmac = 4  (fixed)" in str(fixed)
    assert abs(fixed.labels["teff"] - TRUE[0]) < 3 * fixed.uncertainties["teff"]
    none = quiet_fit(wave, flux, 0.01, decoder, model_error=False)  # the default: vmac 0
    assert none.vmac == 0.0 and not none.vmac_fitted
    assert none.labels["resolution"] < TRUE[5] - 3 * none.uncertainties["resolution"], none


def test_vmac_bounds_and_bad_values(decoder, star, tmp_path, rng):
    wave, flux = star
    narrowed = quiet_fit(wave, flux, 0.01, decoder, vmac="fit", bounds={"vmac": (4.5, 8.0)}, model_error=False,
                         n_starts=1)
    assert 4.5 <= narrowed.labels["vmac"] <= 8.0
    for bad, msg in [(-1.0, "must lie in \\[0, 20\\]"), (25.0, "must lie in \\[0, 20\\]"),
                     ("fits", "must be a number \\(km/s, held fixed\\) or 'fit'"), (None, "must be a number")]:
        with pytest.raises(ValueError, match=msg):
            fastspec.fit(wave, flux, 0.01, decoder, vmac=bad)
    with pytest.raises(ValueError, match="bounds\\['vmac'\\]"):
        fastspec.fit(wave, flux, 0.01, decoder, vmac="fit", bounds={"vmac": (0.0, 30.0)})
    with pytest.raises(ValueError, match="unknown label 'vmac'"):  # a bound on vmac needs vmac="fit"
        fastspec.fit(wave, flux, 0.01, decoder, bounds={"vmac": (0.0, 5.0)})
    point = fastspec.Decoder.load(_write_model(int(rng.integers(1 << 30)), tmp_path), device="cpu")
    spec = point([5000.0, 4.0, 10.0, 0.0, 1.0, 20000.0])
    with pytest.raises(ValueError, match="pixel-mean broadening stage of format-3 models; .* is format 2"):
        fastspec.fit(point.wavelength, spec, 0.01, point, vmac="fit")
    with pytest.raises(ValueError, match="is format 2, so only vmac = 0 works"):
        fastspec.fit(point.wavelength, spec, 0.01, point, vmac=3.0)


def test_cli_vmac(decoder, star, tmp_path, capsys):
    wave, flux = star
    path = tmp_path / "star.csv"
    np.savetxt(path, np.column_stack([wave, flux, np.full(flux.size, 0.01)]), delimiter=",",
               header="wavelength,flux,error", comments="")
    out = tmp_path / "fit.json"
    main(["fit", str(path), "--vmac", "fit", "-o", str(out)])
    doc = json.loads(out.read_text())
    assert doc["vmac_fitted"] is True and doc["vmac"] == doc["labels"]["vmac"] and "vmac" in doc["uncertainties"]
    assert abs(doc["vmac"] - 4.0) < 3 * doc["uncertainties"]["vmac"]
    main(["fit", str(path), "--vmac", "4", "-o", str(out)])
    doc = json.loads(out.read_text())
    assert doc["vmac"] == 4.0 and doc["vmac_fitted"] is False and "vmac" not in doc["labels"]
    # generate: the header says what was applied, and the flux is the decoder's with vmac
    spec = tmp_path / "g.csv"
    main(["generate", "--teff", "5800", "--logg", "4.4", "--vsini", "2", "--mh", "0", "--vmic", "1",
          "--resolution", "80000", "--vmac", "4", "-o", str(spec)])
    text = spec.read_text()
    assert "vmac=4" in text.splitlines()[0]
    got = np.loadtxt(spec, delimiter=",", skiprows=2)[:, 1]
    np.testing.assert_allclose(got, decoder(TRUE, vmac=4.0), atol=1e-6)


def test_cli_vmac_bad_value(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "x.csv", "--vmac", "abc"])
    assert "must be a number >= 0 (km/s) or 'fit'" in capsys.readouterr().err
    assert main(["generate", "--teff", "5800", "--logg", "4.4", "--vsini", "2", "--mh", "0", "--vmic", "1",
                 "--resolution", "80000", "--vmac", "60"]) == 1
    assert "vmac = 60 km/s (row 0) is outside [0, 50]" in capsys.readouterr().err

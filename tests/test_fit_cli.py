"""`fastspec fit` and the spectrum readers behind it (fastspec.observations)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from fastspec import Decoder
from fastspec.cli import main
from fastspec.observations import read_spectrum
from fastspec.wavelength import air_to_vacuum
from test_fit import observe, random_truth


@pytest.fixture
def observed(small_model, rng):
    decoder = Decoder.load(small_model)
    truth = random_truth(rng)
    wl = decoder.wavelength[400:-400]
    flux, error = observe(decoder, truth, 25.0, [1.0, 0.03], 80.0, rng, wl)
    return truth, wl, flux, error


def test_readers_agree(tmp_path, observed):
    astropy_fits = pytest.importorskip("astropy.io.fits", reason="FITS reading needs astropy (the test extra has it)")
    _, wl, flux, error = observed
    csv_path = tmp_path / "s.csv"
    csv_path.write_text("\ufeffWavelength,Flux,Err\r\n" + "".join(f"{a},{b},{c}\r\n" for a, b, c in zip(wl, flux, error)))
    bare = tmp_path / "s.txt"
    np.savetxt(bare, np.column_stack([wl, flux]))
    h5 = tmp_path / "s.h5"
    with h5py.File(h5, "w") as f:
        f["wavelength"], f["flux"], f["ivar"] = wl, flux, 1 / error**2
    table = tmp_path / "t.fits"
    astropy_fits.BinTableHDU.from_columns([astropy_fits.Column("WAVE", "D", array=wl),
                                           astropy_fits.Column("FLUX", "D", array=flux),
                                           astropy_fits.Column("ERR", "D", array=error)]).writeto(table)
    image = tmp_path / "i.fits"
    hdu = astropy_fits.PrimaryHDU(flux)
    hdu.header.update(CRVAL1=wl[0], CDELT1=wl[1] - wl[0], CRPIX1=1.0)
    astropy_fits.HDUList([hdu, astropy_fits.ImageHDU(error, name="ERR")]).writeto(image)
    for path in (csv_path, h5, table, image):
        s = read_spectrum(path)
        np.testing.assert_allclose(s.wavelength, wl, rtol=1e-12)
        np.testing.assert_allclose(s.flux, flux, rtol=1e-12)
        np.testing.assert_allclose(s.error, error, rtol=1e-9)
    s = read_spectrum(bare)
    assert s.error is None and np.allclose(s.flux, flux)
    for bad, match in (("x.dat", "no such file"), ("x.xyz", "unknown spectrum format")):
        (tmp_path / bad).write_text("1,2\n") if bad.endswith("xyz") else None
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            read_spectrum(tmp_path / bad)
    (tmp_path / "nohead.csv").write_text("time,counts\n1,2\n")
    with pytest.raises(ValueError, match="no wavelength column"):
        read_spectrum(tmp_path / "nohead.csv")


def test_fit_command_writes_json_and_plot(tmp_path, small_model, observed, capsys):
    truth, wl, flux, error = observed
    path = tmp_path / "s.csv"
    np.savetxt(path, np.column_stack([air_to_vacuum(wl), flux, error]), delimiter=",", header="wavelength,flux,error",
               comments="")
    code = main(["fit", str(path), "--model", str(small_model), "--medium", "vacuum", "--rv-bounds", "-100", "100",
                 "-o", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["success"] and doc["medium"] == "vacuum" and abs(doc["rv"] - 25.0) < 5 * doc["rv_uncertainty"]
    for name, value in truth.items():
        assert abs(doc["labels"][name] - value) <= 5 * doc["uncertainties"][name], name
    assert (tmp_path / "r.png").stat().st_size > 10000 and "teff" in out
    assert not list(tmp_path.glob("*.partial"))
    # wrong output extensions are refused before any work, and no file appears
    assert main(["fit", str(path), "--model", str(small_model), "-o", str(tmp_path / "r.txt")]) == 1
    assert main(["fit", str(path), "--model", str(small_model), "--bound", "vmic=3"]) == 1
    assert "LABEL=LO:HI" in capsys.readouterr().err and not (tmp_path / "r.txt").exists()


def test_fit_command_exit_status_3_when_quality_fails(tmp_path, small_model, observed, capsys):
    _, wl, flux, error = observed
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f["wavelength"], f["flux"], f["error"] = wl, flux, error / 10  # errors 10x too small: reduced chi2 ~ 100
    assert main(["fit", str(path), "--model", str(small_model), "--no-rv", "-o", str(tmp_path / "r.json")]) == 3
    assert "reduced chi2" in capsys.readouterr().err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert not doc["success"] and doc["converged"] and doc["quality"]

"""fastspec.fit over several segments (issue 25, item 4): each with its own wavelengths, flux, errors, mask, continuum
polynomial and line-spread function, sharing the labels and one RV.

The spectra come from the shipped model (its pixel-mean stage takes an R per call): a two-arm survey-like spectrum
with a gap, each arm at its own resolving power."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastspec
from fastspec import LSF, Decoder, Segment
from fastspec.fitting import C_KMS, FitQualityWarning
from fastspec.fitting.likelihood import Likelihood

STAR = dict(teff=6100.0, logg=4.2, vsini=8.0, mh=-0.3, vmic=1.3)
ARMS = ((4600.0, 4900.0, 12000.0, [1.0, 0.04, -0.02]), (5000.0, 5300.0, 22000.0, [2.5, -0.1, 0.03]))


@pytest.fixture(scope="module")
def shipped():
    return Decoder.load()


def arm(decoder, lo, hi, resolution, continuum, rv, snr, rng, step=0.08):
    """One arm: the model at `resolution`, shifted by rv, on its own pixels (step Å), times its continuum."""
    wl = np.arange(lo, hi, step)
    model = decoder(**STAR, resolution=resolution).astype(np.float64)
    flux = np.interp(wl / (1 + rv / C_KMS), decoder.wavelength, model)
    flux *= np.polynomial.legendre.legval(2 * (wl - wl.min()) / np.ptp(wl) - 1, continuum)
    error = flux / snr
    return wl, flux + rng.normal(size=wl.size) * error, error


def two_arms(decoder, rng, rv=12.0, snr=150.0, lsf=True, **kw):
    return [Segment(*arm(decoder, lo, hi, r, c, rv, snr, rng), lsf=r if lsf else None, name=name, **kw)
            for (lo, hi, r, c), name in zip(ARMS, ("blue", "red"))]


def quiet_fit(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitQualityWarning)
        return fastspec.fit(*args, **kwargs)


def test_two_arms_with_their_own_resolution_recover_the_star(shipped, rng):
    """Each arm's R known (its LSF): R is not fitted; the labels, the RV and each arm's continuum come back."""
    r = quiet_fit(two_arms(shipped, rng), decoder=shipped, continuum_degree=2)
    assert "resolution" not in r.labels and r.success, r
    for name, value in STAR.items():
        assert abs(r.labels[name] - value) <= 4 * r.uncertainties[name], (name, r)
    assert abs(r.rv - 12.0) <= 4 * r.rv_uncertainty
    assert [s["name"] for s in r.segments] == ["blue", "red"]
    for seg, (_, _, resolution, continuum) in zip(r.segments, ARMS):
        assert seg["lsf"] and seg["resolution"] == resolution
        np.testing.assert_allclose(seg["continuum"], continuum, atol=0.02 * continuum[0])
    assert r.parameter_names[-6:] == ["s1.c0", "s1.c1", "s1.c2", "s2.c0", "s2.c1", "s2.c2"]
    # the end-to-end arrays are the segments' own
    np.testing.assert_array_equal(r.model_flux, np.concatenate([s["model_flux"] for s in r.segments]))
    assert r.n_pixels_used == sum(s["n_pixels_used"] for s in r.segments)
    assert abs(r.chi2 - sum(s["chi2"] for s in r.segments)) < 1e-6 * r.chi2


def test_without_lsf_one_resolution_is_fitted_for_all(shipped, rng):
    """Segments without an LSF share the fitted label R (here both arms at 15000)."""
    segs = [Segment(*arm(shipped, lo, hi, 15000.0, c, 0.0, 150.0, rng), name=f"arm{k}")
            for k, (lo, hi, _, c) in enumerate(ARMS)]
    r = quiet_fit(segs, decoder=shipped)
    assert abs(r.labels["resolution"] - 15000) <= 4 * r.uncertainties["resolution"], r
    assert all(not s["lsf"] and s["resolution"] == r.labels["resolution"] for s in r.segments)


def test_one_segment_is_the_plain_fit(shipped, rng):
    """A list of one Segment fits exactly as the spectrum passed on its own."""
    wl, flux, error = arm(shipped, 4700.0, 5100.0, 20000.0, [1.0, 0.02], 5.0, 100.0, rng)
    plain = quiet_fit(wl, flux, error, shipped, n_starts=1, n_candidates=16)
    seg = quiet_fit([Segment(wl, flux, error)], decoder=shipped, n_starts=1, n_candidates=16)
    assert plain.labels == seg.labels and plain.chi2 == seg.chi2
    assert plain.parameter_names == seg.parameter_names


def same(a, b):
    """a equals b to 1e-6 of each column's largest |b| (repeated calls of the float32 core differ by ~2e-7)."""
    scale = np.maximum(np.abs(b).max(axis=0), 1e-300)
    np.testing.assert_allclose(a / scale, b / scale, rtol=0, atol=1e-6)


def test_the_jacobian_of_several_segments_is_each_segments_own(shipped, rng):
    """The joint problem's Jacobian is the segments' own stacked: shared label and RV columns, each continuum block
    on its own rows, 0 elsewhere; a segment with an LSF has no R column of its own (0 in the joint one). Values to
    1e-6 of each column's scale, the zeros exactly."""
    blue, red = two_arms(shipped, rng)
    red.lsf = None  # the red arm takes the fitted R, the blue its own
    resolved = lambda seg, name: Segment(seg.wavelength, seg.flux, seg.error, None, seg.lsf, 2, "air", "auto", name)  # noqa: E731
    joint = Likelihood(shipped, [resolved(blue, "blue"), resolved(red, "red")], True, None, (-300, 300))
    alone = [Likelihood(shipped, [resolved(s, n)], True, None, (-300, 300)) for s, n in ((blue, "blue"), (red, "red"))]
    assert joint.names == alone[1].names and "resolution" not in alone[0].names
    labels = np.array([{**STAR, "resolution": 18000.0}[n] for n in joint.names])
    c_blue, c_red = [1.0, 0.04, -0.02], [2.5, -0.1, 0.03]
    theta = np.concatenate([joint.u_of(labels), [12.0], np.divide(c_blue, joint.scales[0]),
                            np.divide(c_red, joint.scales[1])])
    jac = joint.jacobian(theta)
    rows = [joint.segment == 0, joint.segment == 1]
    nl = len(joint.names)
    jr = joint.names.index("resolution")
    j_blue = alone[0].jacobian(np.concatenate([np.delete(theta[:nl], jr), theta[nl:nl + 4]]))
    j_red = alone[1].jacobian(np.concatenate([theta[:nl + 1], theta[nl + 4:]]))
    same(np.delete(jac[rows[0]][:, :nl + 1], jr, axis=1), j_blue[:, :nl])
    assert np.all(jac[rows[0], jr] == 0)
    same(jac[rows[1]][:, :nl + 1], j_red[:, :nl + 1])
    same(jac[rows[0]][:, nl + 1:nl + 4], j_blue[:, nl:])
    same(jac[rows[1]][:, nl + 4:], j_red[:, nl + 1:])
    assert np.all(jac[rows[0]][:, nl + 4:] == 0) and np.all(jac[rows[1]][:, nl + 1:nl + 4] == 0)
    same(joint.residuals(theta)[rows[1]], alone[1].residuals(theta[np.r_[:nl + 1, nl + 4:nl + 7]]))


def test_lsf_forms(shipped):
    """R as a constant, a table, a callable, or FWHM in Å; each gives R(λ)."""
    wl = np.array([4500.0, 5000.0, 5500.0])
    np.testing.assert_allclose(LSF(20000).resolution_at(wl), 20000)
    np.testing.assert_allclose(LSF([10000, 30000], wavelength=[4000, 6000]).resolution_at(wl), [15000, 20000, 25000])
    np.testing.assert_allclose(LSF(lambda w: w / 0.25).resolution_at(wl), wl / 0.25)
    np.testing.assert_allclose(LSF(fwhm=0.25).resolution_at(wl), wl / 0.25)
    np.testing.assert_allclose(LSF(fwhm=[0.2, 0.3], wavelength=[4500, 5500]).resolution_at(wl), wl / [0.2, 0.25, 0.3])
    assert LSF.of(None) is None and LSF.of(5000).is_constant


@pytest.mark.parametrize("make, message", [
    (lambda: LSF(float("nan")), "finite and > 0; got nan"),
    (lambda: LSF(-5.0), "finite and > 0; got -5"),
    (lambda: LSF([1e4, 0.0], wavelength=[4500, 5000]), r"got 0.0 at 5000.000 Å"),
    (lambda: LSF([1e4, 2e4], wavelength=[5000, 4500]), "increasing"),
    (lambda: LSF([1e4, 2e4]), "needs wavelength="),
    (lambda: LSF(2e4, fwhm=0.1), "exactly one"),
    (lambda: LSF.of("high"), "lsf must be"),
])
def test_bad_lsf(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_bad_segments_are_named(shipped, rng):
    blue, red = two_arms(shipped, rng)
    overlap = Segment(red.wavelength - 300.0, red.flux, red.error, name="red")
    with pytest.raises(ValueError, match=r"blue \(4600.000-4899.9\d+ Å\) and red .* overlap"):
        fastspec.fit([blue, overlap], decoder=shipped)
    unsorted = Segment(red.wavelength[::-1], red.flux[::-1], red.error[::-1], name="red")
    with pytest.raises(ValueError, match="red: its wavelengths are not increasing"):
        fastspec.fit([blue, unsorted], decoder=shipped)
    sharp = Segment(red.wavelength, red.flux, red.error, lsf=200000.0, name="red")
    with pytest.raises(ValueError, match=r"red: its line-spread function has R = 200000 .* beyond the model's highest "
                                         r"R \(115000\): narrower than the model can represent"):
        fastspec.fit([blue, sharp], decoder=shipped)
    nan_lsf = Segment(red.wavelength, red.flux, red.error, lsf=lambda w: np.where(w > 5200, np.nan, 2e4), name="red")
    with pytest.raises(ValueError, match=r"red: LSF: resolution must be finite and > 0; got nan at 520\d.\d+ Å"):
        fastspec.fit([blue, nan_lsf], decoder=shipped)
    outside = Segment(red.wavelength + 2000.0, red.flux, red.error, name="red")
    with pytest.raises(ValueError, match=r"red: only 0 usable pixels"):
        fastspec.fit([blue, outside], decoder=shipped)
    with pytest.raises(ValueError, match="red: a segment needs its errors"):
        fastspec.fit([blue, Segment(red.wavelength, red.flux, None, name="red")], decoder=shipped)
    with pytest.raises(ValueError, match="2 segments are named 'blue'"):
        fastspec.fit([blue, Segment(red.wavelength, red.flux, red.error, name="blue")], decoder=shipped)
    with pytest.raises(TypeError, match="give the flux in each Segment"):
        fastspec.fit([blue, red], red.flux, decoder=shipped)
    with pytest.raises(ValueError, match="resolution is not fitted here"):
        fastspec.fit([blue, red], decoder=shipped, bounds={"resolution": (5000, 20000)})


# ------------------------------------------------------------------------------------------------ the CLI


def write_csv(path, wl, flux, error, **columns):
    names = ["wavelength", "flux", "error", *columns]
    np.savetxt(path, np.column_stack([wl, flux, error, *columns.values()]), delimiter=",", header=",".join(names),
               comments="")
    return path


def test_cli_fits_several_files_as_segments(shipped, rng, tmp_path, capsys):
    """Two files, each with a resolution column: one star, R from the files (not fitted); the JSON lists both
    segments; the plot has both."""
    from fastspec.cli import main

    paths = []
    for seg in two_arms(shipped, rng):
        paths.append(write_csv(tmp_path / f"{seg.name}.csv", seg.wavelength, seg.flux, seg.error,
                               resolution=np.full(seg.wavelength.size, seg.lsf)))
    code = main(["fit", *map(str, paths), "-o", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    out = capsys.readouterr().out
    assert code in (0, 3), out
    doc = __import__("json").loads((tmp_path / "r.json").read_text())
    assert "resolution" not in doc["labels"] and doc["spectrum"] == [str(p) for p in paths]
    assert [(s["name"], s["resolution"], s["lsf"]) for s in doc["segments"]] == [("blue", 12000.0, True),
                                                                                  ("red", 22000.0, True)]
    assert abs(doc["labels"]["teff"] - STAR["teff"]) <= 4 * doc["uncertainties"]["teff"]
    assert (tmp_path / "r.png").stat().st_size > 10000
    # --resolution fit: one R fitted for both, whatever the files say
    code = main(["fit", *map(str, paths), "--resolution", "fit", "-o", str(tmp_path / "f.json")])
    assert code in (0, 3)
    doc = __import__("json").loads((tmp_path / "f.json").read_text())
    assert "resolution" in doc["labels"] and not any(s["lsf"] for s in doc["segments"])


def test_cli_reads_the_segments_of_a_multi_extension_fits(shipped, rng, tmp_path, capsys):
    """One FITS file, one table per arm (EXTNAME), R from each extension's SPEC_RES keyword."""
    fits = pytest.importorskip("astropy.io.fits")
    from fastspec.cli import main
    from fastspec.observations import read_segments

    hdus = [fits.PrimaryHDU()]
    for seg in two_arms(shipped, rng):
        hdu = fits.BinTableHDU.from_columns([fits.Column(name=n, format="D", array=a) for n, a in
                                             (("WAVE", seg.wavelength), ("FLUX", seg.flux), ("ERR", seg.error))],
                                            name=seg.name.upper())
        hdu.header["SPEC_RES"] = seg.lsf
        hdus.append(hdu)
    path = tmp_path / "star.fits"
    fits.HDUList(hdus).writeto(path)
    specs = read_segments(path)
    assert [(s.name, s.resolution) for s in specs] == [("BLUE", 12000.0), ("RED", 22000.0)]
    code = main(["fit", str(path), "-o", str(tmp_path / "r.json")])
    assert code in (0, 3), capsys.readouterr().out
    doc = __import__("json").loads((tmp_path / "r.json").read_text())
    assert [s["name"] for s in doc["segments"]] == ["BLUE", "RED"] and all(s["lsf"] for s in doc["segments"])


def test_cli_resolution_is_refused_with_batch(tmp_path, capsys):
    from fastspec.cli import main

    assert main(["fit", "--batch", str(tmp_path), "--table", str(tmp_path / "t.csv"), "--resolution", "20000"]) == 1
    assert "--resolution is not taken with --batch" in capsys.readouterr().err


def test_a_resolution_that_varies_along_the_segment(shipped, rng):
    """An arm whose R rises 15000 -> 30000 across it (the model through its stage's per-node factors): fitted with
    that LSF as a table it comes back (χ²/dof ~1, labels within 4σ); with one R, the median, χ² is worse."""
    lo, hi = 4700.0, 5300.0
    table = LSF([15000.0, 30000.0], wavelength=[lo, hi])
    nodes = shipped.stage_nodes
    r_nodes = table.resolution_at(nodes)
    model = shipped(**STAR, resolution=22500.0, resolution_factors=r_nodes / 22500.0).astype(np.float64)
    wl = np.arange(lo, hi, 0.08)
    flux = np.interp(wl, shipped.wavelength, model)
    error = np.full(wl.size, 0.005)
    flux = flux + rng.normal(size=wl.size) * error
    prob = Likelihood(shipped, [Segment(wl, flux, error, None, table, 2, "air", "auto", "arm")], True, None, (-300, 300))
    (group,) = prob.groups
    np.testing.assert_allclose(group["r_ref"] * group["factors"], r_nodes)  # R at each node, not the segment's range
    r = quiet_fit(wl, flux, error, shipped, lsf=table)
    assert "resolution" not in r.labels and r.reduced_chi2 < 1.2, r
    for name, value in STAR.items():
        assert abs(r.labels[name] - value) <= 4 * r.uncertainties[name], (name, r)
    flat = quiet_fit(wl, flux, error, shipped, lsf=float(np.median(table.resolution_at(wl))))
    assert flat.chi2 > r.chi2 + 100, (flat.chi2, r.chi2)


# ------------------------------------------------------------------- defects a review found (2026-12-03)


def test_a_constant_fwhm_is_not_a_constant_r(shipped):
    """FWHM 0.25 Å is R = λ/0.25, varying along the range: the stage gets node factors, not the median R."""
    wl = np.arange(4500.0, 5350.0, 0.05)
    prob = Likelihood(shipped, [Segment(wl, np.ones(wl.size), 0.01, None, LSF(fwhm=0.25), 2, "air", "auto", "s")],
                      True, None, (-300, 300))
    (group,) = prob.groups
    np.testing.assert_allclose(group["r_ref"] * group["factors"], shipped.stage_nodes / 0.25)


def test_nodes_outside_a_segment_take_r_at_their_own_wavelength(shipped):
    """A table across the whole range, a segment 5000-5150 Å: each node gets R at its wavelength (before, the
    segment's own R range clipped them, off by up to 4.6e-3 in flux at the segment's edges)."""
    table = LSF([15000.0, 30000.0], wavelength=[4450.0, 5400.0])
    wl = np.arange(5000.0, 5150.0, 0.05)
    prob = Likelihood(shipped, [Segment(wl, np.ones(wl.size), 0.01, None, table, 2, "air", "auto", "s")], True, None,
                      (-300, 300))
    (group,) = prob.groups
    np.testing.assert_allclose(group["r_ref"] * group["factors"], table.resolution_at(shipped.stage_nodes))
    # a callable that is only defined on the segment: outside it, the segment's nearer end
    only_here = LSF(lambda w: np.where((w >= 4999.0) & (w <= 5151.0), 20000.0 + 10.0 * (w - 5000.0), np.nan))
    prob = Likelihood(shipped, [Segment(wl, np.ones(wl.size), 0.01, None, only_here, 2, "air", "auto", "s")], True,
                      None, (-300, 300))
    r_nodes = prob.groups[0]["r_ref"] * prob.groups[0]["factors"]
    np.testing.assert_allclose(r_nodes, 20000.0 + 10.0 * (np.clip(shipped.stage_nodes, wl[0], wl[-1]) - 5000.0))


def test_a_known_lsf_tightens_the_v_sin_i_limit(shipped, rng):
    """R held by the LSF: the slow-rotator profile still runs (before it was skipped, and a non-rotating star at
    R 50000, SNR 300 got σ 18 km/s and a limit of 36 km/s, against 2.2 km/s with R fitted)."""
    wl = np.arange(5000.0, 5300.0, 0.05)
    flux = np.interp(wl, shipped.wavelength, shipped(**{**STAR, "vsini": 0.0}, resolution=50000.0).astype(np.float64))
    flux = flux + rng.normal(size=wl.size) / 300
    fitted = quiet_fit(wl, flux, 1 / 300, shipped, integrate=False)
    held = quiet_fit(wl, flux, 1 / 300, shipped, integrate=False, lsf=50000.0)
    assert "vsini" in held.upper_limits and held.upper_limits["vsini"] < min(2.0, fitted.upper_limits.get("vsini", 99))
    assert "R = 50000  (held" in str(held)


def test_lsf_text_says_its_values():
    """A batch's journal compares fit options by their text: two LSFs that differ must read differently."""
    assert repr(LSF(20000)) != repr(LSF(40000))
    assert repr(LSF([1e4, 2e4], wavelength=[4500, 5000])) != repr(LSF([1e4, 3e4], wavelength=[4500, 5000]))
    with pytest.raises(TypeError, match="not a bool"):
        LSF(True)
    with pytest.raises(TypeError, match="lsf must be"):
        LSF.of(True)


def test_more_bad_input(shipped, rng, tmp_path, capsys):
    from fastspec.cli import main

    with pytest.raises(ValueError, match="no segments given"):
        fastspec.fit([], decoder=shipped)
    blue, red = two_arms(shipped, rng)
    with pytest.raises(ValueError, match="blue: LSF: resolution must be finite and > 0; got nan"):
        fastspec.fit([Segment(blue.wavelength, blue.flux, blue.error, lsf=float("nan"), name="blue"), red],
                     decoder=shipped)
    # a resolution column with a masked (NaN) entry: left out of the table; a file without errors among segments
    r_col = np.full(red.wavelength.size, 22000.0)
    r_col[10] = np.nan
    paths = [write_csv(tmp_path / "blue.csv", blue.wavelength, blue.flux, blue.error),
             write_csv(tmp_path / "red.csv", red.wavelength, red.flux, red.error, resolution=r_col)]
    from fastspec.observations import read_spectrum
    assert read_spectrum(paths[1]).lsf().resolution_at(np.array([5100.0]))[0] == 22000.0
    assert main(["fit", *map(str, paths), "--resolution", "120000"]) == 1
    assert "--resolution 120000 is outside the model's R range (1000-115000)" in capsys.readouterr().err
    no_err = write_csv(tmp_path / "noerr.csv", red.wavelength, red.flux, np.full(red.wavelength.size, np.nan))
    assert main(["fit", str(paths[0]), str(no_err)]) == 1
    err = capsys.readouterr().err
    assert "noerr.csv: no errors, and the segments of a star need them: give --error" in err and "note:" not in err


def test_fits_extensions_of_one_name_are_told_apart(shipped, rng, tmp_path):
    fits = pytest.importorskip("astropy.io.fits")
    from fastspec.observations import read_segments

    hdus = [fits.PrimaryHDU()]
    for seg in two_arms(shipped, rng):
        hdus.append(fits.BinTableHDU.from_columns([fits.Column(name=n, format="D", array=a) for n, a in
                                                   (("WAVE", seg.wavelength), ("FLUX", seg.flux), ("ERR", seg.error))],
                                                  name="SCI"))
    fits.HDUList(hdus).writeto(tmp_path / "sci.fits")
    assert [s.name for s in read_segments(tmp_path / "sci.fits")] == ["SCI 1", "SCI 2"]


def test_batch_reads_a_star_as_fastspec_fit_does(shipped, rng, tmp_path):
    """--batch: a FITS file of two tables is one star of two segments, its SPEC_RES the LSF (R held, in the row's
    resolution and notes), as `fastspec fit FILE` reads it (before: the first table alone, R fitted, nothing said)."""
    fits = pytest.importorskip("astropy.io.fits")
    hdus = [fits.PrimaryHDU()]
    hdus[0].header["SPEC_RES"] = 15000.0
    segs = [Segment(*arm(shipped, lo, hi, 15000.0, c, 0.0, 150.0, rng)) for lo, hi, _, c in ARMS]
    for k, seg in enumerate(segs):
        hdus.append(fits.BinTableHDU.from_columns([fits.Column(name=n, format="D", array=a) for n, a in
                                                   (("WAVE", seg.wavelength), ("FLUX", seg.flux), ("ERR", seg.error))],
                                                  name=f"ARM{k}"))
    (tmp_path / "stars").mkdir()
    fits.HDUList(hdus).writeto(tmp_path / "stars" / "star.fits")
    batch = fastspec.fit_batch(tmp_path / "stars", tmp_path / "t.csv", model=shipped.info["path"], progress=False)
    (row,) = batch.rows
    assert row["status"] == "ok" and row["n_pixels"] == sum(s.wavelength.size for s in segs), row
    assert row["resolution"] == 15000.0 and "R held at 15000 by the file (SPEC_RES)" in row["notes"], row
    assert "2 segments (ARM0, ARM1)" in row["notes"]


def test_segments_with_one_lsf_share_a_decoder_call(shipped, rng):
    """Orders of one instrument (the same R) are one group, one decoder call per evaluation; a segment without an
    LSF, or with another R, has its own; each segment still reads its own group's spectrum."""
    blue, red = two_arms(shipped, rng, lsf=False)
    mid = Segment(*arm(shipped, 4950.0, 4990.0, 12000.0, [1.0], 0.0, 150.0, rng), name="mid")
    resolved = lambda seg, lsf: Segment(seg.wavelength, seg.flux, seg.error, None, lsf, 2, "air", "auto", seg.name)  # noqa: E731
    same = Likelihood(shipped, [resolved(blue, 12000.0), resolved(mid, LSF([12000.0, 12000.0], wavelength=[4400, 5400])),
                                resolved(red, 12000.0)], True, None, (-300, 300))
    assert len(same.groups) == 1 and not same.offset.any()
    mixed = Likelihood(shipped, [resolved(blue, 12000.0), resolved(mid, None), resolved(red, 22000.0)], True, None,
                       (-300, 300))
    assert len(mixed.groups) == 3
    assert [np.unique(mixed.offset[mixed.segment == k]).tolist() for k in range(3)] == [[0], [19000], [38000]]


def test_a_pixel_mean_stage_is_read_band_limited(shipped, rng):
    """Between its pixels the shipped (pixel-mean) stage's output is read as the band-limited function it is: at the
    model's own wavelengths that is the model itself, and the RV column of the Jacobian is the derivative of that
    reading (central differences)."""
    model = shipped(**STAR, resolution=50000.0).astype(np.float64)
    own = shipped.wavelength[1000:3000]
    prob = Likelihood(shipped, [Segment(own, model[1000:3000], 0.01, None, None, -1, "air", False, "s")], False, None,
                      (0, 0))
    assert prob.band_limited
    np.testing.assert_allclose(prob.sample(model, 0.0), model[1000:3000], rtol=0, atol=1e-9)  # t off integers by ~1e-12
    wl = np.arange(5000.0, 5100.0, 0.015)
    flux = np.interp(wl, shipped.wavelength, model) + rng.normal(size=wl.size) * 0.01
    prob = Likelihood(shipped, [Segment(wl, flux, 0.01, None, None, 2, "air", False, "s")], True, None, (-300, 300))
    labels = np.array([{**STAR, "resolution": 50000.0}[n] for n in prob.names])
    theta = np.concatenate([prob.u_of(labels), [7.3], [1.0, 0.0, 0.0]])
    j_rv = prob.jacobian(theta)[:, len(prob.names)]
    h = 1e-3
    up, down = theta.copy(), theta.copy()
    up[len(prob.names)] += h
    down[len(prob.names)] -= h
    fd = (prob.residuals(up) - prob.residuals(down)) / (2 * h)
    assert np.linalg.norm(j_rv - fd) < 1e-4 * np.linalg.norm(fd)

"""A line-spread function that varies along the range: per-node resolution factors g_s of the broadening stage (node s
takes R_s = R·g_s, R the label). None and all ones are today's results bit for bit; the stage against a float64
real-space reference where every output pixel has its own Gaussian of FWHM λ/R(λ) (reference.gaussian_lsf), on
SYNSPEC's fine mesh, side by side with the constant-R stage's own error; the core against training's torch stage;
the Jacobian's R column (the label R, the shape held) against float64 central differences; bad input."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
from conftest import shared_file

from fastspec import Decoder, _core
from fastspec import model_format as mf
from fastspec_train.broadening import Broadener
from fastspec_train.grid.reference import FWHM_PER_SIGMA, band_limited_lsf, gaussian_lsf, pixel_means
from test_broadening_core import EDGE, N, NET_COLS, NETWORK, START, STEP, _write_model, random_spectra
from test_core import reference_forward

NODES = START + STEP * np.round(np.linspace(0, N - 1, 9))  # the default 8 segments


def linear_resolution(wave, lo=20000.0, hi=45000.0):
    """R(λ) rising linearly from lo at the grid's start to hi at its end."""
    return lo + (hi - lo) * (np.asarray(wave) - START) / (STEP * (N - 1))


def test_stage_nodes():
    """Decoder.stage_nodes, Broadening.node_wavelengths and the torch stage's nodes are the same wavelengths;
    a model without a stage has none."""
    d = Decoder.load(_write_model(1, None, sampling="pixel_mean"), device="cpu")
    assert d.stage_nodes.dtype == np.float64 and np.array_equal(d.stage_nodes, NODES)
    assert np.array_equal(_core.Broadening(START, STEP, N).node_wavelengths, NODES)
    assert np.array_equal(Broadener(START, STEP, N).node_wavelength, NODES)
    assert Decoder.load(_write_model(1, None, stage=False), device="cpu").stage_nodes.shape == (0,)


@pytest.mark.parametrize("sampling", ["point", "pixel_mean"])
def test_none_and_ones_are_todays_results(tmp_path, rng, sampling):
    """resolution_factors=None and all ones: the same bits, through the decoder (forward, Jacobian), the stage on its
    own and training's torch stage."""
    d = Decoder.load(_write_model(int(rng.integers(1 << 30)), tmp_path, sampling=sampling), device="cpu")
    ones = np.ones(9)
    labels = [[5200.0, 4.1, 12.0, -0.3, 1.1, 30000.0], [7400.0, 3.5, 0.0, 0.2, 2.0, 115000.0]]
    assert np.array_equal(d(labels), d(labels, resolution_factors=ones))
    vmac = [0.0, 3.0] if sampling == "pixel_mean" else None
    for a, b in zip(d.jacobian(labels, vmac=vmac, return_vmac=True),
                    d.jacobian(labels, vmac=vmac, return_vmac=True, resolution_factors=ones)):
        assert np.array_equal(a, b)
    stage = _core.Broadening(START, STEP, N, sampling=sampling)
    flux, v, r = random_spectra(rng, 2), np.array([0.0, 40.0]), np.array([2000.0, 60000.0])
    for a, b in zip(stage.apply(flux, v, r, True), stage.apply(flux, v, r, True, resolution_factors=ones)):
        assert np.array_equal(a, b)
    br = Broadener(START, STEP, N, sampling=sampling)
    assert torch.equal(br(flux, v, r), br(flux, v, r, resolution_factors=ones))


def fine_spectrum(row_teff: float):
    """The SYNSPEC spectrum of ../shared/data/synspec_fine_v4.h5 nearest row_teff: (fine mesh wavelengths, flux, its
    Teff, the grid's wavelengths, the exact pixel means there as float32)."""
    with h5py.File(shared_file("synspec_fine_v4.h5"), "r") as f:
        row = int(np.argmin(np.abs(f["labels"][:, 0] - row_teff)))
        teff = float(f["labels"][row, 0])
        fwave = float(f.attrs["wavelength_start"]) + float(f.attrs["wavelength_step"]) * np.arange(f["flux"].shape[1])
        fine = f["flux"][row].astype(np.float64)
    lam = START + STEP * np.arange(N)
    return fwave, fine, teff, lam, pixel_means(fwave, fine, lam, STEP).astype(np.float32)


def lsf_accuracy(fwave, fine, lam, means, r_lo=20000.0, r_hi=45000.0, label=30000.0):
    """|ΔF| over the pixels > 30 Å from the ends, for the shipped model's stage (pixel means, 8 segments) with
    resolution factors g_s = R(λ_s)/label, R(λ) linear from r_lo to r_hi:
      "factors": against the float64 truth, each pixel's own Gaussian of FWHM λ/R(λ) on the fine mesh;
      "per-pixel reading": the same pixel means under each pixel's own kernel (no node blend) against that truth:
          the representation's floor for this LSF;
      "blend": the stage against that per-pixel reading: the node blend's own error;
      "blend, 32 segments": the same for a stage of 32 segments (the blend's error falls as the square of the
          widths' change from node to node);
      "one R": the stage with the middle R and no factors against the truth (the variation ignored);
      "constant R <R>": the constant-R stage against the truth for that R (its own floor, for comparison);
      "constant R <middle R> blend": the constant-R stage against the per-pixel reading of that R (its blend's error:
          the widths vary with λ alone)."""
    inner = slice(EDGE, N - EDGE)
    stage = _core.Broadening(START, STEP, N, sampling="pixel_mean")
    g = linear_resolution(stage.node_wavelengths, r_lo, r_hi) / label
    got = stage.apply(means[None], np.zeros(1), np.array([label]), resolution_factors=g)[0]
    r_pixel = linear_resolution(lam, r_lo, r_hi)
    truth = gaussian_lsf(fwave, fine, lam[inner], r_pixel[inner])
    per_pixel = band_limited_lsf(means, lam / (r_pixel * FWHM_PER_SIGMA * STEP))[inner]
    mid = 0.5 * (r_lo + r_hi)
    fine_stage = _core.Broadening(START, STEP, N, segments=32, sampling="pixel_mean")
    g32 = linear_resolution(fine_stage.node_wavelengths, r_lo, r_hi) / label
    got32 = fine_stage.apply(means[None], np.zeros(1), np.array([label]), resolution_factors=g32)[0]
    out = {"factors": np.abs(got[inner] - truth), "per-pixel reading": np.abs(per_pixel - truth),
           "blend": np.abs(got[inner] - per_pixel), "blend, 32 segments": np.abs(got32[inner] - per_pixel),
           "one R": np.abs(stage.apply(means[None], np.zeros(1), np.array([mid]))[0][inner] - truth)}
    for r in (r_lo, mid, r_hi):
        got = stage.apply(means[None], np.zeros(1), np.array([r]))[0]
        out[f"constant R {r:.0f}"] = np.abs(got[inner] - gaussian_lsf(fwave, fine, lam[inner], r))
        if r == mid:
            reading = band_limited_lsf(means, lam / (r * FWHM_PER_SIGMA * STEP))[inner]
            out[f"constant R {r:.0f} blend"] = np.abs(got[inner] - reading)
    return out


@pytest.mark.parametrize("teff", [5000.0, 8000.0])
def test_stage_matches_varying_lsf_reference(teff):
    """R(λ) 20000 → 45000 across the range on a SYNSPEC spectrum: the stage with resolution factors against the
    float64 real-space truth (each pixel its own Gaussian), next to the constant-R stage's own error against its
    constant-R truth. The total is the pixel means' own floor (lines narrower than a pixel, largest for cool stars)
    plus the node blend's error, measured on its own against the same means under each pixel's own kernel; ignoring
    the variation (one R) is far worse. Numbers: benchmarks/results/lsf-*.md."""
    fwave, fine, t, lam, means = fine_spectrum(teff)
    errors = lsf_accuracy(fwave, fine, lam, means)
    for case, d in errors.items():
        print(f"Teff {t:.0f}, {case}: median |dF| {np.median(d):.2e}, max {d.max():.2e}")
    total, blend = errors["factors"], errors["blend"]
    floors = [errors[f"constant R {r}"] for r in (20000, 32500, 45000)]
    assert np.median(total) < 1.5 * max(np.median(f) for f in floors) and total.max() < 1.5 * max(f.max() for f in floors)
    assert np.median(total) < 1.2 * np.median(errors["per-pixel reading"]) + np.median(blend)
    assert np.median(blend) < 1e-4 and blend.max() < 3e-3  # measured: up to 4.5e-5 and 1.5e-3 (4500-10000 K)
    assert np.median(errors["blend, 32 segments"]) < 0.2 * np.median(blend)
    assert np.median(errors["one R"]) > 5 * np.median(total)


@pytest.mark.parametrize("sampling", ["point", "pixel_mean"])
def test_core_matches_torch_with_factors(rng, sampling):
    """Fresh random spectra and factors: the core's stage equals training's float64 torch stage to float32 rounding
    everywhere (edges included), and its d/dR (the label, the shape held) matches central differences of torch's."""
    stage = _core.Broadening(START, STEP, N, sampling=sampling)
    br64 = Broadener(START, STEP, N, dtype=torch.float64, sampling=sampling)
    flux = random_spectra(rng, 3)
    vsini, res = np.array([0.0, 8.0, 120.0]), np.array([40000.0, 15000.0, 3000.0])
    g = rng.uniform(0.5, 2.0, 9)

    def t(r):
        return br64(torch.from_numpy(flux.astype(np.float64)), torch.from_numpy(vsini), torch.from_numpy(r),
                    resolution_factors=g).numpy()

    out, dv, dr = stage.apply(flux, vsini, res, True, resolution_factors=g)
    assert np.abs(out - t(res)).max() < 3e-6
    assert np.abs(out - stage.apply(flux, vsini, res)).max() > 1e-3  # the factors do something
    h = 1e-5 * res
    fd = (t(res + h) - t(res - h)) / (2 * h[:, None])
    for r in range(3):
        assert np.abs(dr[r] - fd[r]).max() <= 1e-4 * np.abs(fd[r]).max(), r


def _reference_decoder(layers, labels, br64, z, g):
    lab = np.asarray(labels, np.float64)
    intrinsic = reference_forward(layers, lab[:, NET_COLS], z, latent_dim=3, label_info=NETWORK)
    return br64(torch.from_numpy(intrinsic), torch.from_numpy(lab[:, 2]), torch.from_numpy(lab[:, 5]),
                resolution_factors=g).numpy()


@pytest.mark.parametrize("sampling", ["point", "pixel_mean"])
def test_decoder_jacobian_with_factors(tmp_path, rng, sampling):
    """A decoder with resolution factors: flux = network then the stage with per-node R (float64 reference), into
    NaN-poisoned buffers, forward's flux bit for bit; the R column against float64 central differences of the label
    R with the factors held; the Python Decoder's resolution_factors= on both calls."""
    path = _write_model(int(rng.integers(1 << 30)), tmp_path, sampling=sampling)
    m = _core.Model.load(str(path))
    layers = [mf.Layer(w, b, info["activation"]) for (w, b), info in zip(m.weights(), m.layers)]
    dec = _core.Decoder(m)
    br64 = Broadener(START, STEP, N, dtype=torch.float64, sampling=sampling)
    lo, hi = np.array([lab.min for lab in mf.INTRINSIC_LABELS]), np.array([lab.max for lab in mf.INTRINSIC_LABELS])
    labels = lo + (hi - lo) * rng.uniform(0.02, 0.98, (3, 6))
    labels[:, 5] = [4000.0, 25000.0, float(rng.uniform(3000, 50000))]
    g = linear_resolution(dec.stage_node_wavelengths()) / 30000.0 * rng.uniform(0.9, 1.1, 9)
    z = rng.normal(size=(3, 3)).astype(np.float32)
    out = np.full((3, N), np.nan, np.float32)
    jac = np.full((3, N, 6), np.nan, np.float32)
    f, j = dec.forward_jacobian(labels, z=z, out=out, jac=jac, resolution_factors=g)
    assert f is out and j is jac and np.isfinite(out).all() and np.isfinite(jac).all()
    poisoned = np.full((3, N), np.nan, np.float32)
    assert np.array_equal(dec.forward(labels, z=z, out=poisoned, resolution_factors=g), out)
    assert np.abs(out - _reference_decoder(layers, labels, br64, z, g)).max() < 3e-6
    h = 1e-5 * labels[:, 5]
    up, down = labels.copy(), labels.copy()
    up[:, 5] += h
    down[:, 5] -= h
    fd = (_reference_decoder(layers, up, br64, z, g) - _reference_decoder(layers, down, br64, z, g)) / (2 * h[:, None])
    for r in range(3):
        assert np.abs(jac[r, :, 5] - fd[r]).max() <= 1e-4 * np.abs(fd[r]).max(), r
    # the column differs from the one without factors: it is the derivative of another spectrum
    assert np.abs(jac[:, :, 5] - dec.forward_jacobian(labels, z=z)[1][:, :, 5]).max() > 1e-3 * np.abs(fd).max()
    d = Decoder.load(path, device="cpu")
    np.testing.assert_array_equal(d(labels, z=z, resolution_factors=list(g)), out)
    fl, jc = d.jacobian(labels, z=z, resolution_factors=g)
    np.testing.assert_array_equal(fl, out)
    np.testing.assert_array_equal(jc, jac)


def test_clip_clamps_the_label_before_the_factors(tmp_path, rng):
    """With clip, an R label above its range is clamped to 115000, then scaled by the factors; its column is 0."""
    d = Decoder.load(_write_model(int(rng.integers(1 << 30)), tmp_path, sampling="pixel_mean"), device="cpu")
    g = np.full(9, 0.5)
    lab = [5200.0, 4.1, 12.0, -0.3, 1.1, 400000.0]
    flux, jac = d.jacobian(lab, clip=True, resolution_factors=g)
    np.testing.assert_array_equal(flux, d(lab[:5] + [115000.0], resolution_factors=g))
    assert not jac[:, 5].any()


def test_bad_factors_are_refused_and_write_nothing(tmp_path, rng):
    """Wrong length, NaN, inf, <= 0, R·g below the model's lowest R or above its highest, R = inf, a model without a
    stage: ValueError naming the node (and its wavelength) or the model, and the outputs keep their values."""
    path = _write_model(int(rng.integers(1 << 30)), tmp_path, sampling="pixel_mean")
    d = Decoder.load(path, device="cpu")
    core = _core.Decoder(_core.Model.load(str(path)))
    labels = np.array([[5200.0, 4.1, 12.0, -0.3, 1.1, 20000.0], [6000.0, 4.0, 5.0, 0.0, 1.0, 50000.0]])
    g = np.ones(9)
    cases = [(np.ones(8), r"resolution_factors must have shape \(9,\), one per node of decoder.stage_nodes"),
             (np.where(np.arange(9) == 4, np.nan, g), r"resolution factor nan at node 4 \(4925 Å\) must be finite and > 0 \(row 0\)"),
             (np.where(np.arange(9) == 8, np.inf, g), r"resolution factor inf at node 8 \(5399.95 Å\)"),
             (np.where(np.arange(9) == 0, 0.0, g), r"resolution factor 0 at node 0 \(4450 Å\) must be finite and > 0"),
             (-g, "must be finite and > 0"),
             (np.where(np.arange(9) == 2, 0.04, g), r"R = 20000 x 0.04 = 800 at node 2 \(4687.5 Å\) is below the lowest "
                                                    r"R the stage takes, 1000 \(row 0\)"),
             (np.where(np.arange(9) == 3, 2.4, g), r"R = 50000 x 2.4 = 120000 at node 3 \(4806.25 Å\) is above the "
                                                   r"model's highest R, 115000: an LSF narrower than the model "
                                                   r"represents \(row 1\)")]
    for bad, message in cases:
        out = np.full((2, N), -7.0, np.float32)
        jac = np.full((2, N, 6), -7.0, np.float32)
        with pytest.raises(ValueError, match=message):
            d(labels, out=out, resolution_factors=bad)
        if bad.shape == (9,):
            with pytest.raises(ValueError, match=message):
                core.forward(labels, out=out, resolution_factors=bad)
            with pytest.raises(ValueError, match=message):
                core.forward_jacobian(labels, out=out, jac=jac, resolution_factors=bad)
        with pytest.raises(ValueError, match=message):
            d.jacobian(labels, resolution_factors=bad)
        assert (out == -7.0).all() and (jac == -7.0).all(), message
    with pytest.raises(ValueError, match="resolution_factors must have shape"):
        core.forward(labels, resolution_factors=np.ones(8))
    with pytest.raises(TypeError, match="resolution_factors must be real numbers"):
        d(labels, resolution_factors=["a"] * 9)
    stage = _core.Broadening(START, STEP, N)
    with pytest.raises(ValueError, match="resolution factors scale a finite R"):
        stage.apply(np.ones((1, N), np.float32), np.zeros(1), np.array([np.inf]), resolution_factors=g)
    with pytest.raises(ValueError, match="resolution factors scale a finite R"):
        Broadener(START, STEP, N)(torch.ones(1, N), 0.0, math.inf, resolution_factors=g)
    with pytest.raises(ValueError, match="resolution_factors must have shape"):
        Broadener(START, STEP, N)(torch.ones(1, N), 0.0, 5000.0, resolution_factors=g[:3])
    with pytest.raises(ValueError, match="below min_resolution"):
        Broadener(START, STEP, N)(torch.ones(1, N), 0.0, 5000.0, resolution_factors=g * 0.1)
    plain = Decoder.load(_write_model(1, tmp_path, stage=False), device="cpu")
    with pytest.raises(ValueError, match=r"resolution factors shape the broadening stage's line-spread function; .* "
                                         r"has no broadening stage \(format \d\)"):
        plain([5200.0, 4.1, 12.0, -0.3, 1.1, 20000.0], resolution_factors=g)

"""Radial-tangential macroturbulence in the broadening stage (pixel means, format 3): the closed-form transform
against the profile computed numerically in real space, the C++ stage and training's torch stage against a float64
real-space reference (the fine mesh convolved with that profile), the derivative by vmac against central
differences of the float64 torch stage, vmac = 0 bit for bit, the Decoder's forward/forward_jacobian with vmac, and
bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import erfc

from fastspec import Decoder, _core
from fastspec import model_format as mf
from fastspec_train.broadening import Broadener, macroturbulence_transform
from fastspec_train.grid.reference import broaden, macroturbulence_profile, pixel_means
from test_broadening_core import NET_COLS, NETWORK, _write_model
from test_core import reference_forward

C_KMS = 299792.458
START, STEP = 4450.0, 0.05


def test_transform_is_the_numerical_profiles_fourier_transform():
    """The profile by quadrature over the disk (real space) is Gray's closed form, has unit area, and its Fourier
    transform, by quadrature in v, is (1 - e^-a)/a with a = (pi zeta s)^2 -- in the core and in torch."""
    from scipy.integrate import simpson

    zeta = 3.7
    v = np.linspace(0.0, 12 * zeta, 40001)  # even profile, smooth for v > 0: 2 * Simpson over v >= 0
    prof = macroturbulence_profile(v, zeta)
    closed = 2 / (math.sqrt(math.pi) * zeta) * (np.exp(-(v / zeta) ** 2) - math.sqrt(math.pi) * v / zeta * erfc(v / zeta))
    assert np.abs(prof - closed).max() < 1e-12 * closed.max()
    assert abs(2 * simpson(prof, x=v) - 1) < 1e-10
    for s in [0.0, 0.003, 0.01, 0.027, 0.05, 0.1, 0.3, 1.0]:  # cycles per km/s
        ft = 2 * simpson(prof * np.cos(2 * math.pi * s * v), x=v)
        a = (math.pi * zeta * s) ** 2
        m, _ = _core._macroturbulence_transform(a)
        assert abs(m - ft) < 1e-9, (s, m, ft)
        assert abs(float(macroturbulence_transform(torch.tensor([a], dtype=torch.float64))[0]) - m) < 1e-15


def test_transform_derivative():
    """dM/da against float64 central differences, on both sides of the series/closed-form switch at a = 1e-2."""
    for a in [0.0, 1e-6, 3e-3, 0.00999, 0.01, 0.0101, 0.5, 3.0, 40.0, 1e4]:
        m, dm = _core._macroturbulence_transform(a)
        h = 1e-6 * max(a, 1e-3)
        lo = max(a - h, 0.0)
        fd = (_core._macroturbulence_transform(a + h)[0] - _core._macroturbulence_transform(lo)[0]) / (a + h - lo)
        assert abs(dm - fd) < 1e-7 * max(abs(dm), 1e-8) + 1e-9, (a, dm, fd)
        assert abs(m - (-math.expm1(-a) / a if a > 0 else 1.0)) < 1e-15


def _fine_spectrum(rng, start, stop, n_lines=150):
    """A 0.005 Å mesh with random Gaussian lines of σ 0.04-0.3 Å (at least 0.8 pixel: narrower lines alias in the
    pixel means, the representation's own floor with or without macroturbulence, measured by
    benchmarks/operator_floor.py on SYNSPEC's spectra)."""
    fine = start + 0.005 * np.arange(int(round((stop - start) / 0.005)) + 1)
    flux = np.ones_like(fine)
    for c, w, d in zip(rng.uniform(start, stop, n_lines), rng.uniform(0.04, 0.3, n_lines), rng.uniform(0, 0.8, n_lines)):
        lo, hi = np.searchsorted(fine, [c - 7 * w, c + 7 * w])
        flux[lo:hi] *= 1 - d * np.exp(-0.5 * ((fine[lo:hi] - c) / w) ** 2)
    return fine, flux


@pytest.fixture(scope="module")
def short_grid(request):
    """4000 pixels (200 Å) from 5000 Å: the float64 reference in seconds."""
    return 5000.0, STEP, 4000


def test_stage_matches_real_space_reference(rng, short_grid):
    """Pixel means of a fine-mesh spectrum through the core's stage with (v sin i, R, zeta) against the fine mesh
    broadened in float64 with the macroturbulence profile in real space (pixels > 10 Å from the ends); and no worse
    than the stage without macroturbulence against the reference without it."""
    start, step, n = short_grid
    fine, flux = _fine_spectrum(rng, start - 5, start + step * n + 5)
    wave = start + step * np.arange(n)
    pm = pixel_means(fine, flux, wave, step).astype(np.float32)[None]
    stage = _core.Broadening(start, step, n, sampling="pixel_mean")
    inner = (wave > wave[0] + 10) & (wave < wave[-1] - 10)
    cases = [(1.6, 115000.0, 4.0), (0.0, math.inf, 3.0), (12.0, 40000.0, 6.0), (60.0, 8000.0, 2.5),
             (float(rng.uniform(0, 20)), float(10 ** rng.uniform(4, 5)), float(rng.uniform(2, 8)))]
    for vsini, res, zeta in cases:
        got = stage.apply(pm, np.array([vsini]), np.array([res]), vmac=np.array([zeta]))[0]
        ref = broaden(fine, flux, wave, vsini, res, vmac=zeta)
        d = np.abs(got - ref)[inner]
        print(f"v sin i {vsini:.3g}, R {res:.6g}, zeta {zeta:.3g}: median |dF| {np.median(d):.2e}, max {d.max():.2e}")
        d0 = np.abs(stage.apply(pm, np.array([vsini]), np.array([res]))[0] - broaden(fine, flux, wave, vsini, res))[inner]
        print(f"    without macroturbulence: median {np.median(d0):.2e}, max {d0.max():.2e}")
        assert np.median(d) < 1e-5 and d.max() < 1e-3, (vsini, res, zeta)  # the max: lines near a pixel wide
        assert np.median(d) < 2 * np.median(d0) + 1e-6 and d.max() < 2 * d0.max() + 1e-5, (vsini, res, zeta)
        # macroturbulence does something: the spectrum without it is far off
        plain = stage.apply(pm, np.array([vsini]), np.array([res]))[0]
        assert np.abs(plain - ref)[inner].max() > 5 * d.max()


def test_core_matches_torch_and_derivatives(rng, short_grid):
    """The core's stage (float32 taps, float32 flux) against training's torch stage in float64, everywhere (edges
    included); the derivatives by vmac, v sin i and R at vmac > 0 against float64 central differences of torch's.
    Outputs come back fresh from the core; the decoder test below poisons its buffers."""
    start, step, n = short_grid
    fine, flux = _fine_spectrum(rng, start - 5, start + step * n + 5)
    wave = start + step * np.arange(n)
    pm = pixel_means(fine, flux, wave, step).astype(np.float32)
    x = np.stack([pm, pm[::-1].copy(), pm])
    stage = _core.Broadening(start, step, n, sampling="pixel_mean")
    br = Broadener(start, step, n, dtype=torch.float64, sampling="pixel_mean")
    vsini, res = np.array([0.0, 5.0, 80.0]), np.array([math.inf, 60000.0, 3000.0])
    zeta = np.array([4.0, float(rng.uniform(0.5, 10)), 40.0])

    def t(v, r, z):
        return br(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(v), torch.from_numpy(r),
                  torch.from_numpy(z)).numpy()

    out, dv, dr, dz = stage.apply(x, vsini, res, True, zeta)
    assert np.isfinite(out).all() and np.isfinite(dz).all()
    assert np.abs(out - t(vsini, res, zeta)).max() < 3e-6
    h = 1e-4
    fd_z = (t(vsini, res, zeta + h) - t(vsini, res, zeta - h)) / (2 * h)
    fd_v = (t(vsini + h, res, zeta) - t(np.maximum(vsini - h, 0), res, zeta)) / (vsini + h - np.maximum(vsini - h, 0))[:, None]
    hr = 1e-5 * np.where(np.isinf(res), 1.0, res)
    fd_r = np.where(np.isinf(res)[:, None], 0.0, (t(vsini, res + hr, zeta) - t(vsini, res - hr, zeta)) / (2 * hr[:, None]))
    for r in range(3):
        assert np.abs(dz[r] - fd_z[r]).max() <= 1e-4 * np.abs(fd_z[r]).max(), r
        if vsini[r] > 0:
            assert np.abs(dv[r] - fd_v[r]).max() <= 1e-4 * np.abs(fd_v[r]).max(), r
        if np.isfinite(res[r]):
            assert np.abs(dr[r] - fd_r[r]).max() <= 1e-4 * np.abs(fd_r[r]).max(), r
    # vmac = 0: the stage without macroturbulence, bit for bit, and d/dvmac = 0 there (the transform is even in zeta)
    o0, dv0, dr0, dz0 = stage.apply(x, vsini, res, True, np.zeros(3))
    p0, pv0, pr0 = stage.apply(x, vsini, res, True)
    assert np.array_equal(o0, p0) and np.array_equal(dv0, pv0) and np.array_equal(dr0, pr0)
    assert np.array_equal(o0, stage.apply(x, vsini, res))
    assert not dz0.any()


def test_bad_input(short_grid):
    start, step, n = short_grid
    x = np.ones((2, n), np.float32)
    stage = _core.Broadening(start, step, n, sampling="pixel_mean")
    v, r = np.array([2.0, 2.0]), np.array([50000.0, 50000.0])
    for bad, msg in [(np.nan, "vmac = nan"), (-1.0, "vmac = -1 km/s is outside \\[0, 50\\]"),
                     (51.0, "vmac = 51 km/s is outside"), (np.inf, "vmac = inf")]:
        with pytest.raises(ValueError, match=msg):
            stage.apply(x, v, r, vmac=np.array([1.0, bad]))
    with pytest.raises(ValueError, match="macroturbulence needs a pixel-mean broadening stage \\(model format 3\\)"):
        _core.Broadening(start, step, n).apply(x, v, r, vmac=np.array([0.0, 3.0]))
    assert _core.Broadening(start, step, n).apply(x, v, r, vmac=np.zeros(2)).shape == (2, n)  # 0 is fine anywhere
    with pytest.raises(ValueError, match="shape"):
        stage.apply(x, v, r, vmac=np.array([1.0]))
    br = Broadener(start, step, n, sampling="point")
    with pytest.raises(ValueError, match="macroturbulence needs sampling='pixel_mean'"):
        br(torch.ones(2, n), 2.0, 50000.0, vmac=3.0)
    with pytest.raises(ValueError, match="vmac must lie in"):
        Broadener(start, step, n, sampling="pixel_mean")(torch.ones(2, n), 2.0, 50000.0, vmac=-1.0)


def _reference_decoder(layers, labels, vmac, br64, z):
    lab = np.asarray(labels, np.float64)
    intrinsic = reference_forward(layers, lab[:, NET_COLS], z, latent_dim=3, label_info=NETWORK)
    return br64(torch.from_numpy(intrinsic), torch.from_numpy(lab[:, 2]), torch.from_numpy(lab[:, 5]),
                torch.from_numpy(np.asarray(vmac, np.float64))).numpy()


@pytest.mark.parametrize("weight_dtype", ["f32", "f16"])
def test_decoder_forward_and_jacobian_with_vmac(tmp_path, rng, weight_dtype):
    """A format-3 decoder with per-row vmac: forward = network then the stage (float64 reference), into NaN-poisoned
    buffers; the vmac column against float64 central differences; the other columns unchanged in kind; vmac = 0 and
    vmac=None give the same bits; the Python Decoder's vmac= and return_vmac=."""
    path = _write_model(int(rng.integers(1 << 30)), tmp_path, weight_dtype=weight_dtype, sampling="pixel_mean")
    m = _core.Model.load(str(path))
    layers = [mf.Layer(w, b, info["activation"]) for (w, b), info in zip(m.weights(), m.layers)]
    dec = _core.Decoder(m)
    br64 = Broadener(START, STEP, m.n_pixels, dtype=torch.float64, sampling="pixel_mean")
    lo, hi = np.array([lab.min for lab in mf.INTRINSIC_LABELS]), np.array([lab.max for lab in mf.INTRINSIC_LABELS])
    labels = lo + (hi - lo) * rng.uniform(0.02, 0.98, (3, 6))
    labels[0, 2], labels[0, 5] = 1.5, 115000.0  # a slow rotator at high R, where macroturbulence shows most
    vmac = np.array([4.0, rng.uniform(0.5, 20), 0.0])
    z = rng.normal(size=(3, 3)).astype(np.float32)
    out = np.full((3, m.n_pixels), np.nan, np.float32)
    jac = np.full((3, m.n_pixels, 6), np.nan, np.float32)
    f, j, jv = dec.forward_jacobian(labels, z=z, out=out, jac=jac, vmac=vmac, vmac_column=True)
    assert f is out and j is jac and np.isfinite(out).all() and np.isfinite(jac).all() and np.isfinite(jv).all()
    poisoned = np.full((3, m.n_pixels), np.nan, np.float32)
    assert np.array_equal(dec.forward(labels, z=z, vmac=vmac, out=poisoned), out)  # forward's flux, bit for bit
    ref = _reference_decoder(layers, labels, vmac, br64, z)
    assert np.abs(out - ref).max() < 3e-6
    h = 1e-4
    fd = (_reference_decoder(layers, labels, vmac + h, br64, z)
          - _reference_decoder(layers, labels, np.maximum(vmac - h, 0), br64, z)) / (vmac + h - np.maximum(vmac - h, 0))[:, None]
    for r in range(2):
        assert np.abs(jv[r] - fd[r]).max() <= 1e-4 * np.abs(fd[r]).max(), r
    assert not jv[2].any()  # vmac = 0: the derivative is 0 (one-sided difference O(h) there)
    # the other columns at vmac > 0: v sin i against central differences
    up, down = labels.copy(), labels.copy()
    up[:, 2] += h
    down[:, 2] -= h
    fdv = (_reference_decoder(layers, up, vmac, br64, z) - _reference_decoder(layers, down, vmac, br64, z)) / (2 * h)
    for r in range(3):
        assert np.abs(jac[r, :, 2] - fdv[r]).max() <= 1e-4 * np.abs(fdv[r]).max(), r
    # vmac = 0 / None: today's results, bit for bit
    f0, j0 = dec.forward_jacobian(labels, z=z)
    f1, j1, jv1 = dec.forward_jacobian(labels, z=z, vmac=np.zeros(3), vmac_column=True)
    assert np.array_equal(f0, f1) and np.array_equal(j0, j1) and not jv1.any()
    assert np.array_equal(dec.forward(labels, z=z), dec.forward(labels, z=z, vmac=np.zeros(3)))
    # the Python layer: scalar or per-row vmac, return_vmac
    d = Decoder.load(path, device="cpu")
    np.testing.assert_array_equal(d(labels, z=z, vmac=vmac), out)
    # one spectrum: batch-1 products (GEMV) round differently from the batch's GEMM
    np.testing.assert_allclose(d(labels[0], z=z[0], vmac=4.0), out[0], rtol=0, atol=2e-6)
    fl, jc, col = d.jacobian(labels[1], z=z[1], vmac=vmac[1], return_vmac=True)
    np.testing.assert_allclose(col, jv[1], rtol=0, atol=1e-5 * np.abs(jv[1]).max())
    assert jc.shape == (m.n_pixels, 6) and col.shape == (m.n_pixels,)
    assert len(d.jacobian(labels, z=z, vmac=vmac)) == 2
    with pytest.raises(ValueError, match=r"vmac = -1 km/s \(row 1\) is outside"):
        d(labels, vmac=[1.0, -1.0, 0.0])
    with pytest.raises(ValueError, match="vmac must be a scalar or have shape"):
        d(labels, vmac=[1.0, 2.0])
    with pytest.raises(ValueError, match="vmac = nan"):
        d(labels, vmac=np.nan)


def test_decoder_refuses_vmac_without_a_pixel_mean_stage(tmp_path, rng):
    """Format 2 (point samples) and no stage: vmac > 0 is an error naming the file's format; 0 works."""
    for stage, fmt in [(True, "format 2 \\(its stage takes point samples\\)"), (False, "format \\d \\(no broadening stage\\)")]:
        path = _write_model(int(rng.integers(1 << 30)), tmp_path, stage=stage)
        d = Decoder.load(path, device="cpu")
        lab = [5000.0, 4.0, 10.0, 0.0, 1.0, 20000.0]
        with pytest.raises(ValueError, match=f"macroturbulence is applied by the pixel-mean broadening stage of "
                                             f"format-3 models; .* is {fmt}, so only vmac = 0 works"):
            d(lab, vmac=3.0)
        np.testing.assert_array_equal(d(lab, vmac=0.0), d(lab))
        flux, jac, col = d.jacobian(lab, vmac=0.0, return_vmac=True)
        assert not col.any() and np.array_equal(flux, d(lab))

"""The float64 reference broadening (training/fastspec_train/grid/reference.py): against ROTIN, conservation,
identity, an analytic Gaussian case, and exact pixel means."""

import math

import h5py
import numpy as np
import pytest

from fastspec_train.grid.reference import FWHM_PER_SIGMA, broaden, pixel_means

WAVE = 4450.0 + 0.05 * np.arange(19000)


def _rotin_cases(rotin_h5):
    with h5py.File(rotin_h5, "r") as f:
        flux = f["flux"][...].astype(np.float64)
        for j, v in enumerate(f["rotation"].attrs["vsini_kms"]):
            yield f"vsini={v:g}", flux, f["rotation"][:, j].astype(np.float64), dict(vsini=float(v))
        for j, w in enumerate(f["gaussian"].attrs["fwhm_angstrom"]):
            yield f"fwhm={w:g}", flux, f["gaussian"][:, j].astype(np.float64), dict(fwhm=float(w))


def test_reference_matches_rotin(rotin_h5):
    """ROTIN's 0.05 Å input taken as the PL fine function; median |ΔF| over the 5 spectra, > 30 Å from the ends.
    Measured (all 5 / worst spectrum, the coolest): v sin i 5/30/100/300 km/s: 3.4e-5/3.9e-5/7.0e-5/8.0e-5 /
    1.0e-4/3.5e-4/6.2e-4/5.4e-4 (the README's independent implementation: 4.2e-4 at 30, 6.4e-4 at 100 km/s);
    FWHM 0.05/0.25/1/4.45 Å: 3.2e-5/3.6e-5/3.6e-5/3.7e-5 / 6.5e-5/1.3e-4/1.4e-4/1.5e-4."""
    inner = (WAVE > WAVE[0] + 30) & (WAVE < WAVE[-1] - 30)
    for name, flux, rotin, kw in _rotin_cases(rotin_h5):
        ours = broaden(WAVE, flux, WAVE, **kw)
        med = np.median(np.abs(ours - rotin)[:, inner])
        worst = max(np.median(np.abs(o - r)[inner]) for o, r in zip(ours, rotin))
        print(f"{name}: median |dF| {med:.2e}, worst spectrum {worst:.2e}")
        assert med < 2.5e-4 and worst < 1e-3, name


def _lines(wave, centres, depth, width):
    """1 − Σ d·exp(−(λ − c)²/(2w²)) (a smooth test spectrum)."""
    return 1.0 - sum(d * np.exp(-0.5 * ((wave - c) / w) ** 2) for c, d, w in zip(centres, depth, width))


def test_equivalent_width_conserved_and_identity(rng):
    wave = 5000.0 + 0.005 * np.arange(8001)  # 5000-5040 Å
    centres = rng.uniform(5012, 5028, 12)
    flux = _lines(wave, centres, rng.uniform(0.1, 0.9, 12), rng.uniform(0.005, 0.05, 12))
    ew = np.trapezoid(1 - flux, wave)
    for vsini, res in [(100.0, 5000.0), (300.0, math.inf), (0.0, 1000.0), (7.0, 115000.0)]:
        out = broaden(wave, flux, wave, vsini, res)
        assert abs(np.trapezoid(1 - out, wave) / ew - 1) < 1e-6, (vsini, res)
    # v sin i = 0 and R = inf: the PL function itself, also between the nodes
    mid = wave[:-1] + 0.0021
    assert np.array_equal(broaden(wave, flux, mid), np.interp(mid, wave, flux))
    # R = 1e9 / v sin i = 1e-4: kernels far below the ln λ mesh (du = 0.00125 Å here), out of the range the
    # reference is for (kernels ≥ a few du: R ≲ 1e6, v sin i ≳ 0.3 km/s); it then returns the band-limited reading
    # of the PL function, within the PL function's own corner error (h²/8·F'' ~ 7e-3 here) of it
    smooth = _lines(wave, centres, rng.uniform(0.1, 0.9, 12), rng.uniform(0.02, 0.05, 12))
    for vsini, res in [(0.0, 1e9), (1e-4, math.inf)]:
        assert np.max(np.abs(broaden(wave, smooth, wave, vsini, res) - smooth)) < 2e-3


def test_gaussian_line_analytic():
    """A Gaussian line in ln λ broadened by FWHM = λ/R: a Gaussian of variance s² + σ², σ = 1/(R·2√(2 ln 2))
    (the PL reading of the 0.0005 Å mesh adds h²/6 to s², 1.4e-5 in F here)."""
    wave = 5000.0 + 0.0005 * np.arange(40001)
    u0, s, d = math.log(5010.0), 0.02 / 5010.0, 0.8
    flux = 1 - d * np.exp(-0.5 * ((np.log(wave) - u0) / s) ** 2)
    out = wave[(wave > 5005) & (wave < 5015)]
    for res in (115000.0, 20000.0, 3000.0):
        sig2 = s * s + (1.0 / (res * FWHM_PER_SIGMA)) ** 2 + (0.0005 / 5010.0) ** 2 / 6  # + the PL's h²/6
        exact = 1 - d * s / math.sqrt(sig2) * np.exp(-0.5 * (np.log(out) - u0) ** 2 / sig2)
        assert np.max(np.abs(broaden(wave, flux, out, 0.0, res) - exact)) < 2e-6, res


def test_rotation_of_narrow_line_is_the_profile():
    """A line much narrower than the rotation half-width takes the shape of Gray's profile (ε = 0.6), area kept."""
    wave = 5000.0 + 0.001 * np.arange(20001)
    w, area = 0.003, 0.01  # a 0.003 Å Gaussian line of equivalent width 0.01 Å at 5010 Å
    flux = 1 - area / (w * math.sqrt(2 * math.pi)) * np.exp(-0.5 * ((wave - 5010.0) / w) ** 2)
    out = np.linspace(5008.5, 5011.5, 61)
    half = 5010.0 * 100.0 / 299792.458  # 1.67 Å for 100 km/s
    t = np.clip((out - 5010.0) / half, -1, 1)
    eps = 0.6
    prof = (2 * (1 - eps) * np.sqrt(1 - t * t) + math.pi * eps / 2 * (1 - t * t)) / (math.pi * half * (1 - eps / 3))
    got = 1 - broaden(wave, flux, out, 100.0)
    inside = np.abs(t) < 0.95
    assert np.max(np.abs(got[inside] - area * prof[inside])) < 2e-5 * area / half * 100


def test_pixel_means_exact_on_piecewise_linear(rng):
    x = np.sort(rng.uniform(0, 10, 200))
    x[0], x[-1] = 0.0, 10.0
    y = rng.normal(size=(3, x.size))
    centres, step = rng.uniform(0.5, 9.5, 50), 0.37
    got = pixel_means(x, y, centres, step)
    for k, c in enumerate(centres):  # trapezoid over the knots plus the pixel edges is exact for a PL function
        lo, hi = c - step / 2, c + step / 2
        t = np.concatenate([[lo, hi], x[(x > lo) & (x < hi)]])
        t.sort()
        for b in range(3):
            assert got[b, k] == pytest.approx(np.trapezoid(np.interp(t, x, y[b]), t) / step, abs=1e-12)
    with pytest.raises(ValueError):
        pixel_means(x, y, [0.1], 0.5)


def test_cell_means_are_read_as_cell_means():
    """The grid builder's fine mesh holds means over 0.005 Å cells: read as such (fine_sampling="pixel_mean") a
    narrow Gaussian line broadened by R = 100000 matches the analytic result to 1e-6 (measured 1.1e-6 max); read
    as point samples it is blurred by dx²/4 (measured 1.25e-3 max)."""
    import math

    from scipy.special import erf

    h, c, s, d, res = 0.005, 5000.0123, 0.008, 0.6, 100000.0
    x = np.arange(4990.0, 5010.0, h) + h / 2

    def antiderivative(t):
        return t - d * s * math.sqrt(math.pi / 2) * erf((t - c) / (s * math.sqrt(2)))

    cells = (antiderivative(x + h / 2) - antiderivative(x - h / 2)) / h
    out = 4995.0 + 0.01 * np.arange(1000)
    st = math.sqrt(s**2 + (c / (res * FWHM_PER_SIGMA)) ** 2)
    exact = 1 - d * s / st * np.exp(-0.5 * ((out - c) / st) ** 2)
    as_means = np.abs(broaden(x, cells, out, 0.0, res, fine_sampling="pixel_mean") - exact).max()
    as_points = np.abs(broaden(x, cells, out, 0.0, res) - exact).max()
    assert as_means < 3e-6 and as_points > 100 * as_means, (as_means, as_points)

"""examples/cpp/fit_spectrum end to end: install the core with plain CMake into a temporary prefix, build the
examples against it with find_package(fastspec), and check that the Levenberg-Marquardt fit on the core's
analytic Jacobian recovers the labels of a spectrum the model generated: exactly (to 1e-3 of each range)
without noise, and within 5σ of its own uncertainties with reduced χ² ≈ 1 at SNR 100."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from conftest import run_checked

from fastspec import model_format as mf

NAMES = [lab.name for lab in mf.STANDARD_LABELS]


@pytest.fixture(scope="module")
def fit_binary(cpp_examples):
    return cpp_examples / "fit_spectrum"


def parse(stdout):
    rows = [line.split() for line in stdout.splitlines()]
    assert [r[0] for r in rows] == NAMES + ["chi2"], stdout
    fits = {r[0]: (float(r[1]), float(r[2]), float(r[3])) for r in rows[:-1]}
    return fits, float(rows[-1][1]), int(rows[-1][2]), float(rows[-1][3])


@pytest.fixture
def case(tmp_path, test_seed):
    seed = test_seed
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    layers = mf.random_decoder([32, 96], latent_dim=4, n_pixels=4000, seed=int(rng.integers(1 << 31)))
    model = mf.write_model(tmp_path / "model.fsm", layers, latent_dim=4, wavelength=(4450.0, 0.05, 4000, "air"))
    labels = [rng.uniform(lab.min + 0.1 * (lab.max - lab.min), lab.max - 0.1 * (lab.max - lab.min))
              for lab in mf.STANDARD_LABELS]
    labels[5] = float(10 ** rng.uniform(np.log10(3000), np.log10(100000)))
    return model, labels, rng


def test_noiseless_fit_recovers_the_labels(fit_binary, case):
    model, labels, _ = case
    fits, chi2, n_pixels, _ = parse(run_checked([fit_binary, model, *labels, 0]).stdout)
    assert n_pixels == 4000
    for lab, true in zip(mf.STANDARD_LABELS, labels):
        value, sigma, echoed = fits[lab.name]
        assert echoed == pytest.approx(true, rel=1e-9)
        assert abs(value - true) <= 1e-3 * (lab.max - lab.min), f"{lab.name}: {value} vs {true}"
    assert chi2 < 1e-2 * n_pixels  # the model itself at the errors of 1e-3: only float32 rounding remains


def test_fit_at_snr_100_is_within_its_uncertainties(fit_binary, case):
    model, labels, rng = case
    fits, chi2, n_pixels, reduced = parse(run_checked([fit_binary, model, *labels, 100, int(rng.integers(1 << 31))]).stdout)
    for name, (value, sigma, true) in fits.items():
        assert np.isfinite(sigma) and sigma > 0
        assert abs(value - true) <= 5 * sigma, f"{name}: {value} ± {sigma}, true {true}"
    assert 0.9 < reduced < 1.1  # Gaussian noise with the stated errors: 1 ± 0.02 (1σ at 4000 pixels)


def test_usage_and_bad_labels(fit_binary, case):
    model, _, _ = case
    bad = subprocess.run([str(fit_binary), str(model), "5777"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage:" in bad.stderr
    outside = subprocess.run([str(fit_binary), str(model), "5777", "7", "2", "0", "1", "50000"],
                             capture_output=True, text=True)
    assert outside.returncode == 1 and "label 'logg' = 7 is outside [2, 5]" in outside.stderr

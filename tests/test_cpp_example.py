"""The C++ package end to end: build and install the core with plain CMake into a temporary prefix,
build examples/cpp against it with find_package(fastspec), run it on a random model and compare its
output with the float64 reference."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from conftest import run_checked

from fastspec import model_format as mf
from test_core import reference_forward



@pytest.fixture(scope="module")
def example_binary(cpp_examples):
    return cpp_examples / "generate_spectrum"


def test_example_matches_reference(example_binary, tmp_path, test_seed):
    layers = mf.random_decoder([48, 96], latent_dim=8, n_pixels=700, seed=test_seed)
    model = mf.write_model(tmp_path / "model.fsm", layers, latent_dim=8, output_scale=1.2, output_offset=-0.1,
                           wavelength=(4450.0, 0.05, 700, "air"))
    labels = [6100.0, 3.9, 120.0, -0.4, 2.2, 20000.0]
    out_file = tmp_path / "spectrum.txt"
    run_checked([example_binary, model, *labels, out_file])
    data = np.loadtxt(out_file)
    assert data.shape == (700, 2)
    np.testing.assert_allclose(data[:, 0], 4450.0 + 0.05 * np.arange(700), rtol=0, atol=5e-5)
    ref = reference_forward(layers, np.array([labels]), latent_dim=8, output_scale=1.2, output_offset=-0.1)[0]
    # the example prints 7 significant digits: compare at that precision
    err = np.max(np.abs(data[:, 1] - ref) / np.maximum(np.abs(ref), 0.12))
    assert err <= 2e-6 + 1e-5, f"max relative error {err:.3g}"
    # stdout variant and the usage message
    stdout = run_checked([example_binary, model, *labels]).stdout.splitlines()
    assert len(stdout) == 700 and np.allclose([float(x) for x in stdout[0].split()], data[0])
    bad = subprocess.run([str(example_binary), str(model), "5777"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage:" in bad.stderr
    outside = subprocess.run([str(example_binary), str(model), "5777", "7", "2", "0", "1", "50000"],
                             capture_output=True, text=True)
    assert outside.returncode == 1 and "label 'logg' = 7 is outside [2, 5]" in outside.stderr

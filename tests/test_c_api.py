"""The C API (fastspec/fastspec.h) through its two examples: a C program (spectrum and Jacobian column) and a
Fortran program (ISO_C_BINDING), both built against an installed core and compared with the Python API on a
version-2 model (network + broadening stage)."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
from conftest import run_checked, seed_for

from fastspec import Decoder
from fastspec import model_format as mf

LABELS = [6100.0, 3.9, 45.0, -0.4, 2.2, 20000.0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    layers = mf.random_decoder([48, 96], latent_dim=8, n_labels=4, n_pixels=900,
                               seed=seed_for("tests/test_c_api.py::model"))
    return mf.write_model(tmp_path_factory.mktemp("capi") / "m.fsm", layers, latent_dim=8, labels=mf.INTRINSIC_LABELS,
                          broadening=mf.BroadeningStage(), wavelength=(4450.0, 0.05, 900, "air"), output_scale=1.05)


def test_c_example_matches_python(c_examples, model):
    out = run_checked([c_examples / "generate_spectrum_c", model, *LABELS]).stdout
    data = np.array([[float(x) for x in line.split()] for line in out.splitlines()])
    flux, jac = Decoder.load(model).jacobian(LABELS)
    assert data.shape == (900, 3)
    np.testing.assert_allclose(data[:, 0], 4450.0 + 0.05 * np.arange(900), atol=5e-5)
    np.testing.assert_allclose(data[:, 1], flux, rtol=1e-7, atol=1e-7)  # the same core: printed to 8 digits
    np.testing.assert_allclose(data[:, 2], jac[:, 0], rtol=1e-7, atol=1e-12)
    bad = subprocess.run([str(c_examples / "generate_spectrum_c"), str(model), "5777", "7", "2", "0", "1", "50000"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "label 'logg' = 7 is outside [2, 5]" in bad.stderr
    missing = subprocess.run([str(c_examples / "generate_spectrum_c"), "/nonexistent.fsm", *map(str, LABELS)],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "cannot open model file" in missing.stderr


def test_fortran_example_matches_python(c_examples, model):
    binary = c_examples / "generate_spectrum_f"
    if not binary.exists():
        if shutil.which("gfortran") or os.environ.get("CI"):
            pytest.fail("gfortran is installed (or CI is set) but the Fortran example was not built")
        pytest.skip("no Fortran compiler (apt-get install gfortran)")
    out = run_checked([binary, model, *LABELS]).stdout
    data = np.array([[float(x) for x in line.split()] for line in out.splitlines()])
    flux = Decoder.load(model)(LABELS)
    np.testing.assert_allclose(data[:, 1], flux, rtol=1e-7, atol=1e-7)
    bad = subprocess.run([str(binary), str(model), "5777", "7", "2", "0", "1", "50000"], capture_output=True, text=True)
    assert bad.returncode == 1 and "label 'logg' = 7 is outside [2, 5]" in bad.stderr


def test_pkg_config_build_and_the_installed_default_model(installed_core, tmp_path):
    """A C program built with nothing but pkg-config, from a shell with no Python: it links, runs, and reads
    the default model the install put under share/fastspec (the one the package ships, byte for byte)."""
    from conftest import clean_env

    from fastspec.decoder import default_model_path

    if shutil.which("pkg-config") is None:
        pytest.fail("pkg-config is needed (apt-get install pkg-config)")
    env = clean_env(PKG_CONFIG_PATH=str(installed_core / "lib" / "pkgconfig"))
    pc = lambda *a: run_checked(["pkg-config", *a, "fastspec"], env=env).stdout.split()  # noqa: E731
    model_path = pc("--variable=default_model")[0]
    assert open(model_path, "rb").read() == default_model_path().read_bytes()
    exe = tmp_path / "generate_spectrum_pc"
    src = os.path.join(os.path.dirname(__file__), "..", "examples", "c", "generate_spectrum.c")
    run_checked(["cc", "-O2", "-o", exe, src, *pc("--cflags", "--libs"), "-lstdc++"], env=env)
    labels = [5777.0, 4.44, 2.0, 0.0, 1.0, 50000.0]
    out = run_checked([exe, model_path, *map(str, labels)], env=env).stdout
    data = np.array([[float(x) for x in line.split()] for line in out.splitlines()])
    np.testing.assert_allclose(data[:, 1], Decoder.load()(labels)[: data.shape[0]], rtol=1e-6, atol=1e-6)


VMAC_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <fastspec/fastspec.h>
/* usage: prog model vmac labels(6): prints flux and dF/dvmac per pixel, or the error and exits 1 */
int main(int argc, char** argv) {
    fastspec_model* m; fastspec_decoder* d;
    double labels[6], vmac = atof(argv[2]);
    for (int i = 0; i < 6; ++i) labels[i] = atof(argv[3 + i]);
    if (fastspec_model_load(argv[1], &m) || fastspec_decoder_new(m, 1, &d)) { fprintf(stderr, "%s\n", fastspec_last_error()); return 1; }
    size_t np = fastspec_model_n_pixels(m), nl = fastspec_model_n_labels(m);
    float* flux = malloc(np * sizeof(float)); float* f2 = malloc(np * sizeof(float));
    float* jac = malloc(np * nl * sizeof(float)); float* jv = malloc(np * sizeof(float));
    int rc = fastspec_forward_vmac(d, labels, &vmac, 1, flux, 0);
    if (rc) { fprintf(stderr, "%d %s\n", rc, fastspec_last_error()); return 1; }
    rc = fastspec_forward_jacobian_vmac(d, labels, &vmac, 1, f2, jac, jv, 0);
    if (rc) { fprintf(stderr, "%d %s\n", rc, fastspec_last_error()); return 1; }
    for (size_t p = 0; p < np; ++p) printf("%.9g %.9g %.9g\n", flux[p], f2[p], jv[p]);
    fprintf(stderr, "max_vmac %g\n", fastspec_max_vmac());
    fastspec_decoder_free(d); fastspec_model_free(m);
    return 0;
}
"""


def test_c_api_macroturbulence(installed_core, model, tmp_path):
    """fastspec_forward_vmac / fastspec_forward_jacobian_vmac against Python on the installed default (format-3)
    model; bad vmac and a format-2 model give FASTSPEC_ERR_INPUT (3) with the message."""
    from conftest import clean_env

    from fastspec.decoder import default_model_path

    env = clean_env(PKG_CONFIG_PATH=str(installed_core / "lib" / "pkgconfig"))
    pc = lambda *a: run_checked(["pkg-config", *a, "fastspec"], env=env).stdout.split()  # noqa: E731
    src, exe = tmp_path / "vmac.c", tmp_path / "vmac"
    src.write_text(VMAC_C)
    run_checked(["cc", "-O2", "-std=c99", "-o", exe, src, *pc("--cflags", "--libs"), "-lstdc++", "-lm"], env=env)
    labels = [5777.0, 4.44, 1.6, 0.0, 1.0, 115000.0]
    out = run_checked([exe, default_model_path(), "4", *map(str, labels)], env=env)
    data = np.array([[float(x) for x in line.split()] for line in out.stdout.splitlines()])
    assert "max_vmac 50" in out.stderr
    d = Decoder.load(device="cpu")
    flux, _, col = d.jacobian(labels, vmac=4.0, return_vmac=True)
    np.testing.assert_allclose(data[:, 0], d(labels, vmac=4.0), rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(data[:, 1], flux, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(data[:, 2], col, rtol=1e-6, atol=1e-9)
    bad = subprocess.run([str(exe), str(default_model_path()), "-1", *map(str, labels)], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 1 and "3 vmac = -1 km/s (row 0) is outside [0, 50]" in bad.stderr
    old = subprocess.run([str(exe), str(model), "3", *map(str, LABELS)], capture_output=True, text=True, env=env)
    assert old.returncode == 1 and "is format 2 (its stage takes point samples), so only vmac = 0 works" in old.stderr


LSF_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <fastspec/fastspec.h>
/* usage: prog model slope labels(6): resolution factors 1 + slope * (node - mid) / mid over the stage's nodes; prints
 * flux (forward), flux and dF/dR (forward_jacobian) per pixel, the nodes to stderr; or the error and exits 1 */
int main(int argc, char** argv) {
    fastspec_model* m; fastspec_decoder* d;
    double labels[6], slope = atof(argv[2]);
    for (int i = 0; i < 6; ++i) labels[i] = atof(argv[3 + i]);
    if (fastspec_model_load(argv[1], &m) || fastspec_decoder_new(m, 1, &d)) { fprintf(stderr, "%s\n", fastspec_last_error()); return 1; }
    size_t np = fastspec_model_n_pixels(m), nl = fastspec_model_n_labels(m), nodes = fastspec_decoder_stage_node_count(d);
    double* wl = malloc(nodes * sizeof(double)); double* g = malloc(nodes * sizeof(double));
    if (fastspec_decoder_stage_node_wavelengths(d, wl)) { fprintf(stderr, "%s\n", fastspec_last_error()); return 1; }
    for (size_t s = 0; s < nodes; ++s) g[s] = 1 + slope * (wl[s] - wl[nodes / 2]) / wl[nodes / 2];
    float* flux = malloc(np * sizeof(float)); float* f2 = malloc(np * sizeof(float));
    float* jac = malloc(np * nl * sizeof(float)); float* jv = malloc(np * sizeof(float));
    int rc = fastspec_forward_lsf(d, labels, NULL, g, 1, flux, NULL, NULL, 0);
    if (rc) { fprintf(stderr, "%d %s\n", rc, fastspec_last_error()); return 1; }
    if (fastspec_forward_lsf(d, labels, NULL, g, 1, f2, NULL, jv, 0) != 3) return 2;  /* jacobian_vmac needs jacobian */
    fprintf(stderr, "%s\n", fastspec_last_error());
    rc = fastspec_forward_lsf(d, labels, NULL, g, 1, f2, jac, jv, 0);
    if (rc) { fprintf(stderr, "%d %s\n", rc, fastspec_last_error()); return 1; }
    for (size_t p = 0; p < np; ++p) printf("%.9g %.9g %.9g\n", flux[p], f2[p], jac[p * nl + 5]);
    for (size_t s = 0; s < nodes; ++s) fprintf(stderr, "node %.9g\n", wl[s]);
    fastspec_decoder_free(d); fastspec_model_free(m);
    return 0;
}
"""


def test_c_api_line_spread_function(installed_core, tmp_path):
    """fastspec_forward_lsf (forward and forward_jacobian) and the node getters against Python on the installed
    default model with resolution factors; a factor <= 0 and jacobian_vmac without jacobian give FASTSPEC_ERR_INPUT."""
    from conftest import clean_env

    from fastspec.decoder import default_model_path

    env = clean_env(PKG_CONFIG_PATH=str(installed_core / "lib" / "pkgconfig"))
    pc = lambda *a: run_checked(["pkg-config", *a, "fastspec"], env=env).stdout.split()  # noqa: E731
    src, exe = tmp_path / "lsf.c", tmp_path / "lsf"
    src.write_text(LSF_C)
    run_checked(["cc", "-O2", "-std=c99", "-o", exe, src, *pc("--cflags", "--libs"), "-lstdc++", "-lm"], env=env)
    labels = [5777.0, 4.44, 1.6, 0.0, 1.0, 40000.0]
    out = run_checked([exe, default_model_path(), "3", *map(str, labels)], env=env)
    data = np.array([[float(x) for x in line.split()] for line in out.stdout.splitlines()])
    d = Decoder.load(device="cpu")
    nodes = [float(line.split()[1]) for line in out.stderr.splitlines() if line.startswith("node ")]
    np.testing.assert_array_equal(nodes, d.stage_nodes)
    assert "jacobian_vmac needs jacobian" in out.stderr
    g = 1 + 3 * (d.stage_nodes - d.stage_nodes[4]) / d.stage_nodes[4]
    flux, jac = d.jacobian(labels, resolution_factors=g)
    np.testing.assert_allclose(data[:, 0], d(labels, resolution_factors=g), rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(data[:, 1], flux, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(data[:, 2], jac[:, 5], rtol=1e-6, atol=1e-6 * np.abs(jac[:, 5]).max())
    assert np.abs(flux - d(labels)).max() > 1e-3  # the factors do something
    bad = subprocess.run([str(exe), str(default_model_path()), "50", *map(str, labels)], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 1 and "3 resolution factor -" in bad.stderr and "must be finite and > 0 (row 0)" in bad.stderr

"""Decoder.forward_jacobian (the core's analytic dF/d(labels)) against two independent float64 references on
fresh random models: torch autograd on the same weights, and central finite differences of the NumPy
reference decoder of test_core.

Accuracy criterion: for every label j, max_p |J[p, j] - Jref[p, j]| <= TOL * max_p |Jref[p, j]|. The core
works in float32 (u = 6e-8): its tangents pass through the same GEMMs as the primal, so they carry the same
~1e-6 relative rounding; the last factor scale·s(1-s) is taken from the float32 flux, whose rounding is
~1e-7·|scale| absolute. Relative to the column's largest derivative both stay well under TOL = 1e-4.

Finite-difference step: h_j = 1e-6 × the label's normalisation scale (a step of 1e-6 in the network input;
for log10 labels the equivalent in R). Truncation error ~h²·F''' ~ 1e-12, cancellation ~1e-16/1e-6 = 1e-10
relative, both far below TOL. A central difference straddling a ReLU kink is wrong (the function is not
differentiable there), so the reference checks that no hidden pre-activation changes sign between x-h and
x+h and draws new labels when one does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastspec import Decoder, _core
from fastspec import model_format as mf
from test_core import make_model, random_labels, reference_forward

TOL = 1e-4
LABELS = mf.STANDARD_LABELS


def torch_jacobian(layers, labels, z, *, latent_dim, weight_dtype, scale, offset, clip=False):
    """dF/d(labels) (n, P, L) by torch autograd, float64, on the weights as stored."""
    Ws = [torch.tensor(mf.quantize(la.weight, weight_dtype), dtype=torch.float64) for la in layers]
    bs = [torch.tensor(la.bias, dtype=torch.float64) for la in layers]
    lo = torch.tensor([lab.min for lab in LABELS], dtype=torch.float64)
    hi = torch.tensor([lab.max for lab in LABELS], dtype=torch.float64)
    norm = [lab.normalisation() for lab in LABELS]
    off = torch.tensor([o for o, _ in norm], dtype=torch.float64)
    sc = torch.tensor([s for _, s in norm], dtype=torch.float64)
    is_log = torch.tensor([lab.scaling == "log10" for lab in LABELS])

    def decode(lab_row, z_row):
        v = torch.clamp(lab_row, lo, hi) if clip else lab_row
        s = torch.where(is_log, torch.log10(v), v)
        x = torch.cat([z_row, (s - off) / sc])
        for k, (W, b) in enumerate(zip(Ws, bs)):
            a = W @ x + b
            x = torch.relu(a) if k + 1 < len(Ws) else torch.sigmoid(a)
        return scale * x + offset

    out = []
    for r in range(labels.shape[0]):
        z_row = torch.zeros(latent_dim, dtype=torch.float64) if z is None else torch.tensor(z[r], dtype=torch.float64)
        lab_row = torch.tensor(labels[r], dtype=torch.float64)
        out.append(torch.autograd.functional.jacobian(lambda v: decode(v, z_row), lab_row).numpy())
    return np.stack(out)


def hidden_signs(layers, labels, z, latent_dim, weight_dtype):
    """Sign pattern of every hidden pre-activation (to detect ReLU kinks between FD points)."""
    n = labels.shape[0]
    x = np.zeros((n, latent_dim + len(LABELS)))
    if z is not None:
        x[:, :latent_dim] = z
    for j, lab in enumerate(LABELS):
        s = np.log10(labels[:, j]) if lab.scaling == "log10" else labels[:, j]
        o, sc = lab.normalisation()
        x[:, latent_dim + j] = (s - o) / sc
    signs = []
    for layer in layers[:-1]:
        a = x @ mf.quantize(layer.weight, weight_dtype).astype(np.float64).T + layer.bias
        signs.append(a > 0)
        x = np.maximum(a, 0)
    return np.concatenate(signs, axis=1)


def fd_jacobian(layers, labels, z, *, latent_dim, weight_dtype, scale, offset):
    """Central differences of the float64 reference; None if a step crosses a ReLU kink."""
    n, nl = labels.shape
    jac = np.empty((n, layers[-1].weight.shape[0], nl))
    ref = dict(latent_dim=latent_dim, weight_dtype=weight_dtype, output_scale=scale, output_offset=offset)
    for j, lab in enumerate(LABELS):
        _, sc = lab.normalisation()
        hn = 1e-6 * sc  # a 1e-6 step in the normalised input
        up, down = labels.copy(), labels.copy()
        if lab.scaling == "log10":
            up[:, j] = labels[:, j] * 10**hn
            down[:, j] = labels[:, j] * 10**-hn
        else:
            up[:, j] += hn
            down[:, j] -= hn
        if not np.array_equal(hidden_signs(layers, up, z, latent_dim, weight_dtype),
                              hidden_signs(layers, down, z, latent_dim, weight_dtype)):
            return None
        jac[:, :, j] = ((reference_forward(layers, up, z, **ref) - reference_forward(layers, down, z, **ref))
                        / (up[:, j] - down[:, j])[:, None])
    return jac


def column_error(jac, ref):
    """max over rows and labels of max_p |J - Jref| / max_p |Jref| (per row and label)."""
    err = np.abs(jac.astype(np.float64) - ref).max(axis=1)
    return float(np.max(err / np.maximum(np.abs(ref).max(axis=1), 1e-300)))


def interior_labels(rng, n):
    """Random labels away from the range ends (so the FD steps stay inside the range)."""
    lab = random_labels(rng, n)
    for j, l in enumerate(LABELS):
        lab[:, j] = np.clip(lab[:, j], l.min + 1e-3 * (l.max - l.min), l.max - 1e-3 * (l.max - l.min))
    return lab


@pytest.mark.parametrize("weight_dtype", ["f32", "f16"])
@pytest.mark.parametrize("widths,latent_dim,n_pixels", [([64, 128], 4, 300), ([40], 0, 211), ([33, 65, 17], 3, 500)])
@pytest.mark.parametrize("n", [1, 5, 40])  # 40 > the Jacobian's internal 32-row chunk
def test_jacobian_matches_autograd_and_finite_differences(tmp_path, rng, weight_dtype, widths, latent_dim, n_pixels, n):
    scale, offset = float(rng.uniform(0.5, 2.0)), float(rng.uniform(-0.5, 0.5))
    layers, path = make_model(tmp_path, widths, latent_dim=latent_dim, n_pixels=n_pixels, weight_dtype=weight_dtype,
                              seed=int(rng.integers(1 << 31)), output_scale=scale, output_offset=offset)
    decoder = _core.Decoder(_core.Model.load(str(path)))
    kw = dict(latent_dim=latent_dim, weight_dtype=weight_dtype, scale=scale, offset=offset)
    for z_given in (False, True):
        for _ in range(20):  # draw until no FD step crosses a ReLU kink (rare)
            labels = interior_labels(rng, n)
            z = rng.normal(size=(n, latent_dim)).astype(np.float32) if z_given else None
            fd = fd_jacobian(layers, labels, z, **kw)
            if fd is not None:
                break
        assert fd is not None, "every draw crossed a ReLU kink"
        out = np.full((n, n_pixels), np.nan, dtype=np.float32)  # poisoned: every entry must be written
        jac = np.full((n, n_pixels, 6), np.nan, dtype=np.float32)
        flux, jac_r = decoder.forward_jacobian(labels, z=z, out=out, jac=jac)
        assert np.shares_memory(flux, out) and np.shares_memory(jac_r, jac)
        assert np.isfinite(out).all() and np.isfinite(jac).all()
        # the flux is forward()'s, bit for bit
        np.testing.assert_array_equal(out, decoder.forward(labels, z=z))
        auto = torch_jacobian(layers, labels, z, **kw)
        err_auto, err_fd = column_error(jac, auto), column_error(jac, fd)
        assert err_auto <= TOL, f"vs autograd: max relative error {err_auto:.3g}"
        assert err_fd <= TOL, f"vs finite differences: max relative error {err_fd:.3g}"
        # the two references agree with each other far better than the float32 tolerance
        assert column_error(auto, fd) <= 1e-6


def test_clipped_labels_have_zero_derivative(tmp_path, rng):
    layers, path = make_model(tmp_path, [48, 64], latent_dim=2, n_pixels=150, seed=int(rng.integers(1 << 31)))
    decoder = _core.Decoder(_core.Model.load(str(path)))
    labels = interior_labels(rng, 3)
    labels[0, 0] = 20000.0  # teff above the range
    labels[1, 2] = -5.0  # vsini below
    labels[2, 5] = 200.0  # R below
    with pytest.raises(ValueError, match="label 'teff' = 20000 is outside"):
        decoder.forward_jacobian(labels)
    flux, jac = decoder.forward_jacobian(labels, clip=True)
    np.testing.assert_array_equal(flux, decoder.forward(labels, clip=True))
    assert np.all(jac[0, :, 0] == 0) and np.all(jac[1, :, 2] == 0) and np.all(jac[2, :, 5] == 0)
    auto = torch_jacobian(layers, labels, None, latent_dim=2, weight_dtype="f32", scale=1.0, offset=0.0, clip=True)
    for r, j in ((0, 1), (1, 3), (2, 0)):  # the other labels still have their derivatives
        assert np.abs(jac[r, :, j] - auto[r, :, j]).max() <= TOL * np.abs(auto[r, :, j]).max()


def test_bad_input_is_rejected_before_anything_is_written(tmp_path):
    _, path = make_model(tmp_path, [16], latent_dim=2, n_pixels=50, seed=3)
    decoder = _core.Decoder(_core.Model.load(str(path)))
    labels = np.array([[5000, 4, 10, 0, 1, 20000], [5000, np.nan, 10, 0, 1, 20000]], dtype=np.float64)
    out = np.full((2, 50), -7.0, dtype=np.float32)
    jac = np.full((2, 50, 6), -7.0, dtype=np.float32)
    with pytest.raises(ValueError, match="row 1: label 'logg' = nan is not finite"):
        decoder.forward_jacobian(labels, out=out, jac=jac)
    assert np.all(out == -7.0) and np.all(jac == -7.0)
    with pytest.raises(ValueError, match=r"jac must have shape \(2, 50, 6\)"):
        decoder.forward_jacobian(labels[:1].repeat(2, 0), jac=np.zeros((2, 50, 5), np.float32))
    with pytest.raises(TypeError, match="labels must have dtype float64"):
        decoder.forward_jacobian(labels.astype(np.float32))
    flux, jac = decoder.forward_jacobian(np.zeros((0, 6)))
    assert flux.shape == (0, 50) and jac.shape == (0, 50, 6)


def test_python_decoder_jacobian(small_model, rng):
    """fastspec.Decoder.jacobian: the same input handling as __call__, shapes for one and many spectra."""
    decoder = Decoder.load(small_model)
    p = [5777.0, 4.44, 2.0, 0.0, 1.0, 50000.0]
    flux, jac = decoder.jacobian(p)
    assert flux.shape == (19000,) and jac.shape == (19000, 6) and jac.dtype == np.float32
    np.testing.assert_array_equal(flux, decoder(p))
    flux_kw, jac_kw = decoder.jacobian(teff=5777, logg=4.44, vsini=2, mh=0, vmic=1, resolution=50000)
    np.testing.assert_array_equal(jac_kw, jac)
    labels = interior_labels(rng, 3)
    z = rng.normal(size=4)
    flux3, jac3 = decoder.jacobian(labels, z=z)
    assert flux3.shape == (3, 19000) and jac3.shape == (3, 19000, 6)
    np.testing.assert_array_equal(flux3, decoder(labels, z=z))
    # The values, not just the shape: each row agrees with the single-spectrum call at that row's labels and the
    # same z (batch 1 takes the GEMV path, the batch GEMM: not bit-identical), and differs from the z = 0 one.
    # (The single-spectrum Jacobian itself is checked against autograd and finite differences above.)
    for i in range(3):
        flux1, jac1 = decoder.jacobian(labels[i], z=z)
        dj = float(np.abs(jac3[i] - jac1).max() / np.abs(jac1).max())
        df = float(np.abs(flux3[i] - flux1).max())
        print(f"row {i}: batched vs single Jacobian {dj:.2e} of its max, flux {df:.2e}")
        assert dj <= 1e-6 and df <= 1e-6  # measured (4 seeds) <= 4.9e-7 and <= 2.4e-7
    assert np.abs(jac3[0] - decoder.jacobian(labels[0])[1]).max() > 1e-4 * np.abs(jac3[0]).max()
    with pytest.raises(ValueError, match="outside"):
        decoder.jacobian([5777.0, 9.0, 2.0, 0.0, 1.0, 50000.0])
    assert np.all(decoder.jacobian([5777.0, 9.0, 2.0, 0.0, 1.0, 50000.0], clip=True)[1][:, 1] == 0)

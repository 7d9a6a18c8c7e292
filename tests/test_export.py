"""Export of the decoder to the model file: torch decoder vs the C++ core and vs a float64 NumPy pass."""

import json

import numpy as np
import pytest
import torch

from test_training import tiny_config, write_synthetic

from fastspec_train._fsm import model_format
from fastspec_train.export import export_decoder, export_run
from fastspec_train.fsm_reader import read_fsm
from fastspec_train.labels import STANDARD_LABELS, normalise_labels
from fastspec_train.model import Decoder
from fastspec_train.train import train


def random_labels(rng, n):
    cols = []
    for lab in STANDARD_LABELS:
        if lab.scaling == "log10":
            cols.append(10 ** rng.uniform(np.log10(lab.min), np.log10(lab.max), n))
        else:
            cols.append(rng.uniform(lab.min, lab.max, n))
    return np.column_stack(cols)


def trained_like_decoder(seed=0, latent=5, widths=(24, 48), n_pixels=19000):
    """A decoder with random weights scaled like a trained one (outputs spread over the sigmoid)."""
    torch.manual_seed(seed)
    dec = Decoder(latent, 6, list(widths), n_pixels, 1.05, 0.0)
    with torch.no_grad():
        for layer in dec.layers:
            layer.weight.mul_(2.0)
            layer.bias.normal_(0, 0.3)
    return dec.eval()


def torch_flux(dec, labels, z, dtype=torch.float32):
    d = Decoder(dec.latent, 6, [l.out_features for l in dec.layers[:-1]], dec.layers[-1].out_features,
                dec.output_scale, dec.output_offset).to(dtype)
    d.load_state_dict(dec.state_dict())
    with torch.no_grad():
        y = normalise_labels(torch.from_numpy(labels)).to(dtype)
        return d(torch.from_numpy(z).to(dtype), y).double().numpy()


def test_export_matches_float64_numpy_forward(tmp_path):
    rng = np.random.default_rng()
    dec = trained_like_decoder(seed=int(rng.integers(1 << 30)))
    path = export_decoder(dec, tmp_path / "m.fsm", provenance={"purpose": "test"})
    m = read_fsm(path)
    assert m.latent_dim == 5 and m.n_pixels == 19000 and m.output_scale == 1.05 and m.weight_dtype == 1
    assert [lab["name"] for lab in m.labels] == [lab.name for lab in STANDARD_LABELS]
    labels = random_labels(rng, 7)
    z = rng.normal(size=(7, 5)).astype(np.float32)
    ref64 = torch_flux(dec, labels, z, torch.float64)  # same f32 weights, float64 arithmetic
    np.testing.assert_allclose(m.forward(labels, z), ref64, rtol=1e-6, atol=1e-7)  # labels normalised in f32 by torch
    got32 = torch_flux(dec, labels, z)
    assert np.max(np.abs(got32 - ref64) / np.abs(ref64)) < 1e-5
    for key in ("git_revision", "created", "torch_version", "broadening", "purpose"):
        assert key in m.provenance


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_reduced_precision_weights_are_the_quantised_ones(tmp_path, dtype):
    dec = trained_like_decoder(seed=3)
    m = read_fsm(export_decoder(dec, tmp_path / f"m_{dtype}.fsm", weight_dtype=dtype))
    mf = model_format()
    for (w, b, _), layer in zip(m.layers, dec.layers):
        np.testing.assert_array_equal(w, mf.quantize(layer.weight.detach().numpy(), dtype).astype(np.float64))
        np.testing.assert_array_equal(b, layer.bias.detach().numpy().astype(np.float64))


def test_torch_decoder_and_cpp_core_agree(tmp_path):
    """The acceptance check of the export: the C++ core on the exported f32 file vs the torch decoder."""
    from fastspec import _core

    rng = np.random.default_rng()
    dec = trained_like_decoder(seed=int(rng.integers(1 << 30)))
    path = export_decoder(dec, tmp_path / "m.fsm")
    core = _core.Decoder(_core.Model.load(str(path)), threads=1)
    labels = np.ascontiguousarray(random_labels(rng, 9))
    z = np.ascontiguousarray(rng.normal(size=(9, 5)).astype(np.float32))
    ref = torch_flux(dec, labels, z, torch.float64)
    for zz, r in ((z, ref), (None, torch_flux(dec, labels, np.zeros_like(z), torch.float64))):
        out = np.full((9, 19000), np.nan, dtype=np.float32)  # poisoned: every value must be written
        core.forward(labels, z=zz, clip=False, out=out)
        assert np.isfinite(out).all()
        rel = np.max(np.abs(out - r) / np.abs(r))
        print(f"max relative |core - torch| = {rel:.2e}")
        assert rel <= 1e-5


def test_export_run_provenance(tmp_path):
    data = tmp_path / "syn.h5"
    write_synthetic(data, n=60)
    run = tmp_path / "run"
    train(tiny_config(max_epochs=1), data, run, quiet=True)
    m = read_fsm(export_run(run, tmp_path / "run.fsm", weight_dtype="f16"))
    p = m.provenance
    assert p["training_data"]["path"] == str(data) and len(p["training_data"]["sha256"]) == 64
    assert p["epochs"] == 1 and p["config"]["name"] == "tiny" and p["val_reconstruction_mse"] > 0
    assert p["split"]["split_seed"] == tiny_config().data.split_seed
    assert m.weight_dtype == 2 and m.n_pixels == 1500 and m.wavelength_start == 4450.0
    json.dumps(p)

"""Export of the decoder to the model file: torch decoder vs the C++ core and vs a float64 NumPy pass."""

import json

import numpy as np
import pytest
import torch

from test_training import tiny_config, write_synthetic

from test_core import reference_forward

from fastspec import _core
from fastspec import model_format as mf
from fastspec_train.export import export_decoder, export_run
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


def read_model(path):
    """The exported file as the C++ core reads it: (model, its layers as model_format.Layer, provenance)."""
    m = _core.Model.load(str(path))
    layers = [mf.Layer(w, b, info["activation"]) for (w, b), info in zip(m.weights(), m.layers)]
    return m, layers, json.loads(m.provenance)


def torch_flux(dec, labels, z, dtype=torch.float32):
    d = Decoder(dec.latent, 6, [l.out_features for l in dec.layers[:-1]], dec.layers[-1].out_features,
                dec.output_scale, dec.output_offset).to(dtype)
    d.load_state_dict(dec.state_dict())
    with torch.no_grad():
        y = normalise_labels(torch.from_numpy(labels)).to(dtype)
        return d(torch.from_numpy(z).to(dtype), y).double().numpy()


def test_export_matches_float64_numpy_forward(tmp_path, test_seed):
    rng = np.random.default_rng(test_seed)
    dec = trained_like_decoder(seed=int(rng.integers(1 << 30)))
    path = export_decoder(dec, tmp_path / "m.fsm", provenance={"purpose": "test"})
    m, layers, provenance = read_model(path)
    assert m.latent_dim == 5 and m.n_pixels == 19000 and m.output_scale == 1.05 and m.weight_dtype == "f32"
    assert [lab["name"] for lab in m.labels] == [lab.name for lab in STANDARD_LABELS]
    labels = random_labels(rng, 7)
    z = rng.normal(size=(7, 5)).astype(np.float32)
    ref64 = torch_flux(dec, labels, z, torch.float64)  # same f32 weights, float64 arithmetic
    ref_file = reference_forward(layers, labels, z, latent_dim=5, output_scale=m.output_scale, output_offset=m.output_offset)
    rel = float(np.max(np.abs(ref_file - ref64) / np.abs(ref64)))
    print(f"max relative |file forward - torch float64| = {rel:.2e}")
    # Measured 2.5e-8 .. 7.0e-8 (6 seeds; labels normalised in f32 by torch); bound 2e-7 (was rtol 1e-6).
    assert rel <= 2e-7
    for key in ("git_revision", "created", "torch_version", "broadening", "purpose"):
        assert key in provenance


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_reduced_precision_weights_are_the_quantised_ones(tmp_path, dtype):
    dec = trained_like_decoder(seed=3)
    m, layers, _ = read_model(export_decoder(dec, tmp_path / f"m_{dtype}.fsm", weight_dtype=dtype))
    assert m.weight_dtype == dtype
    for stored, layer in zip(layers, dec.layers):
        np.testing.assert_array_equal(stored.weight, mf.quantize(layer.weight.detach().numpy(), dtype))
        np.testing.assert_array_equal(stored.bias, layer.bias.detach().numpy())


def test_torch_decoder_and_cpp_core_agree(tmp_path, test_seed):
    """The acceptance check of the export: the C++ core on the exported f32 file vs the torch decoder."""
    rng = np.random.default_rng(test_seed)
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
        # Measured 3.3e-7 .. 9.8e-7 (9 seeds: float32 core vs float64 torch); bound 3e-6 (was 1e-5).
        assert rel <= 3e-6


def test_export_run_provenance(tmp_path):
    data = tmp_path / "syn.h5"
    write_synthetic(data, n=60)
    run = tmp_path / "run"
    train(tiny_config(max_epochs=1), data, run, quiet=True)
    m, _, p = read_model(export_run(run, tmp_path / "run.fsm", weight_dtype="f16"))
    assert p["training_data"]["path"] == str(data) and len(p["training_data"]["sha256"]) == 64
    assert p["epochs"] == 1 and p["config"]["name"] == "tiny" and p["val_reconstruction_mse"] > 0
    assert p["split"]["split_seed"] == tiny_config().data.split_seed
    assert m.weight_dtype == "f16" and m.n_pixels == 1500 and m.wavelength_start == 4450.0
    json.dumps(p)


def test_provenance_names_the_training_data_from_any_folder(tmp_path, monkeypatch, capsys):
    """Trained and exported with a relative --data, the model still finds its data from another folder (the path in
    the provenance is absolute, the one given kept beside it); a file no longer there is named, with --data."""
    from fastspec_train.cli import main

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    write_synthetic(tmp_path / "work" / "syn.h5", n=60, n_pixels=800)
    train(tiny_config(max_epochs=1), "syn.h5", "run", quiet=True)
    model = export_run("run", tmp_path / "run.fsm")
    p = read_model(model)[2]["training_data"]
    assert p["path"] == str(tmp_path / "work" / "syn.h5") and p["path_as_given"] == "syn.h5"
    monkeypatch.chdir(tmp_path)
    assert main(["testset", "--model", str(model), "--out", "t.h5", "--draws", "1"]) == 0
    (tmp_path / "work" / "syn.h5").rename(tmp_path / "moved.h5")
    assert main(["testset", "--model", str(model), "--out", "t.h5", "--draws", "1"]) == 1
    err = capsys.readouterr().err
    assert f"was trained on {tmp_path / 'work' / 'syn.h5'}" in err and "--data" in err, err
    assert main(["testset", "--model", str(model), "--out", "t.h5", "--draws", "1", "--data", "moved.h5"]) == 0


def test_accuracy_and_testset_use_only_held_out_stars(tmp_path):
    import h5py

    from fastspec_train.accuracy import accuracy_report, write_testset
    from fastspec_train.data import SpectraFile, split_indices

    data = tmp_path / "syn.h5"
    write_synthetic(data, n=80)
    train(tiny_config(max_epochs=1), data, tmp_path / "run", quiet=True)
    model = export_run(tmp_path / "run", tmp_path / "run.fsm")
    split = tiny_config().data
    expected = split_indices(SpectraFile(data).labels, split.val_fraction, split.test_fraction, split.split_seed)["test"]

    # compare= against ANOTHER model (the same run exported in bf16): the difference must be seen, and small.
    other = export_run(tmp_path / "run", tmp_path / "run_bf16.fsm", weight_dtype="bf16")
    report = accuracy_report(model, data, tmp_path / "acc", draws=3, seed=5, compare=other)
    assert report["n_test_stars"] == len(expected) > 0 and report["backend"] == "fastspec._core"
    assert 0 < report["overall"]["median_abs_dF"] < 1
    c = report["compare"]
    print("f32 vs bf16 export:", c["max_abs_diff"], c["median_abs_diff"])
    # measured max 1.2e-4 (bf16 rounding of a 1-epoch model); bound 6e-4
    assert c["model"] == str(other) and 0 < c["max_abs_diff"] < 6e-4 and c["median_abs_diff"] > 0
    assert c["accuracy"]["median_abs_dF"] != report["overall"]["median_abs_dF"]
    assert c["accuracy"]["median_abs_dF"] == pytest.approx(report["overall"]["median_abs_dF"], rel=0.2)
    assert (tmp_path / "acc" / "accuracy.md").read_text().count("| all |") == 1

    testset = write_testset(model, data, tmp_path / "test.h5", draws=3, seed=5)
    with h5py.File(testset) as f:
        assert sorted(set(f["source_rows"][:].tolist())) == sorted(expected.tolist())
        assert f["flux"].shape == (3 * len(expected), 1500) and list(f["labels"].attrs["names"]) == [
            lab.name for lab in STANDARD_LABELS]
        flux, labels = f["flux"][:], f["labels"][:]
    # The model's error on the written spectra is the one the report gives (on the pixels beyond the report's edge:
    # on this 75 Å grid the widest kernel's reach, 16.3 Å = 326 pixels, since 30 Å would keep a fifth of it).
    pred = _core.Decoder(_core.Model.load(str(model))).forward(np.ascontiguousarray(labels))
    assert report["edge_angstrom"] == pytest.approx(16.3)
    assert np.isclose(np.median(np.abs(pred - flux)[:, 326:-326]), report["overall"]["median_abs_dF"], rtol=1e-3)


def test_accuracy_edge_follows_the_broadening_and_a_short_grid_is_refused(tmp_path, capsys):
    """The edge accuracy leaves out: 30 Å on the standard grid, the widest kernel's reach (v sin i 300 km/s then R
    1000 to 6σ at the red end) on a red grid, where it is more, and on a short one; a 20 Å grid, shorter than twice
    the reach, is refused by name (it used to give NaN statistics and exit 0); --edge measures it anyway."""
    from types import SimpleNamespace

    from fastspec_train.accuracy import broadening_reach, default_edge
    from fastspec_train.cli import main

    def grid(start, n):
        return SimpleNamespace(path="g.h5", wavelength_start=start, wavelength_step=0.05, n_pixels=n)

    assert default_edge(grid(4450.0, 19000)) == 30.0
    assert broadening_reach(grid(4450.0, 19000)) == pytest.approx(5400 * 300 / 299792.458 + 6 * 5400 / 2354.8, abs=0.3)
    assert default_edge(grid(8500.0, 19000)) == broadening_reach(grid(8500.0, 19000)) > 30.0
    assert default_edge(grid(4450.0, 1200)) == broadening_reach(grid(4450.0, 1200)) < 30.0

    data = tmp_path / "short.h5"
    write_synthetic(data, n=80, n_pixels=400)  # 4450-4470 Å
    train(tiny_config(max_epochs=1), data, tmp_path / "run", quiet=True)
    model = export_run(tmp_path / "run", tmp_path / "run.fsm")
    assert main(["accuracy", "--model", str(model), "--out", str(tmp_path / "acc"), "--draws", "1"]) == 1
    err = capsys.readouterr().err
    assert "the grid is 19.95 Å long" in err and "longer than 32.2 Å" in err and "--edge" in err, err
    assert not (tmp_path / "acc" / "accuracy.json").exists()
    assert main(["accuracy", "--model", str(model), "--out", str(tmp_path / "acc"), "--draws", "1", "--edge", "5"]) == 0
    report = json.loads((tmp_path / "acc" / "accuracy.json").read_text())
    assert report["edge_angstrom"] == 5.0 and 0 < report["overall"]["median_abs_dF"] < 1


def test_label_systematics_trim_a_wavelength_margin(tmp_path, monkeypatch):
    """The label-systematics fits leave out a margin in Å (the fastest rotation plus the RV bound at the red end),
    whatever the grid step: on a 0.1 Å grid 53 pixels (5.29 Å) at each end (it was 120 pixels whatever the step, 12 Å here)."""
    from types import SimpleNamespace

    import h5py

    import fastspec
    from fastspec_train.export import SYSTEMATICS_RV_BOUNDS, measure_label_systematics, systematics_margin

    assert systematics_margin(5400.0) == pytest.approx(5400.0 * (300.0 + 50.0) / 299792.458)  # 6.30 Å
    data = tmp_path / "coarse.h5"
    write_synthetic(data, n=120, n_pixels=800, seed=0)
    with h5py.File(data, "a") as f:
        f.attrs["wavelength_step"] = 0.1  # 4450-4529.9 Å
    train(tiny_config(max_epochs=1), data, tmp_path / "run", quiet=True)
    model = export_run(tmp_path / "run", tmp_path / "run.fsm")
    seen = []

    def fake_fit(wl, flux, error, decoder, rv_bounds, **kw):
        seen.append((wl[0], wl[-1], flux.size, rv_bounds))
        return SimpleNamespace(labels=dict(teff=6000.0, logg=4.0, vsini=10.0, mh=0.0, vmic=1.0, resolution=20000.0))

    monkeypatch.setattr(fastspec, "fit", fake_fit)
    out = measure_label_systematics(model)
    margin = systematics_margin(4529.9)
    assert out["n_stars"] == len(seen) >= 10 and out["margin_angstrom"] == pytest.approx(margin, abs=1e-3)
    first, last, n, rv = seen[0]
    assert n == 800 - 2 * 53 and rv == SYSTEMATICS_RV_BOUNDS
    assert first == pytest.approx(4450.0 + 5.3) and last == pytest.approx(4529.9 - 5.3) and 0 < 5.3 - margin < 0.1


def test_accuracy_against_the_fine_mesh_reference(tmp_path):
    """A pixel-mean file with a fine mesh: the truth is the fine mesh through the float64 reference, the perfect
    decoder (the file's pixels through the stage) is scored apart; a point-sample file gives the consistency truth;
    a model is refused data of the other sampling."""
    import h5py

    from fastspec_train.accuracy import TRUTH_OPERATOR, TRUTH_REFERENCE, accuracy_report, write_testset
    from fastspec_train.grid import reference

    data = tmp_path / "fine.h5"
    lab, _ = write_synthetic(data, n=60, n_pixels=1500)
    wave = 4450.0 + 0.05 * np.arange(1500)
    fine_wave = 4449.975 - 0.5 + 0.005 * (0.5 + np.arange(15000 + 200))
    rng = np.random.default_rng(3)
    centres, widths = rng.uniform(4455.0, 4520.0, 30), rng.uniform(0.02, 0.3, 30)  # some narrower than a pixel
    fine = np.ones((len(lab), fine_wave.size))
    for c, w in zip(centres, widths):
        fine -= (0.2 + 0.1 * np.tanh((lab[:, :1] - 7000) / 2000)) * np.exp(-0.5 * ((fine_wave - c) / w) ** 2)
    with h5py.File(data, "a") as f:
        f["flux"][...] = reference.pixel_means(fine_wave, fine, wave, 0.05).astype(np.float32)
        f["flux_fine"] = fine.astype(np.float32)
        f.attrs.update(sampling="pixel_mean", fine_wavelength_start=fine_wave[0], fine_wavelength_step=0.005)
    cfg = tiny_config(max_epochs=1)
    cfg.model.target = "intrinsic"
    train(cfg, data, tmp_path / "run", quiet=True)
    model = export_run(tmp_path / "run", tmp_path / "run.fsm")
    assert _core.Model.load(str(model)).format_version == 3
    report = accuracy_report(model, data, tmp_path / "acc", draws=2, seed=5)
    assert report["truth"] == TRUTH_REFERENCE
    floor, err = report["perfect_decoder"]["overall"]["median_abs_dF"], report["overall"]["median_abs_dF"]
    assert 0 < floor < 1e-3 and floor < err  # a 1-epoch network errs far more than the operator
    assert "perfect decoder" in (tmp_path / "acc" / "accuracy.md").read_text()
    testset = write_testset(model, data, tmp_path / "test.h5", draws=2, seed=5)
    with h5py.File(testset) as f:
        assert f.attrs["truth"] == TRUTH_REFERENCE and f["perfect_decoder"].shape == f["flux"].shape
    # every row of a file the model never saw ("unseen"); refused for the training file and for a copy of it
    import shutil

    with pytest.raises(ValueError, match="was trained on rows of this file"):
        accuracy_report(model, data, tmp_path / "acc_u", draws=1, split="unseen")
    copy = shutil.copy(data, tmp_path / "copy.h5")
    with pytest.raises(ValueError, match="was trained on rows of this file"):
        write_testset(model, copy, tmp_path / "u.h5", draws=1, split="unseen")
    with h5py.File(copy, "a") as f:
        f["flux_fine"][0] *= 0.999  # other bytes: another file, for this test
    report_u = accuracy_report(model, copy, tmp_path / "acc_u", draws=1, split="unseen")
    assert report_u["n_test_stars"] == 60 and report_u["split"] == "unseen"
    point = tmp_path / "point.h5"
    write_synthetic(point, n=60)
    with pytest.raises(ValueError, match="made for pixel_mean spectra but .*point.h5 holds point ones and no fine"):
        accuracy_report(model, point, tmp_path / "acc2", draws=1)
    train(cfg, point, tmp_path / "run2", quiet=True)
    report2 = accuracy_report(export_run(tmp_path / "run2", tmp_path / "run2.fsm"), point, tmp_path / "acc2", draws=1)
    assert report2["truth"] == TRUTH_OPERATOR and "perfect_decoder" not in report2
    # a point-sample model against the fine-mesh reference (how the shipped model is measured): no floor of its kind
    report3 = accuracy_report(tmp_path / "run2.fsm", data, tmp_path / "acc3", draws=1)
    assert report3["truth"] == TRUTH_REFERENCE and "perfect_decoder" not in report3


def test_intrinsic_decoder_exports_with_the_broadening_stage(tmp_path, test_seed):
    """An intrinsic decoder (4 network labels) becomes a version-2 file; the core's flux equals the torch decoder
    followed by training's float64 broadening, for random labels over the full ranges."""
    from fastspec_train.broadening import Broadener

    rng = np.random.default_rng(test_seed)
    torch.manual_seed(int(rng.integers(1 << 30)))
    dec = Decoder(5, 4, [24, 48], 19000, 1.05, 0.0)
    with torch.no_grad():
        for layer in dec.layers:
            layer.weight.mul_(2.0)
            layer.bias.normal_(0, 0.3)
    dec.eval()
    m = _core.Model.load(str(export_decoder(dec, tmp_path / "i.fsm", epsilon=0.6, segments=8)))
    assert (m.format_version, m.n_network_labels, m.layers[0]["in"]) == (2, 4, 9)
    assert m.broadening == {"sampling": "point", "epsilon": 0.6, "segments": 8, "vsini_label": "vsini",
                            "resolution_label": "resolution"}
    # a decoder of pixel means: format version 3 with the pixel-mean stage
    m3 = _core.Model.load(str(export_decoder(dec, tmp_path / "p.fsm", sampling="pixel_mean")))
    assert m3.format_version == 3 and m3.broadening["sampling"] == "pixel_mean"
    labels = random_labels(rng, 6)
    labels[0, 2], labels[1, 5] = 0.0, 115000.0  # the ends of the ranges
    z = rng.normal(size=(6, 5)).astype(np.float32)
    with torch.no_grad():
        intrinsic = dec(torch.from_numpy(z), normalise_labels(torch.from_numpy(labels), "intrinsic")).double()
    br = Broadener(4450.0, 0.05, 19000, dtype=torch.float64)
    ref = br(intrinsic, torch.from_numpy(labels[:, 2]), torch.from_numpy(labels[:, 5])).numpy()
    out = np.full((6, 19000), np.nan, np.float32)  # poisoned: every pixel must be written
    got = _core.Decoder(m).forward(labels, z=z, out=out)
    assert np.abs(got - ref).max() < 2e-6


def test_intrinsic_training_variants_run(tmp_path):
    """The intrinsic target trains (plain, bf16 autocast, line-weighted loss) and exports a version-2 file."""
    data = tmp_path / "syn.h5"
    write_synthetic(data, n=80)
    for name, extra in (("plain", {}), ("bf16", {"autocast": "bf16"}), ("lines", {"line_weight": 4.0})):
        cfg = tiny_config(max_epochs=1, **extra)
        cfg.model.target = "intrinsic"
        out = tmp_path / name
        summary = train(cfg, data, out, quiet=True)
        hist = json.loads((out / "history.json").read_text())
        assert summary["epochs"] == 1 and np.isfinite(hist[0]["val_mse_z0"]) and hist[0]["val_mse_z0"] < 0.05
    m = _core.Model.load(str(export_run(tmp_path / "plain", tmp_path / "plain.fsm")))
    assert m.format_version == 2 and m.n_network_labels == 4 and m.broadening["segments"] == 8

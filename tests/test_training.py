"""Training pipeline (training/fastspec_train): data reader, split, label normalisation, tiny runs, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fastspec import _core
from fastspec_train import config as cfgmod
from fastspec_train.data import FluxSource, SpectraFile, epoch_plan, open_spectra, sha256_file as data_sha, split_indices
from fastspec_train.labels import LABEL_NAMES, STANDARD_LABELS, normalise_labels
from fastspec_train.train import train

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO / "training"), os.environ.get("PYTHONPATH", "")]))
    return env


def write_synthetic(path: Path, n: int = 120, n_pixels: int = 1500, seed: int = 0, names=("teff", "logg", "mh", "vmic")):
    """A small file in the shared layout: absorption lines whose depth follows the labels."""
    rng = np.random.default_rng(seed)
    lab = np.column_stack([rng.uniform(4000, 11000, n), rng.uniform(2, 5, n), rng.uniform(-1.5, 1.5, n), rng.uniform(0, 4, n)])
    x = np.arange(n_pixels)
    centers = rng.uniform(50, n_pixels - 50, 12)
    flux = np.ones((n, n_pixels))
    for c in centers:
        depth = 0.3 + 0.2 * np.tanh((lab[:, 0:1] - 7000) / 3000) * np.sign(c - n_pixels / 2) + 0.1 * lab[:, 2:3] / 1.5
        flux -= depth * np.exp(-0.5 * ((x - c) / (1 + lab[:, 3:4])) ** 2)
    order = [("teff", "logg", "mh", "vmic").index(nm) for nm in names]
    with h5py.File(path, "w") as f:
        f.create_dataset("flux", data=flux.astype(np.float32), chunks=(1, n_pixels))
        d = f.create_dataset("labels", data=lab[:, order])
        d.attrs["names"] = np.array(names, dtype=object)
        f.attrs.update(wavelength_start=4450.0, wavelength_step=0.05, n_pixels=n_pixels, wavelength_medium="air")
    return lab, flux


def tiny_config(**train_kw):
    cfg = cfgmod.load_config("tiny")
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


def test_normalise_labels_matches_the_file_format(rng):
    phys = np.column_stack([rng.uniform(lab.min, lab.max, 50) if lab.scaling == "linear"
                            else 10 ** rng.uniform(np.log10(lab.min), np.log10(lab.max), 50) for lab in STANDARD_LABELS])
    ref = np.empty_like(phys)
    for j, lab in enumerate(STANDARD_LABELS):
        off, scale = lab.normalisation()
        s = np.log10(phys[:, j]) if lab.scaling == "log10" else phys[:, j]
        ref[:, j] = (s - off) / scale
    got = normalise_labels(torch.from_numpy(phys)).double().numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert np.all(np.abs(ref) <= 1 + 1e-12)
    ends = np.array([[lab.min for lab in STANDARD_LABELS], [lab.max for lab in STANDARD_LABELS]])
    np.testing.assert_allclose(normalise_labels(torch.from_numpy(ends)).numpy(), [[-1] * 6, [1] * 6], atol=1e-6)
    assert LABEL_NAMES == ("teff", "logg", "vsini", "mh", "vmic", "resolution")
    with pytest.raises(ValueError, match="shape"):
        normalise_labels(torch.zeros(3, 4))


def test_split_never_leaks_and_is_stable():
    rng = np.random.default_rng(5)
    labels = rng.uniform(0, 1, (500, 4))
    labels = np.concatenate([labels, labels[:60]])  # duplicated stars
    s = split_indices(labels, 0.1, 0.15, seed=3)
    sets = [set(map(int, s[k])) for k in ("train", "val", "test")]
    assert sum(map(len, sets)) == len(labels) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    key = {k: {tuple(labels[i]) for i in s[k]} for k in s}
    assert not (key["train"] & key["val"] or key["train"] & key["test"] or key["val"] & key["test"])
    assert 0.05 < len(s["val"]) / len(labels) < 0.15 and 0.10 < len(s["test"]) / len(labels) < 0.20
    # Same answer again, and independent of the row order and of extra rows (a later file version).
    perm = rng.permutation(len(labels))
    s2 = split_indices(labels[perm], 0.1, 0.15, seed=3)
    assert {tuple(labels[perm][i]) for i in s2["test"]} == key["test"]
    more = np.concatenate([labels, rng.uniform(0, 1, (100, 4))])
    s3 = split_indices(more, 0.1, 0.15, seed=3)
    assert set(map(int, s3["test"])) & set(range(len(labels))) == sets[2]
    assert not np.array_equal(split_indices(labels, 0.1, 0.15, seed=4)["test"], s["test"])


def test_reader_label_columns_and_streaming(tmp_path):
    path = tmp_path / "syn.h5"
    lab, flux = write_synthetic(path, n=40, n_pixels=300, names=("vmic", "teff", "mh", "logg"))
    sf = SpectraFile(path)
    np.testing.assert_array_equal(sf.labels, lab)  # columns reordered to teff, logg, mh, vmic
    rows = np.array([5, 3, 3, 39, 0])
    np.testing.assert_array_equal(sf.read(rows), flux[rows].astype(np.float32))
    mem = FluxSource(sf, np.arange(0, 40, 2), memory_limit_mb=100)
    stream = FluxSource(sf, np.arange(0, 40, 2), memory_limit_mb=0)
    assert mem.in_memory and not stream.in_memory
    local = np.array([7, 1, 1, 19])
    np.testing.assert_array_equal(mem.get(local), stream.get(local))
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_dataset("flux", data=np.ones((2, 10), np.float32))
    with pytest.raises(ValueError, match="labels"):
        SpectraFile(tmp_path / "bad.h5")
    with pytest.raises(FileNotFoundError):
        SpectraFile(tmp_path / "missing.h5")


def test_reader_leaves_out_rows_a_grid_build_has_not_done(tmp_path):
    path = tmp_path / "partial.h5"
    lab, flux = write_synthetic(path, n=12, n_pixels=200)
    done = np.ones(12, bool)
    done[[2, 7, 8]] = False
    with h5py.File(path, "a") as f:
        f["flux"][2] = 0.0  # what an unfinished row holds
        f.create_dataset("done", data=done.astype(np.uint8))
    sf = SpectraFile(path)
    assert sf.n == 9
    np.testing.assert_array_equal(sf.labels, lab[done])
    np.testing.assert_array_equal(sf.read(np.array([8, 0, 2])), flux[done][[8, 0, 2]].astype(np.float32))
    with pytest.raises(IndexError):
        sf.read(np.array([9]))


def test_epoch_plan_is_deterministic_and_covers_the_ranges():
    s = cfgmod.SamplingConfig()
    a = epoch_plan(100, 8, 64, 4, s, seed=1, epoch=3)
    b = epoch_plan(100, 8, 64, 4, s, seed=1, epoch=3)
    c = epoch_plan(100, 8, 64, 4, s, seed=1, epoch=4)
    assert np.array_equal(a.local, b.local) and np.array_equal(a.vsini, b.vsini) and np.array_equal(a.eps, b.eps)
    assert not np.array_equal(a.local, c.local)
    assert a.local.size % 64 == 0 and a.local.size >= 800
    assert np.bincount(a.local[:800], minlength=100).min() >= 1
    assert 0 <= a.vsini.min() and a.vsini.max() <= 300 and 1000 <= a.resolution.min() and a.resolution.max() <= 115000
    assert 0.35 < np.mean(a.vsini < 30) < 0.5  # 30 % low draws + 10 % of the uniform ones


def test_config_presets_and_errors(tmp_path):
    paper = cfgmod.load_config("paper")
    assert paper.model.encoder == [4000, 2000, 1000] and paper.model.latent == 100
    assert paper.model.decoder == [1000, 2000, 4000] and paper.train.batch_size == 512
    assert paper.model.target == "broadened"  # the paper's 6-label CVAE stays reproducible
    default = cfgmod.load_config("default")
    assert default.model.target == "intrinsic" and default.train.max_minutes > 0
    cvae6 = cfgmod.load_config("cvae6")
    assert cvae6.model.target == "broadened" and cvae6.model.decoder == default.model.decoder
    over = cfgmod.with_overrides(default, ["train.autocast=bf16", "model.decoder=[8, 16]", "train.lr=3e-4"])
    assert (over.train.autocast, over.model.decoder, over.train.lr) == ("bf16", [8, 16], 3e-4)
    assert default.train.autocast == "off"  # the original is untouched
    for bad_item, match in (("train.autocast=fp8", "autocast"), ("model.target=both", "target"),
                            ("train.z0_fraction=1.0", "z0_fraction"), ("train.z0_fraction=-0.1", "z0_fraction"),
                            ("nosuch.key=1", "section.key=value"), ("train.lrr=1", "lrr"),
                            ("train.warmup_epochs=-1", "warmup_epochs")):
        with pytest.raises(ValueError, match=match):
            cfgmod.with_overrides(default, [bad_item])
    with pytest.raises(ValueError, match="anneal_minutes"):  # warm-up belongs to the minutes schedule
        cfgmod.with_overrides(cfgmod.load_config("tiny"), ["train.warmup_epochs=2"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nlatnet = 3\n")
    with pytest.raises(ValueError, match="latnet"):
        cfgmod.load_config(bad)
    bad.write_text('[model]\ndecoder_activation = "gelu"\n')
    with pytest.raises(ValueError, match="ReLU"):
        cfgmod.load_config(bad)


def test_z0_rows_skip_the_encoder_and_zero_init_latent():
    """The first n_z0 rows of a batch are the decoder at z = 0 (what ships), the rest the reparameterised CVAE;
    zero_init_latent starts the decoder's weights on z at 0, so sampled z changes nothing at step 0."""
    from fastspec_train.model import CVAE

    mcfg = cfgmod.load_config("default").model
    mcfg.encoder, mcfg.decoder, mcfg.latent = [8], [16, 32], 4
    torch.manual_seed(0)
    model = CVAE(50, 4, mcfg)
    x, y, eps = torch.rand(6, 50), torch.randn(6, 4), torch.randn(6, 4)
    rec, mu, logvar = model(x, y, eps, n_z0=2)
    assert mu.shape == logvar.shape == (4, 4)  # only the sampled rows were encoded
    mu_all, logvar_all = model.encode(x, y)
    z = torch.cat([torch.zeros(2, 4), mu_all[2:] + torch.exp(0.5 * logvar_all[2:]) * eps[2:]])
    torch.testing.assert_close(rec, model.decoder(z, y), rtol=0, atol=0)
    assert mcfg.zero_init_latent and float(model.decoder.layers[0].weight[:, :4].abs().max()) == 0.0
    torch.testing.assert_close(model.decoder(torch.randn(6, 4), y), model.decoder(torch.zeros(6, 4), y))
    mcfg.zero_init_latent = False
    assert float(CVAE(50, 4, mcfg).decoder.layers[0].weight[:, :4].abs().max()) > 0


def test_tiny_training_run_on_synspec(intrinsic_h5, tmp_path):
    """A few hundred real spectra, 12 epochs, tiny widths: about 12 s. The network must learn something: an
    untrained one already predicts the mean spectrum (the output bias starts there), so the validation MSE at
    z = 0 is compared with predicting the training split's mean spectrum, not with a fixed number.
    Measured (seed 7 of the tiny config): val_mse_z0 0.0194 after epoch 1 (above the mean-spectrum MSE 0.0176),
    0.0125 after epoch 12, ratio 0.71 to the mean; bound 0.85, and every epoch must lower it."""
    out = tmp_path / "run"
    summary = train(tiny_config(max_epochs=12, lr=3e-3, patience=50), intrinsic_h5, out, quiet=True)
    assert summary["epochs"] == 12
    hist = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in hist] == list(range(1, 13))
    for h in hist:
        assert all(np.isfinite(h[k]) for k in ("train_loss", "train_mse", "val_mse", "val_mse_z0"))
    sf = SpectraFile(intrinsic_h5)
    cfg = tiny_config().data
    rows = np.arange(cfg.max_spectra)
    sp = split_indices(sf.labels[rows], cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    mean_spectrum = sf.read(rows[sp["train"]]).mean(axis=0)
    baseline = float(((sf.read(rows[sp["val"]]) - mean_spectrum) ** 2).mean())
    z0 = [h["val_mse_z0"] for h in hist]
    print(f"val_mse_z0 by epoch {[round(v, 5) for v in z0]}; predicting the mean spectrum: {baseline:.5f}")
    assert all(b < a for a, b in zip(z0, z0[1:])), z0
    assert z0[-1] < 0.85 * baseline, (z0[-1], baseline)
    for name in ("checkpoint.pt", "best.pt", "loss_curve.png", "train.log", "summary.json"):
        assert (out / name).is_file(), name
    sizes = summary["split_sizes"]
    assert sizes["train"] + sizes["val"] + sizes["test"] == 240


def joined_config(**train_kw):
    """The tiny config on every row (its max_spectra is for one file and refuses extra files)."""
    cfg = tiny_config(**train_kw)
    cfg.data.max_spectra = 0
    return cfg


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_resume_in_a_fresh_process_is_exact(tmp_path):
    data = tmp_path / "syn.h5"
    write_synthetic(data, n=150)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_config(), data, straight, quiet=True)
    train(tiny_config(max_epochs=1), data, split, quiet=True)
    after_one = _weights(split / "checkpoint.pt")
    r = subprocess.run([sys.executable, "-m", "fastspec_train", "train", "--config", "tiny", "--data", str(data),
                        "--out", str(split), "--resume", "--max-epochs", "2"], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in (split / "train.log").read_text()
    a, b = _weights(straight / "checkpoint.pt"), _weights(split / "checkpoint.pt")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-7, worst
    ha = json.loads((straight / "history.json").read_text())
    hb = json.loads((split / "history.json").read_text())
    assert [h["val_mse"] for h in ha] == pytest.approx([h["val_mse"] for h in hb], rel=1e-6)
    assert max(float((after_one[k] - b[k]).abs().max()) for k in b) > 1e-6  # epoch 2 did train


def test_max_minutes_stops_gracefully(tmp_path):
    data = tmp_path / "syn.h5"
    write_synthetic(data, n=80)
    summary = train(tiny_config(max_epochs=50), data, tmp_path / "run", max_minutes=1e-6, quiet=True)
    assert summary["epochs"] == 1 and "max_minutes" in summary["stop_reason"]
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and (tmp_path / "run" / "best.pt").is_file()


def test_beta_steps_and_lr_annealing(tmp_path):
    from fastspec_train.train import beta_at

    t = cfgmod.TrainConfig(beta=1.0, beta_steps=[[5, 10.0], [3, 2.0]])
    assert [beta_at(t, e) for e in (1, 2, 3, 4, 5, 9)] == [1.0, 1.0, 2.0, 2.0, 10.0, 10.0]
    data = tmp_path / "syn.h5"
    write_synthetic(data, n=60)
    cfg = tiny_config(max_epochs=6, anneal_start_epoch=2, anneal_end_epoch=4, beta_steps=[[3, 5.0]],
                      lr_restarts=[[5, 6, 2e-4]], patience=50)
    train(cfg, data, tmp_path / "run", quiet=True)
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["beta"] for h in hist] == [1.0, 1.0, 5.0, 5.0, 5.0, 5.0]
    assert [h["lr"] for h in hist] == pytest.approx([1e-3, 1e-3, 0.5 * (1e-3 + 1e-6), 1e-6, 2e-4, 1e-6])
    with pytest.raises(ValueError, match="anneal"):
        cfgmod.from_dict({"train": {"anneal_start_epoch": 5, "anneal_end_epoch": 3}})


def test_joined_files_read_as_one_and_refuse_another_grid(tmp_path):
    a, b, other = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "other.h5"
    _, fa = write_synthetic(a, n=30, seed=1)
    _, fb = write_synthetic(b, n=20, seed=2)
    write_synthetic(other, n=5, n_pixels=1400)
    joined = open_spectra([a, b])
    assert joined.n == 50 and joined.path == a and joined.paths == [a, b]
    assert np.array_equal(joined.labels, np.concatenate([SpectraFile(a).labels, SpectraFile(b).labels]))
    rows = np.array([49, 3, 30, 29, 3, 41])  # both files, any order, repeats
    want = np.concatenate([fa, fb]).astype(np.float32)[rows]
    assert np.array_equal(joined.read(rows), want)
    with pytest.raises(IndexError):
        joined.read(np.array([50]))
    with pytest.raises(ValueError, match="wavelength grid"):
        open_spectra([a, other])
    with h5py.File(other, "a") as f:
        f.attrs["broadening"] = "ROTIN: rotation (vsini label ...), then a Gaussian"
    with pytest.raises(ValueError, match="broadened spectra"):
        SpectraFile(other)
    assert isinstance(open_spectra(a), SpectraFile)


def test_pixel_means_and_point_samples_are_not_mixed(tmp_path):
    """Files say what their pixels hold (attr sampling; none = point samples, the shared v1/v2 sets): joining both
    kinds, or an unknown kind, is refused by name; a fine mesh must contain the grid's pixels."""
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_synthetic(a, n=10, seed=1)
    write_synthetic(b, n=10, seed=2)
    assert SpectraFile(a).sampling == "point" and SpectraFile(a).fine_wavelength is None
    with h5py.File(b, "a") as f:
        f.attrs["sampling"] = "pixel_mean"
    assert open_spectra([b]).sampling == "pixel_mean"
    with pytest.raises(ValueError, match=r"b.h5 holds pixel_mean spectra but .*a.h5 holds point ones"):
        open_spectra([a, b])
    with h5py.File(b, "a") as f:
        f.attrs["sampling"] = "integrated"
    with pytest.raises(ValueError, match="attr sampling = 'integrated' is unknown"):
        SpectraFile(b)
    with h5py.File(b, "a") as f:
        f.attrs["sampling"] = "pixel_mean"
        n, npix = f["flux"].shape
        f["flux_fine"] = np.ones((n, 10 * npix + 20), np.float32)
        f.attrs["fine_wavelength_step"] = f.attrs["wavelength_step"] / 10
        f.attrs["fine_wavelength_start"] = f.attrs["wavelength_start"] - f.attrs["wavelength_step"] * 1.5 + 0.0025
    sf = SpectraFile(b)
    assert sf.read_fine(np.array([3, 1])).shape == (2, 10 * npix + 20)
    sf.close()
    with h5py.File(b, "a") as f:
        f.attrs["fine_wavelength_start"] += 1.0
    with pytest.raises(ValueError, match="does not contain the output grid's pixels"):
        SpectraFile(b)
    with pytest.raises(ValueError, match="has no fine mesh"):
        SpectraFile(a).read_fine(np.array([0]))


def test_from_fine_writes_pixel_means(tmp_path):
    """fastspec-grid from-fine: pixel means of a fine mesh (a line narrower than a pixel keeps its area), the mesh
    kept as flux_fine, written complete; a mesh that does not cover the grid is refused and nothing is written."""
    from fastspec_train.grid import cli as grid_cli

    fw = 4999.0 + 0.005 * np.arange(1000)  # 4999.000 .. 5003.995
    line = 0.6 * np.exp(-0.5 * ((fw - 5001.0123) / 0.006) ** 2)
    src = tmp_path / "fine.h5"
    with h5py.File(src, "w") as f:
        f["flux"] = np.stack([1 - line, np.ones_like(fw)]).astype(np.float32)
        f["labels"] = np.array([[5000.0, 4.0, 0.0, 1.0], [6000.0, 4.0, 0.0, 1.0]])
        f["labels"].attrs["names"] = np.array(["teff", "logg", "mh", "vmic"], dtype=object)
        f.attrs.update(wavelength_start=4999.0, wavelength_step=0.005)
    out = tmp_path / "pix.h5"
    assert grid_cli.main(["from-fine", str(src), "--out", str(out), "--wavelength", "5000:5002"]) == 0
    sf = SpectraFile(out)
    assert sf.sampling == "pixel_mean" and sf.n == 2 and sf.n_pixels == 41
    flux = sf.read(np.array([0])).astype(np.float64)[0]
    assert 0.05 * np.sum(1 - flux) == pytest.approx(np.trapezoid(line, fw), rel=1e-4)
    np.testing.assert_allclose(sf.read_fine(np.array([1])), 1.0, atol=1e-4)
    bad = tmp_path / "bad.h5"
    assert grid_cli.main(["from-fine", str(src), "--out", str(bad), "--wavelength", "4990:5002"]) == 2
    assert not bad.exists() and not bad.with_name("bad.h5.partial").exists()


def test_second_stage_starts_from_earlier_weights_on_more_files(tmp_path):
    """init_from loads the weights (with lr = 0 they stay exactly those), extra files add rows to every split,
    warm-up scales the first epochs' LR, and the export records every file."""
    from fastspec_train.export import export_run

    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_synthetic(a, n=80, seed=1)
    write_synthetic(b, n=60, seed=2)
    train(tiny_config(max_epochs=2), a, tmp_path / "stage1", quiet=True)
    stage1 = _weights(tmp_path / "stage1" / "best.pt")

    frozen = joined_config(max_epochs=1, lr=0.0, min_lr=0.0, scheduler="none", init_from=str(tmp_path / "stage1" / "best.pt"))
    summary = train(frozen, [a, b], tmp_path / "frozen", quiet=True)
    kept = _weights(tmp_path / "frozen" / "checkpoint.pt")
    assert all(torch.equal(stage1[k], kept[k]) for k in stage1)
    assert sum(summary["split_sizes"].values()) == 140
    joined = open_spectra([a, b])
    cfg = tiny_config().data
    for name, rows in split_indices(joined.labels, cfg.val_fraction, cfg.test_fraction, cfg.split_seed).items():
        assert (rows < 80).any() and (rows >= 80).any(), name  # both files' rows in every split
    with pytest.raises(ValueError, match="same --data files"):  # a resume on other data is refused
        train(frozen, [a], tmp_path / "frozen", resume=True, quiet=True)
    with pytest.raises(ValueError, match="max_spectra"):
        train(tiny_config(max_epochs=1, init_from=""), [a, b], tmp_path / "capped", quiet=True)
    assert [e["path"] for e in summary["extra_data"]] == [str(b)] and len(summary["extra_data"][0]["sha256"]) == 64
    assert "extra data" in (tmp_path / "frozen" / "train.log").read_text()
    train(joined_config(max_epochs=1, lr=0.0, min_lr=0.0, scheduler="none"), [a, b], tmp_path / "random", quiet=True)
    fresh = _weights(tmp_path / "random" / "checkpoint.pt")
    assert any(not torch.equal(stage1[k], fresh[k]) for k in stage1)

    warm = joined_config(max_epochs=3, lr=1e-3, min_lr=0.0, anneal_minutes=1e6, warmup_epochs=2, patience=50,
                       init_from=str(tmp_path / "stage1" / "best.pt"))
    train(warm, [a, b], tmp_path / "stage2", quiet=True)
    lrs = [h["lr"] for h in json.loads((tmp_path / "stage2" / "history.json").read_text())]
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3], rel=1e-4)
    prov = json.loads(_core.Model.load(str(export_run(tmp_path / "stage2", tmp_path / "stage2.fsm"))).provenance)
    assert [e["path"] for e in prov["extra_training_data"]] == [str(b)]
    assert prov["extra_training_data"][0]["n_spectra"] == 60 and prov["training_data"]["path"] == str(a)
    primary = split_indices(SpectraFile(a).labels, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    assert prov["split"]["sizes"] == {k: int(v.size) for k, v in primary.items()}  # the split accuracy recomputes
    assert sum(prov["split"]["sizes_with_extra_data"].values()) == 140
    assert prov["init_from"]["sha256"] == data_sha(tmp_path / "stage1" / "best.pt")


def test_devpack_round_trip_keeps_test_rows_home(tmp_path):
    """The GPU script's packed data: flux within one quantum (1.7e-5), labels exact, no test-split row."""
    from conftest import shared_file
    from fastspec_train.devpack import QUANTUM, pack, unpack
    from fastspec_train.data import SpectraFile, split_indices

    src = shared_file("synspec_intrinsic_v2.h5")
    info = pack(src, tmp_path / "p.fsp", max_mb=2.0)
    assert 0 < info["spectra"] < info["of_train_val"] and info["bytes"] <= 2e6
    out = SpectraFile(unpack(tmp_path / "p.fsp", tmp_path / "p.h5"))
    orig = SpectraFile(src)
    rows = [int(np.flatnonzero((orig.labels == lab).all(axis=1))[0]) for lab in out.labels]
    test = set(split_indices(orig.labels, 0.1, 0.1, 20261125)["test"].tolist())
    assert not test & set(rows)
    assert np.abs(out.read(np.arange(out.n)) - orig.read(np.array(sorted(rows)))[np.argsort(np.argsort(rows))]).max() <= 0.5 / QUANTUM + 1e-7


def test_a_stage_can_start_from_a_model_file(tmp_path):
    """init_from = a .fsm (a shipped model whose checkpoint is gone): the decoder starts at the file's weights
    (lr 0 keeps them bit for bit), the encoder fresh; a file of
    another architecture or grid is refused by name."""
    from fastspec_train.export import export_run

    a = tmp_path / "a.h5"
    write_synthetic(a, n=80, seed=3)
    train(tiny_config(max_epochs=1), a, tmp_path / "s1", quiet=True)
    fsm = export_run(tmp_path / "s1", tmp_path / "s1.fsm", weight_dtype="f32")
    frozen = joined_config(max_epochs=1, lr=0.0, min_lr=0.0, scheduler="none", init_from=str(fsm))
    train(frozen, a, tmp_path / "s2", quiet=True)
    kept = _weights(tmp_path / "s2" / "checkpoint.pt")
    for k, (w, b) in enumerate(_core.Model.load(str(fsm)).weights()):
        assert np.array_equal(kept[f"decoder.layers.{k}.weight"].numpy(), w)
        assert np.array_equal(kept[f"decoder.layers.{k}.bias"].numpy(), b)
    assert "weights from" in (tmp_path / "s2" / "train.log").read_text()

    other = joined_config(max_epochs=1, init_from=str(fsm))
    other.model.decoder = [*other.model.decoder[:-1], other.model.decoder[-1] * 2]
    with pytest.raises(ValueError, match="s1.fsm: cannot start from this model file: layers"):
        train(other, a, tmp_path / "s3", quiet=True)


def _boxed(path, box, **kw):
    write_synthetic(path, **kw)
    with h5py.File(path, "a") as f:
        f.attrs["label_box"] = json.dumps(box)


def test_a_warm_start_with_a_label_box_needs_the_same_network_ranges(tmp_path):
    """train.init_from onto data with a label box (refused outright before): a start whose network was normalised in
    the same ranges starts from its weights (lr 0 keeps them), whether a run's checkpoint or its .fsm; an intrinsic
    network's start may differ in v sin i and R (the stage's, not the network's); other network ranges, and a
    checkpoint that does not record its box, are refused by name."""
    from fastspec_train.export import export_run

    box = {"teff": [3500.0, 11000.0], "logg": [2.0, 5.5]}
    a, b, c = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"
    _boxed(a, box, n=80, seed=5)
    _boxed(b, {**box, "vsini": [0.0, 50.0], "resolution": [20000.0, 115000.0]}, n=80, seed=6)
    _boxed(c, {**box, "teff": [3500.0, 12000.0]}, n=80, seed=7)

    def config(**kw):
        cfg = joined_config(max_epochs=1, **kw)
        cfg.model.target = "intrinsic"
        return cfg

    train(config(), a, tmp_path / "s1", quiet=True)
    fsm = export_run(tmp_path / "s1", tmp_path / "s1.fsm", weight_dtype="f32")
    best = tmp_path / "s1" / "best.pt"
    for start, data in ((best, a), (fsm, a), (fsm, b), (best, b)):
        train(config(lr=0.0, min_lr=0.0, scheduler="none", init_from=str(start)), data, tmp_path / "s2", quiet=True)
        kept, ref = _weights(tmp_path / "s2" / "checkpoint.pt"), _weights(best)
        assert all(torch.equal(kept[k], ref[k]) for k in ref if k.startswith("decoder."))
        for f in (tmp_path / "s2").iterdir():
            f.unlink()
    with pytest.raises(ValueError, match=r"s1.fsm: cannot start from this model file: network label ranges .*3500.0, 11000.0"):
        train(config(init_from=str(fsm)), c, tmp_path / "s3", quiet=True)
    with pytest.raises(ValueError, match=r"best.pt: its network was normalised in .*11000.0.* the data's label box gives .*12000.0"):
        train(config(init_from=str(best)), c, tmp_path / "s3", quiet=True)
    old = torch.load(best, weights_only=False)
    del old["label_box"]  # as checkpoints were written before they recorded it
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="does not record the label box"):
        train(config(init_from=str(tmp_path / "old.pt")), a, tmp_path / "s3", quiet=True)


def test_the_emulator_error_of_a_boxed_model_is_measured_inside_its_box(tmp_path):
    """A model whose box narrows v sin i and R: the emulator error's nodes are the box's ends and the standard nodes
    inside it (before: the nodes up to 300 km/s and down to R 1000, which the model refuses, so export stopped with
    'resolution = 1000 is outside [20000, 115000]'); the paper's box keeps the standard nodes."""
    from fastspec_train.export import ERROR_RESOLUTION_NODES, ERROR_VSINI_NODES, error_nodes, export_run
    from fastspec_train.accuracy import PAPER_BOX

    assert error_nodes(PAPER_BOX) == (ERROR_VSINI_NODES, ERROR_RESOLUTION_NODES)
    a = tmp_path / "a.h5"
    _boxed(a, {"vsini": [0.0, 50.0], "resolution": [20000.0, 115000.0]}, n=80, n_pixels=400, seed=5)
    cfg = tiny_config(max_epochs=1)
    cfg.sampling.vsini_max, cfg.sampling.resolution_min = 50.0, 20000.0
    train(cfg, a, tmp_path / "run", quiet=True)
    with pytest.warns(UserWarning):  # few validation stars
        path = export_run(tmp_path / "run", tmp_path / "run.fsm", emulator_error=True)
    err = json.loads(_core.Model.load(str(path)).provenance)["emulator_error"]
    assert err["vsini_nodes"] == [0.0, 5.0, 15.0, 40.0, 50.0]
    assert err["resolution_nodes"] == [20000.0, 30000.0, 60000.0, 115000.0]
    assert np.isfinite(err["median_rms"]) and err["median_rms"] > 0


def test_export_measures_the_emulator_error_on_a_subset(tmp_path):
    """--emulator-error-stars N: the block is measured on N evenly spaced validation stars (the provenance says N),
    one RMS spectrum per (v sin i, R) node, finite; N < 1 refused."""
    from fastspec_train.export import export_run, measure_emulator_error

    a = tmp_path / "a.h5"
    write_synthetic(a, n=120, seed=4)
    train(tiny_config(max_epochs=1), a, tmp_path / "s1", quiet=True)
    path = export_run(tmp_path / "s1", tmp_path / "s1.fsm", emulator_error=True, emulator_error_stars=3)
    m = _core.Model.load(str(path))
    prov = json.loads(m.provenance)
    assert prov["emulator_error"]["n_stars"] == 3 and m.has_emulator_error
    assert np.isfinite(m.emulator_error(5.0, 20000.0)).all() and m.emulator_error(5.0, 20000.0).max() > 0
    with pytest.raises(ValueError, match="max_stars must be >= 1"):
        measure_emulator_error(path, max_stars=0)


def test_export_from_one_validation_star_warns_and_claims_no_spread(tmp_path):
    """A 20 Å grid of 20 stars has 1 validation star: the emulator error (an RMS over it) is kept with a warning,
    the label systematics (a MAD, exactly 0 from one star) are left out; both say n in the provenance."""
    from fastspec_train.export import MIN_SPREAD_STARS, FewStarsWarning, export_run

    a = tmp_path / "a.h5"
    write_synthetic(a, n=20, n_pixels=400, seed=3)
    train(tiny_config(max_epochs=1), a, tmp_path / "s1", quiet=True)
    with pytest.warns(FewStarsWarning) as caught:
        path = export_run(tmp_path / "s1", tmp_path / "s1.fsm", emulator_error=True)
    assert {str(w.message).split(" from ")[0] for w in caught} == {
        "the emulator error (an RMS per pixel) is measured",
        "the label systematics are left out (fit adds none): they would be measured"}
    prov = json.loads(_core.Model.load(str(path)).provenance)
    assert prov["split"]["sizes"]["val"] == 1 < MIN_SPREAD_STARS
    assert prov["emulator_error"]["n_stars"] == 1 and "fewer than 10" in prov["emulator_error"]["warning"]
    systematics = prov["label_systematics"]
    assert systematics["n_stars"] == 1 and "fewer than 10" in systematics["warning"]
    assert not {"teff", "logg", "vsini", "mh", "vmic", "resolution_dex"} & set(systematics)


def test_a_data_file_label_box_normalises_training_and_goes_into_the_model(tmp_path):
    """A data file with its own label_box: training maps that box's ends to ±1, the model file carries it (so the
    core, fit, evaluate and the CLI check labels against it), accuracy draws inside it; (v sin i, R) draws outside
    it, labels outside it and a warm start are refused."""
    import h5py

    from fastspec import Decoder
    from fastspec_train.accuracy import accuracy_report
    from fastspec_train.export import export_run, load_run_decoder

    box = {"teff": [3500.0, 12000.0], "vsini": [0.0, 200.0], "vmic": [0.0, 5.0], "resolution": [2000.0, 60000.0]}
    ends = np.array([[3500.0, 2.0, 0.0, -1.5, 0.0, 2000.0], [12000.0, 5.0, 200.0, 1.5, 5.0, 60000.0]])
    np.testing.assert_allclose(normalise_labels(torch.from_numpy(ends), box=box).numpy(), [[-1] * 6, [1] * 6], atol=1e-6)

    a = tmp_path / "a.h5"
    write_synthetic(a, n=80, seed=5)
    with h5py.File(a, "a") as f:
        f.attrs["label_box"] = json.dumps(box)
    cfg = tiny_config(max_epochs=1)
    with pytest.raises(ValueError, match="outside the label box .*sampling.vsini_max"):
        train(cfg, a, tmp_path / "wide", quiet=True)
    cfg.sampling.vsini_max, cfg.sampling.resolution_min, cfg.sampling.resolution_max = 200.0, 2000.0, 60000.0
    train(cfg, a, tmp_path / "run", quiet=True)
    path = export_run(tmp_path / "run", tmp_path / "run.fsm")
    dec = Decoder.load(path)
    want = {lab.name: tuple(box.get(lab.name, (lab.min, lab.max))) for lab in STANDARD_LABELS}
    assert dec.label_ranges == want and dec.info["provenance"]["label_box"] == box
    # the file's normalisation is the one training used: the torch decoder on the box-normalised labels
    labels = np.array([[6000.0, 4.0, 150.0, 0.2, 4.5, 40000.0]])
    torch_dec = load_run_decoder(tmp_path / "run")[0]
    with torch.no_grad():
        y = normalise_labels(torch.from_numpy(labels), box=box)
        ref = torch_dec(torch.zeros(1, torch_dec.latent), y).double().numpy()
    np.testing.assert_allclose(dec(labels), ref, atol=2e-6)
    with pytest.raises(ValueError):
        dec(np.array([[6000.0, 4.0, 250.0, 0.2, 1.0, 40000.0]]))  # v sin i beyond the box
    report = accuracy_report(path, a, tmp_path / "acc", draws=2)  # draws in the box, else the core refuses them
    assert report["overall"]["n_spectra"] > 0

    with h5py.File(a, "a") as f:
        f.attrs["label_box"] = json.dumps({**box, "teff": [5000.0, 12000.0]})
    with pytest.raises(ValueError, match="teff = .* outside the file's label_box"):
        SpectraFile(a)


def test_sha256_file_is_cached_per_size_and_mtime(tmp_path):
    """The hash is computed once per file version: the same file again is not re-read, a rewritten one is."""
    import hashlib
    import os

    from fastspec_train.data import sha256_file

    path = tmp_path / "grid.h5"
    path.write_bytes(b"a" * 1000)
    assert sha256_file(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    path.write_bytes(b"b" * 1000)  # same size; a new modification time
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert sha256_file(path) == hashlib.sha256(b"b" * 1000).hexdigest()

"""The `fastspec` command line: generate, batch, info."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

import fastspec
from fastspec.cli import main

SUN_ARGS = ["--teff", "5777", "--logg", "4.44", "--vsini", "2", "--mh", "0", "--vmic", "1", "--resolution", "50000"]
SUN = [5777.0, 4.44, 2.0, 0.0, 1.0, 50000.0]


def test_generate_csv_and_plot(small_model, tmp_path):
    out, png = tmp_path / "sun.csv", tmp_path / "sun.png"
    assert main(["generate", *SUN_ARGS, "--model", str(small_model), "-o", str(out), "--plot", str(png)]) == 0
    table = np.loadtxt(out, delimiter=",", comments="#", skiprows=2)
    decoder = fastspec.Decoder.load(small_model)
    np.testing.assert_allclose(table[:, 0], decoder.wavelength, atol=5e-4)
    np.testing.assert_allclose(table[:, 1], decoder(SUN), atol=5e-8)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_generate_npy(small_model, tmp_path):
    out = tmp_path / "sun.npy"
    assert main(["generate", *SUN_ARGS, "--model", str(small_model), "-o", str(out)]) == 0
    arr = np.load(out)
    np.testing.assert_array_equal(arr[:, 1].astype(np.float32), fastspec.Decoder.load(small_model)(SUN))


def test_generate_out_of_range_is_one_clear_line(small_model, tmp_path, capsys):
    args = ["generate", *SUN_ARGS[:-1], "200", "--model", str(small_model), "-o", str(tmp_path / "x.csv")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "resolution" in err and "Traceback" not in err
    assert not (tmp_path / "x.csv").exists()
    assert main([*args, "--clip"]) == 0


def test_batch_csv_and_npy_to_hdf5(small_model, tmp_path, test_seed):
    rng = np.random.default_rng(test_seed)
    decoder = fastspec.Decoder.load(small_model)
    labels = np.array([[rng.uniform(*decoder.label_ranges[k]) for k in decoder.label_names] for _ in range(7)])
    # Columns shuffled: the header decides which column is which label.
    order = ["resolution", "teff", "mh", "logg", "vmic", "vsini"]
    csv_path = tmp_path / "labels.csv"
    with open(csv_path, "w") as f:
        f.write("# my stars\n" + ",".join(order) + "\n")
        for row in labels:
            f.write(",".join(repr(float(row[decoder.label_names.index(k)])) for k in order) + "\n")
    npy_path = tmp_path / "labels.npy"
    np.save(npy_path, labels)
    expected = decoder(labels)
    for src in (csv_path, npy_path):
        out = tmp_path / (src.stem + src.suffix[1:] + ".h5")
        assert main(["batch", str(src), "-o", str(out), "--model", str(small_model), "--chunk", "3"]) == 0
        with h5py.File(out) as f:
            np.testing.assert_allclose(f["flux"][:], expected, rtol=1e-6)  # chunks of 3, 3, 1: other BLAS paths
            np.testing.assert_array_equal(f["labels"][:], labels)
            assert list(f["labels"].attrs["names"]) == list(decoder.label_names)
            assert f.attrs["n_pixels"] == 19000 and f.attrs["wavelength_start"] == 4450.0


def test_batch_bad_row_is_named_and_leaves_no_file(small_model, tmp_path, capsys):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("teff,logg,vsini,mh,vmic,resolution\n5777,4.4,2,0,1,50000\n5777,4.4,2,nan,1,50000\n")
    out = tmp_path / "out.h5"
    assert main(["batch", str(csv_path), "-o", str(out), "--model", str(small_model)]) == 1
    err = capsys.readouterr().err
    assert "row 2" in err and "mh" in err
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    csv_path.write_text("teff,logg,vsini,mh\n1,2,3,4\n")
    assert main(["batch", str(csv_path), "-o", str(out), "--model", str(small_model)]) == 1
    assert "missing vmic, resolution" in capsys.readouterr().err


def test_info(small_model, capsys):
    assert main(["info", str(small_model)]) == 0
    text = capsys.readouterr().out
    assert "small.fsm" in text and "teff" in text and "19000" in text and "purpose" in text


def test_info_takes_model_like_the_other_subcommands(small_model, tmp_path, capsys):
    assert main(["info", "--model", str(small_model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(small_model)
    assert main(["info", str(small_model), "--model", str(tmp_path / "other.fsm")]) == 1
    assert "two model files given" in capsys.readouterr().err


def test_console_script_runs(small_model):
    result = subprocess.run([sys.executable, "-m", "fastspec", "info", "--json", str(small_model)],
                            capture_output=True, text=True, check=True)
    assert '"latent_dim": 4' in result.stdout


def test_missing_label_is_an_argparse_error(small_model):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--teff", "5777"])
    assert exc.value.code == 2

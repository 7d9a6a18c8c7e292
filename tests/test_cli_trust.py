"""The command line must not mislead (issue 24): `batch` stores what it computed and writes only what it can,
`fit` refuses bad options before any work, reads the package's own outputs, says what it left out, and its
messages and help texts say what they mean."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import fastspec
from fastspec import Decoder
from fastspec.cli import main
from fastspec.observations import read_spectrum
from fastspec.wavelength import air_to_vacuum
from test_cli_defects import HEADER, SUN, SUN_ARGS, _leftovers
from test_fit_cli import observed  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]


def _csv(path, wl, flux, error=None):
    cols = [wl, flux] + ([] if error is None else [error])
    np.savetxt(path, np.column_stack(cols), delimiter=",", comments="",
               header="wavelength,flux" + ("" if error is None else ",error"))
    return path


# ------------------------------------------------------------------------------------------------ batch


def test_batch_clip_stores_and_reports_the_clamped_labels(small_model, tmp_path, capsys):
    rows = tmp_path / "rows.csv"
    rows.write_text(f"{HEADER}\n3000,4.44,2,0,1,50000\n5777,4.44,2,0,1,50000\n")
    out = tmp_path / "out.h5"
    assert main(["batch", str(rows), "-o", str(out), "--model", str(small_model), "--clip"]) == 0
    err = capsys.readouterr().err
    assert "teff" in err and "clamped" in err and "1 row" in err
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["labels"][:, 0], [4000, 5777])
        # the spectrum at 4000 K (batched: float32 rounding differs from a single call's by ~1e-7)
        np.testing.assert_allclose(f["flux"][0], Decoder.load(small_model)([4000, 4.44, 2, 0, 1, 50000]), atol=1e-6)


@pytest.mark.parametrize("name", ["rows.csv", "x.npy", "x.fits", "x"])
def test_batch_refuses_outputs_other_than_hdf5(small_model, tmp_path, capsys, name):
    rows = tmp_path / "rows.csv"
    rows.write_text(f"{HEADER}\n5777,4.44,2,0,1,50000\n")
    before = rows.read_bytes()
    assert main(["batch", str(rows), "-o", str(tmp_path / name), "--model", str(small_model)]) == 1
    err = capsys.readouterr().err
    assert ".h5" in err and "HDF5" in err
    assert rows.read_bytes() == before and _leftovers(tmp_path) == ["rows.csv"]


def test_batch_refuses_a_job_larger_than_the_free_disk(small_model, tmp_path, monkeypatch, capsys):
    np.save(tmp_path / "labels.npy", np.tile(SUN, (100, 1)))  # 100 x 19000 float32 = 7.6 MB
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    assert main(["batch", str(tmp_path / "labels.npy"), "-o", str(tmp_path / "out.h5"), "--model", str(small_model)]) == 1
    err = capsys.readouterr().err
    assert "7.6 MB" in err and "1 MB free" in err
    assert _leftovers(tmp_path) == ["labels.npy"]


def test_batch_header_only_csv_is_an_error_and_one_row_is_one_spectrum(small_model, tmp_path, capsys):
    rows = tmp_path / "rows.csv"
    rows.write_text(f"{HEADER}\n")
    assert main(["batch", str(rows), "-o", str(tmp_path / "out.h5"), "--model", str(small_model)]) == 1
    assert "no rows" in capsys.readouterr().err and _leftovers(tmp_path) == ["rows.csv"]
    rows.write_text(f"{HEADER}\n5777,4.44,2,0,1,50000\n")
    assert main(["batch", str(rows), "-o", str(tmp_path / "out.h5"), "--model", str(small_model)]) == 0
    assert "wrote 1 spectrum to" in capsys.readouterr().err


@pytest.mark.parametrize("sep", [";", "\t"])
def test_label_table_with_another_delimiter_says_use_commas(small_model, tmp_path, capsys, sep):
    rows = tmp_path / "rows.csv"
    rows.write_text(HEADER.replace(",", sep) + "\n" + sep.join(map(str, SUN)) + "\n")
    assert main(["batch", str(rows), "-o", str(tmp_path / "out.h5"), "--model", str(small_model)]) == 1
    assert "commas" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["batch", "fit", "generate"])
def test_output_in_a_missing_folder_is_refused_first_and_clearly(small_model, tmp_path, monkeypatch, capsys,
                                                                   observed, command):  # noqa: F811
    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the output path was checked")

    monkeypatch.setattr(fastspec.Decoder, "__call__", no_work)
    monkeypatch.setattr(fastspec.Decoder, "jacobian", no_work)
    np.save(tmp_path / "labels.npy", np.array([SUN]))
    _, wl, flux, error = observed
    _csv(tmp_path / "s.csv", wl, flux, error)
    target = tmp_path / "missing" / ("out.h5" if command == "batch" else "r.json" if command == "fit" else "g.csv")
    args = {"batch": ["batch", str(tmp_path / "labels.npy")], "fit": ["fit", str(tmp_path / "s.csv")],
            "generate": ["generate", *SUN_ARGS]}[command]
    assert main([*args, "-o", str(target), "--model", str(small_model)]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and "does not exist" in err and ".partial" not in err and "Unable" not in err


# -------------------------------------------------------------------------------------------------- fit


def test_fit_reads_the_package_own_outputs(small_model, tmp_path):
    decoder = Decoder.load(small_model)
    for name in ("g.h5", "g.npy", "g.csv"):
        assert main(["generate", *SUN_ARGS, "--model", str(small_model), "-o", str(tmp_path / name)]) == 0
        s = read_spectrum(tmp_path / name)
        np.testing.assert_allclose(s.wavelength, decoder.wavelength, atol=1e-3)
        np.testing.assert_allclose(s.flux, decoder(SUN), atol=1e-6)
        assert s.error is None
    np.save(tmp_path / "labels.npy", np.array([SUN, SUN]))
    assert main(["batch", str(tmp_path / "labels.npy"), "-o", str(tmp_path / "b.h5"), "--model", str(small_model)]) == 0
    with pytest.raises(ValueError, match="2 spectra"):
        read_spectrum(tmp_path / "b.h5")
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f["x"] = np.zeros((2, 2))
    with pytest.raises(ValueError, match=r"no wavelength column; looked for .* among \(no 1-D datasets\)"):
        read_spectrum(tmp_path / "empty.h5")


def test_spectrum_csv_with_semicolons_says_use_commas(tmp_path):
    (tmp_path / "s.csv").write_text("wavelength;flux\n5000.0;1.0\n5000.05;0.9\n")
    with pytest.raises(ValueError, match="commas"):
        read_spectrum(tmp_path / "s.csv")


def test_fit_empty_error_column_estimates_the_errors(small_model, tmp_path, observed, capsys):  # noqa: F811
    _, wl, flux, _ = observed
    path = tmp_path / "s.csv"
    path.write_text("wavelength,flux,error\n" + "".join(f"{a},{b},\n" for a, b in zip(wl, flux)))
    assert read_spectrum(path).error is None
    code = main(["fit", str(path), "--model", str(small_model), "--no-rv", "-o", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "error column 'error' is empty" in captured.err
    assert json.loads((tmp_path / "r.json").read_text())["error_estimate"] > 0


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_fit_error_option_must_be_positive(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exc:
        main(["fit", str(tmp_path / "s.csv"), "--error", value])
    assert exc.value.code == 2 and "--error" in capsys.readouterr().err


@pytest.mark.parametrize("degree", ["-2", "50"])
def test_fit_continuum_degree_out_of_range(small_model, tmp_path, observed, capsys, degree):  # noqa: F811
    _, wl, flux, error = observed
    code = main(["fit", str(_csv(tmp_path / "s.csv", wl, flux, error)), "--model", str(small_model),
                 "--continuum-degree", degree])
    assert code == 1 and "continuum" in capsys.readouterr().err


def test_fit_hints_at_vacuum_wavelengths_and_counts_left_out_pixels(small_model, tmp_path, rng, capsys):
    from test_fit import observe, random_truth

    decoder = Decoder.load(small_model)
    wl = decoder.wavelength[400:-400]
    flux, error = observe(decoder, random_truth(rng), 0.0, [1.0], 100.0, rng, wl)
    flux[:7] = np.nan
    error[7:10] = 0.0
    path = _csv(tmp_path / "s.csv", air_to_vacuum(wl), flux, error)  # vacuum, fitted as air: RV = +83.5 km/s
    main(["fit", str(path), "--model", str(small_model)])
    captured = capsys.readouterr()
    assert "air/vacuum offset" in captured.err
    assert "10 invalid (NaN flux, or an error NaN or <= 0)" in captured.out


def test_fit_plot_takes_any_matplotlib_format(small_model, tmp_path, observed):  # noqa: F811
    pytest.importorskip("matplotlib")
    _, wl, flux, error = observed
    path = _csv(tmp_path / "s.csv", wl, flux, error)
    assert main(["fit", str(path), "--model", str(small_model), "--plot", str(tmp_path / "f.pdf")]) in (0, 3)
    assert (tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
    assert main(["fit", str(path), "--model", str(small_model), "--plot", str(tmp_path / "f.xyz")]) == 1


def test_quick_start_sun_fits_without_errors(tmp_path, capsys):
    """The README's noise-free sun.csv, no errors: before, exit 3 'the errors look overestimated'."""
    sun = tmp_path / "sun.csv"
    assert main(["generate", *SUN_ARGS, "-o", str(sun)]) == 0
    code = main(["fit", str(sun), "-o", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "overestimated" not in captured.err


# ----------------------------------------------------------------------------------- Python messages


def test_python_messages_name_the_python_arguments(small_model):
    decoder = Decoder.load(small_model)
    with pytest.raises(TypeError, match="jacobian.* sample"):
        decoder.jacobian(SUN, sample=True)
    with pytest.raises(ValueError, match="pass clip=True to clamp"):
        decoder([3000.0, *SUN[1:]])


# ------------------------------------------------------------------------------------------ help texts


def _help(argv, entry):
    with pytest.raises(SystemExit):
        entry(argv)


def test_help_texts(capsys):
    from fastspec_train.cli import main as train_main
    from fastspec_train.grid.cli import parser as grid_parser

    _help(["evaluate", "--help"], main)
    text = capsys.readouterr().out
    assert "(default: None)" not in text
    assert "--recovery-batch-size" in text and "batch" in text.split("--recovery-batch-size", 1)[1].split("--")[0].lower()
    _help(["testset", "--help"], train_main)
    text = " ".join(capsys.readouterr().out.split())
    assert "(default 10)" in text and "(default 2026)" in text
    build = grid_parser()._subparsers._group_actions[0].choices["build"].format_help()
    assert "needs --seed" not in build
    readme = (REPO / "README.md").read_text()
    assert "fastspec[specutils]" in readme and "fastspec[fits]" in readme


def test_evaluate_bins_must_be_positive(small_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--model", str(small_model), "--data", str(tmp_path / "t.h5"), "--out", str(tmp_path / "r"),
              "--bins", "0"])
    assert exc.value.code == 2 and "--bins" in capsys.readouterr().err


def test_evaluate_data_error_exits_1_like_the_other_commands(small_model, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code = main(["evaluate", "--model", str(small_model), "--data", str(tmp_path / "none.h5"), "--out", str(tmp_path / "r")])
    assert code == 1 and "none.h5" in capsys.readouterr().err

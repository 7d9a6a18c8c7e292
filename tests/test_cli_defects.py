"""The `fastspec` command line: bad input is refused clearly, and a failed or interrupted run leaves no file."""

import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import fastspec
from fastspec import model_format
from fastspec.cli import main
from fastspec.model_format import random_decoder, write_model

SUN_ARGS = ["--teff", "5777", "--logg", "4.44", "--vsini", "2", "--mh", "0", "--vmic", "1", "--resolution", "50000"]
SUN = [5777.0, 4.44, 2.0, 0.0, 1.0, 50000.0]
HEADER = "teff,logg,vsini,mh,vmic,resolution"


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------------ batch


@pytest.mark.parametrize("chunk", ["-5", "0"])
def test_batch_chunk_must_be_positive(small_model, tmp_path, capsys, chunk):
    np.save(tmp_path / "labels.npy", np.array([SUN]))
    out = tmp_path / "out.h5"
    with pytest.raises(SystemExit) as exc:
        main(["batch", str(tmp_path / "labels.npy"), "-o", str(out), "--model", str(small_model), "--chunk", chunk])
    assert exc.value.code == 2
    assert "--chunk" in capsys.readouterr().err
    assert _leftovers(tmp_path) == ["labels.npy"]


def test_batch_sigint_stops_and_removes_the_partial_file(small_model, tmp_path):
    np.save(tmp_path / "labels.npy", np.tile(SUN, (20000, 1)))  # ~40 s of work: far longer than the test waits
    out = tmp_path / "out.h5"
    proc = subprocess.Popen([sys.executable, "-m", "fastspec.cli", "batch", "labels.npy", "-o", out.name,
                             "--model", str(small_model)], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "out.h5.partial").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "batch never started writing"
            time.sleep(0.05)
        time.sleep(1.0)  # well into the loop over chunks
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Exception ignored" not in err and "Traceback" not in err
    assert _leftovers(tmp_path) == ["labels.npy"]


def _failing_call(exc):
    calls = []

    def call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:  # fail in the middle of the run, after something was written
            raise exc
        return original_call(self, *args, **kwargs)

    return call


original_call = fastspec.Decoder.__call__


@pytest.mark.parametrize("exc, code", [(RuntimeError("core failed"), 1), (KeyboardInterrupt(), 130)])
def test_batch_failure_leaves_no_partial_file(small_model, tmp_path, monkeypatch, capsys, exc, code):
    np.save(tmp_path / "labels.npy", np.tile(SUN, (5, 1)))
    monkeypatch.setattr(fastspec.Decoder, "__call__", _failing_call(exc))
    out = tmp_path / "out.h5"
    args = ["batch", str(tmp_path / "labels.npy"), "-o", str(out), "--model", str(small_model), "--chunk", "2"]
    assert main(args) == code
    assert "Traceback" not in capsys.readouterr().err
    assert _leftovers(tmp_path) == ["labels.npy"]


def _batch_csv(small_model, tmp_path, text: bytes, capsys):
    path = tmp_path / "labels.csv"
    path.write_bytes(text)
    out = tmp_path / "out.h5"
    code = main(["batch", str(path), "-o", str(out), "--model", str(small_model)])
    return code, out, capsys.readouterr().err


def test_batch_csv_with_bom_and_crlf(small_model, tmp_path, capsys):
    text = "\ufeff# from a spreadsheet\r\n" + HEADER + "\r\n5777,4.44,2,0,1,50000\r\n\r\n6000,4,10,-0.5,2,20000\r\n"
    code, out, err = _batch_csv(small_model, tmp_path, text.encode("utf-8"), capsys)
    assert code == 0, err
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["labels"][:], [SUN, [6000, 4, 10, -0.5, 2, 20000]])


def test_batch_csv_short_row_names_its_line(small_model, tmp_path, capsys):
    text = f"# comment\n{HEADER}\n5777,4.44,2,0,1,50000\n5777,4.44,2\n"
    code, out, err = _batch_csv(small_model, tmp_path, text.encode(), capsys)
    assert code == 1 and "line 4" in err and "3 values" in err and "index" not in err
    assert _leftovers(tmp_path) == ["labels.csv"]


def test_batch_csv_bad_number_names_its_line_and_column(small_model, tmp_path, capsys):
    code, out, err = _batch_csv(small_model, tmp_path, f"{HEADER}\n5777,4.44,2,zero,1,50000\n".encode(), capsys)
    assert code == 1 and "line 2" in err and "mh" in err and "'zero'" in err


def test_batch_csv_duplicate_column_is_an_error(small_model, tmp_path, capsys):
    code, out, err = _batch_csv(small_model, tmp_path, f"{HEADER},teff\n5777,4.44,2,0,1,50000,6000\n".encode(), capsys)
    assert code == 1 and "duplicate" in err and "teff" in err
    assert _leftovers(tmp_path) == ["labels.csv"]


def test_batch_csv_unknown_column_is_an_error(small_model, tmp_path, capsys):
    code, out, err = _batch_csv(small_model, tmp_path, f"star,{HEADER}\nsun,5777,4.44,2,0,1,50000\n".encode(), capsys)
    assert code == 1 and "star" in err and HEADER.replace(",", ", ") in err
    assert _leftovers(tmp_path) == ["labels.csv"]


# --------------------------------------------------------------------------------------------- generate


def test_generate_unknown_extension_is_refused_before_any_work(tmp_path, capsys):
    # A model that does not exist: the extension is checked first.
    args = ["generate", *SUN_ARGS, "--model", str(tmp_path / "no.fsm"), "-o", str(tmp_path / "sun.fits")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "sun.fits" in err and ".csv" in err and ".txt" in err and ".npy" in err and "no.fsm" not in err
    assert _leftovers(tmp_path) == []


def test_generate_hdf5_has_the_batch_layout(small_model, tmp_path):
    out = tmp_path / "sun.h5"
    assert main(["generate", *SUN_ARGS, "--model", str(small_model), "-o", str(out)]) == 0
    decoder = fastspec.Decoder.load(small_model)
    with h5py.File(out) as f:
        assert f["flux"].shape == (1, 19000)
        np.testing.assert_array_equal(f["flux"][0], decoder(SUN))
        np.testing.assert_array_equal(f["labels"][:], [SUN])
        assert list(f["labels"].attrs["names"]) == list(decoder.label_names)
        assert f.attrs["n_pixels"] == 19000 and f.attrs["wavelength_start"] == 4450.0
    assert _leftovers(tmp_path) == ["sun.h5"]


def test_generate_failed_plot_leaves_no_files(small_model, tmp_path, capsys):
    out, png = tmp_path / "sun.csv", tmp_path / "missing" / "sun.png"
    assert main(["generate", *SUN_ARGS, "--model", str(small_model), "-o", str(out), "--plot", str(png)]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc, code", [(RuntimeError("disk full"), 1), (KeyboardInterrupt(), 130)])
@pytest.mark.parametrize("name", ["sun.csv", "sun.npy"])
def test_generate_failed_write_leaves_no_files(small_model, tmp_path, monkeypatch, exc, code, name):
    def half_write(f, *args, **kwargs):
        f.write(b"half" if "b" in getattr(f, "mode", "") else "half")
        raise exc

    monkeypatch.setattr("fastspec.cli._write_csv", half_write)
    monkeypatch.setattr(np, "save", half_write)
    assert main(["generate", *SUN_ARGS, "--model", str(small_model), "-o", str(tmp_path / name)]) == code
    assert _leftovers(tmp_path) == []


def test_generate_out_of_range_says_clip_option(small_model, tmp_path, capsys):
    assert main(["generate", *SUN_ARGS[:-1], "200", "--model", str(small_model)]) == 1
    err = capsys.readouterr().err
    assert "--clip" in err and "clip=true" not in err


def test_generate_clip_reports_the_clamped_labels(small_model, tmp_path, capsys):
    """--clip computes the spectrum at the range's edge: the header says so, and stderr names the clamped label."""
    out = tmp_path / "c.csv"
    assert main(["generate", "--teff", "3000", "--logg", "4.44", "--vsini", "2", "--mh", "0", "--vmic", "1",
                 "--resolution", "50000", "--model", str(small_model), "--clip", "-o", str(out)]) == 0
    assert "teff = 3000 is outside [4000, 11000]; clamped to 4000" in capsys.readouterr().err
    header = out.read_text().splitlines()[0]
    assert "teff=4000" in header and "teff=3000" not in header


def test_generate_unknown_plot_format_is_refused(small_model, tmp_path):
    assert main(["generate", *SUN_ARGS, "--model", str(small_model), "--plot", str(tmp_path / "p.xyz")]) == 1
    assert not list(tmp_path.iterdir())


def test_generate_seed_needs_sample(small_model, capsys):
    assert main(["generate", *SUN_ARGS, "--model", str(small_model), "--seed", "3"]) != 0
    captured = capsys.readouterr()
    assert "--seed only makes sense with --sample" in captured.err and captured.out == ""
    assert main(["generate", *SUN_ARGS, "--model", str(small_model), "--seed", "3", "--sample"]) == 0


# ------------------------------------------------------------------------------------------------- info


def test_info_into_a_closed_pipe_is_quiet(small_model):
    proc = subprocess.Popen([sys.executable, "-m", "fastspec.cli", "info", str(small_model)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head -n 0`: the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert proc.returncode in (0, 141), err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception" not in err


def test_info_v2_model_shows_roles_and_broadening(tmp_path, capsys):
    path = write_model(tmp_path / "v2.fsm", random_decoder([16], latent_dim=2, n_labels=4, n_pixels=19000),
                       latent_dim=2, labels=model_format.INTRINSIC_LABELS, broadening=model_format.BroadeningStage())
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "[z(2), labels(4)] -> 16(relu) -> 19000(sigmoid)" in text
    assert "role" in next(line for line in text.splitlines() if line.startswith("labels"))
    rows = [line.split() for line in text.splitlines()]
    table = {parts[0]: parts for parts in rows if parts and parts[0] in ("teff", "vsini", "resolution")}
    assert table["vsini"][-1] == "vsini" and table["resolution"][-1] == "resolution" and table["teff"][-1] == "network"
    assert ("broadening   rotation (eps=0.6) then Gaussian FWHM = lambda/R, 8 segments, point samples in "
            "(hat-weighted kernels) (applied by the core; format version 2)" in text.splitlines())


def test_info_model_without_broadening(small_model, capsys):
    assert main(["info", str(small_model)]) == 0
    text = capsys.readouterr().out
    assert "[z(4), labels(6)]" in text
    assert any(line.startswith("broadening   none (format version") for line in text.splitlines())


# --------------------------------------------------------------------------------------------- evaluate


def test_help_lists_evaluate(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "evaluate" in capsys.readouterr().out


def test_evaluate_without_matplotlib_is_a_clear_error(small_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    report = tmp_path / "report"
    code = main(["evaluate", "--model", str(small_model), "--data", str(tmp_path / "test.h5"), "--out", str(report)])
    assert code != 0
    assert "fastspec evaluate needs matplotlib: pip install 'fastspec[plot]'" in capsys.readouterr().err
    assert not report.exists()


@pytest.mark.parametrize("data", [None, b"not hdf5"])
def test_evaluate_checks_inputs_before_making_the_folder(small_model, tmp_path, capsys, data):
    path = tmp_path / "test.h5"
    if data is not None:
        path.write_bytes(data)
    report = tmp_path / "report"
    assert main(["evaluate", "--model", str(small_model), "--data", str(path), "--out", str(report)]) != 0
    assert "test.h5" in capsys.readouterr().err
    assert not report.exists()


def test_evaluate_missing_model_makes_no_folder(tmp_path):
    report = tmp_path / "report"
    args = ["evaluate", "--model", str(tmp_path / "no.fsm"), "--data", str(tmp_path / "t.h5"), "--out", str(report)]
    assert main(args) != 0
    assert not report.exists()


def test_evaluate_runs_on_the_output_of_batch(small_model, tmp_path, capsys):
    rng = np.random.default_rng(3)
    decoder = fastspec.Decoder.load(small_model)
    np.save(tmp_path / "labels.npy", [[rng.uniform(*decoder.label_ranges[k]) for k in decoder.label_names]
                                      for _ in range(12)])
    data, report = tmp_path / "test.h5", tmp_path / "report"
    assert main(["batch", str(tmp_path / "labels.npy"), "-o", str(data), "--model", str(small_model)]) == 0
    with h5py.File(data, "r+") as f:  # 'SYNSPEC' = the model + noise, so that the residuals are not all 0
        f["flux"][...] += rng.normal(0.0, 1e-3, f["flux"].shape).astype(np.float32)
    assert main(["evaluate", "--model", str(small_model), "--data", str(data), "--out", str(report),
                 "--no-recovery", "--quiet", "--dpi", "30", "--bins", "3"]) == 0
    assert (report / "metrics.json").exists() and "median |dF|" in capsys.readouterr().out

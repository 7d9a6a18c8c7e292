"""Many stars: `fastspec.fit_batch` and `fastspec fit --batch` (python/fastspec/fitting/batch.py).

Spectra the small random-weight model (conftest.small_model) generates at random labels, RV and continuum, with
noise at SNR 80 (test_fit.observe), in the formats `fastspec fit` reads; among them a file that is not a spectrum
and one that does not exist. Checked: labels recovered within 5σ, every column in the CSV and FITS tables, the
failures recorded with a reason naming the file while the others are fitted, the same table after a resume from a
journal cut short by a kill, Ctrl-C (SIGINT to the process group, as a terminal sends it) stopping the command
with the journal kept and no table, no table when writing it fails, settings that differ from the journal's
refused, and a Dask cluster giving the same rows as local processes.
"""

from __future__ import annotations

import csv
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

import fastspec
from conftest import skip_or_fail_under_ci
from fastspec import Decoder
from fastspec.cli import main
from fastspec.fitting import batch as B
from test_fit import observe, random_truth

N_GOOD = 4
N_MANY = 8  # stars of the interrupted command: still running when two are done


@pytest.fixture(scope="module")
def stars(tmp_path_factory, small_model):
    """A folder of N_GOOD spectra (CSV, HDF5, .npy, FITS) and a file that is not a spectrum; their truths by name."""
    rng = np.random.default_rng(20261203)
    decoder = Decoder.load(small_model)
    folder = tmp_path_factory.mktemp("stars")
    wl = decoder.wavelength[400:-400]
    truths = {}
    for k, suffix in enumerate([".csv", ".h5", ".npy", ".fits"][:N_GOOD]):
        truth, rv = random_truth(rng), float(rng.uniform(-50, 50))
        flux, error = observe(decoder, truth, rv, [1.0, float(rng.uniform(-0.05, 0.05))], 80.0, rng, wl)
        path = folder / f"star{k}{suffix}"
        if suffix == ".csv":
            np.savetxt(path, np.column_stack([wl, flux, error]), delimiter=",", header="wavelength,flux,error",
                       comments="")
        elif suffix == ".h5":
            with h5py.File(path, "w") as f:
                f["wavelength"], f["flux"], f["error"] = wl, flux, error
        elif suffix == ".npy":
            np.save(path, np.column_stack([wl, flux, error]))
        else:
            from astropy.io import fits

            fits.BinTableHDU.from_columns([fits.Column("WAVE", "D", array=wl), fits.Column("FLUX", "D", array=flux),
                                           fits.Column("ERR", "D", array=error)]).writeto(path)
        truths[str(path)] = (truth, rv)
    (folder / "corrupt.fits").write_bytes(b"SIMPLE  = this is not a FITS file")
    return folder, truths


# point samples of the model, as generated; one start from 32 candidates: a fit in ~1 s
OPTIONS = dict(integrate=False, rv_bounds=(-100.0, 100.0), n_starts=1, n_candidates=32)


def _list(tmp_path, folder, extra=("missing.csv",)):
    """A list file of the folder's spectra, with a file that does not exist in the middle."""
    names = sorted(p.name for p in folder.iterdir())
    lines = [str(folder / n) for n in names[:2]] + [str(folder / e) for e in extra] + [str(folder / n) for n in names[2:]]
    path = tmp_path / "stars.txt"
    path.write_text("# the stars of a test\n" + "\n".join(lines) + "\n\n")
    return path, lines


def _check_rows(rows, files, truths):
    assert [r["file"] for r in rows] == files  # the order given
    for row in rows:
        if row["file"] not in truths:
            assert row["status"] == "failed" and row["success"] is False
            assert row["file"].split("/")[-1] in row["reason"], row  # the reason names the file
            continue
        truth, rv = truths[row["file"]]
        assert row["status"] == "ok" and row["success"], row
        for name, value in truth.items():
            assert abs(row[name] - value) <= 5 * row[f"{name}_err"], (name, row)
        assert abs(row["rv"] - rv) <= 5 * row["rv_err"] and 0.8 < row["reduced_chi2"] < 1.2, row


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def first(tmp_path_factory, stars, small_model):
    """The folder's batch on two local processes into a FITS table: (result, table); later tests reuse its journal."""
    folder, _ = stars
    table = tmp_path_factory.mktemp("first") / "t.fits"
    return fastspec.fit_batch(folder, table, model=small_model, workers=2, progress=False, **OPTIONS), table


def _journal_copy(first, table, keep=None, cut=False):
    """`first`'s journal as the journal of `table`: its header and `keep` rows (all), then half a line when `cut`."""
    lines = B.journal_path(first[1]).read_text().splitlines(keepends=True)
    keep = len(lines) - 1 if keep is None else keep
    B.journal_path(table).write_text("".join(lines[:1 + keep]) + (lines[1 + keep][:40] if cut else ""))
    return [json.loads(line) for line in lines[1:1 + keep]]


def test_batch_fits_every_star_and_writes_every_column(stars, first):
    from astropy.table import Table

    folder, truths = stars
    result, table = first
    files = [str(p) for p in sorted(folder.iterdir())]
    _check_rows(result.rows, files, truths)
    assert result.n_failed == 1 and result.failures[0][0] == str(folder / "corrupt.fits")
    expected = ["file", "status", "success"] + [c for n in fastspec.LABEL_ORDER for c in (n, f"{n}_err")] + [
        "vsini_upper", "rv", "rv_err", "reduced_chi2", "chi2", "n_pixels", "quality", "converged", "error_estimate",
        "medium", "seconds", "reason", "notes"]
    assert result.columns == expected
    written = Table.read(table, mask_invalid=False)
    assert written.colnames == expected and written["teff"].unit == "K" and written["file"].tolist() == files
    for row, line in zip(result.rows, written):
        for name in expected:
            value = row.get(name)
            if name in B.TEXT:
                assert line[name] == ("" if value is None else value), name
            elif name in B.FLAGS:
                assert line[name] == bool(value), name  # False for a failed star
            else:
                assert (np.isnan(line[name]) if value is None else line[name] == value), name
    assert not list(table.parent.glob("*.partial"))


def test_list_with_missing_and_corrupt_files_to_csv(tmp_path, stars, first, small_model):
    folder, truths = stars
    listing, files = _list(tmp_path, folder)
    table = tmp_path / "t.csv"
    _journal_copy(first, table)  # the stars fitted already: only the missing file is new
    result = fastspec.fit_batch(listing, table, model=small_model, progress=False, **OPTIONS)
    assert result.n_skipped == N_GOOD
    _check_rows(result.rows, files, truths)
    assert [f for f, _ in result.failures] == [str(folder / "corrupt.fits"), str(folder / "missing.csv")]
    assert "no such file" in result.failures[1][1] and "FITS" in result.failures[0][1]
    written = _read_csv(table)
    assert list(written[0]) == result.columns and [r["file"] for r in written] == files
    for row, line in zip(result.rows, written):
        assert line["status"] == row["status"] and line["success"] == str(row["success"])
        if row["status"] == "ok":
            assert float(line["teff"]) == row["teff"] and float(line["rv_err"]) == row["rv_err"]
        else:
            assert line["teff"] == "" and line["reason"] == row["reason"]


def test_resume_after_a_kill_skips_done_stars_and_gives_the_same_table(tmp_path, stars, first, small_model):
    from astropy.table import Table

    folder, _ = stars
    table = tmp_path / "t.fits"
    kept = _journal_copy(first, table, keep=2, cut=True)  # as if killed while writing the third star's line
    result = fastspec.fit_batch(folder, table, model=small_model, progress=False, **OPTIONS)
    assert result.n_skipped == sum(r["status"] == "ok" for r in kept) >= 1
    again, written = Table.read(table, mask_invalid=False), Table.read(first[1], mask_invalid=False)
    for name in first[0].columns:
        if name == "seconds":  # the stars refitted took their own time; everything else is the same
            continue
        if again[name].dtype.kind == "f":
            np.testing.assert_array_equal(again[name], written[name], err_msg=name)
        else:
            assert again[name].tolist() == written[name].tolist(), name
    # the cut line is gone, every star fitted once more except those done (a failed one is tried again)
    rows = [json.loads(line) for line in B.journal_path(table).read_text().splitlines()[1:]]
    assert len(rows) == len(kept) + len(first[0].rows) - result.n_skipped
    # other settings are refused, and the table left as it was
    with pytest.raises(ValueError, match="other settings"):
        fastspec.fit_batch(folder, table, model=small_model, progress=False, **{**OPTIONS, "clip": 3.0})
    assert Table.read(table)["file"].tolist() == written["file"].tolist()


def test_no_table_when_writing_it_fails(tmp_path, stars, first, small_model, monkeypatch):
    folder, _ = stars
    table = tmp_path / "t.csv"
    _journal_copy(first, table)
    real = B.write_table

    def half_then_fail(rows, columns, path, *args):
        with B.atomic_output(path) as tmp:
            tmp.write_text(",".join(columns) + "\n" + rows[0]["file"])
            raise OSError("No space left on device")

    monkeypatch.setattr(B, "write_table", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        fastspec.fit_batch(folder, table, model=small_model, progress=False, **OPTIONS)
    assert not table.exists() and not list(tmp_path.glob("*.partial"))
    monkeypatch.setattr(B, "write_table", real)
    result = fastspec.fit_batch(folder, table, model=small_model, progress=False, **OPTIONS)
    assert result.n_skipped == N_GOOD and len(_read_csv(table)) == N_GOOD + 1


@pytest.fixture(scope="module")
def many(tmp_path_factory, stars):
    """N_MANY copies of one star: enough that a command is still running when two are done."""
    folder = tmp_path_factory.mktemp("many")
    for k in range(N_MANY):
        (folder / f"s{k:02d}.csv").write_bytes((stars[0] / "star0.csv").read_bytes())
    return folder


def _start_and_wait(many, table, small_model):
    """`fastspec fit --batch` on two workers in its own process group, once two stars are in the journal."""
    cmd = [sys.executable, "-m", "fastspec", "fit", "--batch", str(many), "--table", str(table), "--model",
           str(small_model), "--no-integrate", "--rv-bounds", "-100", "100", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    journal = B.journal_path(table)
    deadline = time.monotonic() + 300
    while not (journal.exists() and len(journal.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    return cmd, proc, journal


def test_command_interrupted_keeps_the_journal_and_continues(tmp_path, many, small_model):
    table = tmp_path / "t.csv"
    cmd, proc, journal = _start_and_wait(many, table, small_model)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the command and its workers
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "same command" in err, err
    assert not table.exists() and not list(tmp_path.glob("*.partial"))
    n_done = len(journal.read_text().splitlines()) - 1
    assert 2 <= n_done < N_MANY
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{N_MANY} of {N_MANY} stars fitted ({n_done} from the journal)" in done.stderr, done.stderr
    rows = _read_csv(table)
    assert len(rows) == N_MANY and {r["status"] for r in rows} == {"ok"}
    assert len({r["teff"] for r in rows}) == 1  # the same spectrum, the same fit, whichever run did it


def test_a_worker_that_dies_stops_the_batch_with_the_journal_kept(tmp_path, many, small_model):
    if not Path("/proc/self/task").is_dir():
        pytest.skip("finds the worker processes in /proc (Linux)")
    table = tmp_path / "t.csv"
    _, proc, journal = _start_and_wait(many, table, small_model)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    workers = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(workers) == 2, children
    os.kill(int(workers[0]), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "a worker process died" in err and "run the same batch again" in err, err
    assert not table.exists() and not list(tmp_path.glob("*.partial"))
    assert len(journal.read_text().splitlines()) >= 3  # the stars done are kept


def test_command_line_errors(tmp_path, stars, small_model, capsys):
    folder, _ = stars
    base = ["fit", "--model", str(small_model)]
    # a star that cannot be read makes the exit status 1, and the table says why
    listing = tmp_path / "bad-stars.txt"
    listing.write_text(f"{folder / 'corrupt.fits'}\n{folder / 'missing.csv'},vacuum\n")
    assert main([*base, "--batch", str(listing), "--table", str(tmp_path / "t.csv"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "corrupt.fits" in err and "missing.csv: no such file" in err and "0 of 2 stars fitted" in err
    rows = _read_csv(tmp_path / "t.csv")
    assert [r["status"] for r in rows] == ["failed"] * 2 and [r["medium"] for r in rows] == ["air", "vacuum"]
    for args, message in (
            (["--batch", str(folder)], "--batch needs --table"),
            (["--batch", str(folder), "--table", str(tmp_path / "t.txt")], "unknown table format"),
            ([str(folder / "star0.csv"), "--batch", str(folder), "--table", str(tmp_path / "u.csv")], "not both"),
            ([str(folder / "star0.csv"), "--table", str(tmp_path / "u.csv")], "--table goes with --batch"),
            (["--batch", str(folder), "--table", str(tmp_path / "u.csv"), "-o", str(tmp_path / "r.json")],
             "is for one spectrum"),
            (["--batch", str(folder), "--table", str(tmp_path / "u.csv"), "--workers", "2", "--scheduler", "local:2"],
             "not both"),
            (["--batch", str(folder), "--table", str(tmp_path / "u.csv"), "--scheduler", "nowhere"], "scheduler address"),
            (["--batch", str(folder / "star1.h5"), "--table", str(tmp_path / "u.csv")], "a spectrum, not a list"),
            (["--batch", str(tmp_path / "nothing"), "--table", str(tmp_path / "u.csv")], "no such folder"),
    ):
        assert main([*base, *args]) == 1, args
        assert message in capsys.readouterr().err, args
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{folder / 'star0.csv'},sideways\n")
    assert main([*base, "--batch", str(bad), "--table", str(tmp_path / "u.csv")]) == 1
    assert "line 1: expected PATH or PATH,air|vacuum" in capsys.readouterr().err
    (tmp_path / "spectra.txt").write_text("4450.0 0.99\n4450.05 0.98\n")  # a spectrum given as a list
    assert main([*base, "--batch", str(tmp_path / "spectra.txt"), "--table", str(tmp_path / "u.csv")]) == 1
    assert "is a spectrum, not a list of spectra" in capsys.readouterr().err
    (tmp_path / "typos.txt").write_text("no-such-star.csv\nnor-this.csv\n")  # a list whose entries are not files
    assert main([*base, "--batch", str(tmp_path / "typos.txt"), "--table", str(tmp_path / "u.csv")]) == 1
    assert "none of its 2 entries is a file" in capsys.readouterr().err
    assert not (tmp_path / "u.csv").exists() and not B.journal_path(tmp_path / "u.csv").exists()
    B.journal_path(tmp_path / "v.csv").write_text("my notes\n")  # a file of that name that is not a journal
    assert main([*base, "--batch", str(folder), "--table", str(tmp_path / "v.csv")]) == 1
    assert "is not the journal of a batch" in capsys.readouterr().err
    assert B.journal_path(tmp_path / "v.csv").read_text() == "my notes\n" and not (tmp_path / "v.csv").exists()


def test_dask_cluster_gives_the_rows_of_local_processes(tmp_path, stars, first, small_model):
    try:
        import distributed
    except ImportError as exc:
        skip_or_fail_under_ci(f"dask.distributed is not installed ({exc}): pip install './training[cluster]'")
    import logging

    folder, truths = stars
    # threads, not processes: starts in a second; each thread loads its own decoder
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None,
                                  silence_logs=logging.ERROR) as cluster, distributed.Client(cluster) as client:
        on_dask = fastspec.fit_batch(folder, tmp_path / "t.csv", model=small_model, scheduler=client, progress=False,
                                     **OPTIONS)
        assert client.status == "running"  # a client given is left open
    _check_rows(on_dask.rows, [str(p) for p in sorted(folder.iterdir())], truths)
    for a, b in zip(first[0].rows, on_dask.rows):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_a_table_that_would_overwrite_a_file_is_refused_before_any_fit(tmp_path, stars, small_model):
    folder, _ = stars
    spectrum = folder / "star0.csv"
    before = spectrum.read_bytes()
    listing = tmp_path / "list.txt"
    listing.write_text(f"{spectrum}\n{folder / 'star1.h5'}\n")
    # one of the batch's spectra (from a list), a spectrum of the folder (left out of the folder's stars, but a
    # file that is no batch table), a file of notes: refused, nothing written, no journal
    for spectra, table, message in ((listing, spectrum, "one of the batch's spectra"),
                                    (folder, spectrum, "not the table of a batch")):
        with pytest.raises(ValueError, match=message):
            fastspec.fit_batch(spectra, table, model=small_model, progress=False, **OPTIONS)
        assert spectrum.read_bytes() == before and not B.journal_path(table).exists()
    notes = tmp_path / "notes.csv"
    notes.write_text("my,notes\n1,2\n")
    with pytest.raises(ValueError, match="not the table of a batch"):
        fastspec.fit_batch(listing, notes, model=small_model, progress=False, **OPTIONS)
    assert notes.read_text() == "my,notes\n1,2\n" and not B.journal_path(notes).exists()
    # a table path that is a folder, or in a folder that cannot be written: refused up front, no stray journal
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        fastspec.fit_batch(listing, tmp_path / "dir.csv", model=small_model, progress=False, **OPTIONS)
    assert not B.journal_path(tmp_path / "dir.csv").exists()
    assert main(["fit", "--model", str(small_model), "--batch", str(listing), "--table", str(tmp_path / "dir.csv"),
                 "--no-progress"]) == 1
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not writable"):
            fastspec.fit_batch(listing, locked / "t.csv", model=small_model, progress=False, **OPTIONS)
    # a table of an earlier batch is recognised by its columns
    B.write_table([{"file": "a", "status": "failed", "success": False}], B.columns_of([], ["teff"]),
                  tmp_path / "old.csv")
    assert B.is_batch_table(tmp_path / "old.csv") and not B.is_batch_table(notes)
    assert not B.is_batch_table(spectrum) and not B.is_batch_table(folder / "star3.fits")


def test_the_journal_knows_a_star_by_its_file_and_medium(tmp_path, stars, first, small_model, monkeypatch):
    folder, _ = stars
    # the same file in another medium (a list's PATH,vacuum) is fitted again, not taken from the journal
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'star0.csv'},vacuum\n{folder / 'star1.h5'}\n")
    table = tmp_path / "t.csv"
    _journal_copy(first, table)
    result = fastspec.fit_batch(listing, table, model=small_model, progress=False, **OPTIONS)
    assert result.n_skipped == 1 and [r["medium"] for r in result.rows] == ["vacuum", "air"]
    # a relative list run from another folder names other files: fitted, not the first folder's rows reused
    for name, extra in (("a", b""), ("b", b"\n")):  # b's: another file (another size), the same star
        (tmp_path / name).mkdir()
        (tmp_path / name / "s.csv").write_bytes((folder / "star0.csv").read_bytes() + extra)
    relative = tmp_path / "rel.txt"
    relative.write_text("s.csv\n")
    table = tmp_path / "r.csv"
    monkeypatch.chdir(tmp_path / "a")
    assert fastspec.fit_batch(relative, table, model=small_model, progress=False, **OPTIONS).n_skipped == 0
    assert fastspec.fit_batch(relative, table, model=small_model, progress=False, **OPTIONS).n_skipped == 1
    monkeypatch.chdir(tmp_path / "b")
    result = fastspec.fit_batch(relative, table, model=small_model, progress=False, **OPTIONS)
    assert result.n_skipped == 0 and result.rows[0]["status"] == "ok" and result.rows[0]["file"] == "s.csv"
    # a file replaced (other size or time) is fitted again
    with open(tmp_path / "b" / "s.csv", "ab") as f:
        f.write(b"\n")
    result = fastspec.fit_batch(relative, table, model=small_model, progress=False, **OPTIONS)
    assert result.n_skipped == 0 and result.rows[0]["status"] == "ok"


def test_a_journal_without_a_new_option_at_its_default_is_continued(tmp_path, stars, first, small_model):
    folder, _ = stars
    table = tmp_path / "t.csv"
    _journal_copy(first, table)
    path = B.journal_path(table)
    lines = path.read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    del header["settings"]["options"]["vmac"]  # a journal of a version before fit(vmac=0.0)
    path.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    assert fastspec.fit_batch(folder, table, model=small_model, progress=False, **OPTIONS).n_skipped == N_GOOD
    # an option that differs is refused, naming it (old → new), not dumping every setting
    with pytest.raises(ValueError, match="other settings") as caught:
        fastspec.fit_batch(folder, table, model=small_model, progress=False, **{**OPTIONS, "clip": 3.0, "vmac": 2.0})
    message = str(caught.value)
    assert "clip: " in message and "→ 3.0" in message and "vmac: null → 2.0" in message
    assert "n_candidates" not in message and "model" not in message.split("(")[1]


def test_command_line_messages(tmp_path, stars, small_model, capsys):
    folder, _ = stars
    base = ["fit", "--model", str(small_model)]
    # a spectrum given as the list is named as such
    assert main([*base, "--batch", str(folder / "star0.csv"), "--table", str(tmp_path / "u.csv")]) == 1
    assert "is a spectrum, not a list of spectra (fit one with `fastspec fit FILE`" in capsys.readouterr().err
    # --no-progress, as --table, goes with --batch
    assert main([*base, str(folder / "star0.csv"), "--no-progress"]) == 1
    assert "--no-progress goes with --batch" in capsys.readouterr().err
    # a usage error argparse reports exits 2, as --help says
    with pytest.raises(SystemExit) as caught:
        main([*base, "--batch", str(folder), "--workers", "0"])
    assert caught.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "2 on a usage error" in " ".join(capsys.readouterr().out.split())
    # an earlier batch's table in the folder is not a star (the summary says so); a failure's reason printed once
    spectra = tmp_path / "spectra"
    spectra.mkdir()
    (spectra / "s.csv").write_bytes((folder / "star0.csv").read_bytes())
    (spectra / "corrupt.fits").write_bytes((folder / "corrupt.fits").read_bytes())
    B.write_table([{"file": "x.csv", "status": "failed", "success": False, "reason": "Error: " + "long " * 100}],
                  B.columns_of([], ["teff"]), spectra / "old.csv")
    assert main([*base, "--batch", str(spectra), "--table", str(tmp_path / "t.csv"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 stars fitted" in err and "skipped 1 table(s) of earlier batches" in err and "old.csv" in err, err
    assert err.count("No SIMPLE card") == 1, err
    assert [r["file"] for r in _read_csv(tmp_path / "t.csv")] == [str(spectra / "corrupt.fits"), str(spectra / "s.csv")]
    # a reason is its first line, cut short
    reason = B.short_reason(ValueError("x.csv: line 2: " + "1.0," * 200 + "\nmore"))
    assert reason.startswith("ValueError: x.csv: line 2: 1.0,") and len(reason) == B.REASON_CHARS
    assert "more" not in reason

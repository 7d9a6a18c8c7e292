"""`fastspec-grid build --scheduler`: the grid builder on Dask (training/fastspec_train/grid/cluster.py).

Needs the [cluster] extra (dask.distributed): skipped without it, failed under CI. The SYNSPEC tests
(gfortran, as tests/test_grid.py) run 4 spectra over a 10 Å window, a few seconds each, against a
reference written by the local builder (`--workers 2`) for the same seed and labels:
- a LocalCluster of 2 worker processes writes the same file, pixel for pixel;
- one of its worker processes is SIGKILLed mid-run: every row is written exactly once and equals the reference;
- the driver (the CLI, `--scheduler local:2`) is SIGKILLed mid-run: another command on the same --out is
  refused, the same command completes the file.
The fast tests use a threads-only cluster and a fake synthesis: failures, setup errors, back-pressure.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import skip_or_fail_under_ci
from fastspec_train.grid import build as B
from fastspec_train.grid.fetch import GridSetupError
from test_grid import need_download, need_gfortran

REPO = Path(__file__).resolve().parents[1]
SEED, N = 5, 4
WAVELENGTH = "5000:5010"  # = the GridConfig below: 201 pixels of 0.05 Å
CFG = B.GridConfig(wavelength_start=5000.0, wavelength_step=0.05, n_pixels=201, seed=SEED)


def need_dask():
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        skip_or_fail_under_ci(f"dask.distributed is not installed ({exc}): pip install './training[cluster]'")


def need_synspec():
    need_gfortran()
    need_download(B.prepare, CFG)  # builds SYNSPEC and fetches its inputs once, into $FASTSPEC_CACHE


def _env():
    path = os.pathsep.join(filter(None, [str(REPO / "training"), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path)


def _cluster(processes: bool, n: int = 2):
    """A LocalCluster of n one-thread workers (processes or threads) and its client; closed after the module."""
    need_dask()
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=processes, dashboard_address=":0",
                           silence_logs=logging.ERROR)
    client = Client(cluster)
    yield client, cluster
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def labels():
    return B.draw_labels(N, SEED)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, labels):
    """The local builder's file for the same seed, labels and window."""
    need_synspec()
    out = tmp_path_factory.mktemp("local") / "reference.h5"
    r = B.build(out, labels, CFG, workers=2, progress=False)
    assert r["done"] == N and r["failed"] == 0, r["failures"]
    return out


@pytest.fixture(scope="module")
def process_cluster():
    """A LocalCluster of 2 worker processes of one thread each (as --scheduler local:2)."""
    yield from _cluster(processes=True)


def assert_same_file(got: Path, ref: Path):
    """Pixel for pixel, every label, flag and attribute; only the SYNSPEC timings differ."""
    with h5py.File(got, "r") as g, h5py.File(ref, "r") as r:
        assert set(g) == set(r) and dict(g.attrs) == dict(r.attrs)
        for name in ("flux", "labels", "done"):
            assert (g[name].dtype, g[name].chunks, g[name].compression) == (r[name].dtype, r[name].chunks,
                                                                             r[name].compression)
            np.testing.assert_array_equal(g[name][...], r[name][...])
        assert g["done"][...].all() and np.all(g["synspec_seconds"][...] > 0)
        for attr in ("names", "units"):
            assert list(g["labels"].attrs[attr]) == list(r["labels"].attrs[attr])


# ---------------------------------------------------------------- real SYNSPEC on a LocalCluster

def test_dask_matches_local_builder(reference, process_cluster, labels, tmp_path):
    from fastspec_train.grid import cluster as C

    client, _ = process_cluster
    out = tmp_path / "dask.h5"
    r = C.build(out, labels, CFG, client, progress=False)
    assert (r["done"], r["failed"], r["total"]) == (N, 0, N), r["failures"]
    assert sorted(r["written"]) == list(range(N))
    assert_same_file(out, reference)
    # resuming a complete file submits nothing
    assert C.build(out, labels, CFG, client, progress=False)["written"] == []


def test_worker_killed_mid_run(reference, process_cluster, labels, tmp_path):
    """SIGKILL one of the two worker processes while it holds a spectrum: Dask reschedules it, and
    every row is written exactly once (counted by the driver's per-row callback) with the reference's pixels."""
    from fastspec_train.grid import cluster as C

    client, cluster = process_cluster
    out = tmp_path / "killed.h5"
    writes = collections.Counter()
    first = threading.Event()

    def on_row(i):
        writes[i] += 1
        first.set()

    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(C.build(out, labels, CFG, client, progress=False,
                                                                   on_row=on_row)))
    runner.start()
    try:
        assert first.wait(300), "no spectrum within 300 s"
        victim, held = None, []
        deadline = time.time() + 30
        while victim is None and time.time() < deadline:  # a worker that holds a task of this run now
            for addr, keys in client.processing().items():
                if keys:
                    victim, held = addr, [str(k) for k in keys]
                    break
            else:
                time.sleep(0.05)
        assert victim is not None, "no task in flight after the first spectrum"
        os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
    finally:
        runner.join(300)
    assert not runner.is_alive() and result, "the run did not finish"
    assert (result["done"], result["failed"]) == (N, 0), result["failures"]
    assert writes == collections.Counter(range(N)), f"rows written {dict(writes)}: each must be written exactly once"
    assert sorted(result["written"]) == list(range(N))
    # the kill did hit the run: a task held by the killed worker went to processing again elsewhere
    story = {k: [t for t in cluster.scheduler.story(k) if t[2] == "processing"] for k in held}
    assert any(len(s) >= 2 for s in story.values()), story
    assert_same_file(out, reference)


def test_driver_killed_then_resumed(reference, labels, tmp_path):
    """SIGKILL the CLI (driver + its local:2 cluster) after a spectrum is on disk; the same command completes the file."""
    need_dask()
    out = tmp_path / "grid.h5"
    cmd = [sys.executable, "-m", "fastspec_train.grid.cli", "build", "--n", str(N), "--seed", str(SEED),
           "--wavelength", WAVELENGTH, "--out", str(out), "--scheduler", "local:2", "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline, n_done = time.time() + 300, 0
    try:
        while time.time() < deadline:
            time.sleep(0.2)
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                with h5py.File(out, "r", locking=False) as f:  # the driver holds the lock
                    n_done = int(f["done"][...].sum())
            except (OSError, KeyError):
                continue
            if n_done >= 1:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its cluster's processes, at once
        proc.communicate()
    assert n_done >= 1, "no spectrum within 300 s"
    with h5py.File(out, "r") as f:
        before = f["done"][...].astype(bool)
        seconds = f["synspec_seconds"][...][before]
    assert 1 <= before.sum() < N

    other = subprocess.run(cmd[:5] + [str(SEED + 1)] + cmd[6:], env=_env(), capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "other settings or labels" in other.stderr, other.stderr[-2000:]
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{N}/{N} spectra done" in again.stdout and "dashboard" in again.stderr
    assert_same_file(out, reference)
    with h5py.File(out, "r") as f:  # the rows done before the kill were not computed again
        np.testing.assert_array_equal(f["synspec_seconds"][...][before], seconds)


# ---------------------------------------------------------------- fast: threads-only cluster, fake synthesis

@pytest.fixture(scope="module")
def thread_cluster():
    yield from _cluster(processes=False)


@pytest.fixture
def fake(monkeypatch):
    """A fake synthesis in the test process (the workers are threads): counts calls per row; rows whose
    teff is in `fail` raise as a failed SYNSPEC run would."""
    from fastspec_train.grid import cluster as C

    state = {"calls": collections.Counter(), "fail": set(), "lock": threading.Lock()}

    def synthesize_one(cfg, syn, ll, nlines, label):
        with state["lock"]:
            state["calls"][float(label[0])] += 1
        time.sleep(0.01)
        if float(label[0]) in state["fail"]:
            raise RuntimeError("SYNSPEC failed (exit 2) in /tmp/synspec_x; end of syn.log: ...")
        return {"flux": np.full(cfg.n_pixels, 1e-4 * label[0], np.float32)}, 0.01

    monkeypatch.setattr(B, "synthesize_one", synthesize_one)
    monkeypatch.setattr(B, "prepare", lambda cfg: (None, "none", 0))
    monkeypatch.setattr(B, "check_labels", lambda labels, broaden=False: None)
    monkeypatch.setattr(C, "_SETUP", {})
    return state


def test_failures_reported_not_retried_bounded(thread_cluster, fake, tmp_path):
    from fastspec_train.grid import cluster as C

    client, cluster = thread_cluster
    labels, cfg = B.draw_labels(30, 2), B.GridConfig(n_pixels=20, seed=2)
    fake["fail"] = {float(labels[3, 0]), float(labels[17, 0])}
    live = []  # tasks of this run the scheduler holds, seen each time a row is written

    def on_row(i):
        live.append(sum(1 for k, ts in cluster.scheduler.tasks.items()
                        if str(k).startswith("fastspec-synspec") and ts.state not in ("released", "forgotten")))

    messages = []
    out = tmp_path / "g.h5"
    r = C.build(out, labels, cfg, client, progress=False, in_flight=3, on_row=on_row, log=messages.append)
    assert (r["done"], r["failed"]) == (28, 2)
    assert "dashboard" in messages[0] and "2 workers" in messages[0]
    # reported with the row and its labels, not retried, left not done
    assert any(f.startswith(f"row 3 {np.round(labels[3], 4).tolist()}: RuntimeError: SYNSPEC failed") for f in r["failures"])
    assert any(f.startswith("row 17 ") for f in r["failures"])
    assert all(fake["calls"][float(t)] == 1 for t in labels[:, 0]), fake["calls"]
    with h5py.File(out, "r") as f:
        done = f["done"][...].astype(bool)
        assert not done[3] and not done[17] and done.sum() == 28
        np.testing.assert_array_equal(f["flux"][...][done][:, 0], (1e-4 * labels[done, 0]).astype(np.float32))
    # back-pressure: never more than a few tasks at once (30 if all were submitted up front)
    assert max(live) <= 6, live
    # a rerun retries only the failed rows
    fake["fail"] = set()
    r = C.build(out, labels, cfg, client, progress=False, in_flight=3, log=messages.append)
    assert sorted(r["written"]) == [3, 17] and r["done"] == 30


def test_worker_setup_error_stops_the_run(thread_cluster, fake, monkeypatch, tmp_path):
    from fastspec_train.grid import cluster as C

    client, _ = thread_cluster

    def no_compiler(cfg):
        raise GridSetupError("gfortran not found: apt-get install gfortran")

    monkeypatch.setattr(B, "prepare", no_compiler)
    labels, cfg = B.draw_labels(20, 4), B.GridConfig(n_pixels=20, seed=4)
    out = tmp_path / "g.h5"
    with pytest.raises(GridSetupError, match="setting up SYNSPEC failed on Dask worker .*gfortran not found"):
        C.build(out, labels, cfg, client, progress=False, log=lambda m: None)
    with h5py.File(out, "r") as f:
        assert not f["done"][...].any()
    assert not [k for k in cluster_keys(client)], "tasks of the stopped run were left on the scheduler"


def cluster_keys(client):
    deadline = time.time() + 10
    while time.time() < deadline:
        keys = [k for k in client.run_on_scheduler(lambda dask_scheduler: list(map(str, dask_scheduler.tasks)))
                if k.startswith("fastspec-synspec")]
        if not keys:
            return keys
        time.sleep(0.1)
    return keys


def test_cli_scheduler_arguments(tmp_path, capsys):
    from fastspec_train.grid import cli

    base = ["build", "--n", "2", "--out", str(tmp_path / "x.h5")]
    assert cli.main(base + ["--scheduler", "nowhere"]) == 2
    assert "give a scheduler address (tcp://HOST:8786)" in capsys.readouterr().err
    assert cli.main(base + ["--scheduler", "local:0"]) == 2
    assert "local:N wants" in capsys.readouterr().err
    assert cli.main(base + ["--scheduler", "local:2", "--workers", "2"]) == 2
    assert "--workers is for this machine" in capsys.readouterr().err
    assert cli.main(base + ["--in-flight", "4"]) == 2
    assert not (tmp_path / "x.h5").exists()


def test_local_path_does_not_import_dask(tmp_path):
    """Without --scheduler the builder runs as before (fork pool) and Dask is never imported."""
    script = textwrap.dedent(f"""\
        import sys, numpy as np
        from fastspec_train.grid import build as B, cli
        B.synthesize_one = lambda cfg, syn, ll, n, label: (dict(flux=np.full(cfg.n_pixels, 0.5, np.float32)), 0.0)
        B.prepare = lambda cfg: (None, "none", 0)
        B.check_labels = lambda labels, broaden=False: None
        rc = cli.main(["build", "--n", "3", "--wavelength", "{WAVELENGTH}", "--workers", "2", "--no-progress",
                       "--out", sys.argv[1]])
        assert rc == 0, rc
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("dask", "distributed"))
        assert not loaded, loaded
        print("OK")
        """)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "g.h5")], env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]

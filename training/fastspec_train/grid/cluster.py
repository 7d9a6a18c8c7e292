"""The grid run on a Dask cluster: `fastspec-grid build ... --scheduler tcp://HOST:8786 | local:N | FILE.json`.

The same file, rows and resume rule as the local builder (build.py); only where the spectra are computed
changes. Imported only when --scheduler is given: the local path never imports Dask.

- Driver (this process): checks the labels, opens/creates the HDF5 file exactly as build.build does, and
  submits one task per row that is not yet done, keeping a bounded window of tasks in flight (about two
  per worker thread, refilled as results arrive). It alone writes the file, one row at a time, written and
  flushed as each result arrives: a killed driver loses only the spectra in flight and the same command
  continues (rows already done are never resubmitted).
- Workers: each worker process sets up SYNSPEC once (build.prepare: compiles SYNSPEC/ROTIN into its
  $FASTSPEC_CACHE unless already there, fetches atmospheres and line list) on its first task, then runs
  build.synthesize_one, the function the local builder runs: the spectra are the same, pixel for pixel.
- Failures: a worker that dies mid-spectrum is rescheduled by the Dask scheduler (up to its
  `distributed.scheduler.allowed-failures`, default 3, after which the row is reported as failed and left
  not done). A spectrum SYNSPEC fails on is returned as an error by the task, not raised: it is reported
  with its labels, left not done, and not retried (the task has retries=0; the same labels would fail
  again). A worker that cannot set SYNSPEC up stops the run with that error.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from fastspec._scheduler import parse_scheduler

from . import build as B
from .fetch import GridSetupError

try:
    from distributed import WorkerPlugin as _WorkerPlugin
except ImportError:  # build() says how to install Dask
    _WorkerPlugin = object

INSTALL_HINT = 'pip install "fastspec-train[cluster]" (from a checkout: pip install "./training[cluster]")'
IN_FLIGHT_PER_THREAD = 2  # tasks in flight per worker thread: each worker always has its next spectrum
IN_FLIGHT_MIN = 4  # also while no worker has joined yet (e.g. dask-jobqueue jobs still queued)


def _distributed():
    try:
        import distributed
    except ImportError as exc:
        raise GridSetupError(f"--scheduler needs Dask ({exc}); install it with {INSTALL_HINT}") from None
    return distributed


class _CtrlCToDriver(_WorkerPlugin):
    """local:N only: the worker processes ignore Ctrl-C (SIGINT, sent by a terminal to the whole process
    group); the driver handles it and closes the cluster, as the local builder's pool does."""

    def setup(self, worker):
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not a worker process's main thread (a threads-only cluster)
            pass


def connect(scheduler: str):
    """(client, cluster or None) for a --scheduler value; the caller closes both."""
    distributed = _distributed()
    kind, value = parse_scheduler(scheduler)
    if kind == "local":
        # N worker processes of one thread each: N SYNSPEC runs at a time, as `--workers N` locally
        cluster = distributed.LocalCluster(n_workers=value, threads_per_worker=1, processes=True)
        try:
            client = distributed.Client(cluster)
            client.register_plugin(_CtrlCToDriver(), name="fastspec-grid-ctrl-c")  # also for restarted workers
        except BaseException:
            cluster.close()
            raise
        return client, cluster
    try:
        if kind == "file":
            return distributed.Client(scheduler_file=value, timeout="60s"), None
        return distributed.Client(value, timeout="60s"), None
    except (OSError, TimeoutError) as exc:
        raise GridSetupError(f"could not connect to the Dask scheduler {scheduler}: {exc}") from None


# -- worker side -------------------------------------------------------------------------------------

_SETUP: dict = {}
_SETUP_LOCK = threading.Lock()


def _worker_setup(cfg: B.GridConfig):
    """(syn, line list, nlines) for cfg, prepared once per worker process (threads wait for the first)."""
    key = json.dumps(asdict(cfg), sort_keys=True)
    with _SETUP_LOCK:
        if key not in _SETUP:
            try:
                _SETUP[key] = B.prepare(cfg)
            except Exception as exc:
                raise GridSetupError(f"setting up SYNSPEC failed on Dask worker {socket.gethostname()} "
                                     f"(pid {os.getpid()}, FASTSPEC_CACHE={os.environ.get('FASTSPEC_CACHE', '~/.cache/fastspec')}): "
                                     f"{type(exc).__name__}: {exc}") from None
        return _SETUP[key]


def synthesize_task(cfg: B.GridConfig, i: int, label: np.ndarray):
    """The Dask task for row i: (i, rows, seconds, None) or (i, None, 0.0, error text) when SYNSPEC fails."""
    syn, ll, nlines = _worker_setup(cfg)
    try:
        rows, seconds = B.synthesize_one(cfg, syn, ll, nlines, label)
        return i, rows, seconds, None
    except Exception as exc:  # reported by the driver with the row's labels; not retried
        return i, None, 0.0, f"{type(exc).__name__}: {exc} (on {socket.gethostname()})"


# -- driver side -------------------------------------------------------------------------------------

def _threads(client) -> int:
    return int(sum(client.nthreads().values()))


def build(out: str | Path, labels: np.ndarray, cfg: B.GridConfig, scheduler, progress: bool = True,
          in_flight: int | None = None, log=None, on_row=None) -> dict:
    """Compute every not-yet-done row of `out` on a Dask cluster; returns {done, failed, total, failures,
    written}, written: the rows written by this run in the order they were written.

    scheduler: a --scheduler string (see parse_scheduler) or a distributed.Client (left open).
    in_flight: tasks submitted at a time; default two per worker thread (at least IN_FLIGHT_MIN),
    re-read as workers join or leave. log: where messages go (default stderr). on_row(i): called
    after row i is written and flushed."""
    from tqdm import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if in_flight is not None and in_flight < 1:
        raise ValueError(f"--in-flight must be >= 1, got {in_flight}")
    if isinstance(scheduler, str):
        parse_scheduler(scheduler)  # a bad value is refused before anything else
    labels = np.ascontiguousarray(labels, dtype=np.float64)
    if labels.ndim != 2 or labels.shape[1] != len(cfg.label_names()):
        raise ValueError(f"labels must be (N, {len(cfg.label_names())}): {', '.join(cfg.label_names())}")
    B.check_labels(labels, cfg.broaden)
    B.check_in_box(labels, cfg)
    distributed = _distributed()
    out = Path(out)
    failures: list[str] = []
    written: list[int] = []
    on_main = threading.current_thread() is threading.main_thread()
    previous, installed = None, False
    client = cluster = None
    own = isinstance(scheduler, str)
    pending: dict = {}  # future -> row
    bar = None
    # an existing file first: another command on the same --out is refused before a cluster is started;
    # a new file only once the cluster is reached
    f = B._open_output(out, labels, cfg) if out.exists() else None
    try:
        # `kill` (SIGTERM) ends the run like Ctrl-C: the file is closed cleanly, the cluster closed
        if on_main:
            previous, installed = signal.signal(signal.SIGTERM, B._interrupt), True
        client, cluster = connect(scheduler) if own else (scheduler, None)
        info = client.scheduler_info()
        dashboard = (f"dashboard {client.dashboard_link}" if "dashboard" in info.get("services", {})
                     else "no dashboard (needs bokeh where the scheduler runs)")
        nthreads = client.nthreads()
        log(f"fastspec-grid: Dask scheduler {info.get('address', client.scheduler.address)}, "
            f"{len(nthreads)} workers / {sum(nthreads.values())} threads now; {dashboard}")
        if f is None:
            f = B._open_output(out, labels, cfg)
        # the workers get --linelist as an absolute path (their working folder is not ours); the file
        # keeps the command's own settings, so that the local builder and this one resume each other's files
        task_cfg = replace(cfg, linelist=str(Path(cfg.linelist).resolve())) if cfg.linelist else cfg
        done = f["done"][...].astype(bool)
        todo = iter(np.flatnonzero(~done).tolist())
        run = uuid.uuid4().hex[:8]  # keys unique on a scheduler shared by several runs
        bar = tqdm(total=len(labels), initial=int(done.sum()), unit=" spectra", desc=out.name, disable=not progress,
                   dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]")
        ac = distributed.as_completed(with_results=True, raise_errors=False)
        window, checked = in_flight or IN_FLIGHT_MIN, 0.0

        def refill():
            nonlocal window, checked
            if in_flight is None and time.monotonic() - checked > 5.0:  # workers come and go
                threads = _threads(client)
                window, checked = max(IN_FLIGHT_MIN, IN_FLIGHT_PER_THREAD * threads), time.monotonic()
                bar.set_postfix_str(f"{threads} worker threads", refresh=False)
            while len(pending) < window:
                i = next(todo, None)
                if i is None:
                    return
                fut = client.submit(synthesize_task, task_cfg, i, labels[i], key=f"fastspec-synspec-row{i}-{run}",
                                    pure=False, retries=0)
                pending[fut] = i
                ac.add(fut)

        refill()
        for fut, result in ac:
            i = pending[fut]  # left in pending until handled: a run stopped here cancels it
            if fut.status == "finished":
                _, rows, seconds, err = result
            elif fut.status == "error":
                exc = fut.exception()
                if isinstance(exc, GridSetupError):
                    raise exc
                rows = seconds = None
                err = f"{type(exc).__name__}: {exc}"  # e.g. KilledWorker: the row's workers kept dying
            else:
                raise GridSetupError(f"the Dask scheduler dropped the task of row {i} ({fut.status}): "
                                     "was the scheduler restarted? Run the same command again to continue")
            del pending[fut], fut, result
            if B.record_result(f, labels, i, rows, seconds, err, failures, bar):
                written.append(i)
                if on_row is not None:
                    on_row(i)
            refill()
        n_done = int(f["done"][...].sum())
    finally:
        if bar is not None:
            bar.close()
        if f is not None:
            f.close()
        if installed:
            signal.signal(signal.SIGTERM, previous)
        try:
            if pending:
                client.cancel(list(pending), force=True)
            pending.clear()
            if own and client is not None:
                client.close()
            if own and cluster is not None:
                cluster.close()
        except Exception as exc:  # never hide the error that brought us here
            log(f"fastspec-grid: closing the Dask client: {type(exc).__name__}: {exc}")
    return {"done": n_done, "failed": len(failures), "total": len(labels), "failures": failures, "written": written}

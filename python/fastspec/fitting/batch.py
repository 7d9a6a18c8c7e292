"""Many stars: `fit_batch` fits every spectrum of a list or a folder with `fastspec.fit`, in parallel, into one table.

    rows = fastspec.fit_batch("spectra/", "stars.csv", workers=2).rows      # or a list file, or [paths]
    fastspec fit --batch spectra/ --table stars.fits --workers 2            # the same from the shell

Each star is one spectrum file, read as `fastspec fit FILE` reads it (`fastspec.observations.read_segments`: a
FITS file of several tables is the star's segments; a resolution/fwhm column or SPEC_RES is its line-spread
function, R then held, in the row's `resolution` with no `_err`, and said in `notes`; ``lsf=`` given to fit_batch
takes precedence) and fitted by `fastspec.fit` with the same options for every star; a star whose file cannot be
read or whose fit raises gets a row with status "failed" and the reason, and the batch goes on.

Where the fits run: ``workers`` local processes (default 1), each loading the model once and running the core
with one thread; or a Dask cluster (``scheduler``: "tcp://HOST:8786", a scheduler file, or "local:N" for N
local Dask worker processes; needs ``dask.distributed``, `pip install "fastspec[cluster]"`, imported only then). Dask workers must see the model file
and the spectra at the paths this process gives them (absolute paths; a shared filesystem).

The table (``table``: .csv or .fits) has one row per star in the order given: `file`, `status` (ok/failed),
`success` (the fit's quality flag: converged and every quality check passed), each label with `<label>_err`,
`vsini_upper` (95 % upper limit where the data cannot tell v sin i from 0), `rv`, `rv_err`, `reduced_chi2`
(χ²/dof), `chi2`, `n_pixels`, `quality` (the failed checks), `converged`, `error_estimate` (the noise estimated
when the file has no errors), `medium`, `seconds` (wall time of the star), `reason` (why a star failed) and
`notes` (what the reader and fit said). Missing values are empty cells in CSV and NaN in FITS.

Resumable and Ctrl-C safe: each finished star is appended to a journal beside the table (`<table>.journal`, JSON
lines, flushed per star) by this process alone; the same call again skips the stars the journal holds as fitted
(failed ones are tried again; a star is known by its file's real absolute path, size and modification time, and
its medium) and refuses to go on with other settings (model, fit options, medium, error), naming those that differ;
a fit option the journal does not know (added to fastspec since) counts only when it is not at fit()'s default.
The table path is checked before any fit: it may not be a folder, one of the spectra, or an existing file that is
not a table of an earlier batch; such tables in a folder of spectra are skipped (``tables_skipped``).
The table is written at the end, under a temporary name renamed into place, so it is complete or absent; an
interrupted batch (Ctrl-C, SIGTERM) stops the workers at once, keeps the journal and writes no table. A local worker
process that dies (killed, out of memory) stops the batch the same way, with an error; on Dask the scheduler
reschedules a lost worker's star and, past its allowed failures, that star gets a failed row (KilledWorker).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import threading
import time
import uuid
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._files import atomic_output, check_output
from .._scheduler import parse_scheduler
from ..decoder import Decoder
from ..observations import SUFFIXES, read_segments, read_spectrum
from .observation import Segment
from .results import FitQualityWarning
from .solver import fit

TABLE_FORMATS = (".csv", ".fits")
JOURNAL_VERSION = 1
IN_FLIGHT_PER_WORKER = 2  # stars handed out per worker at a time: each has its next star ready
MEDIA = ("air", "vacuum")
# column order of the table; the label columns (with their _err and _upper) go between HEAD and TAIL
HEAD = ("file", "status", "success")
TAIL = ("rv", "rv_err", "reduced_chi2", "chi2", "n_pixels", "quality", "converged", "error_estimate", "medium",
        "seconds", "reason", "notes")
TEXT = ("file", "status", "quality", "medium", "reason", "notes")
FLAGS = ("success", "converged")
REASON_CHARS = 200  # a failed star's reason: its first line, cut to this
INSTALL_DASK = 'pip install "fastspec[cluster]" (Dask\'s distributed scheduler)'


@dataclass(frozen=True)
class Star:
    """One entry of a batch: a spectrum file and, when it differs from the batch's, the medium of its wavelengths."""

    path: str
    medium: str | None = None


@dataclass
class BatchResult:
    """What `fit_batch` did: ``rows`` one dict per star in the order given (the table's rows; keys ``columns``),
    ``table`` the file written (None without one), ``n_skipped`` the stars the journal already held."""

    rows: list
    columns: list
    table: Path | None = None
    n_skipped: int = 0
    failures: list = field(default_factory=list)  # (file, reason) of the stars that could not be fitted
    tables_skipped: list = field(default_factory=list)  # earlier batch tables in the folder, not fitted

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    @property
    def n_quality_failed(self) -> int:
        """Stars fitted whose fit did not pass its quality checks (``success`` False)."""
        return sum(row["status"] == "ok" and not row["success"] for row in self.rows)


# -- the stars -----------------------------------------------------------------------------------------------

def read_star_list(path: str | Path) -> list[Star]:
    """The stars of a list file: one spectrum path per line, optionally followed by a comma and its medium (air or
    vacuum); blank lines and lines starting with # are skipped. Relative paths are relative to the current folder
    (as in IRAF @lists and tar -T), not to the list's."""
    path = Path(path)
    if path.name.lower().endswith(tuple(s for s in SUFFIXES if s not in (".txt", ".csv", ".dat", ".tsv"))):
        raise ValueError(f"{path}: a spectrum, not a list of spectra (a text file, one path per line, or a folder)")
    stars = []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = [x.strip() for x in next(csv.reader([line.strip()]))]
            if len(fields) > 2 or (len(fields) == 2 and fields[1].lower() not in MEDIA) or not fields[0]:
                _refuse_a_spectrum(path)
                raise ValueError(f"{path}: line {number}: expected PATH or PATH,air|vacuum, got {line.strip()!r}")
            stars.append(Star(fields[0], fields[1].lower() if len(fields) == 2 else None))
    if not stars:
        raise ValueError(f"{path}: no spectra listed")
    if not any(Path(s.path).is_file() for s in stars):
        _refuse_a_spectrum(path)
        raise ValueError(f"{path}: none of its {len(stars)} entries is a file (e.g. {stars[0].path!r}); a list has one "
                         "spectrum path per line, relative to the current folder")
    return stars


def _refuse_a_spectrum(path: Path) -> None:
    """A list file that turns out to be a spectrum: say so (instead of what is wrong with it as a list)."""
    try:
        read_spectrum(path)
    except Exception:
        return
    raise ValueError(f"{path} is a spectrum, not a list of spectra (fit one with `fastspec fit FILE`; a list has one "
                     "spectrum path per line)")


def stars_in_folder(folder: str | Path, exclude=(), tables: list | None = None) -> list[Star]:
    """Every file of `folder` (not its subfolders) that read_spectrum knows by its name, sorted; `exclude`: paths
    to leave out (the batch's own table and journal, when they are in it). Tables of earlier batches (by their
    columns, `is_batch_table`) are left out too, and appended to `tables`."""
    folder = Path(folder)
    skip = {Path(p).resolve() for p in exclude}
    stars = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.lower().endswith(SUFFIXES) and p.resolve() not in skip:
            if is_batch_table(p):
                if tables is not None:
                    tables.append(str(p))
            else:
                stars.append(Star(str(p)))
    if not stars:
        raise ValueError(f"{folder}: no spectra in this folder (files ending in {', '.join(SUFFIXES)})")
    return stars


def as_stars(spectra, exclude=(), tables: list | None = None) -> list[Star]:
    """A folder, a list file, or an iterable of paths / (path, medium) pairs / Stars -> [Star]; duplicates refused.
    `tables`: filled with the earlier batch tables a folder holds (not stars)."""
    if isinstance(spectra, (str, os.PathLike)):
        path = Path(spectra)
        if path.is_dir():
            stars = stars_in_folder(path, exclude, tables)
        elif path.is_file():
            stars = read_star_list(path)
        else:
            raise FileNotFoundError(f"{path}: no such folder or list file")
    else:
        stars = []
        for item in spectra:
            if isinstance(item, Star):
                stars.append(item)
            elif isinstance(item, (str, os.PathLike)):
                stars.append(Star(str(item)))
            else:
                path, medium = item
                stars.append(Star(str(path), medium))
        if not stars:
            raise ValueError("no spectra given")
    seen = set()
    for star in stars:
        if star.medium not in (None, *MEDIA):
            raise ValueError(f"{star.path}: medium must be 'air' or 'vacuum', got {star.medium!r}")
        if star.path in seen:
            raise ValueError(f"{star.path} is given twice: each star once (its row is found by its file)")
        seen.add(star.path)
    return stars


# -- one star, in a worker -----------------------------------------------------------------------------------

_LOCAL = threading.local()  # a worker's decoder: one per process (per thread on a Dask worker with several)


def _init_worker(model: str) -> None:
    """A local worker process: Ctrl-C goes to the driver, which stops the workers; the model is loaded now, once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _decoder(model)


def _decoder(model: str) -> Decoder:
    if getattr(_LOCAL, "model", None) != model:
        _LOCAL.decoder, _LOCAL.model = Decoder.load(model, device="cpu", threads=1), model
    return _LOCAL.decoder


def short_reason(exc: BaseException, text: str | None = None) -> str:
    """Why a star failed, for its row and the log: the exception's type and its message's first line, cut to
    REASON_CHARS (a reader's message can quote a whole line of the file)."""
    lines = (str(exc) if text is None else text).strip().splitlines() or [""]
    reason = f"{type(exc).__name__}: {lines[0]}"
    return reason if len(reason) <= REASON_CHARS else reason[:REASON_CHARS - 1] + "…"


def fit_one(path: str, medium: str, error, model: str, options: dict) -> dict:
    """Read and fit one spectrum; the table row (without `file`), also when it fails (status "failed", the reason)."""
    start = time.perf_counter()
    try:
        specs = read_segments(path)
        options = dict(options)
        given_lsf = options.pop("lsf", None)
        lsfs = [given_lsf if given_lsf is not None else spec.lsf() for spec in specs]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if len(specs) == 1:
                spec = specs[0]
                result = fit(spec.wavelength, spec.flux, spec.error if error is None else error, _decoder(model),
                             medium=medium, lsf=lsfs[0], **options)
            else:
                result = fit([Segment(s.wavelength, s.flux, s.error if error is None else error, lsf=lsf, name=s.name)
                              for s, lsf in zip(specs, lsfs)], decoder=_decoder(model), medium=medium, **options)
    except Exception as exc:  # the row says why; the batch goes on
        text = str(exc)
        if path not in text:  # read_spectrum's messages name the file; the fit's do not
            text = f"{path}: {text}"
        return {"status": "failed", "success": False, "medium": medium, "reason": short_reason(exc, text),
                "seconds": time.perf_counter() - start}
    # the quality checks are in `quality`; anything else that was said goes to `notes`
    notes = [note for spec in specs for note in (spec.notes if error is None else ())]
    notes += [f"{len(specs)} segments ({', '.join(spec.name for spec in specs)})"] if len(specs) > 1 else []
    notes += [f"R held at {seg['resolution']:.6g} by {'the given lsf' if given_lsf is not None else 'the file'}"
              + (f" ({spec.resolution_column})" if given_lsf is None and spec.resolution_column else "")
              + (f" for {seg['name']}" if len(specs) > 1 else "") for spec, seg in zip(specs, result.segments) if seg["lsf"]]
    notes += [str(w.message) for w in caught if not issubclass(w.category, FitQualityWarning)]
    row = {"status": "ok", "success": bool(result.success)}
    for name, value in result.labels.items():
        row[name], row[f"{name}_err"] = float(value), float(result.uncertainties[name])
    held = [seg["resolution"] for seg in result.segments if seg["lsf"]]
    if held and "resolution" not in result.labels:  # R not fitted: the LSF's (the median over the segments)
        row["resolution"] = float(np.median(held))
    for name, limit in result.upper_limits.items():
        row[f"{name}_upper"] = float(limit)
    row.update(rv=result.rv, rv_err=result.rv_uncertainty, reduced_chi2=float(result.reduced_chi2),
               chi2=float(result.chi2), n_pixels=int(result.n_pixels_used), quality="; ".join(result.quality),
               converged=bool(result.converged), error_estimate=result.error_estimate, medium=medium,
               seconds=time.perf_counter() - start, reason="", notes="; ".join(dict.fromkeys(notes)))
    return row


# -- where the fits run --------------------------------------------------------------------------------------

def _run_local(tasks: list, workers: int, model: str):
    """Yield (index, row) as the `workers` processes finish the tasks [(index, fit_one args)]."""
    import multiprocessing

    # spawn: a fresh interpreter, whatever threads this process holds (the progress bar's, BLAS's)
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(model,))
    todo, pending = iter(tasks), {}
    paths = {index: args[0] for index, args in tasks}
    try:
        while True:
            while len(pending) < IN_FLIGHT_PER_WORKER * workers and (task := next(todo, None)) is not None:
                pending[executor.submit(fit_one, *task[1])] = task[0]
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                index = pending.pop(future)
                try:
                    yield index, future.result()
                except BrokenProcessPool:
                    raise RuntimeError(f"a worker process died (killed, or out of memory?) while fitting {paths[index]} "
                                       "or another star in flight; the stars finished are kept (in the table's "
                                       "journal): run the same batch again to continue") from None
    except BaseException:
        # a fit in progress is not waited for: its star is just not done. shutdown() cannot stop a running task
        # (before Python 3.14's terminate_workers), so the processes are ended here.
        processes = list((getattr(executor, "_processes", None) or {}).values())
        executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join()
        raise
    executor.shutdown(wait=True)


def _ignore_sigint(dask_worker=None):
    """local:N: Ctrl-C (sent to the whole process group) is the driver's to handle; it closes the cluster."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not a process's main thread
        pass


def _run_dask(tasks: list, scheduler, model: str):
    """Yield (index, row) as a Dask cluster finishes the tasks; `scheduler` a --scheduler string (the cluster is
    closed at the end) or a distributed.Client (left open)."""
    try:
        import distributed
    except ImportError as exc:
        raise RuntimeError(f"--scheduler needs Dask ({exc}): {INSTALL_DASK}") from None
    cluster = None
    if isinstance(scheduler, str):
        kind, value = parse_scheduler(scheduler)
        try:
            if kind == "local":  # N processes of one thread: N fits at a time, as --workers N
                cluster = distributed.LocalCluster(n_workers=value, threads_per_worker=1, processes=True,
                                                   dashboard_address=None, silence_logs=logging.ERROR)
                client = distributed.Client(cluster)
                client.run(_ignore_sigint)
            elif kind == "file":
                client = distributed.Client(scheduler_file=value, timeout="60s")
            else:
                client = distributed.Client(value, timeout="60s")
        except (OSError, TimeoutError) as exc:
            if cluster is not None:
                cluster.close()
            raise RuntimeError(f"could not connect to the Dask scheduler {scheduler}: {exc}") from None
    else:
        client = scheduler
    run = uuid.uuid4().hex[:8]  # keys unique on a scheduler shared by several runs
    todo, pending = iter(tasks), {}
    results = distributed.as_completed(with_results=True, raise_errors=False)
    try:
        def refill():
            window = max(4, IN_FLIGHT_PER_WORKER * int(sum(client.nthreads().values())))
            while len(pending) < window and (task := next(todo, None)) is not None:
                future = client.submit(fit_one, *task[1], key=f"fastspec-fit-{task[0]}-{run}", pure=False)
                pending[future] = task[0]
                results.add(future)

        refill()
        for future, row in results:
            index = pending.pop(future)
            if future.status != "finished":  # fit_one returns its errors: this is the cluster's (a KilledWorker...)
                exc = future.exception()
                row = {"status": "failed", "success": False, "reason": short_reason(exc)}
            yield index, row
            refill()
    finally:
        if pending:
            client.cancel(list(pending), force=True)
        if cluster is not None:
            client.close()
            cluster.close()


# -- the journal and the table -------------------------------------------------------------------------------

def is_batch_table(path: str | Path) -> bool:
    """Whether `path` is a table fit_batch wrote (by its columns: file, status, success first, then the tail)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                columns = next(csv.reader(f), [])
        elif path.suffix.lower() == ".fits":
            from astropy.io import fits

            with fits.open(path) as hdus:
                columns = list(hdus[1].columns.names) if len(hdus) > 1 else []
        else:
            return False
    except Exception:  # unreadable, not text, not FITS, no astropy: not a table of ours
        return False
    return tuple(columns[:len(HEAD)]) == HEAD and set(TAIL) <= set(columns)


def _check_table_target(table: Path, stars: list) -> None:
    """Refuse, before any fit, a table path that would overwrite one of the batch's spectra or any existing file
    that is not a table of an earlier batch."""
    target = table.resolve()
    for star in stars:
        if Path(star.path).resolve() == target:
            raise ValueError(f"{table} is one of the batch's spectra ({star.path}); choose another table")
    if table.exists() and not is_batch_table(table):
        raise ValueError(f"{table} exists and is not the table of a batch (its columns are not file, status, "
                         "success, ...); it would be overwritten: move it away or choose another table")


def journal_path(table: str | Path) -> Path:
    table = Path(table)
    return table.with_name(table.name + ".journal")


class Journal:
    """The rows of finished stars, one JSON line each after a header line with the batch's settings; appended and
    flushed as stars finish, by the driver alone (a lock keeps a second batch off the same file)."""

    def __init__(self, path: Path, settings: dict, defaults: dict | None = None):
        self.path, self.rows = path, {}
        self.file = open(path, "a+b")
        try:
            self._lock()
            self.file.seek(0)
            data = self.file.read()
            lines = data.split(b"\n")
            if data and not data.endswith(b"\n"):  # the last line was cut short by a kill: dropped
                self.file.truncate(len(data) - len(lines[-1]))
            lines = [line for line in lines[:-1] if line.strip()]
            if not lines:
                self.file.truncate(0)
                self._append({"fastspec_fit_batch_journal": JOURNAL_VERSION, "settings": settings})
                return
            try:
                header = json.loads(lines[0])
                header["fastspec_fit_batch_journal"]
            except (ValueError, TypeError, KeyError):
                raise ValueError(f"{path} exists but is not the journal of a batch; move it away or choose another "
                                 "table") from None
            diff = settings_differences(header.get("settings") or {}, settings, defaults or {})
            if diff:
                raise ValueError(f"{path} is the journal of a batch with other settings ({'; '.join(diff)}); "
                                 "run that batch's command to continue it, or delete the journal (or choose another "
                                 "table) to start this one")
            for number, line in enumerate(lines[1:], start=2):
                try:
                    row = json.loads(line)
                except ValueError:
                    raise ValueError(f"{path}: line {number} is not JSON; the journal is damaged") from None
                key = row.pop("key", None)  # (absolute path, medium, size, mtime): rows of older journals have none
                if key is not None:
                    self.rows[tuple(key)] = row  # a star tried again: its last row
        except BaseException:
            self.file.close()
            raise

    def _lock(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{self.path}: another batch is writing this journal (the same table)") from None

    def _append(self, doc: dict) -> None:
        self.file.write((json.dumps(doc) + "\n").encode())
        self.file.flush()

    def add(self, row: dict, key: tuple) -> None:
        self._append({"key": list(key), **row})
        self.rows[tuple(key)] = row

    def close(self) -> None:
        self.file.close()


def settings_differences(old: dict, new: dict, defaults: dict) -> list[str]:
    """What differs between a journal's settings and this batch's, as "key: old → new"; a fit option the journal
    does not have (added to fastspec.fit after it was written) counts only when it is not at fit()'s default."""
    neutral = json.loads(json.dumps(defaults, default=str))
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key == "options" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if name not in a and name in neutral and b.get(name) == neutral[name]:
                    continue
                if a.get(name, "(absent)") != b.get(name, "(absent)"):
                    out.append(f"{name}: {json.dumps(a.get(name))} → {json.dumps(b.get(name))}")
        elif a != b:
            out.append(f"{key}: {json.dumps(a)} → {json.dumps(b)}")
    return out


def _star_key(star: Star, medium: str) -> tuple:
    """What identifies a star's journal row: its file (absolute, links resolved; its size and modification time,
    so that a replaced file is fitted again) and the medium it is fitted in."""
    path = os.path.realpath(star.path)
    try:
        stat = os.stat(path)
        size, mtime = stat.st_size, stat.st_mtime_ns
    except OSError:
        size = mtime = None
    return path, star.medium or medium, size, mtime


def columns_of(rows: list, label_names) -> list:
    """The table's columns: HEAD, the labels (the model's first, in its order) with _err and any _upper, TAIL."""
    names = list(label_names)
    for row in rows:
        names += [k[:-4] for k in row if k.endswith("_err") and k != "rv_err" and k[:-4] not in names]
    uppers = [f"{name}_upper" for name in names if name == "vsini" or any(f"{name}_upper" in row for row in rows)]
    return [*HEAD, *(c for name in names for c in (name, f"{name}_err")), *uppers, *TAIL]


def write_table(rows: list, columns: list, path: str | Path, units: dict | None = None, meta: dict | None = None) -> None:
    """The rows as CSV or FITS (by the extension of `path`), written complete or not at all."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise ValueError(f"{path}: unknown table format {path.suffix or '(no extension)'}; use {', '.join(TABLE_FORMATS)}")
    with atomic_output(path) as tmp:
        if suffix == ".csv":
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(columns)
                for row in rows:
                    writer.writerow(["" if _missing(row.get(c)) else row[c] for c in columns])
        else:
            _write_fits(rows, columns, tmp, units or {}, meta or {})


def _fits_unit(unit: str) -> bool:
    """Whether FITS can say `unit` (it cannot say dex: those columns go without one)."""
    from astropy import units as u

    try:
        u.Unit(unit).to_string("fits")
        return True
    except ValueError:
        return False


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _write_fits(rows, columns, tmp: Path, units: dict, meta: dict) -> None:
    try:
        from astropy.table import Table
    except ImportError:
        raise RuntimeError(f"a FITS table needs astropy: pip install 'fastspec[fits]' (or write {tmp.stem}.csv)") from None
    data = {}
    for c in columns:
        values = [row.get(c) for row in rows]
        if c in TEXT:
            data[c] = ["" if v is None else str(v) for v in values]
        elif c in FLAGS:
            data[c] = [bool(v) for v in values]
        else:
            data[c] = [math.nan if v is None else float(v) for v in values]
    table = Table(data, meta=meta)
    for c, unit in units.items():
        if c in table.columns and _fits_unit(unit):
            table[c].unit = unit
    table.write(tmp, format="fits")


# -- the batch -----------------------------------------------------------------------------------------------

def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def fit_batch(spectra, table: str | Path | None = None, *, model: str | Path | None = None, workers: int | None = None,
              scheduler=None, medium: str = "air", error: float | None = None, progress: bool = True,
              log=None, **options) -> BatchResult:
    """Fit many spectra, each on its own, with the same options; returns a BatchResult and writes ``table``.

    spectra: a folder (every spectrum file in it), a list file (one path per line, optionally ",air" or ",vacuum";
    see `read_star_list`), or an iterable of paths, (path, medium) pairs or `Star`. table: a .csv or .fits file to
    write (and its journal `<table>.journal`, which makes the same call resumable); None: none, the rows are only
    returned. model: a model file (default: the embedded one). workers: local processes (default 1); scheduler: a
    Dask scheduler instead ("tcp://HOST:PORT", a scheduler file, "local:N", or a distributed.Client). medium: of the
    wavelengths of every star without its own; error: one error for every pixel of every star (default: each
    file's, else estimated). options: passed to `fastspec.fit` for every star (rv, continuum_degree, bounds,
    rv_bounds, clip, loss, model_error, integrate, ...). log: where messages go (default: stderr, above the progress
    bar). Ctrl-C (KeyboardInterrupt) stops the workers and re-raises with the journal kept and no table written.

    On a local process pool the caller's script needs the usual ``if __name__ == "__main__":`` guard (workers
    are started fresh, spawn, and import it).
    """
    import inspect
    import sys

    from tqdm import tqdm

    if workers is not None and scheduler is not None:
        raise ValueError("give workers (local processes) or scheduler (a Dask cluster), not both")
    workers = 1 if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if isinstance(scheduler, str):
        parse_scheduler(scheduler)  # a bad value is refused before any work
    if medium not in MEDIA:
        raise ValueError(f"medium must be 'air' or 'vacuum', got {medium!r}")
    if error is not None and not (math.isfinite(error) and error > 0):
        raise ValueError(f"error must be a finite number > 0, got {error}")
    defaults = {name: p.default for name, p in inspect.signature(fit).parameters.items()
                if name not in ("wavelength", "flux", "error", "decoder", "medium")}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"fit_batch: unknown fit option {', '.join(unknown)}; fastspec.fit takes {', '.join(defaults)}")
    if table is not None:
        table = Path(table)
        check_output(table, TABLE_FORMATS, "table")  # the CLI's check of its outputs: before any work
        if table.suffix.lower() == ".fits":
            try:
                import astropy  # noqa: F401
            except ImportError:
                raise RuntimeError(f"{table}: a FITS table needs astropy: pip install 'fastspec[fits]'") from None
    log = log or (lambda message: tqdm.write(message, file=sys.stderr))
    exclude = () if table is None else (table, journal_path(table), table.with_name(table.name + ".partial"))
    tables = []
    stars = as_stars(spectra, exclude, tables)
    if table is not None:
        _check_table_target(table, stars)
    decoder = Decoder.load(model, device="cpu")  # a bad model is refused here, before any work
    model_path = str(Path(decoder.info["path"]).resolve())
    # what decides a star's row (fit's defaults spelt out, so that the CLI's and an API call's settings compare
    # equal): a journal written with other settings is not continued
    settings = json.loads(json.dumps({"model": model_path, "medium": medium, "error": error,
                                      "options": {**defaults, **options}}, default=str))
    journal = Journal(journal_path(table), settings, defaults) if table is not None else None
    keys = [_star_key(s, medium) for s in stars]
    rows, failures = {}, []
    try:
        done = {i: {**journal.rows[k], "file": s.path} for i, (s, k) in enumerate(zip(stars, keys))
                if journal is not None and journal.rows.get(k, {}).get("status") == "ok"}
        rows.update(done)
        # the workers get absolute paths (a Dask worker's folder is not ours); the table keeps them as given
        tasks = [(i, (os.path.abspath(s.path), s.medium or medium, error, model_path, options))
                 for i, s in enumerate(stars) if i not in done]
        runner = _run_dask(tasks, scheduler, model_path) if scheduler is not None else _run_local(tasks, workers, model_path)
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_interrupt) if on_main else None  # `kill`: as Ctrl-C
        try:
            with tqdm(total=len(stars), initial=len(done), unit=" stars", desc="fastspec fit --batch",
                      disable=not progress, dynamic_ncols=True) as bar:
                for index, row in runner:
                    star = stars[index]
                    row = {"file": star.path, **row}
                    rows[index] = row
                    if journal is not None:
                        journal.add(row, keys[index])
                    if row["status"] != "ok":
                        failures.append((index, star.path, row["reason"]))
                        log(f"fastspec fit --batch: {row['reason']}")
                    bar.update(1)
        finally:
            runner.close()  # stops the workers when the loop did not finish
            if on_main:
                signal.signal(signal.SIGTERM, previous)
    finally:
        if journal is not None:
            journal.close()
    ordered = [rows[i] for i in range(len(stars))]
    columns = columns_of(ordered, decoder.label_names)
    if table is not None:
        units = dict(zip(decoder.label_names, decoder.label_units))
        units.update({f"{n}_err": u for n, u in units.items()}, vsini_upper=units.get("vsini"), rv="km/s",
                     rv_err="km/s", seconds="s")
        write_table(ordered, columns, table, {c: u for c, u in units.items() if u},
                    {"MODEL": Path(model_path).name, "MEDIUM": medium})
    return BatchResult(ordered, columns, table, len(done), [f[1:] for f in sorted(failures)], tables)

"""Many stars (issue 25 item 5): `fastspec.fit_batch` on N synthetic stars with 1 and then 2 local worker processes,
side by side in one run, reported as stars per core-second and the scaling from 1 to 2 workers.

    python benchmarks/bench_fit_batch.py --n 1000 --out benchmarks/results/fit-batch-2026-12-03.md [--model M.fsm]

Stars: bench_fit.synthetic_problem (the model's own spectrum at random interior labels, an RV within ±50 km/s, a
quadratic continuum, noise at SNR 100, the model grid less 6 Å per side), one .npy file each, fitted with
`fastspec.fit`'s defaults. Each batch is timed from the call to its return (workers started, the model loaded in
each, every star fitted, the CSV written). Reported per batch: wall time, stars per second, stars per core-second
(stars / (workers × wall)), the CPU seconds the worker processes used (getrusage of the joined children) and
stars per CPU-second, which a machine shared with other work does not change as much as the wall time; the load
average around each batch; how many fits passed their quality checks and recovered every label within 3σ.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fit import load_decoder, synthetic_problem  # noqa: E402
from machine import machine  # noqa: E402

import fastspec  # noqa: E402


def make_stars(decoder, n: int, folder: Path) -> dict:
    """n spectra as .npy files in `folder`; {path: (truth, rv)}."""
    truths = {}
    for k in range(n):
        wl, flux, error, truth, rv = synthetic_problem(decoder, seed=1000 + k)
        path = folder / f"star{k:04d}.npy"
        np.save(path, np.column_stack([wl, flux, error]))
        truths[str(path)] = (truth, rv)
    return truths


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(folder: Path, workers: int, model: str | None, truths: dict) -> dict:
    load_before = os.getloadavg()[0]
    cpu0, t0 = children_cpu(), time.perf_counter()
    result = fastspec.fit_batch(folder, folder.parent / f"table-{workers}.csv", model=model, workers=workers,
                                progress=False)
    wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
    n = len(result.rows)
    good = 0
    for row in result.rows:
        truth, rv = truths[row["file"]]
        good += row["status"] == "ok" and all(abs(row[k] - v) <= 3 * row[f"{k}_err"] for k, v in truth.items())
    return dict(workers=workers, n=n, wall=wall, cpu=cpu, failed=result.n_failed,
                success=sum(r["status"] == "ok" and r["success"] for r in result.rows), within3=good,
                star_seconds=float(np.median([r["seconds"] for r in result.rows])),
                load=(load_before, os.getloadavg()[0]))


def report(runs: list, n: int, model: str, where: str) -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    base = runs[0]["n"] / runs[0]["wall"]
    lines = [f"# `fastspec fit --batch`: {n} synthetic stars on 1 and 2 worker processes", "",
             f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, `python benchmarks/bench_fit_batch.py --n {n}`; "
             f"model `{model}`; {where}.", "", "```", *lscpu, "```", "",
             "| workers | stars | wall [s] | stars / s | stars / core-second | worker CPU [s] | stars / CPU-second "
             "| median s per star (wall, in its worker) | scaling (stars / s against 1 worker) | load average before → after "
             "| passed quality checks | every label within 3σ |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        rate = r["n"] / r["wall"]
        lines.append(f"| {r['workers']} | {r['n']} | {r['wall']:.1f} | {rate:.3f} | {rate / r['workers']:.3f} | "
                     f"{r['cpu']:.1f} | {r['n'] / r['cpu']:.3f} | {r['star_seconds']:.2f} | {rate / base:.2f}× | "
                     f"{r['load'][0]:.1f} → {r['load'][1]:.1f} | {r['success']}/{r['n']} | {r['within3']}/{r['n']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="stars (default 1000)")
    p.add_argument("--workers", default="1,2", help="worker counts, one batch each, in this order (default 1,2)")
    p.add_argument("--model", help="model file (default: the packaged one)")
    p.add_argument("--out", type=Path, help="write the report (Markdown) here; it is printed either way")
    args = p.parse_args()
    where = machine()  # its load average: before the batches
    decoder = load_decoder(args.model)
    with tempfile.TemporaryDirectory(prefix="fit-batch-bench-") as tmp:
        runs = []
        for workers in (int(w) for w in args.workers.split(",")):
            folder = Path(tmp) / f"stars-{workers}"  # each batch its own folder and journal: nothing is skipped
            folder.mkdir()
            truths = make_stars(decoder, args.n, folder)
            runs.append(run(folder, workers, args.model, truths))
            print(runs[-1], file=sys.stderr, flush=True)
    text = report(runs, args.n, args.model or "packaged default (" + Path(decoder.info["path"]).name + ")", where)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

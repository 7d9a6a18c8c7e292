"""`fastspec-grid build` through Dask (`--scheduler local:N`) vs the local builder (`--workers N`).

    python benchmarks/bench_grid_dask.py run --dir runs/grid_bench --pairs 6 --n 48 --seed 3101
    python benchmarks/bench_grid_dask.py summary --dir runs/grid_bench > benchmarks/results/grid-dask-DATE.md

`run` alternates the two builders (local first in even pairs, Dask first in odd ones), each run a new
seed of full-range spectra, and records its wall time, load and the CPU time of the command and all its
children in DIR/runs.jsonl. Every run draws other labels, so its spectra are new training data (keep
clear of seed 2026: the shared hold-out comes from it). SYNSPEC's cost depends on the labels, so
`summary` compares the builders two ways that do not: the share of the worker slots' wall time spent
inside SYNSPEC (what the engine leaves to the work), and SYNSPEC's own time per spectrum at equal
labels (a least-squares fit of log seconds on a quadratic in the four labels plus a Dask indicator).
Not run in CI (minutes of SYNSPEC per run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(a) -> int:
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    seed = a.seed
    for pair in range(a.pairs):
        for arm in ("local", "dask") if pair % 2 == 0 else ("dask", "local"):
            where = ["--workers", str(a.workers)] if arm == "local" else ["--scheduler", f"local:{a.workers}"]
            out = d / f"{arm}_{seed}.h5"
            cmd = ["fastspec-grid", "build", "--n", str(a.n), "--seed", str(seed), "--no-progress", *where, "--out", str(out)]
            load0, cpu0, t0 = os.getloadavg()[0], _children_cpu(), time.perf_counter()
            rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
            row = {"pair": pair, "builder": arm, "workers": a.workers, "seed": seed, "rc": rc, "wall_s": time.perf_counter() - t0,
                   "cpu_s": _children_cpu() - cpu0, "load": [load0, os.getloadavg()[0]], "file": out.name}
            with open(d / "runs.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(row, flush=True)
            if rc != 0:
                return rc
            seed += 1
    return 0


def summary(a) -> int:
    import h5py

    d = Path(a.dir)
    runs = [json.loads(line) for line in open(d / "runs.jsonl")]
    labels, seconds, is_dask, run_of, table = [], [], [], [], []
    for k, r in enumerate(runs):
        with h5py.File(d / r["file"], "r") as f:
            done = f["done"][...].astype(bool)
            sec, lab = f["synspec_seconds"][...][done], f["labels"][...][done]
        n = int(done.sum())
        labels.append(lab), seconds.append(sec), is_dask.append(np.full(n, r["builder"] == "dask")), run_of.append(np.full(n, k))
        share = sec.sum() / (r.get("workers", a.workers) * r["wall_s"])
        table.append((r, n, 3600 * n / r["wall_s"], float(np.median(sec)), float(sec.sum()), share, r["cpu_s"] / n))
    print(f"# fastspec-grid build: Dask (`--scheduler local:{a.workers}`) vs local (`--workers {a.workers}`), full-range spectra\n")
    print(f"Machine: {machine()} (of the summary; each run's load is in the table); Python {platform.python_version()}. "
          "`python benchmarks/bench_grid_dask.py run` then `summary`.\n")
    print("| pair | builder | seed | N | wall s | spectra/h | SYNSPEC median s | Σ SYNSPEC s | SYNSPEC share of the slots | CPU s / spectrum | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r, n, per_h, med, tot, share, cpu in table:
        print(f"| {r['pair']} | {r['builder']} | {r['seed']} | {n} | {r['wall_s']:.1f} | {per_h:.0f} | {med:.2f} | {tot:.1f} | "
              f"{share:.4f} | {cpu:.2f} | {r['load'][0]:.2f}→{r['load'][1]:.2f} |")
    print()
    for arm in ("local", "dask"):
        rows = [t for t in table if t[0]["builder"] == arm]
        print(f"- **{arm}**: spectra/h median {np.median([t[2] for t in rows]):.0f}; SYNSPEC share of the slots median "
              f"{np.median([t[5] for t in rows]):.4f} ({min(t[5] for t in rows):.4f}–{max(t[5] for t in rows):.4f}); "
              f"CPU s per spectrum median {np.median([t[6] for t in rows]):.2f}")
    pairs = {}
    for t in table:
        pairs.setdefault(t[0]["pair"], {})[t[0]["builder"]] = t
    ratios = [p["dask"][5] / p["local"][5] for p in pairs.values() if len(p) == 2]
    print(f"- slot share, Dask / local per pair: {', '.join(f'{x:.4f}' for x in ratios)} (median {np.median(ratios):.4f})")
    x, y, dask = np.concatenate(labels), np.log(np.concatenate(seconds)), np.concatenate(is_dask).astype(float)
    z = (x - x.mean(0)) / x.std(0)
    design = np.column_stack([np.ones_like(y), dask, z] + [z[:, i] * z[:, j] for i in range(4) for j in range(i, 4)])
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    resid = y - design @ coef
    # Spectra of one run share its conditions (load, start-up): a standard error clustered by run, not by spectrum.
    bread = np.linalg.inv(design.T @ design)
    runs_idx = np.concatenate(run_of)
    meat = sum(np.outer(g, g) for g in (design[runs_idx == k].T @ resid[runs_idx == k] for k in np.unique(runs_idx)))
    err = float(np.sqrt((bread @ meat @ bread)[1, 1]))
    print(f"- SYNSPEC seconds per spectrum at equal labels, Dask vs local: {100 * np.expm1(coef[1]):+.1f} % ± {100 * err:.1f} % "
          f"({y.size} spectra in {len(runs)} runs; log seconds on a quadratic in teff, logg, mh, vmic plus a Dask indicator; "
          f"standard error clustered by run; residual scatter {np.sqrt(resid @ resid / (y.size - design.shape[1])):.3f} in ln s)")
    overhead = 1 - np.median(ratios) / np.exp(coef[1])
    print(f"- **engine overhead** (spectra per hour lost at equal labels = 1 − slot-share ratio / SYNSPEC-time ratio): "
          f"{100 * overhead:.1f} %")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    s = sub.add_parser("summary")
    for q in (r, s):
        q.add_argument("--dir", required=True)
        q.add_argument("--workers", type=int, default=2)
    r.add_argument("--pairs", type=int, default=6)
    r.add_argument("--n", type=int, default=48)
    r.add_argument("--seed", type=int, default=3101)
    a = p.parse_args(argv)
    return run(a) if a.cmd == "run" else summary(a)


if __name__ == "__main__":
    sys.exit(main())

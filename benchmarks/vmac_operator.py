"""The broadening stage with radial-tangential macroturbulence against the float64 reference, on SYNSPEC's fine mesh.

Truth: spectra of ../shared/data/synspec_fine_v4.h5 (0.005 Å, read as piecewise-linear) broadened by
training/fastspec_train/grid/reference.py with rotation, the λ/R Gaussian and then the macroturbulence profile
computed numerically and convolved in real space (reference.broaden(..., vmac=)). The stage: the C++ pixel-mean stage
(fastspec._core.Broadening, sampling="pixel_mean", 8 segments: the shipped model's) applied to the exact pixel means
of the same fine spectrum -- a perfect decoder. |ΔF| over the pixels of 4700-5300 Å (the reference is computed on
the fine mesh within 40 Å of that window, beyond any kernel's reach); each (v sin i, R) also without macroturbulence
(the floor the stage had before), side by side.

    nice -n 5 python benchmarks/vmac_operator.py --spectra 2 --out benchmarks/results/vmac-operator-DATE.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastspec_train.grid.reference import broaden, pixel_means  # noqa: E402
from machine import machine  # noqa: E402

from fastspec import _core  # noqa: E402

START, STEP, NPIX = 4450.0, 0.05, 19000
FINE = REPO.parent / "shared" / "data" / "synspec_fine_v4.h5"
CASES = [(1.6, 115000.0), (0.0, 115000.0), (5.0, 50000.0), (20.0, 20000.0)]
ZETAS = [2.0, 4.0, 8.0]
WINDOW = (4700.0, 5300.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fine", default=str(FINE))
    ap.add_argument("--spectra", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / f"vmac-operator-{dt.date.today()}.md"))
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    lam = START + STEP * np.arange(NPIX)
    inner = (lam >= WINDOW[0]) & (lam <= WINDOW[1])
    stage = _core.Broadening(START, STEP, NPIX, sampling="pixel_mean")
    stats = {}  # (v, R, zeta) -> list of |dF| arrays
    t0 = time.time()
    with h5py.File(args.fine, "r") as f:
        fstart, fstep = float(f.attrs["wavelength_start"]), float(f.attrs["wavelength_step"])
        n = f["flux"].shape[0]
        rows = np.sort(rng.choice(n, size=min(args.spectra, n), replace=False))
        teffs = f["labels"][...][rows, 0]
        fwave = fstart + fstep * np.arange(f["flux"].shape[1])
        near = (fwave >= WINDOW[0] - 40) & (fwave <= WINDOW[1] + 40)
        for row in rows:
            fine = f["flux"][row].astype(np.float64)
            pm = pixel_means(fwave, fine, lam, STEP).astype(np.float32)[None]
            for v, r in CASES:
                for z in [0.0] + ZETAS:
                    got = stage.apply(pm, np.array([v]), np.array([r]), vmac=np.array([z]))[0]
                    truth = broaden(fwave[near], fine[near], lam[inner], v, r, vmac=z)
                    stats.setdefault((v, r, z), []).append(np.abs(got[inner] - truth))
            print(f"row {row} done ({time.time() - t0:.0f} s)", flush=True)
    lines = [f"# The broadening stage with macroturbulence against the float64 reference ({dt.date.today()})", "",
             f"Machine: {machine()}. `python benchmarks/vmac_operator.py --spectra {args.spectra} --seed {args.seed}`: "
             f"{len(rows)} SYNSPEC fine-mesh spectra of `{Path(args.fine).name}` (rows {', '.join(map(str, rows))}; "
             f"Teff {', '.join(f'{t:.0f}' for t in teffs)} K), their exact pixel means through the C++ pixel-mean stage "
             "(a perfect decoder) against the fine mesh broadened in float64 with the macroturbulence profile "
             "computed numerically (disk quadrature) and convolved in real space "
             "(`fastspec_train.grid.reference.broaden(..., vmac=)`). |ΔF| pooled over the pixels of "
             f"{WINDOW[0]:.0f}-{WINDOW[1]:.0f} Å; ζ = 0 is the stage without macroturbulence (its floor before).", "",
             "| v sin i (km/s) | R | ζ (km/s) | median \\|ΔF\\| | 99th percentile | max \\|ΔF\\| |",
             "|---|---|---|---|---|---|"]
    for (v, r, z), ds in stats.items():
        d = np.concatenate(ds)
        lines.append(f"| {v:g} | {r:.0f} | {z:g} | {np.median(d):.2e} | {np.percentile(d, 99):.2e} | {d.max():.2e} |")
    lines += ["", "The maxima are at lines narrower than a pixel (the pixel means' own aliasing, the representation's "
              "floor with or without macroturbulence; benchmarks/results/operator-floor-2026-12-03.md)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The observed HARPS Sun (../shared/realstars/sun_harps.csv) fitted by `fastspec fit` with the resolving power held
at HARPS's 115000 (the model's upper bound: `--bound resolution=114900:115000`) and the macroturbulence held at 0
or fitted (`--vmac fit`), side by side; and, for context, R free with vmac held at 0 (the defaults) and fitted. A check on a real star, not a
tuning set: nothing is chosen from it.

    python benchmarks/sun_vmac.py [--model M.fsm] [--out benchmarks/results/sun-vmac-DATE.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402
from sun_fit import SUN, cell, fit  # noqa: E402

R_FIXED = ["--bound", "resolution=114900:115000"]
CASES = [("R 115000, vmac 0", R_FIXED + ["--vmac", "0"]),
         ("R 115000, vmac fitted", R_FIXED + ["--vmac", "fit"]),
         ("R free, vmac 0 (the defaults)", ["--vmac", "0"]),
         ("R free, vmac fitted", ["--vmac", "fit"])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model file (default: the packaged one)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / f"sun-vmac-{dt.date.today()}.md"))
    args = ap.parse_args()
    lines = [f"# The HARPS Sun with macroturbulence ({dt.date.today()})", "",
             f"Machine: {machine()}. `python benchmarks/sun_vmac.py`: `fastspec fit {SUN.name}` with its defaults "
             "plus the options in the first column (R held at 115000 by `--bound resolution=114900:115000`, the "
             "model's upper bound; `--vmac 0` or `--vmac fit`). Model: "
             f"`{args.model or 'the packaged default'}`. Reference: Teff 5771 K, log g 4.44, [M/H] 0.00, "
             "v_mic 1.06 km/s, v sin i 1.6 km/s, macroturbulence ~3-4 km/s (radial-tangential). Nothing was tuned on "
             "this spectrum.", "",
             "| case | Teff | log g | [M/H] | v_mic | v sin i | vmac | R | reduced χ² | time | exit | quality |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, extra in CASES:
        r = fit(args.model, extra)
        limit = r["upper_limits"]
        vmac = (cell(r, "vmac", ".2f") if r["vmac_fitted"] else f"{r['vmac']:g} (fixed)") + (
            f", < {limit['vmac']:.2f}" if "vmac" in limit else "")
        vsini = cell(r, "vsini", ".2f") + (f", < {limit['vsini']:.2f}" if "vsini" in limit else "")
        lines.append(f"| {name} | {cell(r, 'teff', '.0f')} | {cell(r, 'logg', '.3f')} | {cell(r, 'mh', '.3f')} | "
                     f"{cell(r, 'vmic', '.2f')} | {vsini} | {vmac} | {r['labels']['resolution']:.0f} | "
                     f"{r['reduced_chi2']:.1f} | "
                     f"{r['seconds']:.0f} s | {r['exit']} | {'; '.join(r['quality']) or 'ok'} |")
        print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`fastspec fit` with its defaults on the observed HARPS Sun (../shared/realstars/sun_harps.csv), against the Gaia
benchmark labels: the check of a model on a real star that issue 23 sets targets for (|ΔTeff| ≤ 60 K, |Δlog g| ≤
0.1, |Δ[M/H]| ≤ 0.05, R not on a bound). A check, not a tuning set: nothing is fitted to it.

    python benchmarks/sun_fit.py [--model M.fsm ...] [--out benchmarks/results/sun-fit-DATE.md]

Each model is fitted by the `fastspec fit` command as a user runs it (a subprocess; its JSON is read back).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402

SUN = REPO.parent / "shared" / "realstars" / "sun_harps.csv"
REFERENCE = {"teff": 5771.0, "logg": 4.44, "mh": 0.0, "vmic": 1.06, "vsini": 1.6}  # Heiter et al. 2015, Jofré 2014
TARGETS = {"teff": 60.0, "logg": 0.1, "mh": 0.05}


def fit(model: str | None, extra: list[str] = ()) -> dict:
    """`fastspec fit` on the Sun as a user runs it, with `extra` options; its JSON, exit status and seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sun.json"
        cmd = ["fastspec", "fit", str(SUN), "-o", str(out), *extra] + (["--model", model] if model else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if not out.exists():
            raise RuntimeError(f"{' '.join(cmd)} wrote nothing (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        return {"exit": proc.returncode, "seconds": time.perf_counter() - t0, **json.loads(out.read_text())}


def cell(r: dict, name: str, fmt: str) -> str:
    """'value ± sigma (Δ against the reference)' of one label of a fit."""
    lab, unc = r["labels"], r["uncertainties"]
    d = lab[name] - REFERENCE[name] if name in REFERENCE else None
    return f"{lab[name]:{fmt}} ± {unc[name]:{fmt}}" + (f" (Δ {d:+{fmt}})" if d is not None else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="model file(s) (default: the packaged one)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / f"sun-fit-{dt.date.today()}.md"))
    args = ap.parse_args()
    lines = [f"# `fastspec fit` on the HARPS Sun ({dt.date.today()})", "",
             f"Machine: {machine()}. `python benchmarks/sun_fit.py`: `fastspec fit {SUN.name}` with its defaults; "
             "reference labels Teff 5771 K, log g 4.44, [M/H] 0.00, v_mic 1.06 km/s, v sin i 1.6 km/s (+ ~4 km/s of "
             "macroturbulence, which the model has no label for). Targets: |ΔTeff| ≤ 60 K, |Δlog g| ≤ 0.1, "
             "|Δ[M/H]| ≤ 0.05, R not on a bound.", "",
             "| model | Teff | log g | [M/H] | v_mic | v sin i | R | reduced χ² | exit | quality |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model in args.model or [None]:
        r = fit(model)
        lines.append(f"| `{Path(r['model']).name}` | {cell(r, 'teff', '.0f')} | {cell(r, 'logg', '.3f')} | "
                     f"{cell(r, 'mh', '.3f')} | {cell(r, 'vmic', '.2f')} | {cell(r, 'vsini', '.2f')} | "
                     f"{r['labels']['resolution']:.0f} | "
                     f"{r['reduced_chi2']:.1f} | {r['exit']} | {'; '.join(r['quality']) or 'ok'} |")
        print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

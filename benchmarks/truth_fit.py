"""Fitting the truth: sharp-lined held-out stars, SYNSPEC's fine mesh broadened in float64 (not the model, not the
project's own operator), noise at SNR 200, fitted by `fastspec.fit` with its defaults. The check behind issue 23's
targets for sharp-lined stars (v_mic <= 1 km/s, SNR 200): |Δv_mic| <= 0.1 km/s and |Δ[M/H]| <= 0.01.

    python benchmarks/truth_fit.py --data runs/grid_v5/seed3200.h5 [--data runs/fine_v4_pixel.h5 --split all]
        [--model M.fsm] [--resolution 7500 20000 50000] [--n-stars 12] --out benchmarks/results/truth-fit-DATE.md

Stars: a file with a fine mesh (`fastspec-grid build --fine-step`, `fastspec-grid from-fine`); `--split test` takes
the rows the model never saw by its provenance's split (the model's own training file), `--split all` every row (a
file it was never trained on, such as the shared fine set). Of those, the first `--n-stars` (in row order) with
v_mic <= `--vmic-max`. Each is broadened at v sin i `--vsini` and every R, sampled at the model's wavelengths,
given Gaussian noise σ = 1/SNR (seeded), and fitted (RV and continuum free, the model's emulator error in the
variance: the defaults a user gets).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402

LABELS = ("teff", "logg", "vsini", "mh", "vmic", "resolution")


def held_out_rows(model_path: str, data: str, split: str) -> tuple:
    from fastspec_train.accuracy import _split_rows
    from fastspec_train.data import SpectraFile

    if split == "all":
        sf = SpectraFile(data)
        return sf, np.arange(sf.n)
    sf, rows, _ = _split_rows(Path(model_path), data, split)
    return sf, rows


def run(model_path: str, data: str, split: str, n_stars: int, vmic_max: float, vsini: float,
        resolutions: list[float], snr: float, seed: int) -> list[dict]:
    import fastspec
    from fastspec_train.grid import reference

    decoder = fastspec.Decoder.load(model_path)
    sf, rows = held_out_rows(model_path, data, split)
    if sf.fine_wavelength is None:
        raise SystemExit(f"{data} has no fine mesh: the truth cannot be made (fastspec-grid build --fine-step)")
    pick = [r for r in rows if sf.labels[r, 3] <= vmic_max][:n_stars]  # file labels: teff, logg, mh, vmic
    wave = decoder.wavelength
    rng = np.random.default_rng(seed)
    out = []
    for row in pick:
        teff, logg, mh, vmic = (float(v) for v in sf.labels[row])
        fine = sf.read_fine(np.array([row]))[0].astype(np.float64)
        for res in resolutions:
            truth = reference.broaden(sf.fine_wavelength, fine, wave, vsini, res, fine_sampling=sf.fine_sampling)
            flux = truth + rng.normal(0.0, 1.0 / snr, truth.shape)
            r = fastspec.fit(wave, flux, np.full_like(flux, 1.0 / snr), decoder)
            true = {"teff": teff, "logg": logg, "vsini": vsini, "mh": mh, "vmic": vmic, "resolution": res}
            out.append({"row": int(row), "true": true, "fit": {k: float(r.labels[k]) for k in LABELS},
                        "sigma": {k: float(r.uncertainties[k]) for k in LABELS}, "success": bool(r.success),
                        "chi2_reduced": float(r.reduced_chi2)})
            d = {k: out[-1]["fit"][k] - true[k] for k in ("teff", "logg", "mh", "vmic")}
            print(f"row {row} {teff:.0f}/{logg:.2f}/{mh:+.2f}/{vmic:.2f} R {res:.0f}: "
                  + " ".join(f"d{k} {v:+.3g}" for k, v in d.items()), flush=True)
    return out


def markdown(results: list[dict], args) -> str:
    lines = [f"# Fitting the truth: sharp-lined held-out stars ({dt.date.today()})", "",
             f"Machine: {machine()}. Model `{args.model or 'embedded default'}`; stars: `{args.data}` ({args.split} "
             f"rows, the first {args.n_stars} with v_mic <= {args.vmic_max}); truth = the fine mesh broadened in "
             f"float64 at v sin i {args.vsini} km/s, sampled at the model's wavelengths; SNR {args.snr:g}; "
             "`fastspec.fit` defaults (RV, quadratic continuum, emulator error). Targets (issue 23): "
             "|Δv_mic| <= 0.1 km/s, |Δ[M/H]| <= 0.01.", "",
             "| R | stars | median Δv_mic | median \\|Δv_mic\\| | median Δ[M/H] | median \\|Δ[M/H]\\| | "
             "median ΔTeff | median Δlog g | median σ(v_mic) | median σ([M/H]) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for res in sorted({r["true"]["resolution"] for r in results}):
        sel = [r for r in results if r["true"]["resolution"] == res]
        d = {k: np.array([r["fit"][k] - r["true"][k] for r in sel]) for k in ("teff", "logg", "mh", "vmic")}
        s = {k: np.array([r["sigma"][k] for r in sel]) for k in ("mh", "vmic")}
        lines.append(f"| {res:.0f} | {len(sel)} | {np.median(d['vmic']):+.3f} | {np.median(abs(d['vmic'])):.3f} | "
                     f"{np.median(d['mh']):+.4f} | {np.median(abs(d['mh'])):.4f} | {np.median(d['teff']):+.0f} | "
                     f"{np.median(d['logg']):+.3f} | {np.median(s['vmic']):.3f} | {np.median(s['mh']):.4f} |")
    lines += ["", "Per fit (true Teff/log g/[M/H]/v_mic, R: fit − true):", "",
              "| row | Teff | log g | [M/H] | v_mic | R | ΔTeff | Δlog g | Δ[M/H] | Δv_mic | χ²/dof |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t, f = r["true"], r["fit"]
        lines.append(f"| {r['row']} | {t['teff']:.0f} | {t['logg']:.2f} | {t['mh']:+.2f} | {t['vmic']:.2f} | "
                     f"{t['resolution']:.0f} | {f['teff'] - t['teff']:+.0f} | {f['logg'] - t['logg']:+.3f} | "
                     f"{f['mh'] - t['mh']:+.4f} | {f['vmic'] - t['vmic']:+.3f} | {r['chi2_reduced']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model file (default: the embedded one)")
    p.add_argument("--data", required=True, help="HDF5 grid with a fine mesh")
    p.add_argument("--split", choices=["test", "val", "all"], default="test")
    p.add_argument("--n-stars", type=int, default=12)
    p.add_argument("--vmic-max", type=float, default=1.0)
    p.add_argument("--vsini", type=float, default=3.0)
    p.add_argument("--resolution", type=float, nargs="+", default=[7500.0, 20000.0, 50000.0])
    p.add_argument("--snr", type=float, default=200.0)
    p.add_argument("--seed", type=int, default=3200)
    p.add_argument("--out", type=Path, help="markdown report (a .json beside it holds every fit)")
    args = p.parse_args()
    import fastspec

    model = args.model or str(Path(fastspec.__file__).parent / "data" / "default.fsm")
    results = run(model, args.data, args.split, args.n_stars, args.vmic_max, args.vsini, args.resolution,
                  args.snr, args.seed)
    if not results:
        raise SystemExit(f"no star of {args.data} ({args.split}) has v_mic <= {args.vmic_max}")
    text = markdown(results, args)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

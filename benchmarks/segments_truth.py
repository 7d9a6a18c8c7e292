"""Observations made from the truth, fitted with their line-spread function (issue 25's accuracy target): held-out
stars' SYNSPEC fine mesh, rotated and then seen through a Gaussian LSF whose R varies along the range, both in
float64 (`fastspec_train.grid.reference`: not the model, not its operator), integrated over each observed pixel,
with noise; fitted by `fastspec.fit` with each segment's LSF given (R held), RV, continuum and the emulator error as
a user gets them. Reports, per observation layout, the share of fits within 1σ of the truth (target 60-80 %) and
the median of (fit − truth)/σ (target |bias| <= 0.3σ) for Teff, log g, [M/H], v_mic and v sin i.

    python benchmarks/segments_truth.py --data runs/grid_v5/seed3200.h5 [--n-stars 12] [--snr 100]
        --out benchmarks/results/segments-truth-DATE.md

Layouts: "echelle" one segment 5000-5300 Å on 0.015 Å pixels (HARPS-like sampling) with R 40000 -> 60000 linear
across it; "two-arm" 4600-4900 Å and 5100-5390 Å on 0.1 Å pixels, R 6000 -> 7000 and 7000 -> 8000 (a survey
spectrograph's arms). Stars: the model's test split of its own training file (held out, same physics), the first
--n-stars rows; v sin i drawn U(2, 30) km/s per star (seeded).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402
from truth_fit import held_out_rows  # noqa: E402

CHECKED = ("teff", "logg", "mh", "vmic", "vsini")
LAYOUTS = {  # name: [(lo, hi, pixel step Å, R at lo, R at hi)]
    "echelle": [(5000.0, 5300.0, 0.015, 40000.0, 60000.0)],
    "two-arm": [(4600.0, 4900.0, 0.1, 6000.0, 7000.0), (5100.0, 5390.0, 0.1, 7000.0, 8000.0)],
}
SUB = 0.001  # Å: the mesh the LSF-broadened truth is computed on before each pixel's mean is taken


def observe(fine_wave, fine, fine_sampling, vsini, lo, hi, step, r_lo, r_hi, snr, rng):
    """One segment of the truth: rotation (float64 reference), then the λ-varying Gaussian LSF (closed form per
    point), then each pixel's mean; σ = 1/SNR noise. Returns wavelengths, flux, error and the LSF."""
    import fastspec
    from fastspec_train.grid import reference

    centres = np.arange(lo + step / 2, hi - step / 2 + 1e-9, step)
    resolution = lambda w: r_lo + (r_hi - r_lo) * (w - lo) / (hi - lo)  # noqa: E731
    reach = 8 * hi / (min(r_lo, r_hi) * 2.3548) + 1.0  # Å beyond the segment the Gaussians need
    inner = (fine_wave > lo - reach - 5.0) & (fine_wave < hi + reach + 5.0)
    rotated = reference.broaden(fine_wave, fine, fine_wave[inner], vsini, fine_sampling=fine_sampling)
    mesh = np.arange(lo - step, hi + step, SUB)
    seen = reference.gaussian_lsf(fine_wave[inner], rotated, mesh, resolution(mesh))
    flux = reference.pixel_means(mesh, seen, centres, step)
    error = np.full(centres.size, 1.0 / snr)
    lsf = fastspec.LSF([r_lo, r_hi], wavelength=[lo, hi])
    return centres, flux + rng.normal(0.0, 1.0 / snr, centres.size), error, lsf


def run(model_path, data, n_stars, snr, seed):
    import fastspec

    decoder = fastspec.Decoder.load(model_path, threads=1)
    sf, rows = held_out_rows(model_path, data, "test")
    if sf.fine_wavelength is None:
        raise SystemExit(f"{data} has no fine mesh: the truth cannot be made (fastspec-grid build --fine-step)")
    rng = np.random.default_rng(seed)
    out = []
    for row in rows[:n_stars]:
        teff, logg, mh, vmic = (float(v) for v in sf.labels[row])
        vsini = float(rng.uniform(2.0, 30.0))
        fine = sf.read_fine(np.array([row]))[0].astype(np.float64)
        true = {"teff": teff, "logg": logg, "mh": mh, "vmic": vmic, "vsini": vsini}
        for name, layout in LAYOUTS.items():
            segments = []
            for k, (lo, hi, step, r_lo, r_hi) in enumerate(layout):
                wl, flux, err, lsf = observe(sf.fine_wavelength, fine, sf.fine_sampling, vsini, lo, hi, step, r_lo,
                                             r_hi, snr, rng)
                segments.append(fastspec.Segment(wl, flux, err, lsf=lsf, name=f"{name} {k + 1}"))
            start = time.process_time()
            r = fastspec.fit(segments, decoder=decoder)
            cpu = time.process_time() - start
            out.append({"row": int(row), "layout": name, "true": true, "cpu_s": cpu, "success": bool(r.success),
                        "fit": {k: float(r.labels[k]) for k in CHECKED},
                        "sigma": {k: float(r.uncertainties[k]) for k in CHECKED},
                        "upper_limits": {k: float(v) for k, v in r.upper_limits.items()},
                        "chi2_reduced": float(r.reduced_chi2), "rv": float(r.rv)})
            z = {k: (out[-1]["fit"][k] - true[k]) / out[-1]["sigma"][k] for k in CHECKED}
            print(f"row {row} {teff:.0f}/{logg:.2f}/{mh:+.2f}/{vmic:.2f} v sin i {vsini:.1f} {name}: "
                  + " ".join(f"z_{k} {v:+.2f}" for k, v in z.items()) + f"  {cpu:.1f} CPU-s", flush=True)
    return out


def markdown(results, args) -> str:
    lines = [f"# Segments with their line-spread function, fitted on observations of the truth ({dt.date.today()})", "",
             f"Machine: {machine()}. Model `{args.model or 'embedded default'}`; stars: the test split of `{args.data}` "
             f"(the first {args.n_stars}); v sin i U(2, 30) km/s; truth = the fine mesh rotated and seen through a "
             "Gaussian LSF with R linear in λ across each segment, in float64, then each pixel's mean; SNR "
             f"{args.snr:g}; `fastspec.fit(segments)` with each segment's LSF (a table (λ, R)), pixel integration "
             "'auto' (the echelle pixels sampled, the arms' integrated), RV, quadratic continuum per segment, emulator "
             "error. Targets (issue 25): 60-80 % within 1σ, "
             "|median z| <= 0.3 (z = (fit − truth)/σ).", "",
             "Layouts: " + "; ".join(f"**{n}** " + ", ".join(f"{lo:g}-{hi:g} Å at {st:g} Å, R {a:g}->{b:g}"
                                                            for lo, hi, st, a, b in lay) for n, lay in LAYOUTS.items()),
             "", "| layout | fits | label | within 1σ | within 2σ | median z | median σ | CPU-s per fit (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in LAYOUTS:
        sel = [r for r in results if r["layout"] == name]
        cpu = np.median([r["cpu_s"] for r in sel])
        for k in CHECKED:
            z = np.array([(r["fit"][k] - r["true"][k]) / r["sigma"][k] for r in sel])
            lines.append(f"| {name} | {len(sel)} | {k} | {np.mean(abs(z) <= 1):.0%} | {np.mean(abs(z) <= 2):.0%} | "
                         f"{np.median(z):+.2f} | {np.median([r['sigma'][k] for r in sel]):.3g} | {cpu:.1f} |")
    lines += ["", "Per fit (true Teff/log g/[M/H]/v_mic/v sin i; z per label):", "",
              "| row | layout | Teff | log g | [M/H] | v_mic | v sin i | z Teff | z log g | z [M/H] | z v_mic | "
              "z v sin i | χ²/dof | success |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["true"]
        z = [(r["fit"][k] - t[k]) / r["sigma"][k] for k in CHECKED]
        lines.append(f"| {r['row']} | {r['layout']} | {t['teff']:.0f} | {t['logg']:.2f} | {t['mh']:+.2f} | "
                     f"{t['vmic']:.2f} | {t['vsini']:.1f} | " + " | ".join(f"{v:+.2f}" for v in z)
                     + f" | {r['chi2_reduced']:.2f} | {r['success']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model file (default: the embedded one)")
    p.add_argument("--data", required=True, help="the model's training file, with a fine mesh")
    p.add_argument("--n-stars", type=int, default=12)
    p.add_argument("--snr", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=3200)
    p.add_argument("--out", type=Path, help="markdown report (a .json beside it holds every fit)")
    args = p.parse_args()
    import fastspec

    model = args.model or str(Path(fastspec.__file__).parent / "data" / "default.fsm")
    results = run(model, args.data, args.n_stars, args.snr, args.seed)
    text = markdown(results, args)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

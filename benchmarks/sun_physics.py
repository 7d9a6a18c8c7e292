"""The training physics against the observed Sun, without the model: SYNSPEC at the Sun's labels over three
windows, χ² against the HARPS solar spectrum (../shared/realstars/sun_harps.csv) as log g varies, for the grid
builder's van der Waals damping as it is now (--damping abo: ABO cross-sections and enhancement factors converted)
and as the shared v1/v2 files had it (--damping classical).

    python benchmarks/sun_physics.py [--out benchmarks/results/sun-physics-DATE.md]

Per log g: Teff 5771 K, [M/H] 0, v_mic 1.06 km/s (the Gaia benchmark values); SYNSPEC's flux integrated over
0.005 Å cells (the builder's fine mesh), broadened in float64 (training's broadening on that mesh: rotation of an
effective v sin i standing in for v sin i + macroturbulence, then FWHM = λ/115000), interpolated onto the HARPS
pixels; per window a straight-line continuum factor is fitted by least squares, and the effective v sin i is the
best of a few values for each log g. A check of the physics, not a fit: the minimum's log g is what the damping
makes of the Sun's strong-line wings (the Sun's is 4.44). Not run in CI (a few minutes of SYNSPEC).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402

WINDOWS = {"Mg b wings 5160-5195": (5160.0, 5195.0), "5000-5100": (5000.0, 5100.0), "5200-5300": (5200.0, 5300.0)}
LOGGS = (4.0, 4.2, 4.44, 4.6, 4.8, 5.0)
VSINI_EFF = (2.0, 3.5, 5.0)  # km/s: v sin i 1.6 plus ~4 km/s of macroturbulence lies in this range
SUN = dict(teff=5771.0, mh=0.0, vmic=1.06)
R = 115000.0


def read_sun():
    data = np.genfromtxt(REPO.parent / "shared" / "realstars" / "sun_harps.csv", delimiter=",", names=True)
    return data["wavelength"], data["flux"], data["error"]


def model_spectrum(damping: str, logg: float, lo: float, hi: float):
    """(fine cell centres, SYNSPEC F/Fc integrated over 0.005 Å cells) over [lo − 2, hi + 2] Å."""
    from fastspec_train.grid import build as B, synspec, atmospheres

    cfg = B.GridConfig(wavelength_start=lo - 2.0, n_pixels=int(round((hi - lo + 4.0) / 0.05)) + 1, damping=damping)
    syn, ll, n = B.prepare(cfg)
    native, _ = synspec.run_synspec_native(syn, atmospheres.interpolate(SUN["teff"], logg, SUN["mh"]), SUN["mh"],
                                           SUN["vmic"], ll, n, cfg.synthesis_range())
    fine = lo - 2.0 + 0.005 * np.arange(int(round((hi - lo + 4.0) / 0.005)) + 1)
    return fine, native.pixel_means(fine, 0.005)


def chi2(fine, flux, vsini, wave, obs, err):
    import torch

    from fastspec_train.broadening import Broadener

    br = Broadener(fine[0], 0.005, fine.size, max_vsini=10.0, min_resolution=50000.0, dtype=torch.float64)
    broad = br(torch.from_numpy(flux[None]), vsini, R)[0].numpy()
    model = np.interp(wave, fine, broad)
    # a straight-line continuum factor, fitted by weighted least squares
    x = (wave - wave.mean()) / np.ptp(wave)
    a = np.column_stack([model, model * x]) / err[:, None]
    coef, *_ = np.linalg.lstsq(a, obs / err, rcond=None)
    resid = (obs - (coef[0] + coef[1] * x) * model) / err
    return float(resid @ resid), int(wave.size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / f"sun-physics-{dt.date.today()}.md"))
    args = ap.parse_args()
    wave_all, obs_all, err_all = read_sun()
    rows = {}
    for damping in ("classical", "abo"):
        for name, (lo, hi) in WINDOWS.items():
            sel = (wave_all >= lo) & (wave_all <= hi)
            w, o, e = wave_all[sel], obs_all[sel], err_all[sel]
            for logg in LOGGS:
                fine, flux = model_spectrum(damping, logg, lo, hi)
                best = min((chi2(fine, flux, v, w, o, e)[0], v) for v in VSINI_EFF)
                rows[(damping, name, logg)] = (best[0] / (w.size - 2), best[1])
                print(f"{damping:9s} {name:22s} log g {logg:4.2f}: reduced chi2 {rows[(damping, name, logg)][0]:8.1f} "
                      f"(v sin i eff {best[1]} km/s)", flush=True)
    lines = [f"# The training physics against the HARPS Sun ({dt.date.today()})", "",
             f"Machine: {machine()}. `python benchmarks/sun_physics.py` (see its docstring): SYNSPEC at Teff 5771 K, "
             "[M/H] 0, v_mic 1.06 km/s, integrated over 0.005 Å cells, broadened (effective v sin i, best of "
             f"{', '.join(map(str, VSINI_EFF))} km/s; R 115000), against `../shared/realstars/sun_harps.csv` with its "
             "errors, a straight-line continuum per window. Reduced χ² by log g; the Sun's log g is 4.44.", ""]
    for damping in ("classical", "abo"):
        lines += [f"## --damping {damping}", "", "| window | " + " | ".join(f"log g {g}" for g in LOGGS) + " | minimum |",
                  "|---|" + "---|" * (len(LOGGS) + 1)]
        for name in WINDOWS:
            vals = [rows[(damping, name, g)][0] for g in LOGGS]
            lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | log g {LOGGS[int(np.argmin(vals))]} |")
        lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A resolving power that varies along the range (the broadening stage's per-node resolution factors): cost and accuracy.

Cost: a default-size network (16 + 4 → 256 → 512 → 1024 → 19000, fp16 file, random weights) with the format-3
(pixel-mean) stage, forward and forward_jacobian at batch 1 and 32, with resolution factors against the same call
without them, round-robin in one run (ratio = the median of per-round ratios): the factors only change each node's
Gaussian width, so the kernels cost what the widths cost.

Accuracy: SYNSPEC spectra of ../shared/data/synspec_fine_v4.h5 (the rows nearest the given Teffs), their exact pixel
means through the shipped model's stage (pixel means, 8 segments; a perfect decoder) with factors for R(λ) rising
linearly from 20000 to 45000 across the grid, against the float64 truth where every pixel has its own Gaussian of
FWHM λ/R(λ) on the fine mesh (fastspec_train.grid.reference.gaussian_lsf), split into the pixel means' own floor and
the node blend's error, next to the constant-R stage against its constant-R truth (tests/test_lsf.py's lsf_accuracy).

    nice -n 5 python benchmarks/lsf.py --out benchmarks/results/lsf-DATE.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "training"), str(REPO / "tests"), str(Path(__file__).resolve().parent)]
from bench_broadening import _round_robin  # noqa: E402
from machine import machine  # noqa: E402
from test_lsf import fine_spectrum, lsf_accuracy  # noqa: E402

from fastspec import _core  # noqa: E402
from fastspec import model_format as mf  # noqa: E402

COST_CASES = [(2.0, 50000.0, (0.8, 1.2)), (10.0, 20000.0, (0.8, 1.2)), (2.0, 90000.0, (0.8, 1.2)),
              (2.0, 50000.0, (1.0, 1.0))]  # (v sin i, R, factors from the first node to the last)
TEFFS = [4500.0, 5000.0, 5800.0, 6500.0, 8000.0, 10000.0]


def cost(rounds: int) -> list[str]:
    import tempfile

    layers = mf.random_decoder([256, 512, 1024], latent_dim=16, n_labels=4, seed=1)
    path = mf.write_model(Path(tempfile.mkdtemp()) / "pixel.fsm", layers, latent_dim=16, labels=mf.INTRINSIC_LABELS,
                          weight_dtype="f16", broadening=mf.BroadeningStage(sampling="pixel_mean"), format_version=3)
    dec = _core.Decoder(_core.Model.load(str(path)))
    nodes = dec.stage_node_wavelengths()
    rows = ["| call | batch | v sin i (km/s) | R | factors | with factors (ms) | without (ms) | ratio |",
            "|---|---|---|---|---|---|---|---|"]
    for batch in (1, 32):
        for vsini, res, (g0, g1) in COST_CASES:
            labels = np.tile([5777.0, 4.44, vsini, 0.0, 1.0, res], (batch, 1))
            g = np.interp(nodes, [nodes[0], nodes[-1]], [g0, g1])
            for kind in ("forward", "jacobian"):
                call = dec.forward if kind == "forward" else dec.forward_jacobian
                calls = [lambda: call(labels, resolution_factors=g), lambda: call(labels)]
                _round_robin(calls, 3)
                t = _round_robin(calls, rounds)
                rows.append(f"| {kind} | {batch} | {vsini:g} | {res:g} | {g0:g} → {g1:g} | {np.median(t[:, 0]) * 1e3:.2f} | "
                            f"{np.median(t[:, 1]) * 1e3:.2f} | {np.median(t[:, 0] / t[:, 1]):.3f} |")
            print(rows[-2], rows[-1], sep="\n", flush=True)
    return rows


def accuracy() -> tuple[list[str], list[str]]:
    cases = ["factors", "per-pixel reading", "blend", "blend, 32 segments", "one R", "constant R 20000",
             "constant R 32500", "constant R 45000", "constant R 32500 blend"]
    pooled: dict[str, list[np.ndarray]] = {c: [] for c in cases}
    rows = ["| Teff (K) | " + " | ".join(cases) + " |", "|---" * (len(cases) + 1) + "|"]
    for teff in TEFFS:
        fwave, fine, t, lam, means = fine_spectrum(teff)
        errors = lsf_accuracy(fwave, fine, lam, means)
        rows.append(f"| {t:.0f} | " + " | ".join(f"{np.median(errors[c]):.1e} / {errors[c].max():.1e}" for c in cases) + " |")
        for c in cases:
            pooled[c].append(errors[c])
        print(rows[-1], flush=True)
    summary = ["| case | median \\|ΔF\\| | 99th percentile | max \\|ΔF\\| |", "|---|---|---|---|"]
    for c in cases:
        d = np.concatenate(pooled[c])
        summary.append(f"| {c} | {np.median(d):.2e} | {np.percentile(d, 99):.2e} | {d.max():.2e} |")
    return summary, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / f"lsf-{dt.date.today()}.md"))
    args = ap.parse_args()
    header = machine()
    t0 = time.time()
    cost_rows = cost(args.rounds)
    summary, per_star = accuracy()
    lines = [f"# A resolving power varying along the range: cost and accuracy ({dt.date.today()})", "",
             f"Machine: {header}. `python benchmarks/lsf.py --rounds {args.rounds}` ({time.time() - t0:.0f} s); the "
             "method is in the script's docstring.", "",
             "## Cost", "",
             "The pixel-mean model of the default size, one thread; resolution factors interpolated linearly over the "
             "stage's 9 nodes from the first value to the second, against the same call without factors, round-robin "
             "(ratio: median of per-round ratios).", "", *cost_rows, "",
             "## Accuracy", "",
             "R(λ) from 20000 at 4450 Å to 45000 at 5400 Å as factors g_s = R(λ_s)/30000 on the shipped model's "
             "stage (pixel means, 8 segments), v sin i 0, against the float64 truth with each pixel's own Gaussian of "
             "FWHM λ/R(λ) on the fine mesh (|ΔF| over 4480-5370 Å, pooled over the spectra below). *factors*: the "
             "stage against that truth. *per-pixel reading*: the same pixel means under each pixel's own Gaussian "
             "(the stage's band-limited kernel for that pixel's σ, no blend) against the truth: the representation's "
             "floor for this LSF. *blend*: the stage against that per-pixel reading: what the node blend itself adds "
             "(*32 segments*: the same for a stage of 32 segments instead of the model's 8). "
             "*one R*: the stage at R 32500 without factors (the variation ignored). *constant R …*: the constant-R "
             "stage against the truth for that R, and (*blend*) against its own per-pixel reading.", "",
             *summary, "", "Per spectrum (median / max |ΔF|):", "", *per_star, ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

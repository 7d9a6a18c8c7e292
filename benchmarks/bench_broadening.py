"""The broadening stage's cost at batch 1: a version-2 model (network + exact rotation and Gaussian) against the
same network alone, over the (v sin i, R) range. Target (issue 10): with broadening ≤ 1.3× the network alone.
And the version-3 stage for pixel means (band-limited kernels) against the version-2 one, side by side: target
(issue 23) batch-1 forward within 1.5× of the version-2 model's.

    FASTSPEC_BENCH_THREADS=1 python -m pytest benchmarks/bench_broadening.py --benchmark-json=out.json
    python benchmarks/bench_broadening.py out.json > out.md

And (test_vmac_cost) the version-3 stage with radial-tangential macroturbulence ζ > 0 against ζ = 0 on the same
model, forward and forward_jacobian (with the dF/dvmac column), round-robin likewise.

Both models have the default decoder's size (z 16 + 4 labels → 256 → 512 → 1024 → 19000) with the same random
weights, stored as fp16 like the shipped model. Within one benchmark the two run round-robin, one call each
per round, so the ratio (median of per-round ratios) sees the same machine load; forward_jacobian is measured
the same way.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest

from fastspec import _core
from fastspec import model_format as mf

CASES = [(0.0, 115000.0), (2.0, 50000.0), (10.0, 20000.0), (30.0, 20000.0), (100.0, 5000.0), (300.0, 115000.0),
         (0.0, 1000.0), (300.0, 1000.0)]
ROUNDS = 60
NETWORK_LABELS = tuple(lab for lab in mf.INTRINSIC_LABELS if lab.role == "network")


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_broadening")
    layers = mf.random_decoder([256, 512, 1024], latent_dim=16, n_labels=4, seed=1)
    full = mf.write_model(d / "full.fsm", layers, latent_dim=16, labels=mf.INTRINSIC_LABELS, weight_dtype="f16",
                          broadening=mf.BroadeningStage())
    net = mf.write_model(d / "net.fsm", layers, latent_dim=16, labels=NETWORK_LABELS, weight_dtype="f16")
    pixel = mf.write_model(d / "pixel.fsm", layers, latent_dim=16, labels=mf.INTRINSIC_LABELS, weight_dtype="f16",
                           broadening=mf.BroadeningStage(sampling="pixel_mean"), format_version=3)
    return tuple(_core.Decoder(_core.Model.load(str(p))) for p in (full, net, pixel))


def _round_robin(calls, rounds=ROUNDS):
    times = np.empty((rounds, len(calls)))
    for r in range(rounds):
        for k, call in enumerate(calls):
            t = time.perf_counter()
            call()
            times[r, k] = time.perf_counter() - t
    return times


@pytest.mark.parametrize("kind", ["forward", "jacobian"])
@pytest.mark.parametrize("vsini,resolution", CASES)
def test_broadening_overhead(benchmark, decoders, vsini, resolution, kind):
    full, net, pixel = decoders
    labels6 = np.array([[5777.0, 4.44, vsini, 0.0, 1.0, resolution]])
    labels4 = np.ascontiguousarray(labels6[:, [0, 1, 3, 4]])
    if kind == "forward":
        calls = [lambda: full.forward(labels6), lambda: net.forward(labels4), lambda: pixel.forward(labels6)]
    else:
        calls = [lambda: full.forward_jacobian(labels6), lambda: net.forward_jacobian(labels4),
                 lambda: pixel.forward_jacobian(labels6)]
    _round_robin(calls, 5)  # warm the workspaces
    t = _round_robin(calls)
    ratio = float(np.median(t[:, 0] / t[:, 1]))
    benchmark.extra_info.update(kind=kind, vsini=vsini, resolution=resolution, ratio=ratio,
                                with_broadening_ms=float(np.median(t[:, 0]) * 1e3),
                                network_alone_ms=float(np.median(t[:, 1]) * 1e3),
                                pixel_mean_ms=float(np.median(t[:, 2]) * 1e3),
                                pixel_mean_ratio=float(np.median(t[:, 2] / t[:, 0])))
    benchmark.pedantic(calls[0], rounds=20, iterations=1)


VMAC_CASES = [(2.0, 115000.0, 4.0), (2.0, 50000.0, 4.0), (10.0, 20000.0, 8.0), (100.0, 5000.0, 4.0),
              (2.0, 115000.0, 20.0)]


@pytest.mark.parametrize("kind", ["forward", "jacobian"])
@pytest.mark.parametrize("vsini,resolution,vmac", VMAC_CASES)
def test_vmac_cost(benchmark, decoders, vsini, resolution, vmac, kind):
    pixel = decoders[2]
    labels6 = np.array([[5777.0, 4.44, vsini, 0.0, 1.0, resolution]])
    v = np.array([vmac])
    if kind == "forward":
        calls = [lambda: pixel.forward(labels6, vmac=v), lambda: pixel.forward(labels6)]
    else:
        calls = [lambda: pixel.forward_jacobian(labels6, vmac=v, vmac_column=True), lambda: pixel.forward_jacobian(labels6)]
    _round_robin(calls, 5)
    t = _round_robin(calls)
    benchmark.extra_info.update(kind=kind, vsini=vsini, resolution=resolution, vmac=vmac,
                                vmac_ms=float(np.median(t[:, 0]) * 1e3), zero_ms=float(np.median(t[:, 1]) * 1e3),
                                vmac_ratio=float(np.median(t[:, 0] / t[:, 1])))
    benchmark.pedantic(calls[0], rounds=20, iterations=1)


def summarize(path: str) -> str:
    data = json.load(open(path))
    m = data.get("machine_info", {})
    lines = [f"# Broadening stage at batch 1 ({data.get('datetime', '?')[:10]})", "",
             f"Machine: {m.get('cpu', {}).get('brand_raw', m.get('processor', '?'))}, {m.get('node', '?')}; one thread. "
             "Default-size network (16 + 4 → 256 → 512 → 1024 → 19000, fp16 file) with and without the broadening "
             "stage, and with the version-3 stage for pixel means, round-robin in one run; ratios = medians of "
             "per-round ratios (targets: ≤ 1.3 with broadening / alone, ≤ 1.5 pixel means / point, forward).", "",
             "| call | v sin i (km/s) | R | with broadening (ms) | network alone (ms) | ratio | pixel-mean stage (ms) | "
             "pixel mean / point |", "|---|---|---|---|---|---|---|---|"]
    vm = [b["extra_info"] for b in data["benchmarks"] if "vmac" in b["extra_info"]]
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if "vmac" in e:
            continue
        pm = (f" {e['pixel_mean_ms']:.3f} | {e['pixel_mean_ratio']:.2f} |" if "pixel_mean_ms" in e else " | |")
        lines.append(f"| {e['kind']} | {e['vsini']:g} | {e['resolution']:g} | {e['with_broadening_ms']:.3f} | "
                     f"{e['network_alone_ms']:.3f} | {e['ratio']:.2f} |" + pm)
    if vm:
        lines += ["", "Macroturbulence (the pixel-mean model; forward_jacobian with the dF/dvmac column): ζ > 0 against ζ = 0.",
                  "", "| call | v sin i (km/s) | R | ζ (km/s) | ζ > 0 (ms) | ζ = 0 (ms) | ratio |", "|---|---|---|---|---|---|---|"]
        for e in vm:
            lines.append(f"| {e['kind']} | {e['vsini']:g} | {e['resolution']:g} | {e['vmac']:g} | {e['vmac_ms']:.3f} | "
                         f"{e['zero_ms']:.3f} | {e['vmac_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(summarize(sys.argv[1]))

"""GPU benchmark of the CUDA backend against PyTorch eager on the same weights (issue 12), run by gpu_check.sh.

Measures the device's two ceilings first (a device-to-device copy: bandwidth, counting bytes read + written; a
random 8192^3 bf16 and fp16 matrix product: the GEMM rate), then times, per network (the default model's size
16+6 -> 256-512-1024-19000 and the paper's 100+6 -> 1000-2000-4000-19000, random He-scaled weights written to model
files), dtype (f32, bf16, f16) and batch (1, 64, 4096): fastspec with CuPy arrays (labels from the host, as the API
takes them; output on the GPU), with and without CUDA graphs, and PyTorch eager (nn.Linear/ReLU/sigmoid in that
dtype, input already normalised on the GPU). Also the shipped default.fsm end to end (network + broadening stage) and
its agreement with the CPU core. Targets (issue 12):
  batch 1:    fastspec <= 2 x floor (weight bytes / measured bandwidth) and <= 0.5 x PyTorch eager's time;
  batch 4096: 16-bit fastspec >= 50 % of the measured GEMM rate of its dtype, and >= 3 x PyTorch eager's throughput.
Times are medians of repeated timed loops, each loop synchronised (wall clock over many calls, so the host work of
a call, label validation included, counts).

    python benchmarks/bench_gpu.py --out results.json --md results.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def median_time(fn, sync, *, min_time=0.15, repeats=5, warmup=3):
    for _ in range(warmup):
        fn()
    sync()
    # calls per loop so that a loop lasts about min_time / repeats
    t0 = time.perf_counter()
    fn()
    sync()
    one = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, min(2000, int(min_time / repeats / one)))
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def ceilings(torch):
    dev = torch.device("cuda")
    n = 1 << 30  # 4 GiB of float32: far beyond the L2
    a = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    b = torch.empty_like(a)
    sync = torch.cuda.synchronize
    t = median_time(lambda: b.copy_(a), sync, min_time=0.3)
    bandwidth = 2 * a.numel() * 4 / t
    del a, b
    gemm = {}
    for name, dt in (("bf16", torch.bfloat16), ("f16", torch.float16), ("f32", torch.float32)):
        m = 8192
        x = torch.randn(m, m, device=dev, dtype=dt)
        y = torch.randn(m, m, device=dev, dtype=dt)
        t = median_time(lambda: x @ y, sync, min_time=0.3, repeats=5)
        gemm[name] = 2 * m**3 / t
        del x, y
    torch.cuda.empty_cache()
    return bandwidth, gemm


def write_network(path, widths, latent, dtype, seed):
    from fastspec.model_format import random_decoder, write_model

    layers = random_decoder(widths, latent_dim=latent, seed=seed)
    write_model(path, layers, latent_dim=latent, weight_dtype=dtype, output_scale=1.05)
    return path


def torch_network(torch, decoder, tdtype):
    """nn.Sequential on the decoder's weights (as the core uses them) in tdtype; returns f(x_normalised)."""
    import torch.nn as nn

    mods = []
    ws = decoder.weights
    for k, (w, b) in enumerate(ws):
        lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
        mods += [lin, nn.ReLU() if k + 1 < len(ws) else nn.Sigmoid()]
    net = nn.Sequential(*mods).to(device="cuda", dtype=tdtype).eval()
    t = decoder.info["output_transform"]
    scale, offset = t["scale"], t["offset"]

    def run(x):
        with torch.no_grad():
            return net(x) * scale + offset

    return run


def normalised_inputs(decoder, labels):
    cols = []
    for j, lab in enumerate(decoder.info["labels"]):
        v = labels[:, j]
        lo, hi = lab["min"], lab["max"]
        if lab["scaling"] == "log10":
            v, lo, hi = np.log10(v), np.log10(lo), np.log10(hi)
        cols.append((v - (lo + hi) / 2) / ((hi - lo) / 2))
    z = np.zeros((len(labels), decoder.latent_dim))
    return np.concatenate([z, np.stack(cols, 1)], 1).astype(np.float32)


def random_labels(rng, decoder, n):
    lo = np.array([r[0] for r in decoder.label_ranges.values()])
    hi = np.array([r[1] for r in decoder.label_ranges.values()])
    return lo + (hi - lo) * rng.random((n, len(lo)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--batches", default="1,64,4096")
    ap.add_argument("--quick", action="store_true", help="shorter timing loops")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    import cupy as cp
    import torch

    import fastspec

    min_time = 0.05 if args.quick else 0.15
    props = torch.cuda.get_device_properties(0)
    result = {"device": torch.cuda.get_device_name(0), "sm": f"{props.major}{props.minor}",
              "multiprocessors": props.multi_processor_count, "torch": torch.__version__, "cupy": cp.__version__,
              "fastspec_build": fastspec.build_info(), "python": platform.python_version(), "rows": []}
    bandwidth, gemm = ceilings(torch)
    result["bandwidth_bytes_per_s"] = bandwidth
    result["gemm_flop_per_s"] = gemm
    print(f"device {result['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); GEMM "
          + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in gemm.items()), flush=True)

    rng = np.random.default_rng(0)
    tdt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
    sizes = {"default": ([256, 512, 1024], 16), "paper": ([1000, 2000, 4000], 100)}
    tmp = Path(tempfile.mkdtemp(prefix="fastspec_bench_"))
    for size, (widths, latent) in sizes.items():
        for dtype in ("f32", "bf16", "f16"):
            path = write_network(tmp / f"{size}_{dtype}.fsm", widths, latent, dtype, seed=1)
            info_dec = fastspec.Decoder.load(path, device="cpu")
            n_params = sum(w.size + b.size for w, b in info_dec.weights)
            weight_bytes = sum(w.size * (4 if dtype == "f32" else 2) + b.size * 4 for w, b in info_dec.weights)
            flops_per_row = 2 * sum(w.size for w, _ in info_dec.weights)
            floor_b1 = weight_bytes / (bandwidth / 2)  # the copy moved bandwidth/2 bytes/s each way
            tnet = torch_network(torch, info_dec, tdt[dtype])
            decs = {g: fastspec.Decoder.load(path, device="cuda", cuda_graphs=g, max_chunk=4096) for g in (True, False)}
            for n in batches:
                labels = random_labels(rng, info_dec, n)
                out = cp.empty((n, info_dec.n_pixels), cp.float32)
                row = {"network": size, "dtype": dtype, "batch": n, "params": n_params, "weight_bytes": weight_bytes,
                       "floor_s": floor_b1 if n == 1 else max(floor_b1 + n * info_dec.n_pixels * 4 / (bandwidth / 2),
                                                             n * flops_per_row / gemm.get(dtype, gemm["f32"]))}
                for g, d in decs.items():
                    row["fastspec_graphs_s" if g else "fastspec_plain_s"] = median_time(
                        lambda d=d: d(labels, out=out), cp.cuda.get_current_stream().synchronize, min_time=min_time)
                x = torch.from_numpy(normalised_inputs(info_dec, labels)).to("cuda", tdt[dtype])
                row["torch_eager_s"] = median_time(lambda: tnet(x), torch.cuda.synchronize, min_time=min_time)
                # agreement with the CPU core on these labels (first rows)
                ref = info_dec(labels[:64])
                got = cp.asnumpy(decs[True](labels[:64]))
                row["max_abs_vs_cpu"] = float(np.abs(got - ref).max())
                best = min(row["fastspec_graphs_s"], row["fastspec_plain_s"])
                row["fastspec_best_s"] = best
                row["achieved_flop_per_s"] = n * flops_per_row / best
                row["speedup_vs_torch"] = row["torch_eager_s"] / best
                result["rows"].append(row)
                print(f"{size:8s} {dtype:5s} n={n:5d}: fastspec {row['fastspec_graphs_s'] * 1e6:9.1f} us (graphs) "
                      f"{row['fastspec_plain_s'] * 1e6:9.1f} us (plain); torch {row['torch_eager_s'] * 1e6:9.1f} us; "
                      f"floor {row['floor_s'] * 1e6:8.1f} us; vs cpu {row['max_abs_vs_cpu']:.1e}", flush=True)
            del decs, tnet
            torch.cuda.empty_cache()
            cp.get_default_memory_pool().free_all_blocks()

    # The shipped model end to end (f16 network + broadening stage on the GPU), and CPU agreement.
    full = {"model": "default.fsm", "rows": []}
    cpu = fastspec.Decoder.load(device="cpu")
    for g in (True, False):
        d = fastspec.Decoder.load(device="cuda", cuda_graphs=g, max_chunk=4096)
        for n in batches:
            labels = random_labels(rng, cpu, n)
            out = cp.empty((n, cpu.n_pixels), cp.float32)
            t = median_time(lambda: d(labels, out=out), cp.cuda.get_current_stream().synchronize, min_time=min_time,
                            repeats=3)
            tj = median_time(lambda: d.jacobian(labels[:1]), lambda: None, min_time=min_time, repeats=3) if n == 1 else None
            m = min(n, 64)
            diff = float(np.abs(cp.asnumpy(d(labels[:m])) - cpu(labels[:m])).max())
            full["rows"].append({"graphs": g, "batch": n, "forward_s": t, "jacobian_batch1_host_s": tj,
                                 "max_abs_vs_cpu": diff})
            print(f"default.fsm graphs={g} n={n}: {t * 1e6:.1f} us"
                  + (f"; jacobian (batch 1, host arrays) {tj * 1e6:.1f} us" if tj else "") + f"; vs cpu {diff:.1e}",
                  flush=True)
    t_cpu = median_time(lambda: cpu(random_labels(rng, cpu, 1)), lambda: None, min_time=min_time, repeats=3)
    full["cpu_batch1_s"] = t_cpu
    result["default_fsm"] = full

    # Targets
    targets = []
    for r in result["rows"]:
        if r["batch"] == 1:
            targets.append({"what": f"{r['network']} {r['dtype']} batch 1 <= 2x floor", "value": r["fastspec_best_s"],
                            "limit": 2 * r["floor_s"], "pass": r["fastspec_best_s"] <= 2 * r["floor_s"]})
            targets.append({"what": f"{r['network']} {r['dtype']} batch 1 <= 0.5x torch eager",
                            "value": r["fastspec_best_s"], "limit": 0.5 * r["torch_eager_s"],
                            "pass": r["fastspec_best_s"] <= 0.5 * r["torch_eager_s"]})
        if r["batch"] == 4096 and r["dtype"] in ("bf16", "f16"):
            rate = gemm[r["dtype"]]
            targets.append({"what": f"{r['network']} {r['dtype']} batch 4096 >= 50% of GEMM rate",
                            "value": r["achieved_flop_per_s"], "limit": 0.5 * rate,
                            "pass": r["achieved_flop_per_s"] >= 0.5 * rate})
            targets.append({"what": f"{r['network']} {r['dtype']} batch 4096 >= 3x torch eager throughput",
                            "value": r["speedup_vs_torch"], "limit": 3.0, "pass": r["speedup_vs_torch"] >= 3.0})
    bound = {"f32": 1e-5, "bf16": 6e-2, "f16": 1e-2}
    for r in result["rows"]:
        targets.append({"what": f"{r['network']} {r['dtype']} batch {r['batch']} agrees with the CPU core",
                        "value": r["max_abs_vs_cpu"], "limit": bound[r["dtype"]],
                        "pass": r["max_abs_vs_cpu"] <= bound[r["dtype"]]})
    result["targets"] = targets
    args.out.write_text(json.dumps(result, indent=1, default=str))

    lines = [f"# GPU benchmark: {result['device']} (sm_{result['sm']})", "",
             f"Copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); GEMM "
             + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in gemm.items()) + f"; torch {torch.__version__}.", "",
             "| network | dtype | batch | fastspec graphs (us) | fastspec plain (us) | torch eager (us) | floor (us) | "
             "speedup vs torch | TFLOP/s | max abs vs CPU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['network']} | {r['dtype']} | {r['batch']} | {r['fastspec_graphs_s'] * 1e6:.1f} | "
                     f"{r['fastspec_plain_s'] * 1e6:.1f} | {r['torch_eager_s'] * 1e6:.1f} | {r['floor_s'] * 1e6:.1f} | "
                     f"{r['speedup_vs_torch']:.2f} | {r['achieved_flop_per_s'] / 1e12:.1f} | {r['max_abs_vs_cpu']:.1e} |")
    lines += ["", "default.fsm end to end (f16 network + broadening stage; broadening kernels built on the host):", "",
              "| graphs | batch | forward (us) | max abs vs CPU |", "|---|---|---|---|"]
    for r in full["rows"]:
        lines.append(f"| {r['graphs']} | {r['batch']} | {r['forward_s'] * 1e6:.1f} | {r['max_abs_vs_cpu']:.1e} |")
    lines += [f"", f"CPU core, batch 1: {t_cpu * 1e6:.1f} us.", "", "## Targets", "", "| target | value | limit | pass |",
              "|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['what']} | {t['value']:.3g} | {t['limit']:.3g} | {'yes' if t['pass'] else '**NO**'} |")
    md = "\n".join(lines) + "\n"
    if args.md:
        args.md.write_text(md)
    print(md)
    failed = [t["what"] for t in targets if not t["pass"]]
    print(f"targets: {len(targets) - len(failed)} of {len(targets)} met" + (f"; missed: {failed}" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

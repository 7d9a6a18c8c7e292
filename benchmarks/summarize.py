"""Markdown summary of a bench_decoder_cpu.py run:

    python benchmarks/summarize.py results.json > results.md
"""

from __future__ import annotations

import json
import statistics
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    mi = data["machine_info"]
    benches = data["benchmarks"]
    med = lambda b: b["stats"]["median"]  # noqa: E731
    info = lambda b: b["extra_info"]  # noqa: E731

    def rate(kind, what):
        out = {}
        for b in benches:
            if info(b)["kind"] == kind and what in b["name"]:
                per = info(b).get("flop_per_call") or info(b).get("bytes_per_call")
                out[info(b).get("phase", "?")] = per / med(b)
        return out

    sgemm_big, sgemm_dec = rate("sgemm", "4096"), rate("sgemm", "256x19000")
    read, copy = rate("bandwidth_read", "read"), rate("bandwidth_copy", "copy")
    sgemm = max([*sgemm_big.values(), *sgemm_dec.values()])
    read_bw = max(read.values())
    fmt = lambda d, unit, scale: ", ".join(f"{k} {v / scale:.1f}" for k, v in d.items()) + f" {unit}"  # noqa: E731

    cpu = mi.get("lscpu", {})
    print(f"# CPU decoder benchmark ({data['datetime'][:10]})\n")
    print(f"- CPU: {cpu.get('model')}, {cpu.get('cpus')} CPUs ({cpu.get('threads_per_core')} thread/core), "
          f"L2 {cpu.get('l2')}, L3 {cpu.get('l3')}")
    print(f"- flags of note: {', '.join(cpu.get('flags_of_note', []))}; absent: {', '.join(cpu.get('flags_absent', []))}")
    la0 = tuple(round(x, 2) for x in mi["loadavg_at_start"])
    la1 = tuple(round(x, 2) for x in mi.get("loadavg_at_end", ()))
    print(f"- load average (1/5/15 min): {la0} at start, {la1} at end, on 2 cores shared with other jobs "
          "(training, tests): timings are noisy; the backends of one (size, batch) ran back to back")
    fb = mi.get("fastspec_build", {})
    print(f"- fastspec {fb.get('version')}: {fb.get('blas_config')}; {fb.get('compiler')} `{fb.get('cxx_flags', '').strip()}`; "
          f"torch {mi.get('torch')}, numpy {mi.get('numpy')}, Python {mi.get('python')}; "
          f"{mi.get('bench_threads')} thread(s) unless stated")
    print(f"- machine, through the core's OpenBLAS (before / after the decoders): sgemm 4096³ {fmt(sgemm_big, 'GFLOP/s', 1e9)}; "
          f"sgemm 256×19000×4000 {fmt(sgemm_dec, 'GFLOP/s', 1e9)}; read bandwidth {fmt(read, 'GB/s', 1e9)}; "
          f"copy {fmt(copy, 'GB/s (read + write)', 1e9)}")
    print(f"- reference rates below: the best of these, sgemm {sgemm / 1e9:.1f} GFLOP/s and read {read_bw / 1e9:.1f} GB/s\n")

    dec = [b for b in benches if info(b)["kind"] == "decoder"]
    median = lambda xs: statistics.median(xs)  # noqa: E731
    for size in dict.fromkeys(info(b)["size"] for b in dec):
        groups = [b for b in dec if info(b)["size"] == size]
        f32 = groups[0]["extra_info"]["backends"]["fastspec"]
        mflop = info(groups[0])["flop_per_call"] / info(groups[0])["batch"] / 1e6
        print(f"## {size} decoder ({f32['weight_bytes'] / 4e6:.2f} M parameters, {mflop:.1f} MFLOP/spectrum)\n")
        print("| batch | threads | rounds | fastspec | torch | numpy | fastspec / torch | fastspec GFLOP/s | % of sgemm | spectra/s | fastspec bf16 | fastspec f16 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for g in sorted(groups, key=lambda b: (info(b)["batch"], info(b)["threads"])):
            bk = info(g)["backends"]
            t = {k: v["times"] for k, v in bk.items()}
            cell = lambda k: f"{median(t[k]) * 1e3:.3g} ({min(t[k]) * 1e3:.3g})" if k in t else "–"  # noqa: E731
            ratio = f"{median([a / b for a, b in zip(t['fastspec'], t['torch'])]):.2f}" if "torch" in t else "–"
            gf = info(g)["flop_per_call"] / median(t["fastspec"]) / 1e9
            print(f"| {info(g)['batch']} | {info(g)['threads']} | {len(t['fastspec'])} | {cell('fastspec')} | {cell('torch')} | "
                  f"{cell('numpy')} | {ratio} | {gf:.1f} | {100 * gf * 1e9 / sgemm:.0f} % | {info(g)['batch'] / median(t['fastspec']):.4g} | "
                  f"{cell('fastspec-bf16')} | {cell('fastspec-f16')} |")
        print()
        one = next(g for g in groups if info(g)["batch"] == 1 and info(g)["threads"] == mi.get("bench_threads"))
        print("Batch 1 against the floor (bytes of weights + biases / best measured read bandwidth):\n")
        for backend, v in info(one)["backends"].items():
            floor = v["weight_bytes"] / read_bw
            print(f"- {backend}: median {median(v['times']) * 1e3:.2f} ms, min {min(v['times']) * 1e3:.2f} ms; floor "
                  f"{v['weight_bytes'] / 1e6:.0f} MB / {read_bw / 1e9:.1f} GB/s = {floor * 1e3:.2f} ms → "
                  f"{median(v['times']) / floor:.2f}× (median), {min(v['times']) / floor:.2f}× (min)")
        print()
    print("## Targets\n")
    print("| size | target | measured | met |")
    print("|---|---|---|---|")
    for size in dict.fromkeys(info(b)["size"] for b in dec):
        groups = {(info(g)["batch"], info(g)["threads"]): info(g) for g in dec if info(g)["size"] == size}
        th = mi.get("bench_threads")
        t1 = {k: v["times"] for k, v in groups[(1, th)]["backends"].items()}
        per_round = lambda a, b: median([x / y for x, y in zip(a, b)])  # noqa: E731
        for backend in ("fastspec", "fastspec-bf16", "fastspec-f16"):
            if backend in t1:
                r = per_round(t1[backend], t1["torch"])
                print(f"| {size} | batch-1 latency ≤ 0.5× PyTorch eager ({backend}) | {r:.2f}× | {'yes' if r <= 0.5 else 'no'} |")
        g256 = {k: v["times"] for k, v in groups[(256, th)]["backends"].items()}
        r = per_round(g256["fastspec"], g256["torch"])
        print(f"| {size} | batch-256 throughput ≥ PyTorch | fastspec takes {r:.2f}× PyTorch's time | {'yes' if r <= 1 else 'no'} |")
        for batch in (256, 4096):
            if (batch, th) in groups:
                g = groups[(batch, th)]
                best = g["flop_per_call"] / min(g["backends"]["fastspec"]["times"]) / sgemm
                med_ = g["flop_per_call"] / median(g["backends"]["fastspec"]["times"]) / sgemm
                print(f"| {size} | batch {batch} at ≥ 70 % of the measured sgemm rate | {100 * med_:.0f} % (median), {100 * best:.0f} % (min) | "
                      f"{'yes' if med_ >= 0.7 else ('min only' if best >= 0.7 else 'no')} |")
        for backend in ("fastspec", "fastspec-bf16"):
            v = groups[(1, th)]["backends"].get(backend)
            if v:
                floor = v["weight_bytes"] / read_bw
                q, qmin = median(v["times"]) / floor, min(v["times"]) / floor
                print(f"| {size} | batch 1 within 1.5× of the floor ({backend}) | {q:.2f}× (median), {qmin:.2f}× (min) | "
                      f"{'yes' if q <= 1.5 else ('min only' if qmin <= 1.5 else 'no')} |")
    print()
    print("Times in ms per call (one call = one batch): median over rounds, minimum in parentheses. In each round every "
          "backend ran once, back to back, so 'fastspec / torch' is the median of per-round ratios (< 1: fastspec is "
          "faster). GFLOP/s, % of the best measured sgemm rate and spectra/s use fastspec's median. torch and numpy use "
          "the float32 weights; the bf16 / f16 columns are fastspec on 16-bit model files (the direct 16-bit GEMV at "
          "batch 1 on AVX-512F CPUs; OpenBLAS on the widened float32 weights at other batches).")

if __name__ == "__main__":
    main(sys.argv[1])

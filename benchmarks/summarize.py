"""Markdown summary of a bench_decoder_cpu.py run:

    python benchmarks/summarize.py results.json > results.md
"""

from __future__ import annotations

import json
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
    for size in dict.fromkeys(info(b)["size"] for b in dec):
        rows = [b for b in dec if info(b)["size"] == size]
        f32 = next(b for b in rows if info(b)["backend"] == "fastspec")
        wbytes = info(f32)["weight_bytes"]
        mflop = info(f32)["flop_per_call"] / info(f32)["batch"] / 1e6
        print(f"## {size} decoder ({wbytes / 4e6:.2f} M parameters, {mflop:.1f} MFLOP/spectrum)\n")
        print("| batch | threads | fastspec | torch | numpy | fastspec / torch | fastspec GFLOP/s | % of sgemm | spectra/s | fastspec bf16 | fastspec f16 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for batch, threads in sorted({(info(b)["batch"], info(b)["threads"]) for b in rows}):
            get = {info(b)["backend"]: b for b in rows if (info(b)["batch"], info(b)["threads"]) == (batch, threads)}
            fs = get["fastspec"]
            cell = lambda k: f"{med(get[k]) * 1e3:.3g} ({get[k]['stats']['min'] * 1e3:.3g})" if k in get else "–"  # noqa: E731
            ratio = f"{med(fs) / med(get['torch']):.2f}" if "torch" in get else "–"
            gf = info(fs)["flop_per_call"] / med(fs) / 1e9
            print(f"| {batch} | {threads} | {cell('fastspec')} | {cell('torch')} | {cell('numpy')} | {ratio} | {gf:.1f} | "
                  f"{100 * gf * 1e9 / sgemm:.0f} % | {batch / med(fs):.4g} | {cell('fastspec-bf16')} | {cell('fastspec-f16')} |")
        print()
        print("Batch 1 against the floor (bytes of weights + biases / read bandwidth):\n")
        for backend in ("fastspec", "fastspec-bf16", "fastspec-f16", "torch", "numpy"):
            b = next((b for b in rows if info(b)["backend"] == backend and info(b)["batch"] == 1 and info(b)["threads"] == mi.get("bench_threads")), None)
            if b is None:
                continue
            floor = info(b)["weight_bytes"] / read_bw
            print(f"- {backend}: {med(b) * 1e3:.2f} ms (min {b['stats']['min'] * 1e3:.2f}), floor {info(b)['weight_bytes'] / 1e6:.0f} MB / {read_bw / 1e9:.1f} GB/s = "
                  f"{floor * 1e3:.2f} ms → {med(b) / floor:.2f}× the floor (min: {b['stats']['min'] / floor:.2f}×)")
        print()
    print("Times are medians (minimum in parentheses) in ms per call (one call = one batch); GFLOP/s, % and spectra/s "
          "from the median. fastspec / torch < 1: fastspec is faster. torch and numpy use "
          "the float32 weights; the bf16/f16 columns are fastspec on 16-bit model files (direct 16-bit GEMV at batch 1 on "
          "AVX-512F CPUs, OpenBLAS on the widened float32 weights otherwise).")


if __name__ == "__main__":
    main(sys.argv[1])

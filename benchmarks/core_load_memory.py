"""Load time, resident memory and forward time of a model in one fresh process (one BLAS thread):
    python benchmarks/core_load_memory.py new MODEL.fsm
    python benchmarks/core_load_memory.py old MODEL.fsm path/to/other/_core.cpython-*.so   (another build, side by side)
Prints one JSON line: load_s, RSS growth after load / after a batch-1 call / after a batch-256 call (MB), the best
batch-1 (of 20) and batch-256 (of 3) forward times (ms). Results: benchmarks/results/core-lean-2026-12-01.md."""
import importlib.util, json, sys, time
import numpy as np
which, path = sys.argv[1], sys.argv[2]
if which == "old":
    spec = importlib.util.spec_from_file_location("_core", sys.argv[3])
    core = importlib.util.module_from_spec(spec); spec.loader.exec_module(core)
else:
    from fastspec import _core as core
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) / 1024
r0 = rss()
t = time.perf_counter(); m = core.Model.load(path); t_load = time.perf_counter() - t
r_load = rss() - r0
d = core.Decoder(m, threads=1)
labs = []
for lab in m.labels:
    labs.append((lab["min"] + lab["max"]) / 2)
x1 = np.array([labs], dtype=np.float64)
def best(f, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return min(ts)
d.forward(x1)
t1 = best(lambda: d.forward(x1), 20)
r_b1 = rss() - r0
x256 = np.repeat(x1, 256, axis=0)
d.forward(x256)
t256 = best(lambda: d.forward(x256), 3)
r_b256 = rss() - r0
print(json.dumps(dict(which=which, model=path.split("/")[-1], load_s=t_load, rss_after_load_mb=r_load,
                      rss_after_batch1_mb=r_b1, rss_after_batch256_mb=r_b256, batch1_ms=t1 * 1e3, batch256_ms=t256 * 1e3)))

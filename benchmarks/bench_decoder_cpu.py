"""CPU decoder benchmarks: fastspec core vs PyTorch eager vs plain NumPy, on the same weights.

    FASTSPEC_BENCH_THREADS=1 pytest benchmarks/bench_decoder_cpu.py --benchmark-json=out.json
    python benchmarks/summarize.py out.json > out.md

Two decoder sizes (paper: 106 -> 1000 -> 2000 -> 4000 -> 19000; default: 16 + 6 -> 256 -> 512 -> 1024 ->
19000), batches 1, 16, 256, 4096. The same run measures the sgemm rate and the memory bandwidth of
this machine through the very OpenBLAS the core uses (scipy-openblas32), so that summarize.py can
report GFLOP/s as a fraction of the measured sgemm rate and batch-1 latency against the
weight-bytes / bandwidth floor. Backends for one (size, batch) run back to back, so a noisy shared
machine affects them alike. Only the forward pass is timed (inputs and outputs preallocated where the
backend allows it); everything is float32 with float32 weights.
"""

from __future__ import annotations

import ctypes
import os
import time

import numpy as np
import pytest

from fastspec import _core
from fastspec import model_format as mf

# Set by benchmarks/conftest.py into OPENBLAS_NUM_THREADS etc. (read here, not imported: another
# conftest.py may own the module name "conftest" when tests/ and benchmarks/ are collected together).
THREADS = int(os.environ.get("FASTSPEC_BENCH_THREADS", "1"))

SIZES = {
    "default": dict(latent_dim=16, widths=[256, 512, 1024]),
    "paper": dict(latent_dim=100, widths=[1000, 2000, 4000]),
}
BATCHES = [1, 16, 256, 4096]
BACKENDS = ["fastspec", "torch", "numpy"]
# fastspec on f16 / bf16 model files: at batch 1 the direct 16-bit GEMV (AVX-512F) reads half the bytes.
BACKENDS_16 = ["fastspec-f16", "fastspec-bf16"]
N_PIXELS = 19000
TARGET_SECONDS = float(os.environ.get("FASTSPEC_BENCH_SECONDS", "1.5"))  # per benchmark, roughly


# ---- models ------------------------------------------------------------------------------------
_MODELS: dict[tuple, tuple] = {}


def model_for(size: str, tmp_dir, weight_dtype: str = "f32"):
    """(path, [(W, b)] as stored, latent_dim) for a random decoder of this size, written once per session."""
    if (size, weight_dtype) not in _MODELS:
        cfg = SIZES[size]
        layers = mf.random_decoder(cfg["widths"], latent_dim=cfg["latent_dim"], n_pixels=N_PIXELS, seed=1)
        path = mf.write_model(tmp_dir / f"{size}-{weight_dtype}.fsm", layers, latent_dim=cfg["latent_dim"],
                              weight_dtype=weight_dtype)
        _MODELS[(size, weight_dtype)] = (path, [(mf.quantize(l.weight, weight_dtype), l.bias) for l in layers],
                                         cfg["latent_dim"])
    return _MODELS[(size, weight_dtype)]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def labels_for(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(l.min, l.max, n) for l in mf.STANDARD_LABELS], axis=1)


def normalised_input(labels: np.ndarray, latent_dim: int) -> np.ndarray:
    """The decoder input rows [z = 0 | normalised labels] for the torch/NumPy baselines."""
    x = np.zeros((labels.shape[0], latent_dim + labels.shape[1]), dtype=np.float32)
    for j, l in enumerate(mf.STANDARD_LABELS):
        s = np.log10(labels[:, j]) if l.scaling == "log10" else labels[:, j]
        off, sc = l.normalisation()
        x[:, latent_dim + j] = (s - off) / sc
    return x


def flops_and_bytes(weights, weight_dtype="f32") -> tuple[int, int]:
    """FLOP per spectrum and the bytes of weights + biases one batch must read (as stored)."""
    flops = sum(2 * w.shape[0] * w.shape[1] for w, _ in weights)
    per_weight = 4 if weight_dtype == "f32" else 2
    nbytes = sum(w.size * per_weight + b.nbytes for w, b in weights)
    return flops, nbytes


def run(benchmark, fn):
    """Time fn with as many rounds as fit in TARGET_SECONDS (at least 3, after a warm-up call)."""
    t0 = time.perf_counter()
    fn()
    est = time.perf_counter() - t0
    rounds = int(max(3, min(200, TARGET_SECONDS / max(est, 1e-6))))
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1 if est < 0.5 else 0)


# ---- machine rates, through the OpenBLAS the core links ------------------------------------------
# Measured before and after the decoder benchmarks (pytest runs tests in file order), because the
# machine's load changes over a run; summarize.py uses the better of the two as the reference rate.
def _openblas():
    import scipy_openblas32 as o

    lib = ctypes.CDLL(os.path.join(o.get_lib_dir(), "libscipy_openblas.so"))
    lib.scipy_openblas_set_num_threads(THREADS)
    return lib


MACHINE = ["sgemm-4096^3", "sgemm-256x19000x4000", "read", "copy"]


def measure_machine(benchmark, what, phase):
    lib = _openblas()
    benchmark.group = "machine"
    if what.startswith("sgemm"):
        m, n, k = (4096, 4096, 4096) if what == "sgemm-4096^3" else (256, 19000, 4000)
        rng = np.random.default_rng(0)
        a = rng.random((m, k), dtype=np.float32)
        b = rng.random((n, k), dtype=np.float32)
        c = np.empty((m, n), dtype=np.float32)
        p = lambda arr: arr.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
        f = ctypes.c_float
        # C = A B^T, row-major: the decoder's layout (x W^T)
        fn = lambda: lib.scipy_cblas_sgemm(101, 111, 112, m, n, k, f(1.0), p(a), k, p(b), k, f(0.0), p(c), n)  # noqa: E731
        benchmark.extra_info.update(kind="sgemm", phase=phase, flop_per_call=2 * m * n * k, threads=THREADS)
        run(benchmark, fn)
        np.testing.assert_allclose(c[:2, :3], a[:2] @ b[:3].T, rtol=1e-4)
    else:
        # read: sasum over 512 MiB (what a GEMV does to its weights); copy: scopy (bytes read + written)
        n = 128 * 1024 * 1024
        x = np.ones(n, dtype=np.float32)
        y = np.zeros(n, dtype=np.float32)
        lib.scipy_cblas_sasum.restype = ctypes.c_float
        px, py = x.ctypes.data_as(ctypes.c_void_p), y.ctypes.data_as(ctypes.c_void_p)
        fn = (lambda: lib.scipy_cblas_sasum(n, px, 1)) if what == "read" else (lambda: lib.scipy_cblas_scopy(n, px, 1, py, 1))
        benchmark.extra_info.update(kind=f"bandwidth_{what}", phase=phase, threads=THREADS,
                                    bytes_per_call=x.nbytes * (1 if what == "read" else 2))
        run(benchmark, fn)


@pytest.mark.parametrize("what", MACHINE)
def test_machine_before(benchmark, what):
    measure_machine(benchmark, what, "before")


# ---- backends ----------------------------------------------------------------------------------
def make_fastspec(path, weights, latent_dim, batch, threads):
    dec = _core.Decoder(_core.Model.load(str(path)), threads=threads)
    labels = labels_for(batch)
    out = np.empty((batch, N_PIXELS), dtype=np.float32)

    def fn():
        dec.forward(labels, out=out)

    return fn, (lambda: out), labels


def make_torch(path, weights, latent_dim, batch, threads):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(threads)
    linears = []
    for w, b in weights:
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
        linears.append(lin)
    layers = []
    for lin in linears[:-1]:
        layers += [lin, torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, linears[-1], torch.nn.Sigmoid()).eval()
    x = torch.from_numpy(normalised_input(labels_for(batch), latent_dim))
    result = {}

    def fn():
        with torch.inference_mode():
            result["y"] = net(x)  # output_scale = 1, offset = 0 in the benchmark models

    return fn, (lambda: result["y"].numpy()), None


def make_numpy(path, weights, latent_dim, batch, threads):
    x0 = normalised_input(labels_for(batch), latent_dim)
    result = {}

    def fn():
        x = x0
        for w, b in weights[:-1]:
            x = np.maximum(x @ w.T + b, 0.0)
        w, b = weights[-1]
        a = x @ w.T + b
        np.negative(a, out=a)
        np.exp(a, out=a)
        a += 1.0
        result["y"] = np.reciprocal(a, out=a)

    return fn, (lambda: result["y"]), None


MAKERS = {"fastspec": make_fastspec, "torch": make_torch, "numpy": make_numpy}

# One benchmark per (size, batch, threads); inside it the backends run round-robin, one call each
# per round, so that a shared machine's changing load hits them alike (per-round ratios are robust).
GROUPS = []
for size in SIZES:
    for batch in BATCHES:
        backends = BACKENDS + (BACKENDS_16 if batch in (1, 16) else [])
        GROUPS.append((size, batch, THREADS, backends))
        if THREADS == 1 and batch in (1, 256):  # one-vs-two threads, for the core and PyTorch
            GROUPS.append((size, batch, 2, ["fastspec", "torch"]))


@pytest.mark.parametrize("size,batch,threads,backends", GROUPS, ids=[f"{s}-B{b}-t{t}" for s, b, t, _ in GROUPS])
def test_decoder(benchmark, model_dir, size, batch, threads, backends):
    fns, results, meta = {}, {}, {}
    for backend in backends:
        weight_dtype = backend.split("-")[1] if "-" in backend else "f32"
        path, weights, latent_dim = model_for(size, model_dir, weight_dtype)
        fn, result, _ = MAKERS[backend.split("-")[0]](path, weights, latent_dim, batch, threads)
        fns[backend], results[backend] = fn, result
        flops, nbytes = flops_and_bytes(weights, weight_dtype)
        meta[backend] = dict(weight_dtype=weight_dtype, weight_bytes=nbytes, path=path)
    times = {b: [] for b in backends}

    def one_round():
        for b in backends:
            t0 = time.perf_counter()
            fns[b]()
            times[b].append(time.perf_counter() - t0)

    try:
        t0 = time.perf_counter()
        one_round()  # warm-up (allocations, first-touch, thread pools)
        est = time.perf_counter() - t0
        for b in backends:
            times[b].clear()
        rounds = int(max(3, min(100, TARGET_SECONDS * len(backends) / max(est, 1e-6))))
        benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    finally:
        import torch

        torch.set_num_threads(THREADS)
    benchmark.group = "decoder"
    benchmark.extra_info.update(
        kind="decoder", size=size, batch=batch, threads=threads, flop_per_call=flops * batch,
        backends={b: dict(times=times[b], weight_dtype=meta[b]["weight_dtype"], weight_bytes=meta[b]["weight_bytes"])
                  for b in backends})
    # every backend computes the same thing: the core's float32 OpenBLAS path on the same file is the yardstick
    for b in backends:
        ref = _core.Decoder(_core.Model.load(str(meta[b]["path"])), direct_16bit=False).forward(labels_for(batch))
        np.testing.assert_allclose(results[b](), ref, rtol=2e-4, atol=1e-5, err_msg=b)


@pytest.mark.parametrize("what", MACHINE)
def test_machine_after(benchmark, what):
    measure_machine(benchmark, what, "after")

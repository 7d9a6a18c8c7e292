"""Fixtures for the CPU decoder benchmarks (bench_decoder_cpu.py).

Thread count: FASTSPEC_BENCH_THREADS (default 1) is exported as OPENBLAS_NUM_THREADS / OMP_NUM_THREADS
before NumPy or PyTorch load, so every backend runs with the same number of threads.
"""

from __future__ import annotations

import os

THREADS = int(os.environ.get("FASTSPEC_BENCH_THREADS", "1"))
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(THREADS)

import platform  # noqa: E402
import subprocess  # noqa: E402


def _lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = set(info.get("Flags", "").split())
    notable = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile"]
    return {
        "model": info.get("Model name"),
        "cpus": info.get("CPU(s)"),
        "threads_per_core": info.get("Thread(s) per core"),
        "l2": info.get("L2 cache"),
        "l3": info.get("L3 cache"),
        "flags_of_note": [f for f in notable if f in flags],
        "flags_absent": [f for f in notable if f not in flags],
    }


def pytest_benchmark_update_machine_info(config, machine_info):
    import fastspec._core as core

    machine_info["lscpu"] = _lscpu()
    machine_info["loadavg_at_start"] = os.getloadavg()
    machine_info["bench_threads"] = THREADS
    machine_info["fastspec_build"] = core.build_info()
    try:
        import torch

        machine_info["torch"] = torch.__version__
    except ImportError:
        pass
    import numpy

    machine_info["numpy"] = numpy.__version__
    machine_info["python"] = platform.python_version()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["machine_info"]["loadavg_at_end"] = os.getloadavg()

"""One line describing the machine a benchmark ran on (for the reports in benchmarks/results/)."""

from __future__ import annotations

import os
import platform


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?"
    return f"{platform.node()}: {cpu}, {os.cpu_count()} logical CPUs, load average {load} at start"

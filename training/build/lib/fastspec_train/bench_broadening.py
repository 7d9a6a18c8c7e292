"""Time the broadening at the training batch size: FFT vs direct grouped conv1d.

    python -m fastspec_train.bench_broadening [--batch 512] [--repeat 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from .broadening import Broadener


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    flux = torch.from_numpy(rng.uniform(0.3, 1.0, (a.batch, 19000)).astype(np.float32)).to(a.device)
    vs = torch.from_numpy(rng.uniform(0, 300, a.batch))
    rs = torch.from_numpy(10 ** rng.uniform(3, np.log10(115000), a.batch))
    for method in ("fft", "direct"):
        br = Broadener(4450.0, 0.05, 19000, method=method, device=a.device)
        br(flux[:8], vs[:8], rs[:8])  # warm-up
        times = []
        for _ in range(a.repeat):
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            br(flux, vs, rs)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        print(f"{method:6s} batch {a.batch}: best {min(times):.3f} s, median {np.median(times):.3f} s "
              f"({a.batch / min(times):.0f} spectra/s, {a.threads} thread(s), {a.device})")


if __name__ == "__main__":
    main()

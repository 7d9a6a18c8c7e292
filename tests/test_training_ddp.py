"""DistributedDataParallel with torchrun: 2 CPU processes, gloo backend, tiny config."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_training import REPO, _env, _weights, tiny_config, write_synthetic

from fastspec_train.train import train

pytestmark = pytest.mark.slow


def test_two_process_gloo_matches_one_process(tmp_path):
    """Each rank takes half of every global batch and DDP averages the gradients, so two processes must
    follow the single-process run with the same global batch (up to the order of float sums)."""
    data = tmp_path / "syn.h5"
    write_synthetic(data, n=150)
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        "-m", "fastspec_train", "train", "--config", "tiny", "--data", str(data), "--out", str(ddp_out)],
                       env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert (ddp_out / "checkpoint.pt").is_file() and (ddp_out / "loss_curve.png").is_file()
    log = (ddp_out / "train.log").read_text()
    assert "world 2" in log
    train(tiny_config(), data, single_out, quiet=True)
    a, b = _weights(ddp_out / "checkpoint.pt"), _weights(single_out / "checkpoint.pt")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |w_ddp - w_single| = {worst:.2e}")
    # Measured 2.4e-7 (3 runs on this tree, deterministic; training/README.md's 6e-8 is from an older model
    # code); bound 1e-6 (was 1e-5).
    assert worst < 1e-6, worst

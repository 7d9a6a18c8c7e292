"""Training loop: CVAE on intrinsic SYNSPEC spectra, single process or torchrun DDP.

Two targets (`model.target`): "intrinsic" learns the spectrum at v sin i = 0, R = ∞ from (z, teff, logg, mh,
vmic), and the inference core broadens it exactly; "broadened" (the paper's CVAE) learns all six labels
from spectra broadened on the fly with fresh (v sin i, R) draws.

Loss = MSE (mean over pixels and batch) + beta_eff * KL / n_pixels, KL summed over latent dims and averaged
over the (encoded) batch; `train.z0_fraction` of each batch is decoded at z = 0 without the encoder (so beta = 1 is the ELBO of a unit-variance Gaussian likelihood per pixel, up to constants;
see training/README.md for why that is a good choice here). Adam; LR schedule ReduceLROnPlateau on the
validation metric (or cosine); early stopping with patience on the validation reconstruction MSE of the
decoder at z = 0 (what the shipped model runs) by default.

Every epoch rank 0 writes `checkpoint.pt` atomically (model, optimizer, scheduler, RNG states, epoch, best
metric, early-stopping counter, history, elapsed time); `best.pt` holds the best weights. The per-epoch
randomness (order, v sin i, R, noise) comes from (seed, epoch) alone, so `--resume` continues exactly.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fastspec.model_format import boxed_labels

from .broadening import Broadener
from .config import Config
from .data import FluxSource, epoch_plan, fixed_plan, open_spectra, physical_labels, sha256_file, split_rows
from .labels import NETWORK_LABELS, network_ranges, normalise_labels
from .model import CVAE, kl_divergence


class Logger:
    def __init__(self, path: Path | None, echo: bool = True):
        self.fh = open(path, "a", buffering=1) if path else None
        self.echo = echo

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}Z {msg}"
        if self.echo:
            print(line, flush=True)
        if self.fh:
            self.fh.write(line + "\n")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_sampling_in_box(sampling, label_box: dict | None) -> None:
    """Refuse (v sin i, R) draws outside the label box (the data file's; none: the paper's): the network would see
    inputs beyond ±1 and the model file claim a range it was not trained on."""
    box = {lab.name: lab for lab in boxed_labels(label_box)}
    vs, r = box["vsini"], box["resolution"]
    if vs.min > 0 or sampling.vsini_max > vs.max or not r.min <= sampling.resolution_min < sampling.resolution_max <= r.max:
        raise ValueError(f"sampling draws v sin i from 0 to {sampling.vsini_max:g} km/s and R in [{sampling.resolution_min:g}, "
                         f"{sampling.resolution_max:g}], outside the label box (v sin i {vs.min:g}-{vs.max:g}, R "
                         f"{r.min:g}-{r.max:g}): set sampling.vsini_max, resolution_min, resolution_max within it")


def check_start_box(checkpoint: dict, path, label_box: dict | None, target: str) -> None:
    """A warm start (train.init_from, a checkpoint) is right only if its network was normalised in the same ranges
    as this data's label box: the same weights on differently scaled inputs are another function. Checkpoints
    record their box ("label_box"); one written before they did is taken as the paper's box, except onto data with
    a box, where it is refused (it may have been trained on a box of its own)."""
    if "label_box" not in checkpoint and label_box is not None:
        raise ValueError(f"train.init_from {path}: the checkpoint does not record the label box its weights were "
                         f"normalised in (written before checkpoints did), and the data has one ({label_box}); start "
                         "from the run's exported .fsm, whose label ranges say it")
    have, want = network_ranges(checkpoint.get("label_box"), target), network_ranges(label_box, target)
    if have != want:
        raise ValueError(f"train.init_from {path}: its network was normalised in {have}, the data's label box gives "
                         f"{want}; a warm start needs the same ranges for the labels the network takes")


def load_start(model: CVAE, init_from, grid: tuple, label_box: dict | None, target: str, device) -> None:
    """Load the weights of train.init_from into `model`: a checkpoint (an earlier run's best.pt, the same
    architecture) or a model file (a shipped model: its decoder only; the encoder starts fresh, it sees 10 % of the
    rows); refused by name when the file is not there or does not fit (architecture, grid, label ranges)."""
    if not Path(init_from).is_file():
        raise FileNotFoundError(f"train.init_from: no checkpoint at {init_from}")
    if Path(init_from).suffix == ".fsm":
        from .export import load_model_file_weights
        load_model_file_weights(model.decoder, init_from, grid, label_box)
        model.to(device)
    else:
        init = torch.load(init_from, map_location=device, weights_only=False)
        check_start_box(init, init_from, label_box, target)
        model.load_state_dict(init["model"])


class Batcher:
    """Turns a plan into (target flux, normalised labels, eps) batches on the device: the flux broadened
    with the plan's (v sin i, R) when a broadener is given, else the intrinsic flux (intrinsic target)."""

    def __init__(self, source: FluxSource, file_labels: np.ndarray, broadener: Broadener | None, device,
                 block_spectra: int, target: str = "broadened", label_box: dict | None = None):
        self.source, self.file_labels, self.br, self.device = source, file_labels, broadener, device
        self.target, self.label_box = target, label_box
        self.block = max(1, block_spectra)

    def batches(self, plan, batch_size: int, rank: int = 0, world: int = 1):
        """Yield per-rank batches: rows [rank·b/world, (rank+1)·b/world) of each global batch."""
        n = plan.local.size
        per_rank = batch_size // world
        starts = list(range(0, n, batch_size))
        # Read whole blocks of batches at once, so streaming hits the file in large sorted reads.
        per_block = max(1, self.block // batch_size)
        for k in range(0, len(starts), per_block):
            group = starts[k:k + per_block]
            sel = np.concatenate([np.arange(s + rank * per_rank, min(s + (rank + 1) * per_rank, n)) for s in group])
            flux_block = self.source.get(plan.local[sel])
            pos = 0
            for s in group:
                idx = np.arange(s + rank * per_rank, min(s + (rank + 1) * per_rank, n))
                yield self.make(flux_block[pos:pos + idx.size], plan, idx)
                pos += idx.size

    def make(self, flux: np.ndarray, plan, idx: np.ndarray):
        vs, res = plan.vsini[idx], plan.resolution[idx]
        x = torch.from_numpy(flux).to(self.device)
        if self.br is not None:
            x = self.br(x, torch.from_numpy(vs), torch.from_numpy(res))
        y = physical_labels(self.file_labels[plan.local[idx]], vs, res)
        return (x, normalise_labels(torch.from_numpy(y), self.target, self.label_box).to(self.device),
                torch.from_numpy(plan.eps[idx]).to(self.device))


@torch.no_grad()
def evaluate(model: CVAE, batcher: Batcher, plan, batch_size: int) -> dict:
    """Validation metrics over a fixed plan: MSE at z = mu, MSE and MAE at z = 0, KL."""
    model.eval()
    sums = {"val_mse": 0.0, "val_mse_z0": 0.0, "val_mae_z0": 0.0, "val_kl": 0.0}
    count = 0
    for x, y, _ in batcher.batches(plan, batch_size):
        mu, logvar = model.encode(x, y)
        rec = model.decoder(mu, y)
        rec0 = model.decoder(torch.zeros_like(mu), y)
        b = x.shape[0]
        sums["val_mse"] += float(((rec - x) ** 2).mean()) * b
        sums["val_mse_z0"] += float(((rec0 - x) ** 2).mean()) * b
        sums["val_mae_z0"] += float((rec0 - x).abs().mean()) * b
        sums["val_kl"] += float(kl_divergence(mu, logvar)) * b
        count += b
    model.train()
    return {k: v / max(count, 1) for k, v in sums.items()}


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("train_mse", "train MSE (z sampled)"), ("val_mse", "val MSE (z = μ)"),
                       ("val_mse_z0", "val MSE (z = 0)")):
        ax.semilogy(ep, [h[key] for h in history], label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("reconstruction MSE")
    ax.grid(alpha=0.3)
    ax.legend()
    ax2 = ax.twinx()
    lrs = [h["lr"] for h in history]
    ax2.set_yscale("log")
    if min(lrs) == max(lrs):  # one epoch or a constant LR: a span set first (autoscaling a flat one warns)
        ax2.set_ylim(lrs[0] / 2, lrs[0] * 2)
    ax2.plot(ep, lrs, "k:", lw=0.8)
    ax2.set_ylabel("learning rate (dotted)")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def beta_at(tcfg, epoch: int) -> float:
    """KL weight of an epoch: warm-up ramp, then the last of `beta_steps` whose epoch has been reached."""
    beta = tcfg.beta
    for start, value in sorted(tcfg.beta_steps):
        if epoch >= start:
            beta = float(value)
    return beta * (min(1.0, epoch / tcfg.kl_warmup_epochs) if tcfg.kl_warmup_epochs > 0 else 1.0)


def _make_scheduler(opt, tcfg):
    if tcfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=tcfg.plateau_factor,
                                                          patience=tcfg.plateau_patience, min_lr=tcfg.min_lr)
    if tcfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tcfg.max_epochs, eta_min=tcfg.min_lr)
    return None


def train(cfg: Config, data_path, out_dir: str | Path, *, resume: bool = False,
          max_epochs: int | None = None, max_minutes: float | None = None, quiet: bool = False) -> dict:
    """Train (or resume) and return a summary. Under torchrun (WORLD_SIZE > 1) runs DDP; rank 0 writes.

    `data_path`: one HDF5 file, or a list whose first file is the primary one (its split is the one the
    evaluation uses) and whose others add rows, split by the same label hash."""
    t_start = time.time()
    tcfg = cfg.train
    if max_epochs is not None:
        tcfg.max_epochs = int(max_epochs)
    if max_minutes is not None:
        tcfg.max_minutes = float(max_minutes)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = _device(tcfg.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if tcfg.batch_size % world:
            raise ValueError(f"batch_size {tcfg.batch_size} must be divisible by the {world} processes")
    if tcfg.threads > 0:
        torch.set_num_threads(tcfg.threads)
    out = Path(out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "train.log" if rank == 0 else None, echo=rank == 0 and not quiet)

    torch.manual_seed(tcfg.seed)
    np.random.seed(tcfg.seed % 2**32)
    random.seed(tcfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    sf = open_spectra(data_path)
    extra_paths = [str(p) for p in sf.paths[1:]]
    labels = sf.labels
    if cfg.data.max_spectra and extra_paths:
        raise ValueError("data.max_spectra (the first rows of one file, for tests) cannot be combined with extra data files")
    split = split_rows(sf, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed, cfg.data.max_spectra)
    split_sizes = {k: int(v.size) for k, v in split.items()}
    if split["train"].size == 0 or split["val"].size == 0:
        raise ValueError(f"{sf.path}: the split left train={split['train'].size}, val={split['val'].size} spectra")
    train_src = FluxSource(sf, split["train"], cfg.data.memory_limit_mb)
    val_src = FluxSource(sf, split["val"], cfg.data.memory_limit_mb)
    target = cfg.model.target
    br = None
    if target == "broadened":
        check_sampling_in_box(cfg.sampling, sf.label_box)
        br = Broadener(sf.wavelength_start, sf.wavelength_step, sf.n_pixels, epsilon=cfg.broadening.epsilon,
                       segments=cfg.broadening.segments, max_vsini=cfg.sampling.vsini_max,
                       min_resolution=cfg.sampling.resolution_min, device=device, sampling=sf.sampling)
    train_b = Batcher(train_src, labels[split["train"]], br, device, cfg.data.block_spectra, target, sf.label_box)
    val_b = Batcher(val_src, labels[split["val"]], br, device, cfg.data.block_spectra, target, sf.label_box)
    # Intrinsic spectra have no (v sin i, R) draws to vary: validate each spectrum once.
    val_plan = fixed_plan(split["val"].size, cfg.data.val_draws if br is not None else 1, cfg.model.latent,
                          cfg.sampling, tcfg.seed)

    model = CVAE(sf.n_pixels, len(NETWORK_LABELS[target]), cfg.model).to(device)
    # Mean training spectrum (intrinsic: good enough for a starting bias), read in blocks when streaming.
    mean = np.zeros(sf.n_pixels)
    for k in range(0, split["train"].size, cfg.data.block_spectra):
        mean += train_src.get(np.arange(k, min(k + cfg.data.block_spectra, split["train"].size))).sum(0)
    mean /= split["train"].size
    model.decoder.init_output_bias(torch.from_numpy(mean).float().to(device))
    # Per-pixel loss weights (mean 1): line pixels count more when line_weight > 0.
    pixel_weight = torch.from_numpy(1.0 + tcfg.line_weight * np.clip(1.0 - mean, 0.0, 1.0)).float().to(device)
    pixel_weight /= pixel_weight.mean()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.autocast == "bf16")
    if tcfg.init_from and not resume:
        # A second stage: start from an earlier run's weights (same architecture), fresh optimizer and schedule.
        load_start(model, tcfg.init_from, sf.grid, sf.label_box, target, device)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    sched = _make_scheduler(opt, tcfg)

    state = {"epoch": 0, "best": math.inf, "best_epoch": 0, "bad_epochs": 0, "history": [], "elapsed_s": 0.0}
    ckpt_path, best_path = out / "checkpoint.pt", out / "best.pt"
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        was = [ck.get("data"), *ck.get("extra_data", [])]
        if ck.get("data") is not None and [str(Path(p)) for p in was] != [str(p) for p in sf.paths]:
            raise ValueError(f"--resume: the checkpoint was trained on {was}; give the same --data files in that order")
        if ck.get("split_sizes") and ck["split_sizes"] != split_sizes:
            raise ValueError(f"--resume: the data changed since the checkpoint (split sizes {ck['split_sizes']}, now "
                             f"{split_sizes}); a run continues only on the same rows")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if sched is not None and ck.get("scheduler") is not None:
            sched.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        state = ck["state"]
        log(f"resumed from {ckpt_path} after epoch {state['epoch']} (best {state['best']:.4g} at epoch {state['best_epoch']})")
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    n_params = sum(p.numel() for p in model.parameters())
    log(f"data {sf.path}{f' + {len(extra_paths)} more file(s)' if extra_paths else ''} ({sf.n} spectra; train {split['train'].size}, val {split['val'].size}, test {split['test'].size}; "
        f"{'in memory' if train_src.in_memory else 'streamed'}); device {device}, world {world}, "
        f"threads {torch.get_num_threads()}; {n_params / 1e6:.2f} M parameters; config {cfg.name}"
        + (f"; extra data {', '.join(extra_paths)}" if extra_paths else "")
        + (f"; weights from {tcfg.init_from}" if tcfg.init_from else ""))
    from tqdm import tqdm

    n_pix = sf.n_pixels
    stop_reason = "max_epochs"
    run_start = time.time() - state["elapsed_s"]
    while state["epoch"] < tcfg.max_epochs:
        epoch = state["epoch"] + 1
        t0 = time.time()
        plan = epoch_plan(split["train"].size, cfg.data.draws_per_epoch, tcfg.batch_size, cfg.model.latent,
                          cfg.sampling, tcfg.seed, epoch)
        beta = beta_at(tcfg, epoch)
        annealing = tcfg.anneal_end_epoch > 0 and epoch >= tcfg.anneal_start_epoch
        if annealing:
            if epoch == tcfg.anneal_start_epoch or "anneal_base_lr" not in state:
                state["anneal_base_lr"] = opt.param_groups[0]["lr"]
            frac = min(1.0, (epoch - tcfg.anneal_start_epoch) / (tcfg.anneal_end_epoch - tcfg.anneal_start_epoch))
            lr = tcfg.min_lr + (state["anneal_base_lr"] - tcfg.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
            for group in opt.param_groups:
                group["lr"] = lr
        if tcfg.anneal_minutes > 0:
            annealing = True
            state.setdefault("anneal_base_lr", opt.param_groups[0]["lr"])
            frac = min(1.0, state["elapsed_s"] / (60.0 * tcfg.anneal_minutes))
            lr = tcfg.min_lr + (state["anneal_base_lr"] - tcfg.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
            if epoch <= tcfg.warmup_epochs:  # linear warm-up (a fresh Adam on trained weights takes large steps)
                lr *= epoch / (tcfg.warmup_epochs + 1)
            for group in opt.param_groups:
                group["lr"] = lr
        for start, end, peak in tcfg.lr_restarts:
            if start <= epoch <= end:
                annealing = True
                lr = tcfg.min_lr + (peak - tcfg.min_lr) * 0.5 * (1 + math.cos(math.pi * (epoch - start) / (end - start)))
                for group in opt.param_groups:
                    group["lr"] = lr
        sums = np.zeros(3)
        nb = plan.local.size // tcfg.batch_size
        bar = tqdm(train_b.batches(plan, tcfg.batch_size, rank, world), total=nb, desc=f"epoch {epoch}",
                   disable=rank != 0 or quiet or not sys.stderr.isatty(), leave=False)
        for x, y, eps in bar:
            with amp:
                rec, mu, logvar = ddp_model(x, y, eps, int(round(tcfg.z0_fraction * x.shape[0])))
            rec, mu, logvar = rec.float(), mu.float(), logvar.float()
            mse = (((rec - x) ** 2) * pixel_weight).mean()
            kl = kl_divergence(mu, logvar)
            loss = mse + beta * kl / n_pix
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            opt.step()
            sums += [loss.item(), mse.item(), kl.item()]
            bar.set_postfix(mse=f"{mse.item():.3g}")
        val = evaluate(model, val_b, val_plan, tcfg.batch_size)
        metric = val[tcfg.early_stopping_metric]
        if sched is not None and not annealing:
            sched.step(metric) if tcfg.scheduler == "plateau" else sched.step()
        improved = metric < state["best"] * (1 - tcfg.min_delta)
        if improved:
            state.update(best=metric, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["elapsed_s"] = time.time() - run_start
        row = {"epoch": epoch, "train_loss": sums[0] / nb, "train_mse": sums[1] / nb, "train_kl": sums[2] / nb,
               **val, "lr": opt.param_groups[0]["lr"], "beta": beta, "seconds": time.time() - t0}
        state["history"].append(row)
        if rank == 0:
            if improved:
                _atomic_save({"model": model.state_dict(), "epoch": epoch, "metric": metric,
                              "config": cfg.to_dict(), "label_box": sf.label_box}, best_path)
            _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict() if sched is not None else None, "rng": _rng_state(),
                          "state": state, "config": cfg.to_dict(), "data": str(sf.path), "extra_data": extra_paths, "split_sizes":
                          split_sizes, "label_box": sf.label_box}, ckpt_path)
            (out / "history.json").write_text(json.dumps(state["history"], indent=1))
            plot_history(state["history"], out / "loss_curve.png")
        log(f"epoch {epoch}: train mse {row['train_mse']:.4e} kl {row['train_kl']:.3g} | val mse(mu) {val['val_mse']:.4e} "
            f"mse(z=0) {val['val_mse_z0']:.4e} mae(z=0) {val['val_mae_z0']:.4e} | lr {row['lr']:.2e} "
            f"{'*' if improved else ' '} {row['seconds']:.1f}s")
        if state["bad_epochs"] >= tcfg.patience:
            stop_reason = f"early stopping: no improvement for {tcfg.patience} epochs"
            break
        if tcfg.max_minutes > 0 and state["elapsed_s"] >= 60 * tcfg.max_minutes:
            stop_reason = f"max_minutes {tcfg.max_minutes} reached"
            break
    log(f"stopped after epoch {state['epoch']} ({stop_reason}); best {tcfg.early_stopping_metric} "
        f"{state['best']:.4e} at epoch {state['best_epoch']}; {time.time() - t_start:.0f}s this process")
    summary = {"epochs": state["epoch"], "best_epoch": state["best_epoch"], "best_metric": state["best"],
               "metric": tcfg.early_stopping_metric, "stop_reason": stop_reason, "data": str(sf.path),
               "data_sha256": None, "extra_data": [{"path": p, "sha256": None} for p in extra_paths], "split_sizes": split_sizes}
    if rank == 0:
        summary["data_sha256"] = sha256_file(sf.path)
        for extra in summary["extra_data"]:
            extra["sha256"] = sha256_file(extra["path"])
        (out / "summary.json").write_text(json.dumps({**summary, "config": cfg.to_dict()}, indent=1))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    sf.close()
    return summary

"""`fastspec-train factory`: a wavelength range and a label box in, an evaluated model out, in one command.

Every stage is the project's own function; the factory only checks the request, chains them and keeps the books:

=========  ==========================================================================  =====================
stage      what                                                                        writes (in --out)
=========  ==========================================================================  =====================
grid       SYNSPEC spectra, labels drawn in the box with --seed, a 0.005 Å mesh kept   grid.h5
           for the float64 reference truth (fastspec_train.grid.build, or .cluster
           with --scheduler)
train      the config's network with its cosine LR anneal over exactly --minutes of    run/
           training (train.anneal_minutes = train.max_minutes = --minutes)
export     the decoder in f16 with its emulator error (16 validation stars) and       model.fsm
           label systematics (export.export_run)
testset    the grid's test split -- never trained on, nor used to stop training --    testset.h5
           broadened at 10 (v sin i, R) draws a star, seed --seed + 1
           (accuracy.write_testset)
evaluate   `fastspec evaluate` of model.fsm on testset.h5                              report/
=========  ==========================================================================  =====================

factory.json holds the request (what decides the outputs), which stages are done and the seconds each took, and
summary.md the numbers at the end. Before anything is written or any SYNSPEC run, the request is checked, the cheapest
checks first (check_at_once: --out, the label box's names and order, --workers/--scheduler/--in-flight, the range
against the line list's span, all before torch is imported or a line list converted): the line list must cover the
range, the label box must lie where ATLAS9 has atmospheres, the grid must be longer than the
edges the evaluation leaves out, the split must leave at least 10 validation and test stars (export.MIN_SPREAD_STARS:
the emulator error, label systematics and accuracy are spreads over stars), and --minutes must fit MIN_EPOCHS epochs
(a training step and an epoch's checkpoints are timed here). `--allow-small` lifts the last two for smoke runs; the
reports then say the numbers are not meaningful.

Each output appears complete or not at all (the grid file holds finished rows only, the run a checkpoint per
epoch; the model, test set and report are written under a temporary name and renamed), so Ctrl-C or `kill` at any
stage loses at most the work in progress, and the same command continues. A stage is done when its output is
there. Another request on the same --out is refused, naming what differs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

STAGES = ("grid", "train", "export", "testset", "evaluate")
STATE_FILE = "factory.json"
STATE_VERSION = 1
# The grid's label draw; the test set's (v sin i, R) draws use seed + 1. The project's grids used 2026-2028,
# 3101-3128 and 3200 (the shipped model's); 3300 is none of them.
DEFAULT_SEED = 3300
FINE_STEP = 0.005  # Å: the fine mesh kept in the grid, the input of the float64 reference truth
EMULATOR_ERROR_STARS = 16  # validation stars the emulator error is measured on (as for the shipped model)
TEST_DRAWS = 10  # (v sin i, R) draws per test star
WEIGHT_DTYPE = "f16"  # as the shipped model: half the file, 1e-6 of difference (training/README.md)
MIN_EPOCHS = 10  # fewer and the cosine anneal and the choice of the best epoch have little to work with
# Training settings the factory sets from --minutes: the schedule must end with the budget.
OWNED_SETTINGS = ("train.max_minutes", "train.anneal_minutes", "train.anneal_start_epoch", "train.anneal_end_epoch",
                  "train.max_epochs")


class FactoryError(ValueError):
    """A request the factory refuses, or a stage that could not finish; the message says why and what to do."""


def min_stars() -> int:
    from .export import MIN_SPREAD_STARS

    return MIN_SPREAD_STARS


@dataclass
class Request:
    """What decides the outputs (recorded in factory.json; a rerun must ask for the same)."""

    wavelength: tuple  # (start, step, n_pixels) as fastspec-grid's --wavelength parses it
    n: int
    minutes: float
    label_box: tuple | None = None  # ((name, lo, hi), ...) as fastspec-grid's --label
    linelist: str | None = None
    seed: int = DEFAULT_SEED
    config: str = "default"
    overrides: list = field(default_factory=list)  # --set
    allow_small: bool = False


@dataclass
class Execution:
    """How to run (not recorded: a rerun may use other workers or threads)."""

    workers: int | None = None
    scheduler: str | None = None
    in_flight: int | None = None
    threads: int | None = None
    device: str | None = None
    progress: bool = True
    log: object = print


# ------------------------------------------------------------------------------------------------ the request

def training_config(req: Request, ex: Execution):
    """The training Config of the request: --config with --set, the schedule fitted to --minutes."""
    from .config import load_config, with_overrides

    owned = [s for s in req.overrides if s.partition("=")[0].strip() in OWNED_SETTINGS]
    if owned:
        raise FactoryError(f"--set {owned[0]}: the factory sets {', '.join(OWNED_SETTINGS)} from --minutes (the "
                           "cosine anneal must end with the budget)")
    cfg = with_overrides(load_config(req.config), req.overrides)
    t = cfg.train
    t.max_minutes = t.anneal_minutes = float(req.minutes)
    t.anneal_start_epoch = t.anneal_end_epoch = 0
    t.max_epochs = 10**9  # the budget ends training, not an epoch count
    if ex.threads is not None:
        t.threads = ex.threads
    if ex.device is not None:
        t.device = ex.device
    if t.init_from:  # absolute: a rerun from another folder starts from the same file
        t.init_from = str(Path(t.init_from).resolve())
    return cfg


def grid_config(req: Request):
    from .grid import build as B

    start, step, npix = req.wavelength
    try:
        return B.GridConfig(wavelength_start=start, wavelength_step=step, n_pixels=npix, label_box=req.label_box,
                            linelist=str(Path(req.linelist).resolve()) if req.linelist else None, seed=req.seed,
                            fine_step=FINE_STEP)
    except ValueError as exc:
        if "fine_step" in str(exc):
            raise FactoryError(f"--wavelength step {step} Å: the factory keeps a {FINE_STEP} Å mesh for the "
                               f"reference truth, so the step must be a multiple of {FINE_STEP} Å") from None
        raise FactoryError(str(exc)) from None


LABEL_NAMES = ("teff", "logg", "vsini", "mh", "vmic", "resolution")  # what --label may name (the model's labels)


def check_at_once(out: Path, req: Request, ex: Execution) -> None:
    """The checks that need neither the training config nor torch nor a conversion, made first so that a typo is
    refused in a moment: the numbers, --out, the label box, how to run, the range against the line list's span."""
    from .grid import build as B

    if req.n < 1:
        raise FactoryError(f"--n must be at least 1, got {req.n}")
    if not (req.minutes > 0 and math.isfinite(req.minutes)):
        raise FactoryError(f"--minutes must be a positive number, got {req.minutes}")
    if out.exists() and not out.is_dir():
        raise FactoryError(f"--out {out} is a file; give a folder")
    for name, lo, hi in req.label_box or ():
        if name not in LABEL_NAMES:
            raise FactoryError(f"--label {name}: unknown label; known: {', '.join(LABEL_NAMES)}")
        if not lo < hi:
            raise FactoryError(f"--label {name}={lo:g}:{hi:g}: LO must be < HI")
    if ex.workers is not None and ex.workers < 1:
        raise FactoryError(f"--workers must be at least 1, got {ex.workers}")
    if ex.scheduler is not None:
        from fastspec._scheduler import parse_scheduler

        try:
            parse_scheduler(ex.scheduler)
        except ValueError as exc:
            raise FactoryError(str(exc)) from None
    if ex.in_flight is not None and ex.in_flight < 1:
        raise FactoryError(f"--in-flight must be at least 1, got {ex.in_flight}")
    gcfg = grid_config(req)
    span = B.linelist_span(gcfg)
    if span is not None:
        first, last, name = span
        lo, hi = gcfg.synthesis_range()
        if not (first < lo and hi < last):
            start, step, npix = req.wavelength
            end = start + step * (npix - 1)
            raise FactoryError(
                f"--wavelength {start:g}:{end:g}: the synthesis range {lo:g}-{hi:g} Å is not inside the line list ("
                f"{name}), which covers {first:g}-{last:g} Å: give a --wavelength within {first + start - lo:g}-"
                f"{last - (hi - end):g} Å, or a --linelist that covers the range")


def recorded(req: Request, cfg) -> dict:
    """The request as factory.json records it: the training config in full (a changed preset file counts) less
    what only says how to run."""
    train_cfg = cfg.to_dict()
    for key in ("threads", "device"):
        train_cfg["train"].pop(key)
    return {"wavelength": list(req.wavelength), "n": req.n, "minutes": req.minutes,
            "label_box": {name: [lo, hi] for name, lo, hi in req.label_box} if req.label_box else None,
            "linelist": str(Path(req.linelist).resolve()) if req.linelist else None, "seed": req.seed,
            "config": req.config, "set": list(req.overrides), "allow_small": req.allow_small,
            "training_config": train_cfg}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: was {json.dumps(a)}, now {json.dumps(b)}")
    return out


def split_counts(labels: np.ndarray, cfg) -> dict:
    from .data import split_indices

    d = cfg.data
    return {k: int(v.size) for k, v in split_indices(labels, d.val_fraction, d.test_fraction, d.split_seed).items()}


def smallest_n(req: Request, cfg, box, need: int) -> int | None:
    """The smallest --n whose split (with this seed and box) has `need` validation and test stars: a longer draw
    begins with the shorter one, so one draw of many rows answers for every n."""
    from .data import split_indices
    from .grid import build as B

    n_max = max(20 * req.n, 50 * need)
    labels = B.draw_labels(n_max, req.seed, box=box)
    d = cfg.data
    s = split_indices(labels, d.val_fraction, d.test_fraction, d.split_seed)
    val, test = np.zeros(n_max, int), np.zeros(n_max, int)
    val[s["val"]], test[s["test"]] = 1, 1
    ok = np.flatnonzero((np.cumsum(val) >= need) & (np.cumsum(test) >= need))
    return int(ok[0]) + 1 if ok.size else None


def time_training(cfg, n_pixels: int) -> tuple[float, float]:
    """(seconds of one training step, seconds an epoch spends outside its steps) of the config's network on this
    grid's pixels: steps on random data (the configured batch, threads and device; the median of three after a
    warm-up), and the two checkpoints and the loss curve every epoch writes."""
    import tempfile

    import torch

    from .labels import NETWORK_LABELS
    from .model import CVAE, kl_divergence
    from .train import _atomic_save, _device, plot_history

    t = cfg.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    device = _device(t.device)
    model = CVAE(n_pixels, len(NETWORK_LABELS[cfg.model.target]), cfg.model).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=t.lr)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(t.batch_size, n_pixels, generator=gen).to(device)
    y = (2 * torch.rand(t.batch_size, len(NETWORK_LABELS[cfg.model.target]), generator=gen) - 1).to(device)
    eps = torch.randn(t.batch_size, cfg.model.latent, generator=gen).to(device)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        rec, mu, logvar = model(x, y, eps, int(round(t.z0_fraction * t.batch_size)))
        loss = ((rec - x) ** 2).mean() + t.beta * kl_divergence(mu, logvar) / n_pixels
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):  # the second time: matplotlib's import and first figure cost the first epoch alone
            t0 = time.perf_counter()
            _atomic_save({"model": model.state_dict()}, Path(tmp) / "best.pt")
            _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict()}, Path(tmp) / "checkpoint.pt")
            plot_history([{"epoch": e, "train_mse": 1e-3, "val_mse": 1e-3, "val_mse_z0": 1e-3, "lr": 1e-3}
                          for e in (1, 2)], Path(tmp) / "loss_curve.png")
            overhead = time.perf_counter() - t0
    return float(np.median(times[1:])), overhead


@dataclass
class Plan:
    """A checked request: what the stages need."""

    req: Request
    cfg: object  # training Config
    grid_cfg: object
    labels: np.ndarray
    split: dict
    warnings: list
    estimate: dict


def check(req: Request, cfg, timing: tuple[float, float] | None = None) -> Plan:
    """Every check that can be made before SYNSPEC runs (see the module's docstring); raises FactoryError.
    timing: time_training's numbers as measured by the run that began this --out (None: measure them now), so that
    a rerun is not refused because the machine got busier."""
    from .accuracy import broadening_reach, default_edge
    from .export import systematics_margin
    from .grid import atmospheres, build as B
    from .grid.fetch import GridSetupError
    from .train import check_sampling_in_box

    gcfg = grid_config(req)
    box = gcfg.box()
    ranges = B.box_ranges(box)
    for name in ("vsini", "vmic"):
        if ranges[name][0] < 0:
            raise FactoryError(f"the label box's {name} starts at {ranges[name][0]:g}: it cannot be negative")
    try:
        atmospheres.check_box(ranges["teff"], ranges["logg"], ranges["mh"])
    except ValueError as exc:
        raise FactoryError(str(exc)) from None
    labels = B.draw_labels(req.n, req.seed, box=box)

    # edges: the accuracy leaves out the broadening's reach at both ends, the label systematics its margin
    start, step, npix = req.wavelength
    grid = SimpleNamespace(path=f"--wavelength {start:g}:{start + step * (npix - 1):g}:{step:g}",
                           wavelength_start=start, wavelength_step=step, n_pixels=npix)
    end = start + step * (npix - 1)
    reach = broadening_reach(grid, ranges)
    if 2 * reach >= end - start:
        raise FactoryError(f"{grid.path}: the grid is {end - start:g} Å long, but the widest broadening kernel of the "
                           f"label box (v sin i {ranges['vsini'][1]:g} km/s, R {ranges['resolution'][0]:g}) reaches "
                           f"{reach:.1f} Å from each end, so no pixel can be evaluated: give a range longer than "
                           f"{2 * reach:.1f} Å, or a smaller v sin i and a larger R in the label box (e.g. --label "
                           "vsini=0:50 --label resolution=20000:115000 reach 1.8 Å near 5170 Å)")
    edge = default_edge(grid, ranges)
    margin = systematics_margin(end, vsini_max=ranges["vsini"][1])
    if 2 * math.ceil(margin / step - 1e-9) >= npix:
        raise FactoryError(f"{grid.path}: the label systematics fits leave out {margin:.2f} Å at each end (v sin i up "
                           f"to {ranges['vsini'][1]:g} km/s and an RV of 50 km/s), the whole grid: make it longer")
    if cfg.model.target == "broadened":
        check_sampling_in_box(cfg.sampling, box)

    # sizes: spreads over stars need MIN_SPREAD_STARS of them
    split = split_counts(labels, cfg)
    need, warnings = min_stars(), []
    if min(split.values()) < 1 or (min(split["val"], split["test"]) < need and not req.allow_small):
        best = smallest_n(req, cfg, box, 1 if req.allow_small else need)
        raise FactoryError(
            f"--n {req.n} splits (by the label hash, seed {req.seed}) into {split['train']} training, {split['val']} "
            f"validation and {split['test']} test spectra; "
            + (f"the emulator error and label systematics are spreads over validation stars and the accuracy over "
               f"test stars, and from fewer than {need} they are mostly noise" if not req.allow_small
               else "every split needs at least one")
            + (f": with this seed --n {best} is the least that gives them" if best else ": raise --n")
            + ("" if req.allow_small else " (--allow-small runs anyway, for a smoke test, and says the numbers are "
               "not meaningful)"))
    if min(split["val"], split["test"]) < need:
        warnings.append(f"--allow-small: {split['val']} validation and {split['test']} test star(s), fewer than "
                        f"{need}; the emulator error, label systematics and accuracy numbers are not meaningful")

    # the budget: enough epochs for the schedule
    step_s, overhead_s = time_training(cfg, npix) if timing is None else timing
    steps = math.ceil(split["train"] * cfg.data.draws_per_epoch / cfg.train.batch_size)
    epoch_s = steps * step_s + overhead_s
    epochs = 60 * req.minutes / epoch_s
    estimate = {"step_seconds": step_s, "epoch_overhead_seconds": overhead_s, "steps_per_epoch": steps,
                "epochs": round(epochs, 1), "edge_angstrom": round(edge, 3)}
    if epochs < MIN_EPOCHS:
        need_minutes = MIN_EPOCHS * epoch_s / 60
        text = (f"--minutes {req.minutes:g} fits about {epochs:.1f} epochs ({steps} steps of batch "
                f"{cfg.train.batch_size} over {split['train']} training spectra x {cfg.data.draws_per_epoch} draws, a "
                f"step {step_s:.3g} s here, and {overhead_s:.2g} s of checkpoints an epoch)")
        if not req.allow_small:
            raise FactoryError(f"{text}; the cosine schedule needs at least {MIN_EPOCHS}: give --minutes "
                               f"{math.ceil(need_minutes * 10) / 10:g} or more")
        warnings.append(f"--allow-small: {text}, fewer than {MIN_EPOCHS}: too few for the schedule to mean much")

    # a warm start must fit this grid and box (checked by loading it, as training will)
    if cfg.train.init_from:
        import torch

        from .labels import NETWORK_LABELS
        from .model import CVAE
        from .train import load_start

        model = CVAE(npix, len(NETWORK_LABELS[cfg.model.target]), cfg.model)
        try:
            load_start(model, cfg.train.init_from, (start, step, npix, "air"), box, cfg.model.target,
                       torch.device("cpu"))
        except (OSError, ValueError, RuntimeError) as exc:
            raise FactoryError(str(exc)) from None

    # the line list must cover the synthesis range (converted and cached here; SYNSPEC is not needed for it)
    try:
        B.check_labels(labels)
        B.line_list(gcfg)
    except (GridSetupError, ValueError) as exc:
        raise FactoryError(str(exc)) from None
    return Plan(req, cfg, gcfg, labels, split, warnings, estimate)


# ------------------------------------------------------------------------------------------------ the stages

class Factory:
    """The stages on one output folder."""

    def __init__(self, out: str | Path, plan: Plan, ex: Execution):
        self.out, self.plan, self.ex = Path(out), plan, ex
        self.grid, self.run_dir = self.out / "grid.h5", self.out / "run"
        self.model, self.testset, self.report = self.out / "model.fsm", self.out / "testset.h5", self.out / "report"

    # -- done: a stage's output is there (each appears complete or not at all)
    def done(self, stage: str) -> bool:
        if stage == "grid":
            if not self.grid.is_file():
                return False
            import h5py

            with h5py.File(self.grid, "r") as f:
                return bool(f["done"][...].all())
        if stage == "train":
            try:
                json.loads((self.run_dir / "summary.json").read_text())  # written when training has ended
                return True
            except (OSError, ValueError):
                return False
        return {"export": self.model, "testset": self.testset, "evaluate": self.report}[stage].exists()

    def run_grid(self) -> dict:
        from .grid import build as B

        p, ex = self.plan, self.ex
        if ex.scheduler:
            from .grid import cluster

            result = cluster.build(self.grid, p.labels, p.grid_cfg, ex.scheduler, progress=ex.progress,
                                   in_flight=ex.in_flight)
        else:
            result = B.build(self.grid, p.labels, p.grid_cfg, workers=1 if ex.workers is None else ex.workers, progress=ex.progress)
        if result["done"] != result["total"]:
            raise FactoryError(f"{result['failed']} of {result['total']} spectra failed (above); run the same command "
                               "again to retry them")
        import h5py

        with h5py.File(self.grid, "r") as f:
            seconds = f["synspec_seconds"][...]
        return {"spectra": int(result["total"]), "synspec_seconds_per_spectrum": round(float(seconds.mean()), 2)}

    def run_train(self) -> dict:
        from .train import train

        resume = (self.run_dir / "checkpoint.pt").is_file()
        s = train(self.plan.cfg, self.grid, self.run_dir, resume=resume)
        return {"epochs": s["epochs"], "best_epoch": s["best_epoch"], "best_val_mse_z0": s["best_metric"],
                "stop": s["stop_reason"]}

    def run_export(self) -> dict:
        from fastspec import _core

        from .export import export_run

        tmp = self.out / "model.partial.fsm"
        export_run(self.run_dir, tmp, weight_dtype=WEIGHT_DTYPE, emulator_error=True,
                   emulator_error_stars=EMULATOR_ERROR_STARS)
        prov = json.loads(_core.Model.load(str(tmp)).provenance)
        os.replace(tmp, self.model)
        return {"emulator_error_median_rms": prov["emulator_error"]["median_rms"],
                "emulator_error_stars": prov["emulator_error"]["n_stars"],
                "label_systematics": {k: v for k, v in prov["label_systematics"].items()
                                      if k not in ("method", "split")}}

    def run_testset(self) -> dict:
        from .accuracy import write_testset

        write_testset(self.model, self.grid, self.testset, draws=TEST_DRAWS, seed=self.plan.req.seed + 1)
        return {"test_stars": self.plan.split["test"], "spectra": self.plan.split["test"] * TEST_DRAWS}

    def run_evaluate(self) -> dict:
        from fastspec import Decoder
        from fastspec.evaluate.pipeline import evaluate

        tmp = self.out / "report.partial"
        shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted run left
        m = evaluate(Decoder.load(self.model), self.testset, tmp, progress=self.ex.progress,
                     log=lambda msg: self.ex.log(msg.replace(str(tmp), str(self.report))))
        if self.plan.warnings:  # the report itself says so, not only the summary
            text = (tmp / "report.md").read_text()
            (tmp / "report.md").write_text("".join(f"> **{w}**\n>\n" for w in self.plan.warnings) + "\n" + text)
        os.replace(tmp, self.report)
        out = {"median_abs_dF": m["pixels"]["abs_median"], "spectra": m["pixels"]["n_spectra"]}
        if m.get("operator_floor"):
            out["floor_median_abs_dF"] = m["operator_floor"]["pixels"]["abs_median"]
        return out


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise FactoryError(f"{path} is not readable ({exc}); it was not written by this factory") from None


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, path)


def open_state(out: Path, req: Request, cfg) -> dict:
    """factory.json of --out: a new one, or the one there when it records the same request (refused otherwise).
    Nothing is written here."""
    want = recorded(req, cfg)
    state = _read_state(out / STATE_FILE)
    if state is None:
        if out.exists() and any(out.iterdir()):
            raise FactoryError(f"{out} exists and holds files not written by fastspec-train factory (no "
                               f"{STATE_FILE}); choose a new --out")
        return {"version": STATE_VERSION, "request": want, "stages": {}}
    if state.get("version") != STATE_VERSION:
        raise FactoryError(f"{out / STATE_FILE} is of another factory version ({state.get('version')}); choose a new --out")
    diff = _differences(state["request"], want)
    if diff:
        raise FactoryError(f"{out} holds a factory run of another request; continue it with the same arguments or "
                           "choose a new --out. Differences: " + "; ".join(diff))
    return state


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(out: str | Path, req: Request, ex: Execution | None = None) -> dict:
    """Check the request, then run the stages not yet done; returns the state (also in OUT/factory.json)."""
    import threading

    ex = ex or Execution()
    out = Path(out).resolve()  # the run's checkpoint names its data: the same wherever the command is run from
    check_at_once(out, req, ex)
    cfg = training_config(req, ex)
    state = open_state(out, req, cfg)
    e = state.get("estimate")
    plan = check(req, cfg, (e["step_seconds"], e["epoch_overhead_seconds"]) if e else None)
    state.update(split=plan.split, estimate=plan.estimate, warnings=plan.warnings,
                 seeds={"labels": req.seed, "test_draws": req.seed + 1, "split": plan.cfg.data.split_seed})
    out.mkdir(parents=True, exist_ok=True)
    _write_state(out / STATE_FILE, state)
    factory = Factory(out, plan, ex)
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main else None  # `kill` stops like Ctrl-C
    try:
        for stage in STAGES:
            record = state["stages"].setdefault(stage, {"done": False, "seconds": 0.0})
            if factory.done(stage):
                record["done"] = True
                continue
            ex.log(f"fastspec-train factory: {stage} ...")
            t0 = time.time()
            try:
                record["result"] = getattr(factory, f"run_{stage}")()
                record["done"] = True
            finally:  # the time counts also when the stage was interrupted
                record["seconds"] = round(record["seconds"] + time.time() - t0, 4)  # not 0.1 s: a short stage counts too
                _write_state(out / STATE_FILE, state)
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    _write_summary(out, state)
    return state


def _result_text(stage: str, r: dict) -> str:
    """The numbers of a stage's result worth a line of the summary."""
    if not r:
        return ""
    if stage == "grid":
        return f"{r['spectra']} spectra, SYNSPEC {r['synspec_seconds_per_spectrum']:g} s a spectrum (mean wall time)"
    if stage == "train":
        return f"{r['epochs']} epochs, best validation MSE (z = 0) {r['best_val_mse_z0']:.3g} at epoch {r['best_epoch']}"
    if stage == "export":
        ls = r["label_systematics"]
        sig = ", ".join(f"{k} {ls[k]:.3g}" for k in ("teff", "logg", "vsini", "mh", "vmic", "resolution_dex") if k in ls)
        return (f"emulator error: median RMS {r['emulator_error_median_rms']:.3g} over {r['emulator_error_stars']} "
                f"validation stars; label systematics ({ls['n_stars']} stars): {sig or 'none (too few stars)'}")
    if stage == "testset":
        return f"{r['spectra']} spectra of {r['test_stars']} test stars"
    return (f"median |ΔF| {r['median_abs_dF']:.3g} over {r['spectra']} spectra"
            + (f" (a perfect network: {r['floor_median_abs_dF']:.2g})" if "floor_median_abs_dF" in r else ""))


def _write_summary(out: Path, state: dict) -> None:
    req = state["request"]
    start, step, npix = req["wavelength"]
    box = req["label_box"] or {}
    lines = [f"# fastspec factory: {start:g}-{start + step * (npix - 1):g} Å, {req['n']} spectra, {req['minutes']:g} "
             "minutes of training", ""]
    lines += [f"> **{w}**" for w in state["warnings"]] + ([""] if state["warnings"] else [])
    s, e = state["split"], state["estimate"]
    lines += [f"Label box: {', '.join(f'{k} {lo:g}-{hi:g}' for k, (lo, hi) in box.items()) or 'the paper’s'}"
              f"{' (the paper’s ranges for the others)' if box else ''}. Seeds: labels {state['seeds']['labels']}, "
              f"test draws {state['seeds']['test_draws']}. Split by the label hash: {s['train']} train / {s['val']} "
              f"validation / {s['test']} test. Evaluated more than {e['edge_angstrom']:g} Å from the ends. Training "
              f"step {e['step_seconds']:.3g} s and {e['epoch_overhead_seconds']:.2g} s of checkpoints an epoch: about "
              f"{e['epochs']:g} epochs in the budget (estimated before the run).",
              "", "| stage | seconds | result |", "|---|---|---|"]
    for stage in STAGES:
        r = state["stages"].get(stage, {})
        lines.append(f"| {stage} | {r.get('seconds', 0):.0f} | {_result_text(stage, r.get('result', {}))} |")
    lines += ["", "Model: `model.fsm`; evaluation: `report/report.md`; test set: `testset.h5`; training: `run/`; "
                  "the request and the stages: `factory.json`."]
    tmp = out / "summary.md.partial"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "summary.md")


def stage_table(state: dict) -> str:
    """The seconds each stage took (over every run of the command), as printed at the end."""
    rows = [f"  {stage:<9} {state['stages'].get(stage, {}).get('seconds', 0):>8.0f} s" for stage in STAGES]
    return "\n".join(rows)

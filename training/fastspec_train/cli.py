"""`fastspec-train` (or `python -m fastspec_train`): train, export, accuracy, testset, factory."""

from __future__ import annotations

import argparse
import json
import sys


def _train(a) -> int:
    from .config import load_config, with_overrides
    from .train import train

    cfg = with_overrides(load_config(a.config), a.set)
    if a.threads is not None:
        cfg.train.threads = a.threads
    if a.device is not None:
        cfg.train.device = a.device
    summary = train(cfg, a.data, a.out, resume=a.resume, max_epochs=a.max_epochs, max_minutes=a.max_minutes)
    print(json.dumps(summary, indent=1))
    return 0


def _export(a) -> int:
    from .export import export_run

    path = export_run(a.run, a.out, weight_dtype=a.dtype, which=a.which, emulator_error=a.emulator_error,
                      emulator_error_stars=a.emulator_error_stars)
    print(path)
    return 0


def _accuracy(a) -> int:
    from .accuracy import accuracy_report

    report = accuracy_report(a.model, a.data, a.out, draws=a.draws, seed=a.seed, compare=a.compare, edge=a.edge,
                             split=a.split)
    print(json.dumps(report["overall"], indent=1))
    return 0


def _testset(a) -> int:
    from .accuracy import write_testset

    print(write_testset(a.model, a.data, a.out, draws=a.draws, seed=a.seed, split=a.split))
    return 0


def _factory(a) -> int:
    from .factory import Execution, Request, run, stage_table

    req = Request(wavelength=a.wavelength, n=a.n, minutes=a.minutes, label_box=tuple(a.label) if a.label else None,
                  linelist=a.linelist, seed=a.seed, config=a.config, overrides=a.set, allow_small=a.allow_small)
    ex = Execution(workers=a.workers, scheduler=a.scheduler, in_flight=a.in_flight, threads=a.threads,
                   device=a.device, progress=not a.no_progress)
    if a.scheduler and a.workers is not None:
        raise ValueError("--workers is for this machine's processes; with --scheduler use local:N or start workers on "
                         "the cluster")
    state = run(a.out, req, ex)
    print(f"fastspec-train factory: done; {a.out}/model.fsm, report {a.out}/report/report.md, summary "
          f"{a.out}/summary.md. Seconds per stage:\n{stage_table(state)}")
    for w in state["warnings"]:
        print(f"fastspec-train factory: {w}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastspec-train", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train the CVAE (torchrun for several processes)")
    t.add_argument("--config", required=True, help="TOML file or preset name (paper, default, tiny)")
    t.add_argument("--data", required=True, nargs="+", action="extend", metavar="FILE",
                   help="HDF5 file(s) of intrinsic spectra (shared/README.md layout); more files (e.g. your own "
                        "fastspec-grid build) add rows: the first is the primary file, every row is split by its label hash")
    t.add_argument("--out", required=True, help="run folder: checkpoint.pt, best.pt, history.json, loss_curve.png, train.log")
    t.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint.pt")
    t.add_argument("--max-epochs", type=int)
    t.add_argument("--max-minutes", type=float, help="stop gracefully after this much training time")
    t.add_argument("--threads", type=int)
    t.add_argument("--device")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (TOML syntax), e.g. --set train.autocast=bf16; repeatable")
    t.set_defaults(func=_train)

    e = sub.add_parser("export", help="write the decoder of a run to a .fsm model file")
    e.add_argument("--run", required=True, help="run folder written by train")
    e.add_argument("--out", required=True, help="model file to write")
    e.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    e.add_argument("--which", default="best", choices=["best", "last"], help="best.pt or checkpoint.pt weights")
    e.add_argument("--emulator-error", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the model's error on the validation split and store it in the file, for "
                        "fastspec.fit(model_error=True) (default: on; a minute or two, an hour or more against a "
                        "fine-mesh truth: see --emulator-error-stars)")
    e.add_argument("--emulator-error-stars", type=int, metavar="N",
                   help="measure it on N evenly spaced validation stars (default: all)")
    e.set_defaults(func=_export)

    for name, helptext in (("accuracy", "held-out accuracy of an exported model"),
                           ("testset", "write broadened held-out spectra (6 labels) to HDF5 for `fastspec evaluate`")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--model", required=True, help=".fsm file written by export (its provenance names the split)")
        s.add_argument("--data", help="HDF5 file of intrinsic spectra (default: the one in the model's provenance)")
        s.add_argument("--out", required=True, help="output folder (accuracy) or .h5 file (testset)")
        s.add_argument("--draws", type=int, default=10, help="(vsini, R) draws per held-out spectrum (default 10)")
        s.add_argument("--seed", type=int, default=2026, help="seed of the (vsini, R) draws (default 2026)")
        s.add_argument("--split", choices=["test", "val", "unseen"], default="test",
                       help="the held-out rows: the model's test split (default), its validation split, or every row "
                            "of a file it was never trained on (refused for its training file)")
        if name == "accuracy":
            s.add_argument("--compare", help="a second .fsm (e.g. the f32 export) to report the max/median |ΔF| between the two")
            s.add_argument("--edge", type=float, metavar="ANGSTROM",
                           help="leave out the pixels within this many Å of either end (default: 30, or the reach of "
                                "the widest broadening kernel where that is more, or less on a short grid)")
        s.set_defaults(func=_accuracy if name == "accuracy" else _testset)

    from .factory import DEFAULT_SEED
    from .grid.cli import _label_range, _range

    f = sub.add_parser("factory", help="grid -> training -> export -> test set -> evaluation in one resumable command",
                       description="Build a SYNSPEC grid over --wavelength in the label box, train the config's network "
                                   "for --minutes (its cosine LR schedule fitted to them), export it, and evaluate it "
                                   "on the grid's held-out test split, all into --out. Checks the request before "
                                   "anything runs; run the same command again to continue after Ctrl-C or a kill.")
    f.add_argument("--wavelength", type=_range, required=True, metavar="START:END[:STEP]",
                   help="the model's grid in Å (air); STEP 0.05 by default, a multiple of 0.005")
    f.add_argument("--label", type=_label_range, action="append", metavar="NAME=LO:HI",
                   help="the label box: draw this label in [LO, HI] instead of the paper's range (repeatable; teff, "
                        "logg, mh, vmic, and vsini, resolution: the ranges the model broadens over and is tested in)")
    f.add_argument("--linelist", metavar="FILE", help="atomic line list (default: Gaia-ESO, 4200-9200 Å)")
    f.add_argument("--n", type=int, required=True, help="spectra in the grid (about 80 %% train, 10 %% validation, 10 %% test)")
    f.add_argument("--minutes", type=float, required=True, help="training budget in minutes (the LR anneals over them)")
    f.add_argument("--out", required=True, help="output folder: grid.h5, run/, model.fsm, testset.h5, report/, "
                                                "factory.json, summary.md")
    f.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed of the label draw; the test draws use SEED + 1 (default {DEFAULT_SEED})")
    f.add_argument("--config", default="default", help="training preset or TOML file (default: default)")
    f.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one training config value, as for train (not the schedule's: --minutes sets it)")
    f.add_argument("--allow-small", action="store_true",
                   help="run even with fewer than 10 validation or test stars, or a budget of fewer than 10 epochs "
                        "(a smoke test: the reports say the numbers are not meaningful)")
    f.add_argument("--workers", type=int, help="parallel SYNSPEC processes on this machine (default 1)")
    f.add_argument("--scheduler", metavar="ADDRESS|FILE|local:N", help="compute the grid on a Dask cluster (as fastspec-grid)")
    f.add_argument("--in-flight", type=int, metavar="K", help="with --scheduler: tasks submitted at a time")
    f.add_argument("--threads", type=int, help="training threads")
    f.add_argument("--device", help="training device (auto, cpu, cuda)")
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.set_defaults(func=_factory)

    a = p.parse_args(argv)
    if a.command == "train":  # a training run's errors keep their traceback
        return a.func(a)
    try:
        return a.func(a)
    except (ValueError, OSError) as exc:  # a short grid, a missing file: one clear line, not a traceback
        print(f"fastspec-train {a.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if a.command != "factory":
            raise
        print("fastspec-train factory: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`fastspec-train` (or `python -m fastspec_train`): train, export, accuracy, testset."""

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

    a = p.parse_args(argv)
    if a.command == "train":  # a training run's errors keep their traceback
        return a.func(a)
    try:
        return a.func(a)
    except (ValueError, OSError) as exc:  # a short grid, a missing file: one clear line, not a traceback
        print(f"fastspec-train {a.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

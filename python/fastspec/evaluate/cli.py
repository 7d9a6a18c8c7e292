"""`fastspec evaluate`: registered by fastspec.cli through `add_parser(subparsers)`."""

from __future__ import annotations

import argparse
import sys

from .recovery import RecoveryOptions


def _widths(text: str) -> tuple[int, ...]:
    try:
        w = tuple(int(v) for v in text.replace(",", "-").split("-") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must look like 5000-2000-1000-64, got {text!r}") from None
    if not w or min(w) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive integers, got {text!r}")
    return w


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        f = tuple(float(v) for v in text.split(","))
    except ValueError:
        f = ()
    if len(f) != 3:
        raise argparse.ArgumentTypeError(f"split must be three fractions like 0.7,0.15,0.15, got {text!r}")
    return f


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (those options say in words what they do when not given)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = RecoveryOptions()
    p = subparsers.add_parser(
        "evaluate",
        help="compare a model with SYNSPEC spectra: figures, report.md, metrics.json",
        description="Evaluate a fastspec model against broadened SYNSPEC spectra (6 labels, made with "
        "`fastspec-train testset`): pixel statistics, heat maps and marginals of the per-spectrum error, "
        "parameter recovery (PCA + dense network; needs torch) and overlays. Writes PNG figures, a markdown "
        "report and a JSON of every number into --out.",
        formatter_class=_Defaults,
    )
    p.add_argument("--model", default=None, help="model file (.fsm); default: the embedded default model")
    p.add_argument("--data", required=True, help="HDF5 file of broadened SYNSPEC spectra with 6 labels")
    p.add_argument("--out", required=True, help="output folder for report.md, metrics.json and the PNGs")
    p.add_argument("--chunk-size", type=_positive_int, default=128, help="spectra read and generated at a time")
    p.add_argument("--max-spectra", type=_positive_int, default=None, help="use only the first N spectra (default: all)")
    p.add_argument("--bins", type=_positive_int, default=10, help="bins per label for heat maps and marginals")
    p.add_argument("--n-worst", type=int, default=10, help="worst spectra listed")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNGs")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("parameter recovery (needs torch, the `train` extra)")
    g.add_argument("--no-recovery", action="store_true", help="skip the parameter-recovery test")
    g.add_argument("--recovery-widths", type=_widths, default=d.widths, help="hidden widths, e.g. 5000-2000-1000-64")
    g.add_argument("--recovery-epochs", type=int, default=d.epochs, help="maximum training epochs")
    g.add_argument("--recovery-patience", type=int, default=d.patience, help="early stop after this many epochs without improvement")
    g.add_argument("--recovery-batch-size", type=_positive_int, default=d.batch_size, help="training batch size")
    g.add_argument("--recovery-lr", type=float, default=d.lr, help="Adamax learning rate")
    g.add_argument("--recovery-components", type=int, default=d.n_components, help="PCA components")
    g.add_argument("--recovery-noise-draws", type=int, default=d.noise_draws, help="noisy copies of each training spectrum per epoch")
    g.add_argument("--recovery-snr", type=float, nargs=2, default=d.snr_range, metavar=("MIN", "MAX"), help="SNR range of the noise")
    g.add_argument("--recovery-split", type=_fractions, default=d.fractions, help="train,validation,test fractions of the intrinsic spectra")
    g.add_argument("--recovery-threads", type=int, default=d.threads, help="torch threads")
    g.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=run)
    return p


def options_from_args(args) -> dict:
    return {
        "chunk_size": args.chunk_size,
        "max_spectra": args.max_spectra,
        "bins": args.bins,
        "n_worst": args.n_worst,
        "dpi": args.dpi,
        "progress": not args.quiet,
        "recovery": not args.no_recovery,
        "recovery_options": RecoveryOptions(
            n_components=args.recovery_components,
            widths=tuple(args.recovery_widths),
            epochs=args.recovery_epochs,
            batch_size=args.recovery_batch_size,
            lr=args.recovery_lr,
            noise_draws=args.recovery_noise_draws,
            snr_range=tuple(args.recovery_snr),
            fractions=tuple(args.recovery_split),
            patience=args.recovery_patience,
            seed=args.seed,
            threads=args.recovery_threads,
        ),
    }


def run(args) -> int:
    try:
        import matplotlib  # noqa: F401  (the figures need it: say so before any work)
    except ImportError:
        print("fastspec evaluate needs matplotlib: pip install 'fastspec[plot]'", file=sys.stderr)
        return 1
    from fastspec import Decoder

    from .data import DataError, EvalData
    from .pipeline import evaluate

    decoder = Decoder.load(args.model, threads=args.threads)
    try:
        # Check the data before evaluate() creates --out, so that a bad input leaves no empty folder behind.
        EvalData(args.data, decoder.label_names, decoder.wavelength, args.max_spectra,
                 medium=decoder.info.get("medium")).close()
        m = evaluate(decoder, args.data, args.out, **options_from_args(args))
    except DataError as exc:
        print(f"fastspec evaluate: error: {exc}", file=sys.stderr)
        return 1  # as the other commands on bad input (2 is argparse's usage error)
    px = m["pixels"]
    print(f"median |dF| {px['abs_median']:.3e}, 99th percentile {px['abs_percentiles']['p99']:.3e}, "
          f"mean residual {px['residual_mean']:+.2e} over {px['n_spectra']} spectra")
    rec = m["recovery"]
    if rec.get("status") == "ok":
        t, g = rec["splits"]["test"]["rmse"], rec["splits"]["generated"]["rmse"]
        print("recovery RMSE test / generated: " + ", ".join(f"{k} {t[k]:.4g}/{g[k]:.4g}" for k in t))
    else:
        print(f"recovery {rec.get('status')}")
    return 0


def main(argv=None) -> int:
    """Stand-alone entry (`python -m fastspec.evaluate`), the same options as `fastspec evaluate`."""
    parser = argparse.ArgumentParser(prog="fastspec")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["evaluate", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)

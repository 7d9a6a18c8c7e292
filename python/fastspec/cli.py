"""The `fastspec` command: generate one spectrum, a batch of spectra, or describe a model.

    fastspec generate --teff 5777 --logg 4.44 --vsini 2 --mh 0 --vmic 1 --resolution 50000 -o sun.csv --plot sun.png
    fastspec batch labels.csv -o spectra.h5
    fastspec info [--model model.fsm]
    fastspec fit spectrum.fits --medium vacuum -o result.json --plot fit.png
    fastspec fit --batch spectra/ --table stars.csv --workers 2
    fastspec evaluate --model M --data D --out report/
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import signal
import sys
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from ._files import atomic_output as _atomic_output
from ._files import check_output as _check_output
from .decoder import Decoder
from .evaluate.cli import _positive_int  # one parser of "a positive integer" for every subcommand

LABEL_HELP = {
    "teff": "effective temperature [K]",
    "logg": "surface gravity log g [dex]",
    "vsini": "projected rotational velocity v sin i [km/s]",
    "mh": "metallicity [M/H] [dex]",
    "vmic": "microturbulence [km/s]",
    "resolution": "resolving power R = λ/FWHM",
}
OUTPUT_FORMATS = (".csv", ".txt", ".npy", ".h5", ".hdf5")  # what `generate -o` can write
HDF5_FORMATS = (".h5", ".hdf5")  # what `batch -o` writes


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # inside the try: a closed pipe shows up here, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`fastspec info | head`). As in the Python docs' "Note on SIGPIPE": point stdout
        # at devnull so that the flush at exit does not fail again, and exit as a process killed by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
    except KeyboardInterrupt:
        print(f"fastspec {args.command}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, what shells report for Ctrl-C
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        # User errors (bad labels, bad files) get one clear line, not a traceback. The core's range message
        # names the Python API's clip=True; here that is the --clip option.
        message = str(exc).replace("pass clip=True", "pass --clip")
        print(f"fastspec {args.command}: error: {message}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastspec", description="Neural surrogate for SYNSPEC stellar spectra.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="one spectrum from six labels")
    for name, text in LABEL_HELP.items():
        gen.add_argument(f"--{name}", type=float, required=True, help=text)
    _model_options(gen)
    gen.add_argument("-o", "--output", type=Path,
                     help="write to .csv or .txt (CSV text), .npy (N, 2) or .h5/.hdf5 (the layout of `batch`, "
                          "one row); default: CSV on stdout")
    gen.add_argument("--plot", type=Path, help="also save a plot of the spectrum, in the format of its extension "
                                                "(.png, .pdf, ...; needs matplotlib)")
    gen.add_argument("--vmac", type=_vmac_value, default=0.0, metavar="KM_S",
                     help="radial-tangential macroturbulence in km/s, 0-50, applied in the broadening stage "
                          "(format-3 models; default 0)")
    gen.add_argument("--sample", action="store_true", help="draw z ~ N(0, I) instead of the prior mean z = 0")
    gen.add_argument("--seed", type=int, help="random seed for --sample (only with --sample)")
    gen.set_defaults(func=cmd_generate)

    batch = sub.add_parser("batch", help="many spectra from a table of labels, written to HDF5")
    batch.add_argument("labels", type=Path,
                       help="CSV with a header naming the six labels (any column order, no other columns; lines "
                            "starting with # are skipped) or an .npy array (N, 6) in the order teff, logg, vsini, "
                            "mh, vmic, resolution")
    batch.add_argument("-o", "--output", type=Path, required=True, help="HDF5 file to write (.h5 or .hdf5)")
    _model_options(batch)
    batch.add_argument("--chunk", type=_positive_int, default=256, help="spectra per call to the core (default 256)")
    batch.set_defaults(func=cmd_batch)

    info = sub.add_parser("info", help="describe a model file (default: the embedded model)")
    info.add_argument("model", nargs="?", type=Path, help="model file (default: the embedded model); or --model")
    info.add_argument("--model", dest="model_option", type=Path, metavar="MODEL",
                      help="model file, as in the other subcommands")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=cmd_info)

    fit = sub.add_parser("fit", help="fit the labels, RV and continuum of an observed spectrum (or of many: --batch)",
                         description="Fit an observed spectrum (fastspec.fit): prints the labels with uncertainties; "
                                     "exit status 0 when the fit passed its quality checks, 3 when it ran but did not "
                                     "(see 'quality' in the output), 1 on an error, 2 on a usage error (an unknown "
                                     "option or a bad value, as argparse reports it). With --batch, every spectrum of "
                                     "a folder or list, each on its own, with the same options, into one --table "
                                     "(fastspec.fit_batch): exit status 0 when every star was fitted and passed its "
                                     "quality checks, 3 when every star was fitted but some did not pass (their "
                                     "'success' column), 1 when a star could not be fitted (its row says why; the "
                                     "others go on) or on an error, 2 on a usage error, 130 when interrupted (the "
                                     "journal keeps the stars done: the same command continues).")
    fit.add_argument("spectrum", type=Path, nargs="*",
                     help="CSV/text (header naming wavelength, flux[, error], or those three columns), FITS (a 1-D "
                          "table, or a 1-D image with CRVAL1/CDELT1; needs astropy), HDF5 (datasets wavelength, "
                          "flux[, error]) or .npy (N, 2 or 3); also what `fastspec generate -o` writes. Several files, "
                          "or a FITS file of several tables (one per extension), are segments of one star (echelle "
                          "orders, a spectrograph's arms): fitted together, sharing the labels and the RV, each with "
                          "its own continuum polynomial and line-spread function. A column resolution (R) or fwhm (Å) "
                          "per pixel, or a FITS keyword SPEC_RES, is the segment's line-spread function")
    many = fit.add_argument_group("many stars (--batch)")
    many.add_argument("--batch", type=Path, metavar="LIST_OR_DIR",
                      help="fit many stars: a folder (each spectrum file in it is one star) or a text file listing one "
                           "spectrum per line (PATH, or PATH,air|vacuum; relative to the current folder; # comments)")
    many.add_argument("--table", type=Path,
                      help="with --batch: the table to write (.csv or .fits; FITS needs astropy): per star its file, "
                           "status, labels and uncertainties, RV, reduced chi2, quality flag and reason. Beside it "
                           "TABLE.journal records each star as it finishes; the same command again skips those done. "
                           "Refused before any fit when it is one of the spectra or an existing file that is not an "
                           "earlier batch's table")
    many.add_argument("--workers", type=_positive_int,
                      help="with --batch: local processes fitting at once, one thread each (default 1)")
    many.add_argument("--scheduler", metavar="ADDRESS|FILE|local:N",
                      help="with --batch: fit on a Dask cluster instead (needs dask.distributed): a scheduler address "
                           "(tcp://HOST:8786), a scheduler file, or local:N for N local Dask worker processes")
    many.add_argument("--no-progress", action="store_true", help="with --batch: no progress bar")
    fit.add_argument("--medium", choices=["air", "vacuum"], default="air", help="of the observed wavelengths (default air)")
    fit.add_argument("--model", type=Path, help="model file (default: the embedded model)")
    fit.add_argument("--error", type=_positive_float,
                     help="one error for every pixel, > 0 (default: the file's, else estimated)")
    fit.add_argument("--rv-bounds", type=float, nargs=2, default=(-300.0, 300.0), metavar=("LO", "HI"), help="km/s")
    fit.add_argument("--no-rv", action="store_true", help="do not fit a radial velocity")
    fit.add_argument("--continuum-degree", type=int, default=2,
                     help="Legendre degree of the continuum, 0-10; -1: none, the spectrum is normalised (default 2)")
    fit.add_argument("--bound", action="append", default=[], metavar="LABEL=LO:HI",
                     help="narrow a label's range, e.g. --bound vmic=1:3 (repeatable)")
    fit.add_argument("--resolution", type=_resolution_value, metavar="R|fit",
                     help="the instrument's resolving power for every segment (held, not fitted), over what the files "
                          "say; 'fit': fit one R for all, whatever the files say (default: the files' where they give "
                          "one, else fitted)")
    fit.add_argument("--vmac", type=_vmac_value, default=0.0, metavar="KM_S|fit",
                     help="radial-tangential macroturbulence: a value in km/s held fixed (0-20, default 0), or 'fit' "
                          "to fit it in 0-20 km/s (narrow with --bound vmac=LO:HI); format-3 models")
    fit.add_argument("--clip", type=float, default=5.0, metavar="SIGMA",
                     help="reject outliers beyond SIGMA robust standard deviations (default 5; 0: off)")
    fit.add_argument("--loss", default="linear", help="least-squares loss: linear, soft_l1, huber, cauchy, arctan")
    fit.add_argument("--no-model-error", action="store_true", help="leave the emulator error out of the variance")
    fit.add_argument("--integrate", action=argparse.BooleanOptionalAction, default=None,
                     help="average the model over each observed pixel (default: when the pixels are at least 1.5 "
                          "model pixels, 0.075 Å, wide); --no-integrate: sample it at the pixel centres")
    fit.add_argument("-o", "--output", type=Path, help="write the result as JSON")
    fit.add_argument("--plot", type=Path, help="also save a plot of data, model and residuals, in the format of its "
                                                "extension (.png, .pdf, ...; needs matplotlib)")
    fit.add_argument("--threads", type=int, help="CPU threads (default 1; with --batch each worker uses 1)")
    fit.set_defaults(func=cmd_fit)

    # Always registered: it says itself when matplotlib is missing.
    from .evaluate.cli import add_parser as add_evaluate_parser

    add_evaluate_parser(sub)
    return parser


def _number_or_fit(lowest: float, strict: bool, unit: str):
    """An argparse type: 'fit', or a finite number >= lowest (> lowest when strict); fit() and the core check the
    rest (the upper bound, the model)."""
    def parse(text: str):
        if text.strip().lower() == "fit":
            return "fit"
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > lowest if strict else value >= lowest)):
            raise argparse.ArgumentTypeError(f"must be a number {'>' if strict else '>='} {lowest:g} ({unit}) or 'fit', "
                                             f"got {text!r}")
        return value

    return parse


_vmac_value = _number_or_fit(0.0, False, "km/s")  # --vmac
_resolution_value = _number_or_fit(0.0, True, "R")  # --resolution


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _check_plot(path: Path | None) -> None:
    if path is None:
        return
    _require_matplotlib("--plot")
    import matplotlib.figure

    known = matplotlib.figure.Figure().canvas.get_supported_filetypes()
    _check_output(path, tuple("." + k for k in sorted(known)), "plot")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="model file (default: the embedded model)")
    p.add_argument("--clip", action="store_true", help="clamp out-of-range labels to the model's range instead of failing")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")


def cmd_generate(args) -> int:
    # Refuse what cannot be done before any work is done.
    if args.seed is not None and not args.sample:
        raise ValueError("--seed only makes sense with --sample")
    suffix = args.output.suffix.lower() if args.output is not None else None
    _check_output(args.output, OUTPUT_FORMATS)
    _check_plot(args.plot)
    decoder = Decoder.load(args.model, threads=args.threads)
    labels = {name: getattr(args, name) for name in LABEL_HELP}
    if args.vmac == "fit":
        raise ValueError("--vmac fit is for `fastspec fit`; generate takes a value in km/s")
    flux = decoder(**labels, clip=args.clip, sample=args.sample, seed=args.seed, vmac=args.vmac or None)
    if args.clip:  # say what was computed: the header and the plot carry the clamped labels
        labels = dict(zip(labels, _clamped(np.array([list(labels.values())]), decoder, "generate")[0]))
    wave = decoder.wavelength
    medium = decoder.info["medium"]
    header = ("fastspec " + " ".join(f"{k}={v:g}" for k, v in labels.items())
              + (f" vmac={args.vmac:g}" if args.vmac else "")
              + f" z={'sampled' if args.sample else '0'}; wavelength in Å ({medium}), flux normalised to the continuum")
    # The output and the plot appear together, complete, or not at all.
    with ExitStack() as outputs:
        if args.output is None:
            _write_csv(sys.stdout, wave, flux, header)
        else:
            tmp = outputs.enter_context(_atomic_output(args.output))
            if suffix == ".npy":
                with open(tmp, "wb") as f:  # a file, not a name: np.save would append .npy to the name
                    np.save(f, np.column_stack([wave, flux]))
            elif suffix in (".h5", ".hdf5"):
                import h5py

                with h5py.File(tmp, "w") as f:
                    dset = _create_hdf5(f, decoder, np.array([list(labels.values())]), args.clip)
                    dset[0] = flux
                    f.attrs["z"] = "sampled" if args.sample else "0"
            else:
                with open(tmp, "w", newline="") as f:
                    _write_csv(f, wave, flux, header)
        if args.plot:
            plot_spectrum(wave, flux, labels, outputs.enter_context(_atomic_output(args.plot)), medium,
                          fmt=args.plot.suffix[1:] or "png")  # the temporary name says no format
    if args.output is not None:
        print(f"wrote {args.output} ({flux.size} pixels, {wave[0]:.2f}-{wave[-1]:.2f} Å {medium})",
              file=sys.stderr)
    return 0


def _clamped(labels: np.ndarray, decoder: Decoder, command: str) -> np.ndarray:
    """Labels (N, 6) clamped to the model's ranges, as --clip computes them; each clamped label reported."""
    out = labels.copy()
    for j, name in enumerate(decoder.label_names):
        lo, hi = decoder.label_ranges[name]
        out[:, j] = np.clip(labels[:, j], lo, hi)
        moved = np.flatnonzero(out[:, j] != labels[:, j])
        if moved.size == 0:
            continue
        i = moved[0]
        if len(labels) == 1:
            text = f"{name} = {labels[i, j]:g} is outside [{lo:g}, {hi:g}]; clamped to {out[i, j]:g}"
        else:
            text = (f"{name} is outside [{lo:g}, {hi:g}] in {moved.size} row{'s' if moved.size > 1 else ''} (the "
                    f"first: row {i + 1}, {labels[i, j]:g}); clamped to the range, and stored so")
        print(f"fastspec {command}: {text}", file=sys.stderr)
    return out


@contextmanager
def _deferred_sigint():
    """Ctrl-C only sets the yielded event; the caller stops between chunks of work. A KeyboardInterrupt raised at
    an arbitrary point can land in one of h5py's weakref callbacks, which print "Exception ignored" and go on."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted  # signal handlers can only be set in the main thread
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def _require_matplotlib(what: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError(f"{what} needs matplotlib: pip install 'fastspec[plot]'") from None


def _write_csv(f, wave: np.ndarray, flux: np.ndarray, header: str) -> None:
    f.write(f"# {header}\n")
    f.write("wavelength,flux\n")
    np.savetxt(f, np.column_stack([wave, flux]), fmt=["%.3f", "%.7f"], delimiter=",")


def plot_spectrum(wave, flux, labels: dict, path: Path, medium: str = "air", fmt: str | None = None) -> None:
    """Save a plot; `fmt` (png, pdf, ...) when `path` does not end in it."""
    _require_matplotlib("--plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 3.5), constrained_layout=True)
    ax.plot(wave, flux, lw=0.6, color="k")
    ax.set_xlabel(f"wavelength [Å, {medium}]")
    ax.set_ylabel("normalised flux")
    ax.set_title(f"Teff {labels['teff']:g} K, log g {labels['logg']:g}, v sin i {labels['vsini']:g} km/s, "
                 f"[M/H] {labels['mh']:+g}, v_mic {labels['vmic']:g} km/s, R {labels['resolution']:g}", fontsize=10)
    ax.set_xlim(wave[0], wave[-1])
    fig.savefig(path, dpi=120, format=fmt)
    plt.close(fig)


def read_label_table(path: Path, names: tuple[str, ...]) -> np.ndarray:
    """Labels (N, 6) from a CSV with a header row naming the columns, or from an .npy array."""
    if path.suffix == ".npy":
        table = np.load(path, allow_pickle=False)
        if table.ndim != 2 or table.shape[1] != len(names):
            raise ValueError(f"{path}: expected an array of shape (N, {len(names)}) with columns "
                             f"{', '.join(names)}; got {table.shape}")
        return np.asarray(table, dtype=np.float64)
    # utf-8-sig: spreadsheets start the file with a byte-order mark; universal newlines take CRLF too.
    with open(path, encoding="utf-8-sig") as f:
        rows = [(number, next(csv.reader([line]))) for number, line in enumerate(f, start=1)
                if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise ValueError(f"{path}: no rows")
    if len(rows[0][1]) == 1 and any(sep in rows[0][1][0] for sep in ";\t"):
        raise ValueError(f"{path}: the columns are separated by ';' or tabs: use commas")
    header = [h.strip().lower() for h in rows[0][1]]
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate column {', '.join(duplicates)} in the header row")
    missing = [n for n in names if n not in header]
    if missing:
        raise ValueError(f"{path}: the header row must name the columns {', '.join(names)}; missing {', '.join(missing)}")
    unknown = [h for h in header if h not in names]
    if unknown:
        raise ValueError(f"{path}: unknown column {', '.join(map(repr, unknown))}; the header row must name "
                         f"exactly the columns {', '.join(names)}")
    columns = [header.index(n) for n in names]
    if len(rows) == 1:
        raise ValueError(f"{path}: no rows below the header")
    table = np.empty((len(rows) - 1, len(names)))
    for i, (number, row) in enumerate(rows[1:]):
        if len(row) != len(header):
            raise ValueError(f"{path}: line {number}: {len(row)} values for the {len(header)} columns of the header")
        for j, c in enumerate(columns):
            try:
                table[i, j] = float(row[c])
            except ValueError:
                raise ValueError(f"{path}: line {number}: {names[j]} = {row[c]!r} is not a number") from None
    return table


def cmd_batch(args) -> int:
    import h5py
    from tqdm import tqdm

    _check_output(args.output, HDF5_FORMATS, "output (batch writes HDF5)")
    decoder = Decoder.load(args.model, threads=args.threads)
    labels = read_label_table(args.labels, decoder.label_names)
    if not len(labels):
        raise ValueError(f"{args.labels}: no rows")
    _check_rows(labels, decoder, args.labels, args.clip)
    if args.clip:  # store the labels the spectra were computed at
        labels = _clamped(labels, decoder, "batch")
    n = len(labels)
    need, free = n * decoder.n_pixels * 4, shutil.disk_usage(args.output.parent).free
    if need > free:
        raise ValueError(f"{args.output}: {n} spectra need up to {_size(need)} (float32, before compression) but "
                         f"{args.output.parent} has {_size(free)} free")
    with _deferred_sigint() as interrupted, _atomic_output(args.output) as tmp, h5py.File(tmp, "w") as f:
        flux = _create_hdf5(f, decoder, labels, args.clip)
        with tqdm(total=n, unit="spectra", desc="fastspec batch") as bar:
            for start in range(0, n, args.chunk):
                if interrupted.is_set():
                    raise KeyboardInterrupt
                stop = min(start + args.chunk, n)
                flux[start:stop] = decoder(labels[start:stop], clip=args.clip)
                bar.update(stop - start)
    print(f"wrote {n} spectr{'um' if n == 1 else 'a'} to {args.output}", file=sys.stderr)
    return 0


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.3g} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.3g} MB"


def _create_hdf5(f, decoder: Decoder, labels: np.ndarray, clip: bool):
    """The output layout of `batch` in the open file `f`: labels and grid written, flux (N, n_pixels) returned
    empty for the caller to fill."""
    n = len(labels)
    flux = f.create_dataset("flux", shape=(n, decoder.n_pixels), dtype="f4",
                            chunks=(1, decoder.n_pixels) if n else None, compression="gzip")
    dset = f.create_dataset("labels", data=labels)
    dset.attrs["names"] = list(decoder.label_names)
    dset.attrs["units"] = list(decoder.label_units)
    info = decoder.info
    f.attrs["wavelength_start"] = info["wavelength_start"]
    f.attrs["wavelength_step"] = info["wavelength_step"]
    f.attrs["n_pixels"] = decoder.n_pixels
    f.attrs["wavelength_medium"] = info["medium"]
    f.attrs["model"] = json.dumps({"path": info["path"], "provenance": info["provenance"]})
    f.attrs["clip"] = bool(clip)
    return flux


def _check_rows(labels: np.ndarray, decoder: Decoder, path: Path, clip: bool) -> None:
    """Find a bad row before any work is done, and name it by its line in the table."""
    for j, name in enumerate(decoder.label_names):
        lo, hi = decoder.label_ranges[name]
        column = labels[:, j]
        bad = ~np.isfinite(column) if clip else ~((column >= lo) & (column <= hi))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path}: row {i + 1}: {name} = {column[i]:g} is "
                             + ("not finite" if not np.isfinite(column[i]) else
                                f"outside [{lo:g}, {hi:g}]; use --clip to clamp to the model's range"))


def cmd_info(args) -> int:
    from . import build_info

    if args.model and args.model_option and args.model != args.model_option:
        raise ValueError(f"two model files given: {args.model} and --model {args.model_option}")
    decoder = Decoder.load(args.model_option or args.model)
    info = decoder.info
    if args.json:
        print(json.dumps({**info, "build": build_info()}, indent=2, default=str))
        return 0
    size = Path(info["path"]).stat().st_size
    print(f"model        {info['path']} ({size / 1e6:.1f} MB, weights {info['weight_dtype']})")
    # Only the labels of role "network" go into the network; v sin i and R of a version 2 model go to the
    # broadening stage after it.
    n_network = sum(lab.get("role", "network") == "network" for lab in info["labels"])
    dims = [layer["out"] for layer in info["layers"]]
    acts = [layer["activation"] for layer in info["layers"]]
    print(f"decoder      [z({info['latent_dim']}), labels({n_network})] -> "
          + " -> ".join(f"{d}({a})" for d, a in zip(dims, acts)))
    stage = info.get("broadening")
    if stage:
        kind = ("pixel means in (band-limited kernels)" if stage.get("sampling") == "pixel_mean"
                else "point samples in (hat-weighted kernels)")
        print(f"broadening   rotation (eps={stage['epsilon']:g}) then Gaussian FWHM = lambda/R, "
              f"{stage['segments']} segments, {kind} (applied by the core; format version "
              f"{info.get('format_version', '?')})")
    else:
        print(f"broadening   none (format version {info.get('format_version', 1)}: "
              "the network outputs the broadened spectrum)")
    print(f"spectrum     {info['n_pixels']} pixels, {info['wavelength_start']:.3f} Å + {info['wavelength_step']:g} Å steps, "
          f"{info['medium']}; output {info['output_transform']['scale']:g}·sigmoid + {info['output_transform']['offset']:g}")
    print("labels       name        unit    min        max        scaling  role")
    for lab in info["labels"]:
        print(f"             {lab['name']:<11} {lab['unit']:<7} {lab['min']:<10g} {lab['max']:<10g} "
              f"{lab['scaling']:<8} {lab.get('role', 'network')}")
    prov = info["provenance"]
    if prov:
        print("provenance   " + json.dumps(prov, indent=2, default=str).replace("\n", "\n             "))
    bi = build_info()
    print(f"build        {', '.join(f'{k}={v}' for k, v in bi.items())}")
    return 0


def _parse_bounds(items: list[str]) -> dict:
    bounds = {}
    for item in items:
        name, sep, rng = item.partition("=")
        lo, sep2, hi = rng.partition(":")
        try:
            if not (sep and sep2):
                raise ValueError
            bounds[name.strip()] = (float(lo), float(hi))
        except ValueError:
            raise ValueError(f"--bound {item!r} must look like LABEL=LO:HI, e.g. vmic=1:3") from None
    return bounds


def _fit_options(args) -> dict:
    """The options of `fastspec fit` as keyword arguments of fastspec.fit (one star or --batch)."""
    if args.continuum_degree < -1:
        raise ValueError(f"--continuum-degree must be -1 (none) or 0-10, got {args.continuum_degree}")
    return dict(rv=not args.no_rv, continuum_degree=None if args.continuum_degree == -1 else args.continuum_degree,
                rv_bounds=tuple(args.rv_bounds), bounds=_parse_bounds(args.bound) or None, clip=args.clip or None,
                loss=args.loss, model_error=False if args.no_model_error else "auto",
                integrate="auto" if args.integrate is None else args.integrate, vmac=args.vmac)


def cmd_fit(args) -> int:
    import warnings

    from .fitting import FitQualityWarning, Segment, fit
    from .observations import read_segments

    if args.batch is not None:
        return cmd_fit_batch(args)
    if not args.spectrum:
        raise ValueError("give a spectrum file (several: the segments of one star), or --batch LIST_OR_DIR --table "
                         "TABLE for many stars")
    for name in ("table", "workers", "scheduler", "no_progress"):
        if getattr(args, name) not in (None, False):
            raise ValueError(f"--{name.replace('_', '-')} goes with --batch")
    options = _fit_options(args)
    _check_output(args.output, (".json",), "result")
    _check_plot(args.plot)
    specs = [spec for path in args.spectrum for spec in read_segments(path)]
    if len(specs) > 1 and args.error is None:
        for spec in specs:
            if spec.error is None:
                raise ValueError(f"{spec.source}: no errors, and the segments of a star need them: give --error (one "
                                 "error for every pixel) or files with an error column")
    decoder = Decoder.load(args.model, threads=args.threads or 1)
    if isinstance(args.resolution, float):
        lo, hi = decoder.label_ranges[decoder.info["broadening"]["resolution_label"]] if decoder.info.get(
            "broadening") else (math.nan, math.nan)
        if not lo <= args.resolution <= hi:
            raise ValueError(f"--resolution {args.resolution:g} is outside the model's R range ({lo:g}-{hi:g})")
    for spec in specs:
        for note in spec.notes if args.error is None else ():
            print(f"note: {spec.source}: {note}" if len(specs) > 1 else f"note: {note}", file=sys.stderr)

    def lsf_of(spec):  # --resolution R (held) or fit (fitted), else the file's where it has one
        if args.resolution is None:
            return spec.lsf()
        return None if args.resolution == "fit" else args.resolution

    lsfs = [lsf_of(spec) for spec in specs]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FitQualityWarning)  # reported below, with the result
        if len(specs) == 1:
            spec = specs[0]
            result = fit(spec.wavelength, spec.flux, args.error if args.error is not None else spec.error, decoder,
                         medium=args.medium, lsf=lsfs[0], **options)
        else:
            names = [spec.name or Path(spec.source).stem for spec in specs]
            names = names if len(set(names)) == len(names) else [spec.source for spec in specs]
            result = fit([Segment(spec.wavelength, spec.flux, args.error if args.error is not None else spec.error,
                                  lsf=lsf, name=name) for spec, lsf, name in zip(specs, lsfs, names)],
                         decoder=decoder, medium=args.medium, **options)
    sources = ", ".join(spec.source for spec in specs)
    print(f"{sources}: {result.n_pixels_used} pixels fitted ({result.n_pixels_invalid} invalid (NaN flux, or an "
          f"error NaN or <= 0), {result.n_pixels_masked} masked, {result.n_pixels_trimmed} outside the model's reach "
          f"trimmed, {result.n_pixels_clipped} clipped); medium {args.medium}; "
          + (f"pixels integrated over {result.integrate_pixels:.3g} model pixels; " if result.integrate_pixels > 1 else "")
          + (f"noise estimated {result.error_estimate:.4g} (the emulator error is part of it)"
             if result.error_estimate is not None else
             f"emulator error {'in' if result.model_error else 'not in'} the variance"))
    print(result)
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, FitQualityWarning)):
        print(f"warning: {message}", file=sys.stderr)  # the quality checks, and hints such as air/vacuum
    for w in caught:  # any other warning as Python would have shown it
        if not issubclass(w.category, FitQualityWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    with ExitStack() as outputs:
        if args.output:
            doc = {"spectrum": specs[0].source if len(specs) == 1 else [spec.source for spec in specs],
                   "model": decoder.info["path"], "medium": args.medium,
                   "labels": result.labels, "uncertainties": result.uncertainties, "rv": result.rv,
                   "rv_uncertainty": result.rv_uncertainty, "continuum": result.continuum.tolist(),
                   "parameter_names": result.parameter_names, "covariance": result.covariance.tolist(),
                   "chi2": result.chi2, "reduced_chi2": result.reduced_chi2, "success": result.success,
                   "converged": result.converged, "quality": result.quality, "n_pixels_used": result.n_pixels_used,
                   "n_pixels_trimmed": result.n_pixels_trimmed, "n_pixels_clipped": result.n_pixels_clipped,
                   "error_estimate": result.error_estimate, "model_error": result.model_error,
                   "upper_limits": result.upper_limits, "integrate_pixels": result.integrate_pixels,
                   "n_pixels_invalid": result.n_pixels_invalid, "n_pixels_masked": result.n_pixels_masked,
                   "vmac": result.vmac, "vmac_fitted": result.vmac_fitted,
                   "segments": [{"source": spec.source, **{k: v.tolist() if isinstance(v, np.ndarray) else v
                                                           for k, v in seg.items() if k not in ("model_flux", "mask")}}
                                for spec, seg in zip(specs, result.segments)]}
            with open(outputs.enter_context(_atomic_output(args.output)), "w") as f:
                json.dump(doc, f, indent=1)
        if args.plot:
            plot_fit(specs, result, outputs.enter_context(_atomic_output(args.plot)), fmt=args.plot.suffix[1:].lower())
    return 0 if result.success else 3


def cmd_fit_batch(args) -> int:
    from .fitting.batch import fit_batch

    if args.spectrum:
        raise ValueError(f"give a spectrum ({', '.join(map(str, args.spectrum))}) or --batch, not both; several files for one star are "
                         "not a batch")
    for option, given in (("--table", args.table is None), ("-o/--output", args.output is not None),
                          ("--plot", args.plot is not None), ("--threads", args.threads is not None),
                          ("--resolution", args.resolution is not None)):
        if given:
            raise ValueError("--batch needs --table" if option == "--table" else
                             "--resolution is not taken with --batch (yet): each file's own line-spread function (a "
                             "resolution/fwhm column or SPEC_RES) is used where it has one, else R is fitted"
                             if option == "--resolution" else
                             f"{option} is for one spectrum; with --batch the results go to --table"
                             + (" and each worker uses one thread" if option == "--threads" else ""))
    try:
        result = fit_batch(args.batch, args.table, model=args.model, workers=args.workers, scheduler=args.scheduler,
                           medium=args.medium, error=args.error, progress=not args.no_progress, **_fit_options(args))
    except KeyboardInterrupt:
        print(f"fastspec fit: interrupted; the stars done are kept in {args.table}.journal: run the same command "
              "again to continue", file=sys.stderr)
        return 130
    n = len(result.rows)
    print(f"fastspec fit: {n - result.n_failed} of {n} stars fitted ({result.n_skipped} from the journal), "
          f"{result.n_quality_failed} not passing their quality checks, {result.n_failed} could not be fitted; "
          f"wrote {args.table}" + (" (their reasons are above, and in its reason column)" if result.n_failed else ""),
          file=sys.stderr)
    if result.tables_skipped:
        print(f"fastspec fit: skipped {len(result.tables_skipped)} table(s) of earlier batches in the folder, not "
              f"spectra: {', '.join(Path(t).name for t in result.tables_skipped)}", file=sys.stderr)
    if result.n_failed:
        return 1
    return 3 if result.n_quality_failed else 0


def plot_fit(specs, result, path, fmt: str = "png") -> None:
    """Data, model and residuals of a fit: one pair of panels per segment (specs: the Spectra, in the fit's order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = specs if isinstance(specs, (list, tuple)) else [specs]
    fig, axes = plt.subplots(2 * len(specs), 1, figsize=(11, 2 + 3 * len(specs)), squeeze=False,
                             height_ratios=[3, 1] * len(specs), constrained_layout=True)
    lab = result.labels
    r_text = (f", R {lab['resolution']:.0f}" if "resolution" in lab else "")
    fig.suptitle(f"Teff {lab['teff']:.0f} ± {result.uncertainties['teff']:.0f} K, log g {lab['logg']:.2f}, "
                 f"[M/H] {lab['mh']:+.2f}, v sin i {lab['vsini']:.1f}, v_mic {lab['vmic']:.2f}{r_text}"
                 + (f", v_mac {result.vmac:.1f}" + ("" if result.vmac_fitted else " (fixed)") if result.vmac else "")
                 + (f", RV {result.rv:.2f} km/s" if result.rv is not None else "")
                 + f"; reduced χ² {result.reduced_chi2:.2f}", fontsize=9)
    for k, (spec, seg) in enumerate(zip(specs, result.segments)):
        ax, axr = axes[2 * k, 0], axes[2 * k + 1, 0]
        used = seg["mask"]
        ax.plot(spec.wavelength, spec.flux, lw=0.5, color="0.6", label="data")
        ax.plot(spec.wavelength[used], seg["model_flux"][used], lw=0.7, color="C3", label="model")
        ax.legend(loc="lower left", fontsize=8)
        ax.set_ylabel("flux")
        if len(specs) > 1:
            ax.set_title(f"{seg['name']}: R {seg['resolution']:.0f}" + (" (its LSF)" if seg["lsf"] else "")
                         + f", χ² {seg['chi2']:.0f} on {seg['n_pixels_used']} pixels", fontsize=8)
        axr.plot(spec.wavelength[used], (spec.flux - seg["model_flux"])[used], lw=0.5, color="k")
        axr.axhline(0, color="C3", lw=0.7)
        axr.set_ylabel("data − model")
        axr.sharex(ax)
    axes[-1, 0].set_xlabel(f"wavelength [Å, {result.medium}]")
    fig.savefig(path, dpi=110, format=fmt)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

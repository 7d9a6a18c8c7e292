"""Reading and checking the evaluation data set: broadened SYNSPEC spectra with six labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

INTRINSIC_LABELS = ("teff", "logg", "mh", "vmic")
MAKE_TESTSET_HINT = (
    "Evaluation compares the model with fully broadened SYNSPEC spectra, labelled by all six labels "
    "(teff, logg, vsini, mh, vmic, resolution). Make such a file from intrinsic spectra with\n"
    "    fastspec-train testset --model <model.fsm> --data <intrinsic.h5> --out <testset.h5>\n"
    "(the spectra held out from that model's training, broadened at random v sin i and R) and pass it as --data."
)


class DataError(ValueError):
    """The evaluation data file cannot be used; the message says why and what to do."""


def _names(attr) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in np.atleast_1d(attr)]


class EvalData:
    """An open evaluation file: labels in the model's order, flux read in row chunks."""

    def __init__(self, path, label_names, wavelength, max_spectra: int | None = None, medium: str | None = None):
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: no such file")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise DataError(f"{self.path}: not a readable HDF5 file ({exc})") from exc
        try:
            self._check(label_names, wavelength, max_spectra, medium)
        except Exception:
            self._h5.close()
            raise

    def _check(self, label_names, wavelength, max_spectra, model_medium):
        f, p = self._h5, self.path
        for name in ("flux", "labels"):
            if name not in f:
                raise DataError(f"{p}: no '{name}' dataset (expected the layout of shared/README.md: flux (N, n_pixels), labels (N, 6))")
        flux, labels = f["flux"], f["labels"]
        if "names" not in labels.attrs:
            raise DataError(f"{p}: 'labels' has no attribute 'names'; labels are read by name, not by position")
        names = _names(labels.attrs["names"])
        if labels.ndim != 2 or labels.shape[1] != len(names):
            raise DataError(f"{p}: 'labels' has shape {labels.shape} but {len(names)} names {names}")
        missing = [n for n in label_names if n not in names]
        if missing:
            if set(names) <= set(INTRINSIC_LABELS):
                raise DataError(
                    f"{p} holds intrinsic spectra with the {len(names)} labels {names} only (no v sin i, no R).\n"
                    + MAKE_TESTSET_HINT
                )
            raise DataError(f"{p}: labels {names} lack {missing}, which the model needs.\n" + MAKE_TESTSET_HINT)
        if flux.ndim != 2 or flux.shape[0] != labels.shape[0]:
            raise DataError(f"{p}: flux has shape {flux.shape} but labels {labels.shape}: one row of labels per spectrum expected")

        # The grid must be the model's, pixel for pixel.
        wl = np.asarray(wavelength, dtype=np.float64)
        model_grid = (float(wl[0]), float(wl[1] - wl[0]), int(wl.size))
        try:
            file_grid = (float(f.attrs["wavelength_start"]), float(f.attrs["wavelength_step"]), int(f.attrs["n_pixels"]))
        except KeyError as exc:
            raise DataError(f"{p}: missing the wavelength grid attribute {exc} (wavelength_start, wavelength_step, n_pixels)") from None
        if (
            file_grid[2] != model_grid[2]
            or flux.shape[1] != model_grid[2]
            or abs(file_grid[0] - model_grid[0]) > 1e-6
            or abs(file_grid[1] - model_grid[1]) > 1e-9 * max(1.0, abs(model_grid[1]))
        ):
            raise DataError(
                f"{p}: wavelength grid (start {file_grid[0]} Å, step {file_grid[1]} Å, {file_grid[2]} pixels; flux has "
                f"{flux.shape[1]} columns) differs from the model's (start {model_grid[0]} Å, step {model_grid[1]} Å, "
                f"{model_grid[2]} pixels)"
            )
        self.medium = f.attrs.get("wavelength_medium")
        if isinstance(self.medium, bytes):
            self.medium = self.medium.decode()
        if model_medium and self.medium and str(model_medium).lower() != str(self.medium).lower():
            raise DataError(f"{p}: wavelengths are in {self.medium} but the model's are in {model_medium}")

        cols = [names.index(n) for n in label_names]
        all_labels = np.asarray(labels[...], dtype=np.float64)
        self.n_total = all_labels.shape[0]
        self.n = self.n_total if max_spectra is None else min(int(max_spectra), self.n_total)
        if self.n == 0:
            raise DataError(f"{p}: no spectra")
        self.labels = all_labels[: self.n][:, cols]
        if not np.all(np.isfinite(self.labels)):
            raise DataError(f"{p}: non-finite labels in rows {np.nonzero(~np.isfinite(self.labels).all(axis=1))[0][:10].tolist()}")
        units = labels.attrs.get("units")
        self.units = dict(zip(names, _names(units))) if units is not None and len(np.atleast_1d(units)) == len(names) else {}
        # Which intrinsic spectrum each row was broadened from, when the file says (fastspec-train testset
        # writes `source_rows`); otherwise the caller groups by the intrinsic labels.
        self.source_rows = None
        if "source_rows" in f and f["source_rows"].shape == (self.n_total,):
            self.source_rows = np.asarray(f["source_rows"][: self.n])
        self.label_names = tuple(label_names)
        self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        self._flux = flux
        # `fastspec-train testset` on data with a fine mesh: the model's broadening stage applied to the SYNSPEC
        # pixels themselves (a perfect network), scored apart as the floor of the representation and operator
        self._floor = f["perfect_decoder"] if "perfect_decoder" in f else None
        if self._floor is not None and self._floor.shape != flux.shape:
            raise DataError(f"{p}: 'perfect_decoder' has shape {self._floor.shape} but flux {flux.shape}")

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._flux[start:stop], dtype=np.float32)

    def read_rows(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows)
        out = np.empty((rows.size, self._flux.shape[1]), dtype=np.float32)
        # h5py fancy indexing needs increasing, unique indices.
        uniq, inv = np.unique(rows[order], return_inverse=True)
        out[order] = np.asarray(self._flux[uniq.tolist()], dtype=np.float32)[inv]
        return out

    @property
    def has_floor(self) -> bool:
        return self._floor is not None

    def read_floor(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._floor[start:stop], dtype=np.float32)

    def chunks(self, chunk_size: int):
        for s in range(0, self.n, chunk_size):
            e = min(s + chunk_size, self.n)
            yield s, e, self.read(s, e)

    def close(self):
        self._h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

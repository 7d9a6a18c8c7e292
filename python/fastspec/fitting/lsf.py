"""The instrument's line-spread function (LSF) of an observation: a Gaussian of FWHM λ/R(λ), R given as a constant, a
table (λ, R), a callable R(λ), or the FWHM itself in Å (a constant, a table or a callable).

The broadening stage builds its kernels at a few nodes across the model grid and blends neighbouring nodes
(docs/model-format.md); an LSF enters it as the resolving power at those nodes: the label R is set to a reference
value R_ref (the median over the segment's pixels) and each node's kernel takes R_ref · g_s with g_s = R(λ_s) / R_ref
(`Decoder(..., resolution_factors=g)`). Nodes beyond the wavelengths the LSF is given for take the value at the
nearer end (a table is not extrapolated; a callable is called only within the segment's wavelengths).
"""

from __future__ import annotations

import numbers

import numpy as np


class LSF:
    """R(λ) of an instrument. Give one of ``resolution`` (R: a number, a callable of λ in Å, or values at
    ``wavelength``) or ``fwhm`` (Å, likewise); R = λ / FWHM."""

    def __init__(self, resolution=None, *, fwhm=None, wavelength=None):
        if (resolution is None) == (fwhm is None):
            raise ValueError("LSF: give exactly one of resolution= (R) and fwhm= (Å)")
        self.kind = "resolution" if fwhm is None else "fwhm"
        value = resolution if fwhm is None else fwhm
        self.table = None
        if callable(value):
            self.function = value
        elif isinstance(value, numbers.Real):
            self.function = None
            self.constant = float(value)
            self._check(np.array([self.constant]))
        else:
            values = np.asarray(value, dtype=np.float64)
            if wavelength is None:
                raise ValueError(f"LSF: a table of {self.kind} values needs wavelength= (Å) of the same length")
            wl = np.asarray(wavelength, dtype=np.float64)
            if values.ndim != 1 or wl.shape != values.shape or values.size < 2:
                raise ValueError(f"LSF: wavelength and {self.kind} must be 1-D of one length >= 2; got shapes "
                                 f"{wl.shape} and {values.shape}")
            if not (np.all(np.isfinite(wl)) and np.all(np.diff(wl) > 0)):
                raise ValueError("LSF: the table's wavelengths must be finite and increasing")
            self._check(values, wl)
            self.function, self.table = None, (wl, values)

    def _check(self, values, wavelength=None):
        bad = ~(np.isfinite(values) & (values > 0))
        if bad.any():
            at = "" if wavelength is None else f" at {np.broadcast_to(wavelength, values.shape)[bad][0]:.3f} Å"
            raise ValueError(f"LSF: {self.kind} must be finite and > 0; got {values[bad][0]}{at}")

    @classmethod
    def of(cls, value) -> "LSF | None":
        """None, an LSF, a number (R) or a callable R(λ) as an LSF."""
        if value is None or isinstance(value, LSF):
            return value
        if isinstance(value, numbers.Real) or callable(value):
            return cls(value)
        raise TypeError(f"lsf must be an LSF, a number (R) or a callable R(λ), not {type(value).__name__}")

    @property
    def is_constant(self) -> bool:
        return self.function is None and self.table is None

    def resolution_at(self, wavelength, span=None) -> np.ndarray:
        """R at the wavelengths (Å); span (lo, hi): where a callable may be called (wavelengths outside take the
        value at the nearer end)."""
        wl = np.asarray(wavelength, dtype=np.float64)
        if self.is_constant:
            values = np.full(wl.shape, self.constant)
        elif self.table is not None:
            values = np.interp(wl, *self.table)  # the ends' values beyond the table
        else:
            at = np.clip(wl, *span) if span is not None else wl
            values = np.asarray(self.function(at), dtype=np.float64) * np.ones(wl.shape)
            self._check(values, at)
        return wl / values if self.kind == "fwhm" else values

    def __repr__(self) -> str:
        what = "constant" if self.is_constant else "table" if self.table is not None else "callable"
        return f"LSF({self.kind}, {what})"

"""The instrument's line-spread function (LSF) of an observation: a Gaussian of FWHM λ/R(λ), R given as a constant, a
table (λ, R), a callable R(λ), or the FWHM itself in Å (a constant, a table or a callable).

The broadening stage builds its kernels at a few nodes across the model grid and blends neighbouring nodes
(docs/model-format.md); an LSF enters it as the resolving power at those nodes: the label R is set to a reference
value R_ref (the median over the segment's pixels) and each node's kernel takes R_ref · g_s with g_s = R(λ_s) / R_ref
(`Decoder(..., resolution_factors=g)`). Nodes outside the segment take R(λ) at their own wavelength: a table
beyond its ends takes the nearer end's value (it is not extrapolated); a callable is called there too, and where it
gives no usable value outside the segment the segment's nearer end's is taken. The wavelengths of an LSF are those
of the fit (the model's medium, air): the 1.4 Å between air and vacuum near 5000 Å does not matter for R(λ).
"""

from __future__ import annotations

import hashlib
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
        if isinstance(value, bool):
            raise TypeError(f"LSF: {self.kind} must be a number, a table or a callable, not a bool")
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
        if (isinstance(value, numbers.Real) and not isinstance(value, bool)) or callable(value):
            return cls(value)
        raise TypeError(f"lsf must be an LSF, a number (R) or a callable R(λ), not {type(value).__name__}")

    @property
    def is_constant(self) -> bool:
        """One R for every wavelength (a constant FWHM is not: R = λ / FWHM)."""
        return self.function is None and self.table is None and self.kind == "resolution"

    def resolution_at(self, wavelength, span=None) -> np.ndarray:
        """R at the wavelengths (Å). span (lo, hi): the segment's wavelengths; a callable's values outside it that are
        not finite and > 0 are replaced by its value at the nearer end of span (inside, they raise)."""
        wl = np.asarray(wavelength, dtype=np.float64)
        if self.function is None and self.table is None:
            values = np.full(wl.shape, self.constant)
        elif self.table is not None:
            values = np.interp(wl, *self.table)  # the ends' values beyond the table
        else:
            values = self._call(wl)
            if span is not None:
                outside = (wl < span[0]) | (wl > span[1])
                bad = outside & ~(np.isfinite(values) & (values > 0))
                if bad.any():
                    values = np.where(bad, self._call(np.clip(wl, *span)), values)
            self._check(values, wl)
        return wl / values if self.kind == "fwhm" else values

    def _call(self, wl):
        values = np.asarray(self.function(wl), dtype=np.float64)
        if values.shape not in (wl.shape, ()):
            raise ValueError(f"LSF: the callable returned shape {values.shape} for wavelengths of shape {wl.shape}")
        return np.broadcast_to(values, wl.shape).copy()

    def __repr__(self) -> str:
        """Says what it is, values included: a batch's journal compares fit options by this text."""
        if self.table is not None:
            wl, values = self.table
            digest = hashlib.sha1(np.concatenate([wl, values]).tobytes()).hexdigest()[:12]
            return (f"LSF({self.kind}: a table of {wl.size} from {wl[0]:g} to {wl[-1]:g} Å, "
                    f"{values.min():g}-{values.max():g}, sha1 {digest})")
        if self.function is not None:
            name = f"{getattr(self.function, '__module__', '?')}.{getattr(self.function, '__qualname__', '?')}"
            return f"LSF({self.kind}: the callable {name})"
        return f"LSF({self.kind}={self.constant:g})"

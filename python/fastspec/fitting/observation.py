"""The observed spectrum as the fit sees it: wavelengths in the model's medium, flux and 1σ errors (a scalar for
every pixel, masked arrays' masks honoured), the pixels that are fitted, the flux unit divided out, and whether
each pixel is the model's mean over its width (pixel integration). A specutils Spectrum is unpacked here too.

Reading files (CSV, FITS, HDF5, .npy) is `fastspec.observations`; this module takes arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..observations import sigma_from_ivar
from ..wavelength import air_to_vacuum, vacuum_to_air

C_KMS = 299792.458


def from_specutils(spectrum):
    """(wavelength Å, flux, error or None, bad-pixel mask or None) of a specutils Spectrum (or Spectrum1D)."""
    import astropy.units as u
    from astropy.nddata import InverseVariance, StdDevUncertainty, VarianceUncertainty

    wave = spectrum.spectral_axis.to(u.AA, equivalencies=u.spectral()).value
    flux = np.asarray(spectrum.flux.value, dtype=np.float64)
    unc, error = spectrum.uncertainty, None
    if isinstance(unc, StdDevUncertainty):
        error = np.asarray(unc.array, dtype=np.float64)
    elif isinstance(unc, VarianceUncertainty):
        error = np.sqrt(np.asarray(unc.array, dtype=np.float64))
    elif isinstance(unc, InverseVariance):
        error = sigma_from_ivar(unc.array)
    elif unc is not None:
        raise ValueError(f"unsupported uncertainty type {type(unc).__name__}: use StdDev, Variance or InverseVariance")
    if isinstance(unc, StdDevUncertainty) and unc.unit is not None:  # in the flux's unit
        error = np.asarray(unc.quantity.to_value(spectrum.flux.unit), dtype=np.float64)
    bad = None if spectrum.mask is None else np.asarray(spectrum.mask, bool)  # specutils: True = bad
    return wave, flux, error, bad


class Observation:
    """wl, flux, sigma_obs: the fitted pixels (flux and error divided by `scale`); mask: which of the given pixels
    they are; half: half-widths of the pixels when each is the model's mean over its width, else None; width: the
    median pixel width in model pixels (1: no integration); n_invalid, n_masked, n_trimmed: pixels left out."""

    def __init__(self, decoder, wavelength, flux, error, mask, medium, rv_bounds, min_pixels, divide_unit,
                 integrate):
        # the data: masked arrays' masks, a scalar error or none (estimated), wavelengths in the model's medium
        masked = [np.ma.getmaskarray(a) for a in (wavelength, flux) if np.ma.isMaskedArray(a)]
        if np.ma.isMaskedArray(error):
            masked.append(np.ma.getmaskarray(error))
        wl = np.ma.getdata(np.asarray(wavelength) if not np.ma.isMaskedArray(wavelength) else wavelength).astype(np.float64)
        fl = np.ma.getdata(flux).astype(np.float64) if np.ma.isMaskedArray(flux) else np.asarray(flux, dtype=np.float64)
        if wl.ndim != 1 or fl.shape != wl.shape:
            raise ValueError(f"wavelength and flux must be 1-D arrays of one length; got shapes {wl.shape}, {fl.shape}")
        er = np.ma.getdata(error).astype(np.float64) if np.ma.isMaskedArray(error) else np.asarray(error, dtype=np.float64)
        if er.ndim == 0:
            if not (np.isfinite(er) and er > 0):
                raise ValueError(f"error must be a finite number > 0 (one error for every pixel), got {float(er)}")
            er = np.full(wl.shape, float(er))
        if er.shape != wl.shape:
            raise ValueError(f"error must be a scalar or a 1-D array like flux; got shape {er.shape} for {wl.shape}")
        if not np.all(np.isfinite(wl)):
            raise ValueError("wavelength contains NaN or infinite values")
        if medium not in ("air", "vacuum"):
            raise ValueError(f"medium must be 'air' or 'vacuum', not {medium!r}")
        model_medium = decoder.info["medium"]
        if medium != model_medium:  # the fit runs in the model's medium; RV is unaffected (both scale alike)
            wl = vacuum_to_air(wl) if model_medium == "air" else air_to_vacuum(wl)
        # A wavelength given twice would count twice in χ² (orders merged by concatenation, a repeated export).
        values, counts = np.unique(wl, return_counts=True)
        if counts.max(initial=1) > 1:
            raise ValueError(f"{int((counts - 1).sum())} duplicated wavelengths (the first at {values[counts > 1][0]:.4f} Å): "
                             "each would be fitted twice; merge or drop the repeats")
        valid = np.isfinite(fl) & np.isfinite(er) & (er > 0)
        good = np.ones(wl.shape, bool)
        for m_ in masked:
            good &= ~m_
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != wl.shape or mask.dtype != bool:
                raise ValueError(f"mask must be a boolean array of shape {wl.shape} (True = fit this pixel)")
            good &= mask
        self.n_invalid, self.n_masked = int((~valid).sum()), int((valid & ~good).sum())
        good &= valid

        # Trim the pixels that some allowed RV would map outside the model grid (reported, not an error).
        self.w0, self.dw, self.n_model = decoder._model.wavelength_start, decoder._model.wavelength_step, decoder.n_pixels
        w_end = self.w0 + self.dw * (self.n_model - 1)
        reach = (wl / (1 + rv_bounds[1] / C_KMS) >= self.w0) & (wl / (1 + rv_bounds[0] / C_KMS) <= w_end)
        self.n_trimmed = int((good & ~reach).sum())
        good &= reach
        if good.sum() < min_pixels:
            allowed = (self.w0 * (1 + rv_bounds[1] / C_KMS), w_end * (1 + rv_bounds[0] / C_KMS))
            raise ValueError(f"only {int(good.sum())} usable pixels (finite flux, finite error > 0, inside the mask "
                             f"and within {allowed[0]:.3f}-{allowed[1]:.3f} Å ({model_medium}), where the model "
                             f"covers every RV in {rv_bounds} km/s); at least {min_pixels} are needed")
        self.mask = good
        # Flux in any unit: the fit runs on flux / scale (the continuum polynomial takes the unit back), so that
        # tolerances, starting scales and the degeneracy test see numbers near 1 whatever the unit.
        scale = float(np.median(np.abs(fl[good]))) if divide_unit else 1.0
        self.scale = scale if np.isfinite(scale) and scale > 0 else 1.0
        self.wl, self.flux, self.sigma_obs = wl[good], fl[good] / self.scale, er[good] / self.scale
        # Pixel integration: each observed pixel as the mean of the model over its width (its distance to the
        # nearer neighbour); "auto": when the pixels are 1.5 model pixels wide or more (median).
        if integrate not in (True, False, "auto"):
            raise ValueError(f"integrate must be True, False or 'auto', not {integrate!r}")
        order = np.argsort(wl)
        gaps = np.diff(wl[order]) if wl.size > 1 else np.array([self.dw])
        spacing = np.empty_like(wl)
        spacing[order] = np.minimum(np.r_[gaps[:1], gaps], np.r_[gaps, gaps[-1:]])
        self.width = float(np.median(spacing[good]) / self.dw)
        self.half = 0.5 * spacing[good] if integrate is True or (integrate == "auto" and self.width >= 1.5) else None
        if self.half is None:
            self.width = 1.0


DEFAULT = "default"  # a Segment option left to fit()'s argument of the same name


@dataclass
class Segment:
    """One piece of an observed spectrum (an echelle order, a spectrograph's arm) with what is its own: wavelengths
    (Å, increasing), flux, 1σ errors (an array or a scalar), a mask (True = fit), the line-spread function and the
    continuum polynomial. `fastspec.fit` takes a list of them and shares the stellar labels (and one RV) among them.

    lsf: an `LSF`, a number (R) or a callable R(λ); None: the resolving power is the fitted label R, shared by every
    segment without an lsf. continuum_degree: its own Legendre polynomial's degree (None: none), medium ("air" or
    "vacuum") and integrate (see fit): "default" takes fit()'s argument. name: how messages and outputs call it
    (default: "segment 1", "segment 2", ... in the order given)."""

    wavelength: Any
    flux: Any
    error: Any
    mask: Any = None
    lsf: Any = None
    continuum_degree: Any = DEFAULT
    medium: Any = DEFAULT
    integrate: Any = DEFAULT
    name: str | None = None

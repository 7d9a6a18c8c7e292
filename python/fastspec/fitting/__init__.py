"""`fastspec.fit` (this package's `fit`): least-squares fit of the six labels (plus a radial velocity and a
continuum polynomial) to an observed spectrum, with the decoder's analytic Jacobian. Radial-tangential
macroturbulence (a parameter of the broadening stage, not a label) is held fixed (``vmac=``, default 0) or fitted
(``vmac="fit"``: then one more parameter, "vmac", in 0-20 km/s, with the core's dF/dvmac).

The model of the observation and its Jacobian: `likelihood`; the fit's coordinates: `parameters`.

The emulator's own error, in two parts (``model_error``, on by default when the model file has them):
the variance per pixel is σ_obs² + (C · σ_model)², σ_model the file's emulator error (its measured RMS against
SYNSPEC on held-out spectra at the current v sin i and R, interpolated like F; re-evaluated at each run's start
and at the solution); and because that error is correlated over pixels (a star's residual pattern is fixed, so
it does not average down like noise), the label systematics measured at export (the spread of noise-free fits
of held-out spectra) are added in quadrature to the label covariance. Without them the reported uncertainties
were 1.3-2.6× smaller than the actual scatter of Teff, log g and [M/H] at SNR 50-100 with the shipped
default (benchmarks/results/fit-2026-12-02.md; 3-6× with the less accurate model of commit 2d8ffae).

Observations as they come: vacuum wavelengths (``medium="vacuum"``) are converted to the model's medium;
pixels that no allowed RV maps into the model grid are trimmed (and counted); a scalar error applies to every
pixel; masked arrays' masks are honoured.
No error at all: a first fit with one error for every pixel gives the residuals, their RMS is taken as the noise
of every pixel, and the fit is repeated with it (``error_estimate``). Flux in any unit: the fit runs on flux
divided by its median (the continuum polynomial carries the unit). v sin i = 0 is a physical limit: a fit there
is no failure, and where the data cannot tell v sin i from 0 a 95 % upper limit is reported. Outliers (cosmic
rays, bad pixels): ``clip`` rejects pixels whose normalised residual exceeds clip·σ and refits, ``loss`` passes a robust loss to least_squares.

Where things are: `observation` (the spectrum to fit: wavelengths, flux, errors, mask, medium, flux unit, pixel
integration; a specutils Spectrum unpacked), `parameters` (label ranges, ``bounds``, the fit's coordinates),
`likelihood` (the model of the observation, residuals and Jacobian, the emulator-error variance and label
systematics), `solver` (`fit`: starts, least squares, v sin i at 0, clipping, covariance, upper limits) and
`results` (`FitResult`, `FitQualityWarning`, the quality checks, `model_spectrum`); `batch` (`fit_batch`: many
spectra, each fitted on its own, in parallel processes or on Dask, into one table, resumable).
"""

from .batch import BatchResult, Star, fit_batch
from .lsf import LSF
from .observation import C_KMS, Segment
from .results import FitQualityWarning, FitResult, model_spectrum
from .solver import fit

# `fastspec.fit` is the function (the package exports it under that name): the helper documented as
# `fastspec.fit.model_spectrum` must be reachable from it.
fit.model_spectrum = model_spectrum

__all__ = ["BatchResult", "C_KMS", "FitQualityWarning", "FitResult", "LSF", "Segment", "Star", "fit", "fit_batch",
           "model_spectrum"]

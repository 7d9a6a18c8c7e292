"""The likelihood: the model of the observation, its residuals in units of the error and their Jacobian, and the
error model.

Model of the observation at wavelength λ (Å, in the model's medium, air for the shipped models):

    m(λ) = C(x) · F(λ / (1 + v/c); labels, vmac),   C(x) = Σ_k c_k P_k(x),  x ∈ [−1, 1] across the fitted pixels

F is the decoder's spectrum (z = 0; with the macroturbulence vmac, fixed or fitted, in its broadening stage) interpolated linearly from the model grid at the rest wavelength (or, with
pixel integration, averaged over each observed pixel), P_k are Legendre polynomials. The Jacobian is exact: the
core's dF/d(labels) sampled the same way as F, the RV column from the model spectrum's wavelength gradient, and
the polynomial basis for the continuum.

The error model: the variance per pixel is σ_obs² + (C · σ_model)² with ``model_error``, σ_model the file's
emulator error at the current v sin i and R (`reweight`); the label systematics measured at export are added to
the label covariance (`add_systematics`).
"""

from __future__ import annotations

import numpy as np

from .observation import C_KMS, Observation
from .parameters import Parameters


class Likelihood(Parameters, Observation):
    """The observed spectrum (Observation) seen through the fit's coordinates (Parameters): residuals, Jacobian
    and χ² of a parameter vector, and the χ² of whole model spectra for ranking starts."""

    def __init__(self, decoder, wavelength, flux, error, mask, fit_rv, continuum_degree, bounds, rv_bounds,
                 medium="air", model_error=False, integrate="auto", vmac=0.0):
        self.decoder = decoder
        Parameters.__init__(self, decoder, bounds, fit_rv, continuum_degree, rv_bounds, vmac)
        Observation.__init__(self, decoder, wavelength, flux, error, mask, medium, self.rv_bounds,
                             min_pixels=max(10, 2 * self.n_params), divide_unit=self.degree >= 0, integrate=integrate)
        self.ivar_sqrt = 1.0 / self.sigma_obs
        self.model_error = bool(model_error)

        # continuum basis on the fitted pixels
        span = self.wl.max() - self.wl.min()
        x = 2.0 * (self.wl - self.wl.min()) / span - 1.0 if span > 0 else np.zeros_like(self.wl)
        self.basis = np.polynomial.legendre.legvander(x, self.degree) if self.degree >= 0 else np.ones((x.size, 0))
        self.basis_products = (self.basis[:, :, None] * self.basis[:, None, :]).reshape(x.size, -1)
        self.n_model_calls = 0
        self.n_jac_calls = 0

    def model_flux(self, labels):
        """The decoder's spectra at fit-coordinate labels (len(names),) or (N, len(names)), with the macroturbulence
        (fitted or fixed)."""
        lab, vmac = self.model_call(labels)
        return self.decoder(lab, vmac=vmac)

    def model_jacobian(self, labels):
        """Flux and dF/d(names) at fit-coordinate labels (len(names),): the core's label columns, then dF/dvmac
        when it is fitted."""
        lab, vmac = self.model_call(labels)
        if not self.fit_vmac:
            return self.decoder.jacobian(lab, vmac=vmac)
        spec, jac, jac_vmac = self.decoder.jacobian(lab, vmac=vmac, return_vmac=True)
        return spec, np.concatenate([jac, jac_vmac[:, None]], axis=1)

    def _interp(self, rv):
        """Indices and weights of the linear interpolation at the rest wavelengths (rv scalar or (R, 1))."""
        rest = self.wl / (1.0 + rv / C_KMS)
        pos = (rest - self.w0) / self.dw
        k = np.clip(np.floor(pos).astype(np.int64), 0, self.n_model - 2)
        return k, pos - k

    def sample(self, spec, rv):
        """The model spec (n_model, ...) at the observed pixels, (P, ...); rv a scalar, or (R, 1) for a 1-D spec,
        giving (R, P). Point samples: linear interpolation at the rest wavelength. Pixel integration: the mean
        over the pixel of the model samples read as bins one model pixel wide (exact for bin-averaged data)."""
        expand = (1,) * (spec.ndim - 1)
        if self.half is None:
            k, w = self._interp(rv)
            w = w.reshape(w.shape + expand)
            return (1 - w) * spec[k] + w * spec[k + 1]
        a, b = self._edges(rv)
        cum = np.concatenate([np.zeros((1,) + spec.shape[1:]), np.cumsum(spec, axis=0)])

        def integral(x):  # of the bins from the grid's start (x = -0.5) to x
            k = np.clip(np.floor(x + 0.5).astype(np.int64), 0, self.n_model - 1)
            return cum[k] + spec[k] * (x - k + 0.5).reshape(x.shape + expand)

        return (integral(b) - integral(a)) / (b - a).reshape(a.shape + expand)

    def rv_derivative(self, spec, rv):
        """d(sample(spec, rv))/d rv for a 1-D spec, (P,)."""
        if self.half is None:
            k, _ = self._interp(rv)
            slope = (spec[k + 1] - spec[k]) / self.dw  # the segment each pixel falls in (the interpolant's exact slope)
            return slope * (-self.wl / C_KMS / (1.0 + rv / C_KMS) ** 2)
        a, b = self._edges(rv)
        bins = lambda x: spec[np.clip(np.floor(x + 0.5).astype(np.int64), 0, self.n_model - 1)]  # noqa: E731
        mean = self.sample(spec, rv)
        # each edge x = (λ_edge / (1 + v/c) − w0) / dw moves by −(x + w0/dw) / (c + v); so does b − a, by −(b − a) / (c + v)
        da, db = -(a + self.w0 / self.dw) / (C_KMS + rv), -(b + self.w0 / self.dw) / (C_KMS + rv)
        return (bins(b) * db - bins(a) * da) / (b - a) + mean / (C_KMS + rv)

    def _edges(self, rv):
        """The observed pixels' edges in model pixels (the rest frame at rv)."""
        shift = 1.0 + np.asarray(rv) / C_KMS
        return (((self.wl - self.half) / shift - self.w0) / self.dw, ((self.wl + self.half) / shift - self.w0) / self.dw)

    def reweight(self, theta):
        """Variance σ_obs² + (C·σ_model)² with the emulator error at these labels (no-op without model_error)."""
        if not self.model_error:
            return
        u, rv, c = self.split(theta)
        lab = self.labels_of(u)
        err = self.decoder._model.emulator_error(float(lab[self.names.index("vsini")]),
                                                 float(lab[self.names.index("resolution")])).astype(np.float64)
        k, w = self._interp(rv)
        cont = self.basis @ c if self.degree >= 0 else 1.0
        sig_model = cont * ((1 - w) * err[k] + w * err[k + 1])
        self.ivar_sqrt = 1.0 / np.sqrt(self.sigma_obs**2 + sig_model**2)

    def chi2_at(self, theta):
        """χ² with the variance at theta itself (runs started elsewhere weighted the emulator error there)."""
        self.reweight(theta)
        r = self.residuals(theta)
        return float(r @ r)

    def drop(self, reject):
        """Leave out fitted pixels (indices into the fitted set), e.g. outliers."""
        keep = Observation.drop(self, reject)
        self.ivar_sqrt, self.basis = self.ivar_sqrt[keep], self.basis[keep]
        self.basis_products = (self.basis[:, :, None] * self.basis[:, None, :]).reshape(self.wl.size, -1)

    def residuals(self, theta):
        u, rv, c = self.split(theta)
        self.n_model_calls += 1
        f = self.sample(self.model_flux(self.labels_of(u)).astype(np.float64), rv)
        cont = self.basis @ c if self.degree >= 0 else 1.0
        return (cont * f - self.flux) * self.ivar_sqrt

    def jacobian(self, theta):
        u, rv, c = self.split(theta)
        self.n_jac_calls += 1
        spec, jac = self.model_jacobian(self.labels_for_jacobian(u))
        spec = spec.astype(np.float64)
        f = self.sample(spec, rv)
        cont = self.basis @ c if self.degree >= 0 else np.ones_like(f)
        scale = cont * self.ivar_sqrt
        cols = [self.sample(jac.astype(np.float64), rv) * self.dlabel_du(u)[None, :] * scale[:, None]]
        if self.fit_rv:
            cols.append((self.rv_derivative(spec, rv) * scale)[:, None])
        if self.degree >= 0:
            cols.append(self.basis * (f * self.ivar_sqrt)[:, None])
        return np.concatenate(cols, axis=1)

    def continuum_for(self, model_flux):
        """Best continuum coefficients for model spectra on the fitted pixels, (N, M) -> (N, d+1), and the χ²."""
        # Normal equations by GEMMs: A = basis * (f / σ), AᵀA = (f/σ)² @ (basis_i basis_j), Aᵀb = (f/σ) @ (basis b)
        fw = model_flux * self.ivar_sqrt[None, :]
        b = self.flux * self.ivar_sqrt
        nb = self.degree + 1
        ata = ((fw * fw) @ self.basis_products).reshape(-1, nb, nb) + 1e-12 * np.eye(nb)
        atb = fw @ (self.basis * b[:, None])
        c = np.linalg.solve(ata, atb[:, :, None])[:, :, 0]
        return c, np.maximum(b @ b - np.einsum("ni,ni->n", atb, c), 0.0)

    def chi2_of_spectra(self, spectra, rv):
        """χ² of model spectra (N, n_model) at one RV, each with its best continuum."""
        return self._chi2_interpolated(self.sample(spectra.T, rv).T)

    def chi2_of_rvs(self, spectrum, rvs):
        """χ² of one model spectrum (n_model,) at each RV of rvs (R,), with its best continuum."""
        return self._chi2_interpolated(self.sample(spectrum, np.asarray(rvs, dtype=np.float64)[:, None]))[0]

    def _chi2_interpolated(self, f):
        if self.degree >= 0:
            c, chi2 = self.continuum_for(f)
            return chi2, c
        return (((f - self.flux) * self.ivar_sqrt) ** 2).sum(axis=1), np.zeros((len(f), 0))


def add_systematics(cov, names, labels, decoder) -> None:
    """Add the model file's label systematics (noise-free held-out fits) to the label variances of cov."""
    systematics = decoder.info["provenance"].get("label_systematics") or {}
    for j, name in enumerate(names):
        s_sys = systematics.get(name)
        if name == "resolution" and "resolution_dex" in systematics:
            s_sys = systematics["resolution_dex"] * labels[j] * np.log(10.0)
        if s_sys:
            cov[j, j] += float(s_sys) ** 2

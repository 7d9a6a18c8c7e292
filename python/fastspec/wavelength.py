"""Air and vacuum wavelengths: the IAU standard conversion (Morton 2000, ApJS 130, 403, eq. 3, from the
refractive index of Ciddor 1996 for standard air: 15 °C, 101 325 Pa, 450 ppm CO2, dry).

    λ_air = λ_vac / n(λ_vac),  n = 1 + 8.34254e-5 + 2.406147e-2 / (130 − s²) + 1.5998e-4 / (38.9 − s²),
    s = 10⁴ / λ_vac  (λ in Å)

`air_to_vacuum` inverts it to machine precision (a fixed-point iteration on the same formula), so the two are
exact inverses of each other. Valid above 2000 Å (the formula's range; below that air is not transparent).
The shipped models' wavelengths are in air (`Decoder.info["medium"]`).
"""

from __future__ import annotations

import numpy as np

_MIN_WAVELENGTH = 2000.0


def _refractive_index(wave_vac: np.ndarray) -> np.ndarray:
    s2 = (1e4 / wave_vac) ** 2
    return 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)


def _checked(wave, name: str) -> np.ndarray:
    w = np.asarray(wave, dtype=np.float64)
    finite = w[np.isfinite(w)]
    if finite.size and finite.min() < _MIN_WAVELENGTH:
        raise ValueError(f"{name}: {finite.min():g} Å is below {_MIN_WAVELENGTH:g} Å, where the IAU air/vacuum "
                         "formula does not apply (wavelengths must be in Å)")
    return w


def vacuum_to_air(wave_vac):
    """Vacuum wavelengths [Å] -> air wavelengths [Å] (IAU standard; arrays or scalars, NaN passes through)."""
    w = _checked(wave_vac, "vacuum_to_air")
    return w / _refractive_index(w)


def air_to_vacuum(wave_air):
    """Air wavelengths [Å] -> vacuum wavelengths [Å], the exact inverse of `vacuum_to_air`."""
    w = _checked(wave_air, "air_to_vacuum")
    vac = w * _refractive_index(w)  # first guess: n at the air wavelength (off by ~1e-8 relative)
    for _ in range(4):  # fixed point of vac = air * n(vac); converges by ~1e-8 per step
        vac = w * _refractive_index(vac)
    return vac

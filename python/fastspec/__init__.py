"""fastspec: a neural surrogate for SYNSPEC stellar spectra.

    >>> import fastspec
    >>> decoder = fastspec.Decoder.load()            # the embedded default model
    >>> flux = decoder([5777, 4.44, 2.0, 0.0, 1.0, 50000])   # Teff, log g, v sin i, [M/H], v_mic, R
    >>> decoder.wavelength                            # Å, air

The numerical work runs in a C++ core (`fastspec._core`); this package never imports PyTorch.
"""

from importlib.metadata import PackageNotFoundError, version

from ._core import build_info
from .decoder import LABEL_ORDER, Decoder, DeviceError, DeviceMemoryError, cuda_available, default_model_path
from . import wavelength
from .fitting import LSF, FitQualityWarning, FitResult, Segment, fit, fit_batch

try:
    __version__ = version("fastspec")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "unknown"
__all__ = ["Decoder", "DeviceError", "DeviceMemoryError", "FitQualityWarning", "FitResult", "LABEL_ORDER", "LSF", "Segment",
           "wavelength", "build_info", "cuda_available", "default_model_path", "fit", "fit_batch",
           "__version__"]

"""`fastspec.Decoder`: stellar labels in physical units -> continuum-normalised SYNSPEC-like spectra.

This is the user-facing layer over the C++ core (`fastspec._core`): it turns whatever the user hands
in (lists, scalars, keywords, any float dtype) into the strict C-contiguous arrays the core takes, and
keeps the model's metadata at hand. All numerical work and all label/model-file validation happen in
the core, so the errors a C++ caller sees and a Python caller sees are the same.
"""

from __future__ import annotations

import functools
import json
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np

from . import _core
from . import _device_arrays as devarr

LABEL_ORDER = ("teff", "logg", "vsini", "mh", "vmic", "resolution")


def default_model_path() -> Path:
    """The model file shipped inside the package (trained on SYNSPEC spectra, see training/README.md)."""
    path = Path(str(resources.files("fastspec") / "data" / "default.fsm"))
    if not path.is_file():
        raise FileNotFoundError(
            f"the embedded default model {path} is missing from this installation; "
            "reinstall fastspec or pass a model file: Decoder.load('model.fsm')"
        )
    return path


def _is_gpu_array(a) -> bool:
    return devarr.is_device_array(a)


DeviceError = _core.DeviceError  # RuntimeError: the CUDA backend cannot be used (the message says why)
DeviceMemoryError = _core.DeviceMemoryError  # DeviceError and MemoryError: out of GPU memory


def _parse_device(device) -> tuple[str, int]:
    """'cpu' | 'cuda' | 'cuda:N' | 'auto' -> (kind, ordinal)."""
    if isinstance(device, str):
        text = device.strip().lower()
        if text in ("auto", "cpu", "cuda"):
            return text, 0
        if text.startswith("cuda:") and text[5:].isdigit():
            return "cuda", int(text[5:])
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {device!r}")


def cuda_usable() -> bool:
    """Whether device='auto' picks the GPU: the CUDA backend is built, its library loads and a GPU is visible.
    Exported as ``fastspec.cuda_available``: it preloads cuBLASLt first, as ``Decoder.load(device='cuda')`` does."""
    if not _core.build_info().get("cuda", False):
        return False
    devarr.preload_cublas()
    return bool(_core.cuda_available())


cuda_available = cuda_usable


def _python_words(method):
    """The core's messages spell its C++ option (clip=true); a Python caller passes clip=True."""

    @functools.wraps(method)
    def call(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except ValueError as exc:
            if "clip=true" not in str(exc):
                raise
            raise ValueError(str(exc).replace("clip=true", "clip=True")) from None

    return call


class Decoder:
    """The decoder half of the CVAE: ``flux = decoder(params)``.

    ``params`` holds the six labels in physical units and in this order: Teff [K], log g [dex],
    v sin i [km/s], [M/H] [dex], v_mic [km/s], resolving power R. Shape (6,) gives one spectrum of
    shape (n_pixels,); shape (N, 6) gives (N, n_pixels). Keywords work too:
    ``decoder(teff=5777, logg=4.44, vsini=2, mh=0, vmic=1, resolution=50000)`` (scalars or arrays that
    broadcast). The result is float32 continuum-normalised flux on ``decoder.wavelength``.

    Latent vector: z = 0 (the prior mean, the most likely spectrum) unless ``z=`` is given, or
    ``sample=True`` draws z ~ N(0, I) (reproducibly with ``seed=``), as the paper does to show the
    spread the model allows.

    Labels outside the training ranges (``decoder.label_ranges``) raise ValueError, because a neural
    network extrapolates badly and silently; ``clip=True`` clamps them to the range instead. NaN or
    infinite labels always raise ValueError naming the label.

    Macroturbulence: ``vmac=`` (km/s; a scalar or one value per spectrum; default 0) adds Gray's radial–tangential
    macroturbulence profile (equal radial and tangential areas, no limb darkening) to the broadening stage, with
    rotation and the instrumental profile. It is not a label (the six labels stay as they are, and ``clip`` does not
    touch it): it must lie in [0, 50] km/s, and only models whose stage takes pixel means (format 3, the shipped
    one) apply it; vmac > 0 on another model raises ValueError naming its format. vmac = 0 gives the spectra
    without it, bit for bit.

    Line-spread function varying along the range: ``resolution_factors=`` (a 1-D array of one factor g_s per node of
    ``decoder.stage_nodes``, shared by all spectra of the call; default None, all ones) makes the broadening stage's
    node s use R_s = R·g_s: the label R is the LSF's scale, g its shape across the range (FWHM = λ_s/R_s at the node,
    blended linearly between nodes). Every g_s must be finite and > 0 and every R·g_s within the R label's range
    (ValueError naming the node's wavelength otherwise); ones give the spectra without it, bit for bit.
    """

    def __init__(self, model: _core.Model, path: Path, *, threads: int = 1, device: str = "cpu", cuda_device: int = 0,
                 max_chunk: int | None = None, cuda_graphs: bool = True, tf32: bool = False):
        self._model = model
        self._path = Path(path)
        kwargs = {} if max_chunk is None else {"max_chunk": int(max_chunk)}
        if device == "cuda":
            devarr.preload_cublas()
        self._core = _core.Decoder(model, threads=threads, device=device, cuda_device=cuda_device,
                                   cuda_graphs=cuda_graphs, tf32=tf32, **kwargs)
        self.device = device  # "cpu" or "cuda"
        self.cuda_device = cuda_device if device == "cuda" else None
        self.label_names = tuple(lab["name"] for lab in model.labels)
        self.label_units = tuple(lab["unit"] for lab in model.labels)
        self.label_ranges = {lab["name"]: (lab["min"], lab["max"]) for lab in model.labels}
        self.latent_dim = model.latent_dim
        self.n_pixels = model.n_pixels

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "auto", *, threads: int = 1,
             max_chunk: int | None = None, cuda_graphs: bool = True, tf32: bool = False) -> "Decoder":
        """Load a model file; with no path, the default model shipped in the package.

        ``device``: "cpu", "cuda" (or "cuda:N") or "auto" (the GPU when the CUDA backend is built and a GPU is
        usable, else the CPU). ``threads``: BLAS threads for the CPU backend (one is fastest for small batches on a
        busy machine). ``max_chunk``: rows per pass (bounds the workspace; default 1024). CUDA only: ``cuda_graphs``
        replays repeated batch sizes from CUDA graphs; ``tf32`` runs float32 models' products in TF32.
        Asking for "cuda" where it cannot run raises ``fastspec.DeviceError`` (a RuntimeError) saying why.
        """
        kind, ordinal = _parse_device(device)
        if kind == "auto":
            kind = "cuda" if cuda_usable() else "cpu"
        elif kind == "cuda" and not cuda_usable():
            if not _core.build_info().get("cuda", False):
                raise DeviceError(
                    "device='cuda' was requested but this fastspec was built without the CUDA backend "
                    "(rebuild with FASTSPEC_CUDA=ON, nvcc and cuBLASLt); use device='cpu' (or 'auto')"
                )
            raise DeviceError(f"device='cuda' was requested but CUDA cannot be used here: "
                              f"{_core.cuda_unavailable_reason()}")
        path = default_model_path() if path is None else Path(path)
        if not path.exists():
            raise FileNotFoundError(f"model file not found: {path}")
        return cls(_core.Model.load(str(path)), path, threads=threads, device=kind, cuda_device=ordinal,
                   max_chunk=max_chunk, cuda_graphs=cuda_graphs, tf32=tf32)

    # ----------------------------------------------------------------------------------- metadata
    @cached_property
    def wavelength(self) -> np.ndarray:
        """Pixel wavelengths in Å (air or vacuum: see ``info['medium']``)."""
        return self._model.wavelength()

    @cached_property
    def weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(W (out, in), b (out,)), ...] as float32 copies, layer by layer, for inspection and interop.

        The first layer's input is [z, normalised network labels] (all six, or teff, logg, mh, vmic when the
        model has a broadening stage); see docs/model-format.md for the normalisation.
        """
        return self._model.weights()

    @cached_property
    def info(self) -> dict:
        """What the model is and where it came from (the provenance written at export)."""
        m = self._model
        try:
            provenance = json.loads(m.provenance) if m.provenance else {}
        except json.JSONDecodeError:
            provenance = {"raw": m.provenance}
        return {
            "path": str(self._path),
            "labels": [dict(lab) for lab in m.labels],
            "layers": [dict(layer) for layer in m.layers],
            "latent_dim": m.latent_dim,
            "n_pixels": m.n_pixels,
            "wavelength_start": m.wavelength_start,
            "wavelength_step": m.wavelength_step,
            "medium": m.medium,
            "weight_dtype": m.weight_dtype,
            "output_transform": {"scale": m.output_scale, "offset": m.output_offset},
            "format_version": m.format_version,
            "broadening": m.broadening,  # None, or the exact rotation + Gaussian stage after the network
            "provenance": provenance,
        }

    def __repr__(self) -> str:
        widths = "-".join(str(layer["out"]) for layer in self._model.layers)
        stage = " + broadening" if self._model.broadening else ""
        return (f"Decoder({self._path.name!r}: {self.latent_dim}+{self._model.n_network_labels} -> {widths}{stage}, "
                f"{self._model.weight_dtype}, device={self.device!r})")

    @cached_property
    def stage_nodes(self) -> np.ndarray:
        """The broadening stage's nodes: the wavelengths (Å, the model's medium, float64) where it takes its kernel
        widths; ``resolution_factors=`` has one value per node. Empty for a model without a stage."""
        return self._core.stage_node_wavelengths()

    # ------------------------------------------------------------------------------------ compute
    @_python_words
    def __call__(self, params=None, *, z=None, sample: bool = False, seed=None, clip: bool = False,
                 out=None, vmac=None, resolution_factors=None, **labels):
        if self.device == "cuda" and any(_is_gpu_array(a) for a in (params, z, out)):
            return self._call_device(params, labels, z, sample, seed, clip, out, jacobian=False, vmac=vmac,
                                     resolution_factors=resolution_factors)
        labels_2d, single = self._labels_array(params, labels)
        n = labels_2d.shape[0]
        z_2d = self._latent_array(z, sample, seed, n)
        vmac_1d = _vmac_array(vmac, n)
        factors = self._factors_array(resolution_factors)
        if out is not None:
            out_2d = out.reshape(1, -1) if (single and out.ndim == 1) else out
            if out_2d.shape != (n, self.n_pixels) or out_2d.dtype != np.float32 or not out_2d.flags.c_contiguous:
                raise ValueError(f"out must be a C-contiguous float32 array of shape {(n, self.n_pixels)}")
        else:
            out_2d = None
        flux = self._core.forward(labels_2d, z=z_2d, clip=clip, out=out_2d, vmac=vmac_1d, resolution_factors=factors)
        return flux[0] if single else flux

    @_python_words
    def jacobian(self, params=None, *, z=None, clip: bool = False, vmac=None, return_vmac: bool = False,
                 resolution_factors=None, **labels) -> tuple[np.ndarray, ...]:
        """The flux and its derivatives with respect to the labels, in one call: ``flux, jac = decoder.jacobian(p)``.

        Labels as for ``__call__`` (array of shape (6,) or (N, 6), or keywords). Returns float32 ``flux``
        (n_pixels,) or (N, n_pixels), equal to ``decoder(params)``, and ``jac`` (n_pixels, 6) or
        (N, n_pixels, 6): dF/d(label) in physical units (per K, per dex, per km/s, per unit of R), computed
        analytically by the core (about 7 forward passes). With ``clip=True`` a label outside its range
        is clamped and its derivative is 0. On a CUDA decoder, GPU arrays in give GPU arrays out.

        ``vmac``: macroturbulence in km/s, as for ``__call__``. ``return_vmac=True`` returns a third array, dF/dvmac
        per km/s, (n_pixels,) or (N, n_pixels), from the derivative of the stage's kernel (0 at vmac = 0, where the
        flux is even in vmac).

        ``resolution_factors``: the LSF's shape, as for ``__call__``; the R column is then dF/dR of the label R (the
        LSF's scale) with the shape held.
        """
        for name in ("sample", "seed", "out"):
            if name in labels:
                raise TypeError(f"jacobian() takes no {name}=: it differentiates at the given z (default 0); "
                                "for a sampled z, draw it yourself and pass z=")
        if self.device == "cuda" and any(_is_gpu_array(a) for a in (params, z)):
            return self._call_device(params, labels, z, False, None, clip, None, jacobian=True, vmac=vmac,
                                     return_vmac=return_vmac, resolution_factors=resolution_factors)
        labels_2d, single = self._labels_array(params, labels)
        z_2d = self._latent_array(z, False, None, labels_2d.shape[0])
        vmac_1d = _vmac_array(vmac, labels_2d.shape[0])
        factors = self._factors_array(resolution_factors)
        result = self._core.forward_jacobian(labels_2d, z=z_2d, clip=clip, vmac=vmac_1d, vmac_column=bool(return_vmac),
                                             resolution_factors=factors)
        return tuple(a[0] for a in result) if single else tuple(result)

    def _call_device(self, params, keywords, z, sample, seed, clip, out, *, jacobian: bool, vmac=None,
                     return_vmac: bool = False, resolution_factors=None):
        """A CUDA decoder with GPU arrays: labels are read to the host (validated and normalised there, then copied
        once), z and the outputs stay on the GPU; the work is queued on CuPy's current stream (or the producer's)."""
        dev = self.cuda_device
        stream = devarr.compute_stream(devarr.producer_stream(params, z, out))
        if _is_gpu_array(params):
            arr = devarr.as_device_array(params, devarr.dlpack_stream(stream))
            if arr.device is not None and arr.device != dev:
                raise ValueError(f"params is on cuda:{arr.device}, but this decoder runs on cuda:{dev}")
            params = devarr.to_host(params, "params")
        labels_2d, single = self._labels_array(params, keywords)
        n = labels_2d.shape[0]
        vmac_1d = _vmac_array(devarr.to_host(vmac, "vmac") if _is_gpu_array(vmac) else vmac, n)
        factors = self._factors_array(devarr.to_host(resolution_factors, "resolution_factors")
                                      if _is_gpu_array(resolution_factors) else resolution_factors)
        z_ptr, z_keep = 0, None
        if _is_gpu_array(z):
            if sample:
                raise TypeError("give either z= or sample=True, not both")
            z_arr = devarr.as_device_array(z, devarr.dlpack_stream(stream))
            if tuple(z_arr.shape) == (self.latent_dim,) and n > 1:
                raise ValueError(f"a GPU z must have shape ({n}, {self.latent_dim}) (no broadcasting on the GPU)")
            shape = (self.latent_dim,) if single and tuple(z_arr.shape) == (self.latent_dim,) else (n, self.latent_dim)
            devarr.check(z_arr, "z", "<f4", shape, dev)
            z_ptr, z_keep = z_arr.ptr, z_arr
        else:
            # A host z goes to the core as it is: the core reads z on the host anyway (forward_device accepts host
            # memory for z), so there is no round trip through the GPU and no CuPy needed.
            z_host = self._latent_array(z, sample, seed, n)
            if z_host is not None:
                z_keep = z_host
                z_ptr = z_host.ctypes.data
        out_shape = (self.n_pixels,) if single else (n, self.n_pixels)
        if out is None:
            out = devarr.empty(out_shape, dev)
            if out is None:
                raise TypeError("GPU arrays in need CuPy to allocate the GPU output (pip install cupy-cuda13x), "
                                "or pass out= a GPU float32 array")
        out_arr = devarr.check(devarr.as_device_array(out, devarr.dlpack_stream(stream)), "out", "<f4", out_shape, dev,
                               writable=True)
        if not jacobian:
            self._core.forward_device(labels_2d, out_arr.ptr, stream, z_ptr, clip, vmac_1d, factors)
            del z_keep
            return out
        jac_shape = (self.n_pixels, len(self.label_names)) if single else (n, self.n_pixels, len(self.label_names))
        jac = devarr.empty(jac_shape, dev)
        if jac is None:
            raise TypeError("forward_jacobian with GPU arrays needs CuPy to allocate the GPU Jacobian")
        jac_arr = devarr.as_device_array(jac)
        jac_vmac, jv_ptr = None, 0
        if return_vmac:
            jac_vmac = devarr.empty(out_shape, dev)
            jv_ptr = devarr.as_device_array(jac_vmac).ptr
        self._core.forward_jacobian_device(labels_2d, out_arr.ptr, jac_arr.ptr, stream, z_ptr, clip, vmac_1d, jv_ptr,
                                           factors)
        del z_keep
        return (out, jac, jac_vmac) if return_vmac else (out, jac)

    def _labels_array(self, params, keywords: dict) -> tuple[np.ndarray, bool]:
        if _is_gpu_array(params):
            raise TypeError("a GPU (CuPy) array was given but this decoder runs on the CPU; "
                            "pass a NumPy array, or load with device='cuda' on a CUDA build")
        if params is not None and keywords:
            raise TypeError("give the labels either as an array or as keywords, not both")
        if params is None:
            if not keywords:
                raise TypeError(f"no labels given: pass an array of {len(self.label_names)} labels "
                                f"({', '.join(self.label_names)}) or keywords")
            unknown = sorted(set(keywords) - set(self.label_names))
            missing = [name for name in self.label_names if name not in keywords]
            if unknown or missing:
                raise TypeError(f"labels must be exactly {', '.join(self.label_names)}"
                                + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                                + (f"; missing: {', '.join(missing)}" if missing else ""))
            columns = np.broadcast_arrays(*(_as_float(keywords[name], name) for name in self.label_names))
            params = np.stack(columns, axis=-1)
        else:
            params = _as_float(params, "params")
        if params.ndim not in (1, 2) or params.shape[-1] != len(self.label_names):
            raise ValueError(f"params must have shape ({len(self.label_names)},) or (N, {len(self.label_names)}) "
                             f"with columns {', '.join(self.label_names)}; got shape {params.shape}")
        single = params.ndim == 1
        return np.ascontiguousarray(params.reshape(-1, len(self.label_names)), dtype=np.float64), single

    def _factors_array(self, factors) -> np.ndarray | None:
        """resolution_factors (None, or one per stage node) as the core's float64 (n_nodes,); the core checks the
        values (finite, > 0, R·g_s in the R label's range) and refuses them on a model without a stage."""
        if factors is None:
            return None
        arr = _as_float(factors, "resolution_factors")
        nodes = self.stage_nodes.size
        if nodes and arr.shape != (nodes,):
            raise ValueError(f"resolution_factors must have shape ({nodes},), one per node of decoder.stage_nodes "
                             f"(shared by all spectra); got {arr.shape}")
        return np.ascontiguousarray(arr.reshape(-1) if not nodes else arr, dtype=np.float64)

    def _latent_array(self, z, sample: bool, seed, n: int) -> np.ndarray | None:
        if z is not None and sample:
            raise TypeError("give either z= or sample=True, not both")
        if sample:
            return np.random.default_rng(seed).standard_normal((n, self.latent_dim), dtype=np.float32)
        if seed is not None:
            raise TypeError("seed= only applies with sample=True")
        if z is None:
            return None  # the core uses z = 0 without materialising it
        if _is_gpu_array(z):
            raise TypeError(f"z is a GPU (CuPy) array but this decoder runs on the {self.device.upper()} "
                            "with host labels; pass z as a NumPy array (or the labels as a GPU array)")
        z = _as_float(z, "z")
        if z.shape == (self.latent_dim,):
            z = np.broadcast_to(z, (n, self.latent_dim))
        if z.shape != (n, self.latent_dim):
            raise ValueError(f"z must have shape ({self.latent_dim},) or ({n}, {self.latent_dim}); got {z.shape}")
        if not np.all(np.isfinite(z)):
            raise ValueError("z contains NaN or infinite values")
        return np.ascontiguousarray(z, dtype=np.float32)


def _vmac_array(vmac, n: int) -> np.ndarray | None:
    """vmac (None, a scalar, or (n,)) as the core's float64 (n,), or None for 0 everywhere; the core checks the
    values (finite, in [0, 50] km/s, > 0 only on a pixel-mean stage)."""
    if vmac is None:
        return None
    arr = _as_float(vmac, "vmac")
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"vmac must be a scalar or have shape ({n},) (one per spectrum); got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float64)


def _as_float(value, name: str) -> np.ndarray:
    """Any real numeric input as a float64 array; a clear TypeError for strings, objects, complex."""
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} could not be converted to a numeric array: {exc}") from None
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be real numbers, not dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)

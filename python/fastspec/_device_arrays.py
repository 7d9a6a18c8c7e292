"""GPU arrays in and out of a CUDA decoder without host copies.

Anything that exposes the CUDA array interface (``__cuda_array_interface__``, versions 2 and 3: CuPy, Numba,
PyTorch, JAX...) or DLPack (``__dlpack__`` / ``__dlpack_device__`` on a CUDA device) is read here as a plain
description, :class:`DeviceArray`: address, shape, strides, dtype, device and stream. All of it is pure Python
(DLPack capsules are read with ctypes), so the parsing is unit-tested with fake objects on machines without a GPU
(tests/test_cuda_host.py). CuPy is used when it is installed, for the current stream, to allocate outputs and to
copy device labels to the host; it is never required for NumPy in -> NumPy out.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass, field

import numpy as np

# DLPack device types (dlpack.h): the CUDA ones this decoder can use.
KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED = 1, 2, 3, 13
_DLPACK_CUDA = (KDL_CUDA, KDL_CUDA_MANAGED)
# DLPack dtype codes: 0 int, 1 uint, 2 float, 4 bfloat.
_DL_KIND = {0: "i", 1: "u", 2: "f", 4: "V"}


@dataclass(frozen=True)
class DeviceArray:
    """A GPU array as the decoder sees it. ``strides`` in bytes, or None for C-contiguous; ``device`` the CUDA
    ordinal when the source says (DLPack, CuPy), else None; ``stream`` the producer's stream from a version-3 CUDA
    array interface (None: not given; 1: the legacy default stream, 2: per-thread default)."""

    ptr: int
    shape: tuple
    typestr: str
    strides: tuple | None = None
    device: int | None = None
    stream: int | None = None
    readonly: bool = False
    owner: object = field(default=None, repr=False, compare=False)  # keeps the source (and a capsule) alive

    @property
    def itemsize(self) -> int:
        return np.dtype(self.typestr).itemsize

    @property
    def c_contiguous(self) -> bool:
        if self.strides is None:
            return True
        expected, size = [], self.itemsize
        for extent in reversed(self.shape):
            expected.append(size)
            size *= extent
        expected.reverse()
        # Extents of 1 may carry any stride (NumPy and CuPy agree).
        return all(s == e or n == 1 for s, e, n in zip(self.strides, expected, self.shape))


def _has_cai(obj) -> bool:
    """Whether obj has a CUDA array interface. Reading the attribute can raise more than AttributeError (a torch
    tensor that requires grad raises RuntimeError): such an object is looked at through DLPack instead."""
    try:
        return hasattr(obj, "__cuda_array_interface__")
    except Exception:
        return False


def is_device_array(obj) -> bool:
    """True for an object exposing the CUDA array interface, or DLPack on a CUDA device."""
    if obj is None or isinstance(obj, np.ndarray):
        return False
    if _has_cai(obj):
        return True
    dev = getattr(obj, "__dlpack_device__", None)
    if dev is not None and hasattr(obj, "__dlpack__"):
        try:
            return int(dev()[0]) in _DLPACK_CUDA
        except Exception:  # a producer that cannot say: not a device array for us
            return False
    return False


def from_cuda_array_interface(obj) -> DeviceArray:
    """Parse ``obj.__cuda_array_interface__`` (version 2 or 3)."""
    cai = obj.__cuda_array_interface__
    if not isinstance(cai, dict):
        raise TypeError("__cuda_array_interface__ must be a dict")
    try:
        shape = tuple(int(n) for n in cai["shape"])
        typestr = str(cai["typestr"])
        ptr, readonly = cai["data"]
    except (KeyError, TypeError, ValueError) as exc:
        raise TypeError(f"malformed __cuda_array_interface__ ({exc!r}): needs shape, typestr and data") from None
    version = int(cai.get("version", 0))
    if version < 2:
        raise TypeError(f"__cuda_array_interface__ version {version} is not supported (2 or 3 needed)")
    if cai.get("mask") is not None:
        raise TypeError("masked CUDA arrays are not supported")
    strides = cai.get("strides")
    strides = None if strides is None else tuple(int(s) for s in strides)
    if strides is not None and len(strides) != len(shape):
        raise TypeError(f"__cuda_array_interface__ strides {strides} do not match shape {shape}")
    stream = cai.get("stream") if version >= 3 else None
    if stream is not None:
        stream = int(stream)
        if stream == 0:
            raise TypeError("__cuda_array_interface__ stream 0 is disallowed by the protocol (use 1 or 2)")
    device = _cupy_device_of(obj)
    return DeviceArray(int(ptr or 0), shape, typestr, strides, device, stream, bool(readonly), obj)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensorVersioned(ctypes.Structure):  # DLPack >= 1.0
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64), ("dl_tensor", _DLTensor)]


DLPACK_FLAG_BITMASK_READ_ONLY = 1


def dltensor_from_capsule(capsule) -> tuple[_DLTensor, bool]:
    """The DLTensor of a DLPack capsule and whether it is read-only: a versioned one ('dltensor_versioned', whose
    flags say), or an unversioned one ('dltensor': a DLManagedTensor, whose first member it is; no flags)."""
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    valid = ctypes.pythonapi.PyCapsule_IsValid
    valid.restype, valid.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]
    if valid(capsule, b"dltensor_versioned"):
        m = _DLManagedTensorVersioned.from_address(get(capsule, b"dltensor_versioned"))
        if m.major < 1:
            raise TypeError(f"DLPack version {m.major}.{m.minor} is not supported")
        return m.dl_tensor, bool(m.flags & DLPACK_FLAG_BITMASK_READ_ONLY)
    if not valid(capsule, b"dltensor"):
        raise TypeError("__dlpack__() did not return an unconsumed 'dltensor' or 'dltensor_versioned' capsule")
    return _DLTensor.from_address(get(capsule, b"dltensor")), False


def _export_dlpack(obj, stream: int | None):
    """obj.__dlpack__ asking for a versioned capsule (which can say read-only) where the producer supports it."""
    kwargs = {} if stream is None else {"stream": stream}
    for extra in ({"max_version": (1, 0)}, {}):
        try:
            return obj.__dlpack__(**kwargs, **extra)
        except TypeError:  # an older producer: no max_version (or no stream) keyword
            continue
    return obj.__dlpack__()


def from_dlpack(obj, stream: int | None = None) -> DeviceArray:
    """Parse ``obj.__dlpack__(stream=stream)`` (the producer makes its data ready on that stream)."""
    dev_type, dev_id = (int(v) for v in obj.__dlpack_device__())
    if dev_type not in _DLPACK_CUDA:
        raise TypeError(f"the DLPack array is on device type {dev_type}, not a CUDA device")
    try:
        capsule = _export_dlpack(obj, stream)
    except (RuntimeError, BufferError, ValueError) as exc:  # e.g. a torch tensor that requires grad
        raise TypeError(f"{type(obj).__name__} could not be exported through DLPack: {exc}") from None
    t, readonly = dltensor_from_capsule(capsule)
    if t.dtype.lanes != 1 or t.dtype.code not in _DL_KIND:
        raise TypeError(f"unsupported DLPack dtype (code {t.dtype.code}, bits {t.dtype.bits}, lanes {t.dtype.lanes})")
    kind = _DL_KIND[t.dtype.code]
    typestr = f"<{kind}{t.dtype.bits // 8}"
    shape = tuple(int(t.shape[i]) for i in range(t.ndim))
    strides = None
    if t.strides:
        strides = tuple(int(t.strides[i]) * (t.dtype.bits // 8) for i in range(t.ndim))  # elements -> bytes
    ptr = int(t.data or 0) + int(t.byte_offset)
    # The capsule stays with the DeviceArray; when it is dropped unconsumed, its destructor releases the producer's
    # export, while obj itself keeps the memory alive.
    return DeviceArray(ptr, shape, typestr, strides, int(t.device.device_id), None, readonly, (obj, capsule))


def as_device_array(obj, stream: int | None = None) -> DeviceArray:
    if _has_cai(obj):
        return from_cuda_array_interface(obj)
    if hasattr(obj, "__dlpack__"):
        return from_dlpack(obj, stream)
    raise TypeError(f"{type(obj).__name__} is neither a CUDA array (__cuda_array_interface__) nor DLPack")


def check(arr: DeviceArray, name: str, typestr: str, shape: tuple, device: int, *, writable: bool = False) -> DeviceArray:
    """Exactly typestr (e.g. '<f4'), exactly shape, C-contiguous, on `device` when the source says which; writable
    (an output): not read-only."""
    want, got = np.dtype(typestr), np.dtype(arr.typestr)
    if got != want:
        raise TypeError(f"{name} must be a {want} device array, not {got}")
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, not {tuple(arr.shape)}")
    if not arr.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (strides {arr.strides})")
    if arr.device is not None and arr.device != device:
        raise ValueError(f"{name} is on cuda:{arr.device}, but this decoder runs on cuda:{device}; "
                         f"move it (cupy: with cupy.cuda.Device({device}): x = cupy.asarray(x)) or load the decoder "
                         f"with device='cuda:{arr.device}'")
    if arr.ptr == 0 and int(np.prod(shape)) > 0:
        raise ValueError(f"{name} has a null data pointer")
    if writable and arr.readonly:
        raise ValueError(f"{name} is read-only (its producer exported it as read-only); pass a writable GPU array")
    return arr


# --- CuPy, when installed ------------------------------------------------------------------------------------------

def cupy_module():
    """CuPy if it is installed (imported on demand), else None."""
    if "cupy" in sys.modules:
        return sys.modules["cupy"]
    try:
        import cupy  # noqa: PLC0415
    except Exception:  # not installed, or no usable CUDA for it
        return None
    return cupy


def _cupy_device_of(obj) -> int | None:
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(obj, cp.ndarray):
        return int(obj.device.id)
    return None


def producer_stream(*objs) -> int | None:
    """The stream named by the first of objs that has a CUDA array interface (None if none names one)."""
    for obj in objs:
        if obj is not None and not isinstance(obj, np.ndarray) and _has_cai(obj):
            return from_cuda_array_interface(obj).stream
    return None


def compute_stream(producer_stream: int | None = None) -> int:
    """The stream a device call runs on: CuPy's current stream when CuPy is installed; else the producer's stream
    from the CUDA array interface; else 0 (the legacy default stream). With CuPy, a producer's different stream is
    waited for first (an event), as the CUDA array interface asks of consumers."""
    cp = cupy_module()
    if cp is None:
        return producer_stream if producer_stream not in (None, 1) else 0
    current = cp.cuda.get_current_stream()
    if producer_stream not in (None, 1, 2) and producer_stream != current.ptr:
        event = cp.cuda.Event(disable_timing=True)
        event.record(cp.cuda.ExternalStream(producer_stream))
        current.wait_event(event)
    return int(current.ptr)


def dlpack_stream(stream: int) -> int:
    """The stream argument __dlpack__ takes for a CUDA stream handle (the legacy default stream is 1, not 0)."""
    return 1 if stream == 0 else stream


def to_host(obj, name: str) -> np.ndarray:
    """A device array's values on the host (labels are small): needs CuPy."""
    cp = cupy_module()
    if cp is None:
        raise TypeError(f"{name} is a GPU array; reading it needs CuPy (pip install cupy-cuda13x), "
                        "or pass it as a NumPy array")
    return cp.asnumpy(cp.asarray(obj))


def empty(shape: tuple, device: int):
    """A float32 CuPy array on `device` (None when CuPy is not installed)."""
    cp = cupy_module()
    if cp is None:
        return None
    with cp.cuda.Device(device):
        return cp.empty(shape, dtype=cp.float32)


_cublas_preloaded = False


def preload_cublas() -> None:
    """Load cuBLASLt from the nvidia-cublas wheel when it is installed, so that the backend library finds it whatever
    the layout of site-packages (its RPATH covers the usual one). Once loaded, later calls return at once; a miss is
    tried again next time (the wheel may have been installed since)."""
    global _cublas_preloaded
    if _cublas_preloaded:
        return
    import importlib  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    for name in ("nvidia.cu13", "nvidia.cublas"):  # the CUDA 13 wheel layout, then the older one
        try:
            pkg = importlib.import_module(name)
        except Exception:
            continue
        for root in list(getattr(pkg, "__path__", [])):
            for lib in sorted(Path(root, "lib").glob("libcublasLt.so*")):
                try:
                    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                    _cublas_preloaded = True
                    return
                except OSError:
                    continue

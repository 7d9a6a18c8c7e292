"""The CUDA backend's host side, on any machine (no GPU needed): device dispatch and its errors, the chunk and
buffer arithmetic and the graph cache policy of the backend (through fastspec._core's test hooks), and the parsing
of GPU arrays (CUDA array interface, DLPack) with fake objects. The GPU itself is tests/test_cuda.py."""

import numpy as np
import pytest

import fastspec
from fastspec import _core
from fastspec import _device_arrays as devarr
from fastspec import decoder as decoder_module
from fastspec.model_format import BroadeningStage, INTRINSIC_LABELS, random_decoder, write_model

NO_GPU = not decoder_module.cuda_usable()


@pytest.fixture(scope="module")
def v2_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cudahost") / "v2.fsm"
    write_model(path, random_decoder([32, 64], latent_dim=3, n_labels=4, seed=3), latent_dim=3,
                labels=INTRINSIC_LABELS, broadening=BroadeningStage(), format_version=2, weight_dtype="f16")
    return path


# --- dispatch and errors -----------------------------------------------------------------------------------------

def test_device_strings(small_model):
    assert fastspec.Decoder.load(small_model, device="cpu").device == "cpu"
    assert decoder_module._parse_device("cuda:3") == ("cuda", 3)
    assert decoder_module._parse_device(" CUDA ") == ("cuda", 0)
    for bad in ("gpu", "cuda:", "cuda:x", 0, None, "cuda:-1"):
        with pytest.raises(ValueError, match="device"):
            fastspec.Decoder.load(small_model, device=bad)


def test_auto_picks_the_gpu_only_when_usable(small_model):
    d = fastspec.Decoder.load(small_model, device="auto")
    assert d.device == ("cuda" if decoder_module.cuda_usable() else "cpu")
    if not _core.build_info()["cuda"]:
        assert not decoder_module.cuda_usable()
    assert _core.cuda_available() == (_core.cuda_unavailable_reason() == "")
    # fastspec.cuda_available goes through the cuBLASLt preload, as Decoder.load(device="cuda") does.
    assert fastspec.cuda_available is decoder_module.cuda_usable
    assert fastspec.cuda_available() == decoder_module.cuda_usable()


@pytest.mark.skipif(not NO_GPU, reason="checks the errors of a machine without a usable GPU")
def test_cuda_without_gpu_is_a_device_error(small_model):
    with pytest.raises(fastspec.DeviceError, match="CUDA") as info:
        fastspec.Decoder.load(small_model, device="cuda")
    assert isinstance(info.value, RuntimeError)
    # The core refuses too, with the same reason (the library, the driver or the GPU).
    model = _core.Model.load(str(small_model))
    with pytest.raises(_core.DeviceError, match="cuda"):
        _core.Decoder(model, device="cuda")
    reason = _core.cuda_unavailable_reason()
    assert reason and ("CUDA" in reason or "cuda" in reason)


def test_device_error_classes():
    assert issubclass(fastspec.DeviceError, RuntimeError)
    assert issubclass(fastspec.DeviceMemoryError, fastspec.DeviceError)
    assert issubclass(fastspec.DeviceMemoryError, MemoryError)
    assert fastspec.DeviceError is _core.DeviceError


def test_device_entry_points_refuse_a_cpu_decoder(small_model):
    d = fastspec.Decoder.load(small_model, device="cpu")
    labels = np.array([[5777, 4.44, 2.0, 0.0, 1.0, 5e4]])
    with pytest.raises(fastspec.DeviceError, match="runs on the CPU"):
        d._core.forward_device(labels, 1 << 20, 0)
    with pytest.raises(fastspec.DeviceError, match="runs on the CPU"):
        d._core.forward_jacobian_device(labels, 1 << 20, 1 << 21, 0)
    with pytest.raises(ValueError, match="device"):
        _core.Decoder(_core.Model.load(str(small_model)), device="tpu")
    assert d._core.device == "cpu" and d._core.device_description == "cpu"


# --- chunks, buffers, graphs -----------------------------------------------------------------------------------------

def test_cuda_plan_chunks(small_model):
    m = _core.Model.load(str(small_model))  # 4 + 6 -> 32 -> 64 -> 19000, f32, no broadening
    p = _core._cuda_plan(m, 17, 1024, False, False)
    assert p["rows"] == 17 and p["chunks"] == [(0, 17)] and p["elem"] == 4
    p = _core._cuda_plan(m, 2500, 1024, False, False)
    assert p["rows"] == 1024 and p["chunks"] == [(0, 1024), (1024, 1024), (2048, 452)]
    b = p["buffers"]
    assert b["logits"] == 1024 * 19000 * 4 and b["hidden"] == 1024 * 64 * 4
    assert b["input"] == 256 + 1024 * 10 * 4 and b["intrinsic"] == b["kernels"] == b["staging_out"] == 0
    assert p["total"] == b["input"] + 2 * b["hidden"] + b["logits"] + b["lt_workspace"]
    # Host callers get a device staging buffer for the output.
    assert _core._cuda_plan(m, 5, 1024, False, True)["buffers"]["staging_out"] == 5 * 19000 * 4 + 256 - (5 * 19000 * 4) % 256
    # forward_jacobian: 6 tangents a row, capped to 1 GiB of tangents (+ the host Jacobian for host callers)
    pj = _core._cuda_plan(m, 10**6, 10**6, True, False)
    assert pj["rows"] == (1 << 30) // (6 * 19000 * 4)
    assert _core._cuda_plan(m, 10**6, 10**6, True, True)["rows"] == (1 << 30) // ((6 + 2 + 6) * 19000 * 4)
    assert _core._cuda_plan(m, 0, 1024, False, False)["chunks"] == []


def test_cuda_plan_broadening(v2_model):
    m = _core.Model.load(str(v2_model))
    p = _core._cuda_plan(m, 3, 1024, True, False)
    assert p["elem"] == 2 and p["nodes"] == 9 and p["max_half"] > 300
    taps = 9 * (2 * p["max_half"] + 1) * 4  # flux, d/dvsini, d/dR, d/dvmac
    align = lambda n: (n + 255) // 256 * 256  # noqa: E731
    assert p["buffers"]["kernels"] == align(3 * 16) + align(3 * 9 * 4) + align(3 * taps * 4)
    assert p["buffers"]["intrinsic"] == align(3 * 19000 * 4)
    assert p["buffers"]["tangent_last"] == align(3 * 4 * 19000 * 4)


def test_graph_cache_policy():
    # First sighting of a batch size: plain launches; second: capture; then replay. The mode is part of the key.
    acts = _core._graph_actions([(64, False), (64, False), (64, False), (64, True), (64, True), (1, False), (64, False)])
    assert acts == ["plain", "capture", "replay", "plain", "capture", "plain", "replay"]
    # Capacity 1: capturing a second key evicts the first, which is then seen anew.
    acts = _core._graph_actions([(8, False), (8, False), (9, False), (9, False), (8, False), (8, False)], capacity=1)
    assert acts == ["plain", "capture", "plain", "capture", "plain", "capture"]
    # A failed capture leaves that key on plain launches for good; other keys still get graphs.
    acts = _core._graph_actions([(4, False)] * 4 + [(5, False)] * 3, failing=[(4, False)])
    assert acts == ["plain", "capture", "plain", "plain", "plain", "capture", "replay"]


def test_bias_path_when_cublaslt_has_no_fused_epilogue():
    # (status, found, first result's state): 0 = CUBLAS_STATUS_SUCCESS, 7 = INVALID_VALUE, 15 = NOT_SUPPORTED.
    assert _core._bias_path(True, 0, 2, 0) == "fused"
    assert _core._bias_path(True, 7, 0, 0) == "kernel"   # the n = 1 case: the heuristic refuses the epilogue
    assert _core._bias_path(True, 0, 0, 0) == "kernel"   # no algorithm
    assert _core._bias_path(True, 0, 1, 15) == "kernel"  # a result that is not usable
    assert _core._bias_path(False, 0, 1, 0) == "none"    # tangent products have no bias


# --- GPU arrays: parsing with fakes ---------------------------------------------------------------------------------

class FakeCAI:
    def __init__(self, **cai):
        self.__cuda_array_interface__ = {"version": 3, **cai}


def test_cuda_array_interface_parsing():
    a = devarr.from_cuda_array_interface(FakeCAI(shape=(2, 5), typestr="<f4", data=(0x1000, False), strides=None,
                                                 stream=7))
    assert (a.ptr, a.shape, a.typestr, a.strides, a.stream, a.readonly) == (0x1000, (2, 5), "<f4", None, 7, False)
    assert a.c_contiguous and a.itemsize == 4 and a.device is None
    b = devarr.from_cuda_array_interface(FakeCAI(shape=(2, 5), typestr="<f4", data=(0x1000, True), strides=(20, 4)))
    assert b.c_contiguous and b.readonly and b.stream is None
    assert not devarr.from_cuda_array_interface(FakeCAI(shape=(2, 5), typestr="<f4", data=(8, 0), strides=(4, 8))).c_contiguous
    assert devarr.from_cuda_array_interface(FakeCAI(shape=(1, 5), typestr="<f4", data=(8, 0), strides=(999, 4))).c_contiguous
    v2 = FakeCAI(shape=(3,), typestr="<f8", data=(16, False), stream=5)
    v2.__cuda_array_interface__["version"] = 2
    assert devarr.from_cuda_array_interface(v2).stream is None  # streams are a version-3 field
    for bad, match in [(dict(shape=(3,), typestr="<f4", data=(1, False), stream=0), "stream 0"),
                       (dict(shape=(3,), typestr="<f4", data=(1, False), mask=object()), "masked"),
                       (dict(shape=(3,), typestr="<f4"), "malformed"),
                       (dict(shape=(3,), typestr="<f4", data=(1, False), strides=(4, 4)), "strides")]:
        with pytest.raises(TypeError, match=match):
            devarr.from_cuda_array_interface(FakeCAI(**bad))
    # the stream a decoder call orders its work after: the first CUDA-array-interface input's
    assert devarr.producer_stream(None, np.zeros(3), FakeCAI(shape=(3,), typestr="<f4", data=(1, False), stream=9),
                                  FakeCAI(shape=(3,), typestr="<f4", data=(1, False), stream=4)) == 9
    assert devarr.producer_stream(None, np.zeros(3)) is None
    old = FakeCAI(shape=(3,), typestr="<f4", data=(1, False))
    old.__cuda_array_interface__["version"] = 1
    with pytest.raises(TypeError, match="version 1"):
        devarr.from_cuda_array_interface(old)


class FakeCudaDLPack:
    """A host NumPy array that claims to live on CUDA device `device` (its capsule is NumPy's real one)."""

    def __init__(self, arr, device=0, dev_type=devarr.KDL_CUDA):
        self.arr, self.device, self.dev_type, self.streams = arr, device, dev_type, []

    def __dlpack_device__(self):
        return (self.dev_type, self.device)

    def __dlpack__(self, stream=None):
        self.streams.append(stream)
        return self.arr.__dlpack__()


def test_dlpack_parsing():
    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    fake = FakeCudaDLPack(host)
    assert devarr.is_device_array(fake) and not devarr.is_device_array(host) and not devarr.is_device_array(None)
    a = devarr.from_dlpack(fake, stream=5)
    assert fake.streams == [5]  # the consumer's stream is handed to the producer
    assert a.ptr == host.ctypes.data and a.shape == (3, 4) and np.dtype(a.typestr) == np.float32 and a.c_contiguous
    t = devarr.from_dlpack(FakeCudaDLPack(np.ascontiguousarray(host.T)))
    assert t.shape == (4, 3)
    nc = devarr.from_dlpack(FakeCudaDLPack(host.T))  # a transposed view: strides in bytes, not C-contiguous
    assert nc.shape == (4, 3) and not nc.c_contiguous
    assert devarr.from_dlpack(FakeCudaDLPack(np.zeros(3, np.float64))).typestr == "<f8"
    assert not devarr.is_device_array(FakeCudaDLPack(host, dev_type=devarr.KDL_CPU))
    with pytest.raises(TypeError, match="not a CUDA device"):
        devarr.from_dlpack(FakeCudaDLPack(host, dev_type=devarr.KDL_CPU))
    assert devarr.dlpack_stream(0) == 1 and devarr.dlpack_stream(1234) == 1234


class FakeVersionedDLPack(FakeCudaDLPack):
    """Exports DLPack >= 1.0 capsules (NumPy's), which carry the read-only flag."""

    def __dlpack__(self, stream=None, max_version=None):
        self.streams.append(stream)
        return self.arr.__dlpack__(max_version=max_version)


def test_dlpack_read_only_and_versioned():
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    a = devarr.from_dlpack(FakeVersionedDLPack(host))
    assert a.ptr == host.ctypes.data and a.shape == (2, 3) and not a.readonly
    ro = host.copy()
    ro.flags.writeable = False
    r = devarr.from_dlpack(FakeVersionedDLPack(ro))
    assert r.readonly
    devarr.check(r, "z", "<f4", (2, 3), 0)  # an input may be read-only
    with pytest.raises(ValueError, match="read-only"):
        devarr.check(r, "out", "<f4", (2, 3), 0, writable=True)


class RaisingCAI:
    """Like a torch CUDA tensor that requires grad: reading __cuda_array_interface__ raises RuntimeError, and so
    does exporting it through DLPack."""

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")

    def __dlpack_device__(self):
        return (devarr.KDL_CUDA, 0)

    def __dlpack__(self, stream=None, max_version=None):
        raise RuntimeError("Can't export tensors that require gradient, use tensor.detach()")


def test_an_array_whose_interface_raises_is_a_clear_error():
    t = RaisingCAI()
    assert devarr.is_device_array(t)  # seen through DLPack; no exception escapes
    with pytest.raises(TypeError, match="requires? grad"):
        devarr.as_device_array(t)


def test_device_array_checks():
    a = devarr.DeviceArray(0x1000, (2, 5), "<f4", None, device=1)
    assert devarr.check(a, "out", "<f4", (2, 5), 1) is a
    with pytest.raises(TypeError, match="float32"):
        devarr.check(devarr.DeviceArray(0x1000, (2, 5), "<f8"), "out", "<f4", (2, 5), 0)
    with pytest.raises(ValueError, match="shape"):
        devarr.check(a, "out", "<f4", (5, 2), 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        devarr.check(devarr.DeviceArray(0x1000, (2, 5), "<f4", (4, 8)), "out", "<f4", (2, 5), 0)
    with pytest.raises(ValueError, match="on cuda:1, but this decoder runs on cuda:0"):
        devarr.check(a, "out", "<f4", (2, 5), 0)
    with pytest.raises(ValueError, match="null"):
        devarr.check(devarr.DeviceArray(0, (2, 5), "<f4"), "out", "<f4", (2, 5), 0)


def test_stream_choice_without_cupy(monkeypatch):
    monkeypatch.setattr(devarr, "cupy_module", lambda: None)
    assert devarr.compute_stream(None) == 0
    assert devarr.compute_stream(1) == 0      # the legacy default stream
    assert devarr.compute_stream(0xABC) == 0xABC  # the producer's stream
    with pytest.raises(TypeError, match="CuPy"):
        devarr.to_host(FakeCAI(shape=(6,), typestr="<f8", data=(1, False)), "params")
    assert devarr.empty((2, 3), 0) is None


class RecordingCore:
    """Stands in for a cuda _core.Decoder: records the device calls the Python layer makes."""

    def __init__(self):
        self.calls = []

    def forward_device(self, labels, out, stream, z, clip, vmac=None, resolution_factors=None):
        self.calls.append(("forward", labels.copy(), out, stream, z, clip))
        self.vmac, self.resolution_factors = vmac, resolution_factors

    def forward_jacobian_device(self, labels, out, jac, stream, z, clip, vmac=None, jac_vmac=0,
                                resolution_factors=None):
        self.calls.append(("jacobian", labels.copy(), out, jac, stream, z, clip))
        self.vmac, self.jac_vmac, self.resolution_factors = vmac, jac_vmac, resolution_factors

    def stage_node_wavelengths(self):
        return np.array([4450.0, 4925.0, 5399.95])


def test_cuda_decoder_python_layer_with_fakes(small_model, monkeypatch):
    """The CUDA path of Decoder.__call__ on a machine without a GPU: a GPU `out` goes to forward_device by address,
    untouched, on the producer's stream, and the same object comes back."""
    monkeypatch.setattr(devarr, "cupy_module", lambda: None)
    d = fastspec.Decoder.load(small_model, device="cpu")
    d.device, d.cuda_device, d._core = "cuda", 0, RecordingCore()
    out = FakeCAI(shape=(2, 19000), typestr="<f4", data=(0x7000, False), stream=99)
    labels = [[5777, 4.44, 2.0, 0.0, 1.0, 5e4], [6000, 4.0, 10.0, -0.5, 1.5, 2e4]]
    assert d(labels, out=out, clip=True) is out
    kind, lab, ptr, stream, z, clip = d._core.calls[-1]
    assert kind == "forward" and ptr == 0x7000 and stream == 99 and z == 0 and clip is True
    assert lab.dtype == np.float64 and lab.shape == (2, 6) and lab.flags.c_contiguous
    assert d._core.vmac is None
    d(labels, out=out, vmac=[4.0, 0.0])  # macroturbulence: host float64 (N,) to the core
    assert d._core.vmac.dtype == np.float64 and d._core.vmac.tolist() == [4.0, 0.0]
    assert d._core.resolution_factors is None
    d(labels, out=out, resolution_factors=[0.9, 1, 1.1])  # resolution factors: host float64 (nodes,) to the core
    assert d._core.resolution_factors.dtype == np.float64 and d._core.resolution_factors.tolist() == [0.9, 1, 1.1]
    with pytest.raises(ValueError, match=r"resolution_factors must have shape \(3,\)"):
        d(labels, out=out, resolution_factors=[0.9, 1])
    z_dev = FakeCAI(shape=(2, 4), typestr="<f4", data=(0x9000, False))
    d(labels, z=z_dev, out=out)
    assert d._core.calls[-1][4] == 0x9000
    with pytest.raises(TypeError, match="float32"):
        d(labels, out=FakeCAI(shape=(2, 19000), typestr="<f8", data=(0x7000, False)))
    with pytest.raises(ValueError, match="shape"):
        d(labels, out=FakeCAI(shape=(3, 19000), typestr="<f4", data=(0x7000, False)))
    with pytest.raises(ValueError, match="read-only"):
        d(labels, out=FakeCAI(shape=(2, 19000), typestr="<f4", data=(0x7000, True)))
    # A host z with a GPU out: handed to the core as a host address, no CuPy needed (the core reads z on the host).
    z_host = np.full((2, 4), 0.25, np.float32)
    d(labels, z=z_host, out=out)
    assert d._core.calls[-1][4] != 0
    with pytest.raises(TypeError, match="requires? grad"):
        d(labels, out=RaisingCAI())
    with pytest.raises(TypeError, match="CuPy"):  # no out given and no CuPy to allocate one
        d(labels, z=z_dev)
    with pytest.raises(TypeError, match="CuPy"):  # device labels need CuPy to be read
        d(FakeCAI(shape=(6,), typestr="<f8", data=(0x100, False)), out=out)

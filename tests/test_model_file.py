"""The C++ model-file reader (docs/model-format.md) rejects every damaged or inconsistent file with a
ValueError that names the file, and never crashes or reads out of bounds (the sanitizer build of the
C++ tests, .ci/sanitizers.sh, runs the same kind of checks under ASan/UBSan)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from fastspec import _core
from fastspec import model_format as mf

N_LABELS, LATENT, WIDTHS, N_PIXELS = 6, 3, [5, 7], 9
LABELS_AT = mf.HEADER_BYTES
LAYERS_AT = LABELS_AT + mf.LABEL_RECORD_BYTES * N_LABELS


def small_model_bytes(weight_dtype="f32", provenance=None, format_version=1) -> bytes:
    layers = mf.random_decoder(WIDTHS, latent_dim=LATENT, n_pixels=N_PIXELS, seed=5)
    return mf.model_bytes(layers, latent_dim=LATENT, weight_dtype=weight_dtype, format_version=format_version,
                          wavelength=(4450.0, 0.05, N_PIXELS, "air"), provenance=provenance or {"note": "tiny"})


def intrinsic_model_bytes() -> bytes:
    """Version 2: a 4-label network followed by the broadening stage."""
    layers = mf.random_decoder(WIDTHS, latent_dim=LATENT, n_pixels=N_PIXELS, n_labels=4, seed=5)
    return mf.model_bytes(layers, latent_dim=LATENT, labels=mf.INTRINSIC_LABELS, broadening=mf.BroadeningStage(0.6, 3),
                          wavelength=(4450.0, 0.05, N_PIXELS, "air"), provenance={"note": "tiny v2"})


def with_crc(data: bytes | bytearray) -> bytes:
    """Recompute the trailer CRC so that a deliberately inconsistent field reaches its own check."""
    data = bytearray(data)
    data[-4:] = struct.pack("<I", zlib.crc32(bytes(data[:-8])) & 0xFFFFFFFF)
    return bytes(data)


def patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return with_crc(buf)


def expect_rejected(path, data: bytes, match: str | None = None):
    path.write_bytes(data)
    with pytest.raises(ValueError) as info:
        _core.Model.load(str(path))
    message = str(info.value)
    assert str(path) in message, f"message does not name the file: {message}"
    if match is not None:
        assert match in message, f"expected {match!r} in {message!r}"
    return message


def test_valid_small_model_loads(tmp_path):
    for dtype in ("f32", "f16", "bf16"):
        path = tmp_path / f"ok_{dtype}.fsm"
        path.write_bytes(small_model_bytes(dtype))
        m = _core.Model.load(str(path))
        assert m.layers[-1]["out"] == N_PIXELS and m.weight_dtype == dtype


@pytest.mark.parametrize("weight_dtype", ["f32", "bf16"])
def test_every_truncation_is_rejected(tmp_path, weight_dtype):
    data = small_model_bytes(weight_dtype)
    path = tmp_path / "truncated.fsm"
    for length in range(len(data)):
        message = expect_rejected(path, data[:length])
        assert "truncated" in message or "smaller than a header" in message or "magic" in message, message
    assert len(data) > 1000  # the model is big enough that this covered every region of the file


def test_trailing_data_is_rejected(tmp_path):
    expect_rejected(tmp_path / "long.fsm", small_model_bytes() + b"\0", "trailing data")


def test_random_byte_flips_are_rejected(tmp_path, test_seed):
    seed = test_seed
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    data = small_model_bytes("f16")
    path = tmp_path / "flipped.fsm"
    for _ in range(300):
        buf = bytearray(data)
        pos = int(rng.integers(len(buf)))
        buf[pos] ^= int(rng.integers(1, 256))  # always a change
        expect_rejected(path, bytes(buf))


def test_random_field_values_with_a_valid_crc_never_crash(tmp_path, test_seed):
    """Garbage in header and table fields, CRC made valid: each is rejected with a clear message."""
    seed = test_seed
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    data = small_model_bytes()
    tables_end = LAYERS_AT + mf.LAYER_RECORD_BYTES * (len(WIDTHS) + 1)
    path = tmp_path / "garbage.fsm"
    loaded = 0
    for _ in range(300):
        buf = bytearray(data)
        pos = int(rng.integers(8, tables_end - 4))
        fmt = ["<I", "<Q", "<B"][int(rng.integers(3))]
        value = int(rng.choice([0, 1, 2, 3, 63, 64, 2**20 + 1, 2**31, 2**32 - 1])) if fmt != "<B" else int(rng.integers(256))
        if fmt == "<Q":
            value = int(rng.choice([0, 64, len(data), 2**63, 2**64 - 64]))
        struct.pack_into(fmt, buf, pos, value % (256 if fmt == "<B" else 2**64))
        path.write_bytes(with_crc(buf))
        try:
            _core.Model.load(str(path))
            loaded += 1  # some changes are harmless (a float that stays valid, the same value)
        except ValueError as e:
            assert str(path) in str(e)
    print(f"{loaded} of 300 patched files were still valid")


def test_specific_field_errors(tmp_path):
    data = small_model_bytes()
    p = tmp_path / "bad.fsm"
    layer1 = LAYERS_AT + mf.LAYER_RECORD_BYTES  # second layer record
    last = LAYERS_AT + 2 * mf.LAYER_RECORD_BYTES
    expect_rejected(p, with_crc(b"XSPECMDL" + data[8:]), "bad magic")
    expect_rejected(p, patched(data, 8, "<I", 4), "format version 4 is not supported; this reader knows versions 1-3")
    expect_rejected(p, patched(data, 8, "<I", 0), "format version 0 is not supported")
    expect_rejected(p, patched(data, 12, "<I", 64), "header_bytes is 64")
    expect_rejected(p, patched(data, 16, "<Q", 41234560), "truncated: header says 41234560 bytes, file has")
    expect_rejected(p, patched(data, 24, "<I", 0), "n_labels = 0")
    expect_rejected(p, patched(data, 24, "<I", 65), "n_labels = 65")
    expect_rejected(p, patched(data, 28, "<I", 5000), "latent_dim = 5000")
    expect_rejected(p, patched(data, 32, "<I", 0), "n_layers = 0")
    expect_rejected(p, patched(data, 36, "<I", 4), "weight_dtype = 4 is unknown")
    expect_rejected(p, patched(data, 36, "<I", 2), "weight_bytes")  # f16 claimed, f32-sized blocks
    expect_rejected(p, patched(data, 48, "<d", 0.0), "wavelength_step")
    expect_rejected(p, patched(data, 40, "<d", float("nan")), "wavelength_start")
    expect_rejected(p, patched(data, 56, "<I", N_PIXELS + 1), "n_pixels")
    expect_rejected(p, patched(data, 60, "<I", 3), "wavelength_medium = 3")
    expect_rejected(p, patched(data, 64, "<I", 2), "output_transform = 2")
    expect_rejected(p, patched(data, 72, "<d", 0.0), "output_scale")
    expect_rejected(p, patched(data, 80, "<d", float("inf")), "output_offset")
    expect_rejected(p, patched(data, 88, "<Q", 0), "provenance_offset")
    expect_rejected(p, patched(data, 96, "<Q", 17 << 20), "provenance_bytes")
    expect_rejected(p, patched(data, 96, "<Q", len(data)), "provenance")
    expect_rejected(p, patched(data, 110, "<B", 1), "reserved header bytes")
    # label records
    expect_rejected(p, patched(data, LABELS_AT, "<B", ord("T")), "label 0 name")
    expect_rejected(p, patched(data, LABELS_AT, "<B", 0), "label 0 name")  # empty
    expect_rejected(p, patched(data, LABELS_AT + mf.LABEL_RECORD_BYTES, "<4s", b"teff"), "appears twice")
    expect_rejected(p, patched(data, LABELS_AT + 32, "<d", 20000.0), "range")  # min > max
    expect_rejected(p, patched(data, LABELS_AT + 48, "<I", 3), "scaling = 3")
    expect_rejected(p, patched(data, LABELS_AT + mf.LABEL_RECORD_BYTES * 2 + 48, "<I", 2), "log10 scaling needs min > 0")
    expect_rejected(p, patched(data, LABELS_AT + 64, "<d", 0.0), "norm_scale")
    expect_rejected(p, patched(data, LABELS_AT + 52, "<I", 1), "reserved")
    # layer records: dims, activations, sizes and offsets that lie
    expect_rejected(p, patched(data, LAYERS_AT, "<I", LATENT + N_LABELS + 1), "layer 0: in = 10 but latent_dim + network labels is 9")
    expect_rejected(p, patched(data, layer1, "<I", 6), "layer 1: in = 6 but the previous layer's out is 5")
    expect_rejected(p, patched(data, LAYERS_AT + 8, "<I", 2), "layer 0: activation = 2")
    expect_rejected(p, patched(data, last + 8, "<I", 1), "activation = 1, expected 2")
    expect_rejected(p, patched(data, LAYERS_AT + 8, "<I", 9), "activation = 9")
    expect_rejected(p, patched(data, LAYERS_AT + 24, "<Q", 4), "weight_bytes = 4")
    expect_rejected(p, patched(data, LAYERS_AT + 40, "<Q", 8), "bias_bytes = 8")
    expect_rejected(p, patched(data, LAYERS_AT + 16, "<Q", struct.unpack_from("<Q", data, LAYERS_AT + 16)[0] + 4), "not 64-byte aligned")
    expect_rejected(p, patched(data, LAYERS_AT + 16, "<Q", 2**64 - 64), "lies outside the data area")
    expect_rejected(p, patched(data, LAYERS_AT + 16, "<Q", 0), "lies outside the data area")
    expect_rejected(p, patched(data, LAYERS_AT + 32, "<Q", len(data) - 8), "lies outside the data area")
    w1 = struct.unpack_from("<Q", data, layer1 + 16)[0]
    expect_rejected(p, patched(data, LAYERS_AT + 16, "<Q", w1), "overlap")
    expect_rejected(p, patched(data, LAYERS_AT + 12, "<I", 7), "reserved")


def test_version_2_broadening_stage(tmp_path):
    data = intrinsic_model_bytes()
    p = tmp_path / "v2.fsm"
    p.write_bytes(data)
    m = _core.Model.load(str(p))
    assert (m.format_version, m.n_labels, m.n_network_labels) == (2, 6, 4)
    assert m.broadening == {"sampling": "point", "epsilon": 0.6, "segments": 3, "vsini_label": "vsini",
                            "resolution_label": "resolution"}
    assert [lab["role"] for lab in m.labels] == ["network", "network", "vsini", "network", "network", "resolution"]
    assert m.layers[0]["in"] == LATENT + 4
    role = lambda i: LABELS_AT + mf.LABEL_RECORD_BYTES * i + 52  # noqa: E731
    expect_rejected(p, patched(data, 68, "<I", 2), "broadening = 2 (pixel means) needs format version 3")
    expect_rejected(p, patched(data, 104, "<d", 1.5), "limb darkening epsilon = 1.5")
    expect_rejected(p, patched(data, 104, "<d", float("nan")), "limb darkening epsilon")
    expect_rejected(p, patched(data, 112, "<I", 0), "segments = 0")
    expect_rejected(p, patched(data, 112, "<I", 5000), "segments = 5000")
    expect_rejected(p, patched(data, 116, "<B", 1), "reserved header bytes 116-119")
    expect_rejected(p, patched(data, 120, "<Q", 65), "emulator_error_offset = 65 is not 64-byte aligned")
    expect_rejected(p, patched(data, 120, "<Q", 64), "emulator-error block at 64 lies outside")
    expect_rejected(p, patched(data, 68, "<I", 0), "broadening = 0 but header bytes 104-119 are not zero")
    expect_rejected(p, patched(data, role(0), "<I", 3), "role = 3 is unknown")
    expect_rejected(p, patched(data, role(3), "<I", 1), "exactly one label with role vsini, the file has 2")
    expect_rejected(p, patched(data, role(5), "<I", 0), "exactly one label with role resolution, the file has 0")
    expect_rejected(p, patched(data, LABELS_AT + mf.LABEL_RECORD_BYTES * 2 + 32, "<d", -1.0), "must lie in [0, 3000]")
    expect_rejected(p, patched(data, LABELS_AT + mf.LABEL_RECORD_BYTES * 5 + 32, "<d", 5.0), "min = 5 must be >= 10")
    # Roles and the stage are version 2: the same fields in a version-1 file are reserved.
    expect_rejected(p, patched(data, 8, "<I", 1), "reserved header field at offset 68")
    v1 = small_model_bytes()
    expect_rejected(p, patched(v1, role(2), "<I", 1), "reserved bytes are not zero")
    v2_plain = small_model_bytes(format_version=2)  # version 2 without a stage: every label is a network input
    expect_rejected(p, patched(v2_plain, role(2), "<I", 1), "has role vsini but the file has no broadening stage")
    p.write_bytes(v2_plain)
    assert _core.Model.load(str(p)).broadening is None


def test_pixel_mean_stage_is_version_3(tmp_path):
    """Version 3 adds broadening = 2 (the network's pixels are pixel means); version-2 files load as before, a
    pixel-mean stage in a version-2 file and unknown stages or versions are refused with what is wrong."""
    layers = mf.random_decoder(WIDTHS, latent_dim=LATENT, n_pixels=N_PIXELS, n_labels=4, seed=5)
    grid = (4450.0, 0.05, N_PIXELS, "air")
    p = tmp_path / "v3.fsm"
    v3 = mf.model_bytes(layers, latent_dim=LATENT, labels=mf.INTRINSIC_LABELS, wavelength=grid, format_version=3,
                        broadening=mf.BroadeningStage(sampling="pixel_mean"))
    p.write_bytes(v3)
    m = _core.Model.load(str(p))
    assert m.format_version == 3 and m.broadening["sampling"] == "pixel_mean"
    v2 = mf.model_bytes(layers, latent_dim=LATENT, labels=mf.INTRINSIC_LABELS, wavelength=grid,
                        broadening=mf.BroadeningStage())
    p.write_bytes(v2)
    m = _core.Model.load(str(p))
    assert m.format_version == 2 and m.broadening["sampling"] == "point"
    expect_rejected(p, patched(v3, 8, "<I", 2), "broadening = 2 (pixel means) needs format version 3, the file has 2")
    expect_rejected(p, patched(v3, 68, "<I", 3), "broadening = 3 is unknown")
    expect_rejected(p, patched(v3, 8, "<I", 4), "format version 4 is not supported; this reader knows versions 1-3")
    with pytest.raises(ValueError, match="pixel means needs format version 3"):
        mf.model_bytes(layers, latent_dim=LATENT, labels=mf.INTRINSIC_LABELS, wavelength=grid,
                       broadening=mf.BroadeningStage(sampling="pixel_mean"))
    with pytest.raises(ValueError, match="broadening sampling must be one of"):
        mf.BroadeningStage(sampling="mean")


def test_writer_refuses_inconsistent_stages():
    layers4 = mf.random_decoder(WIDTHS, latent_dim=LATENT, n_pixels=N_PIXELS, n_labels=4, seed=5)
    grid = (4450.0, 0.05, N_PIXELS, "air")
    with pytest.raises(ValueError, match="need a broadening stage"):
        mf.model_bytes(layers4, latent_dim=LATENT, labels=mf.INTRINSIC_LABELS, wavelength=grid)
    with pytest.raises(ValueError, match="needs format version 2"):
        mf.model_bytes(layers4, latent_dim=LATENT, labels=mf.INTRINSIC_LABELS, wavelength=grid,
                       broadening=mf.BroadeningStage(), format_version=1)
    with pytest.raises(ValueError, match="exactly one vsini and one resolution"):
        mf.model_bytes(mf.random_decoder(WIDTHS, latent_dim=LATENT, n_pixels=N_PIXELS, seed=5), latent_dim=LATENT,
                       wavelength=grid, broadening=mf.BroadeningStage())


def test_provenance_must_be_utf8(tmp_path):
    data = bytearray(small_model_bytes(provenance={"note": "abcd"}))
    prov_off = struct.unpack_from("<Q", data, 88)[0]
    i = data.index(b"abcd", prov_off)
    data[i : i + 2] = b"\xc3\x28"  # invalid continuation byte
    expect_rejected(tmp_path / "prov.fsm", with_crc(data), "not valid UTF-8")


def test_nonfinite_weights_are_rejected(tmp_path):
    data = bytearray(small_model_bytes())
    w0 = struct.unpack_from("<Q", data, LAYERS_AT + 16)[0]
    struct.pack_into("<f", data, w0 + 8, float("nan"))
    expect_rejected(tmp_path / "nan.fsm", with_crc(data), "layer 0: weight 2 is not finite")


def test_not_a_model_file(tmp_path):
    expect_rejected(tmp_path / "empty.fsm", b"")
    expect_rejected(tmp_path / "text.fsm", b"hello world\n" * 50, "bad magic")


def test_emulator_error_block(tmp_path, test_seed):
    """Version 2's optional emulator-error block: read back exactly, interpolated bilinearly in (v sin i, log R),
    constant beyond the nodes; damaged blocks are refused."""
    layers = mf.random_decoder(WIDTHS, latent_dim=LATENT, n_pixels=N_PIXELS, n_labels=4, seed=5)
    rms = np.random.default_rng(test_seed).random((3, 2, N_PIXELS)).astype(np.float32)
    ee = mf.EmulatorError(np.array([0.0, 50.0, 300.0]), np.array([1000.0, 100000.0]), rms)
    data = mf.model_bytes(layers, latent_dim=LATENT, labels=mf.INTRINSIC_LABELS, broadening=mf.BroadeningStage(),
                          wavelength=(4450.0, 0.05, N_PIXELS, "air"), emulator_error=ee)
    p = tmp_path / "err.fsm"
    p.write_bytes(data)
    m = _core.Model.load(str(p))
    assert m.has_emulator_error
    np.testing.assert_array_equal(m.emulator_error(50.0, 1000.0), rms[1, 0])
    np.testing.assert_array_equal(m.emulator_error(900.0, 1e7), rms[2, 1])  # clamped to the last nodes
    np.testing.assert_allclose(m.emulator_error(25.0, 10000.0), rms[:2].mean(axis=(0, 1)), rtol=1e-6)
    at = struct.unpack_from("<Q", data, 120)[0]
    assert at % 64 == 0
    expect_rejected(p, patched(data, at, "<I", 0), "nodes, each must be in [1, 64]")
    expect_rejected(p, patched(data, at + 8, "<I", N_PIXELS + 1), "emulator error: n_pixels")
    expect_rejected(p, patched(data, at + 16 + 8, "<d", 0.0), "nodes must be finite, increasing")
    expect_rejected(p, patched(data, at + 16 + 8 * 3, "<d", -5.0), "nodes must be finite, increasing")
    expect_rejected(p, patched(data, at + 16 + 8 * 5, "<f", float("nan")), "must be finite and >= 0")
    expect_rejected(p, patched(data, 120, "<Q", at + 64 * 1000), "lies outside the data area")
    plain = small_model_bytes(format_version=2)
    p.write_bytes(plain)
    assert not _core.Model.load(str(p)).has_emulator_error and _core.Model.load(str(p)).emulator_error(1, 2000) is None

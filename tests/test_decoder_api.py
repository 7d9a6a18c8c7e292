"""The Python API over the core: input forms, latent options, metadata and errors."""

import subprocess
import sys

import numpy as np
import pytest

import fastspec
from fastspec import _core
from test_core import random_labels

SUN = [5777.0, 4.44, 2.0, 0.0, 1.0, 50000.0]
NAMES = ("teff", "logg", "vsini", "mh", "vmic", "resolution")


@pytest.fixture(scope="module")
def decoder(small_model):
    return fastspec.Decoder.load(small_model)


def test_matches_core_for_arrays_lists_and_keywords(decoder, small_model, test_seed):
    rng = np.random.default_rng(test_seed)
    labels = random_labels(rng, 5)
    core = _core.Decoder(_core.Model.load(str(small_model)))
    expected = core.forward(np.ascontiguousarray(labels))

    np.testing.assert_array_equal(decoder(labels), expected)
    np.testing.assert_array_equal(decoder(labels.tolist()), expected)
    np.testing.assert_array_equal(decoder(labels.astype(np.float32)), core.forward(labels.astype(np.float32).astype(np.float64)))
    np.testing.assert_array_equal(decoder(labels[::-1].copy()[::-1]), expected)  # non-contiguous views
    np.testing.assert_array_equal(decoder(**{k: labels[:, j] for j, k in enumerate(NAMES)}), expected)
    one = decoder(labels[2])
    assert one.shape == (19000,) and one.dtype == np.float32
    # One spectrum takes the core's matrix-vector path, a batch the matrix-matrix one: rounding differs.
    np.testing.assert_allclose(one, expected[2], rtol=1e-6)
    np.testing.assert_array_equal(decoder(**dict(zip(NAMES, labels[2]))), one)


def test_keywords_broadcast(decoder):
    teff = np.array([5000.0, 6000.0, 7000.0])
    flux = decoder(teff=teff, logg=4.0, vsini=10.0, mh=0.0, vmic=1.0, resolution=20000.0)
    assert flux.shape == (3, 19000)
    np.testing.assert_allclose(flux[1], decoder([6000.0, 4.0, 10.0, 0.0, 1.0, 20000.0]), rtol=1e-6)


def test_latent_options(decoder):
    zero = decoder(SUN)
    np.testing.assert_array_equal(decoder(SUN, z=np.zeros(decoder.latent_dim)), zero)
    a = decoder([SUN, SUN], sample=True, seed=3)
    b = decoder([SUN, SUN], sample=True, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1]), "each spectrum gets its own z"
    assert not np.array_equal(a[0], zero)
    z = np.random.default_rng(3).standard_normal((2, decoder.latent_dim), dtype=np.float32)
    np.testing.assert_array_equal(decoder([SUN, SUN], z=z), a)


def test_out_argument_is_filled(decoder):
    out = np.full((2, 19000), np.nan, dtype=np.float32)
    result = decoder([SUN, SUN], out=out)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(result, out)


def test_metadata(decoder, small_model):
    assert decoder.label_names == NAMES
    assert decoder.label_ranges["teff"] == (4000.0, 11000.0)
    assert decoder.label_ranges["resolution"] == (1000.0, 115000.0)
    wave = decoder.wavelength
    assert wave.shape == (19000,) and wave.dtype == np.float64
    np.testing.assert_allclose(wave[[0, -1]], [4450.0, 4450.0 + 0.05 * 18999])
    assert [w.shape for w, _ in decoder.weights] == [(32, 10), (64, 32), (19000, 64)]
    assert decoder.info["provenance"] == {"purpose": "tests", "seed": 1}
    assert decoder.info["medium"] == "air"
    assert "small.fsm" in repr(decoder)


@pytest.mark.parametrize("bad, match", [
    ([SUN[:5]], r"shape"),
    (np.zeros((2, 3, 6)), r"shape"),
    ([["a"] * 6], r"real numbers"),
    ([[5777.0, 4.44, 2.0, np.nan, 1.0, 5e4]], r"mh"),
    ([[5777.0, 4.44, 2.0, 0.0, 1.0, np.inf]], r"resolution"),
    ([[3000.0, 4.44, 2.0, 0.0, 1.0, 5e4]], r"teff"),
])
def test_bad_labels(decoder, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        decoder(bad)


def test_clip_clamps_to_range(decoder):
    clipped = decoder([3000.0, 9.0, 2.0, 0.0, 1.0, 5e4], clip=True)
    np.testing.assert_array_equal(clipped, decoder([4000.0, 5.0, 2.0, 0.0, 1.0, 5e4]))
    with pytest.raises(ValueError, match="teff"):
        decoder([np.nan, 4.0, 2.0, 0.0, 1.0, 5e4], clip=True)


def test_bad_arguments(decoder):
    with pytest.raises(TypeError, match="missing: vmic"):
        decoder(teff=5777, logg=4.4, vsini=2, mh=0, resolution=5e4)
    with pytest.raises(TypeError, match="unknown: feh"):
        decoder(teff=5777, logg=4.4, vsini=2, mh=0, vmic=1, resolution=5e4, feh=0)
    with pytest.raises(TypeError, match="not both"):
        decoder(SUN, teff=5777)
    with pytest.raises(TypeError, match="not both"):
        decoder(SUN, z=np.zeros(decoder.latent_dim), sample=True)
    with pytest.raises(ValueError, match="z must have shape"):
        decoder(SUN, z=np.zeros(decoder.latent_dim + 1))
    with pytest.raises(ValueError, match="NaN"):
        decoder(SUN, z=np.full(decoder.latent_dim, np.nan))
    with pytest.raises(ValueError, match="out must be"):
        decoder(SUN, out=np.zeros(19000, dtype=np.float64))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.fsm"):
        fastspec.Decoder.load(tmp_path / "nope.fsm")
    garbage = tmp_path / "garbage.fsm"
    garbage.write_bytes(b"not a model at all" * 20)
    with pytest.raises(ValueError, match="garbage.fsm"):
        fastspec.Decoder.load(garbage)
    with pytest.raises(ValueError, match="device"):
        fastspec.Decoder.load(device="tpu")


@pytest.mark.skipif(_core.cuda_available(), reason="this checks the error on a machine without a usable GPU")
def test_cuda_request_without_gpu_is_a_clear_error(small_model):
    with pytest.raises(RuntimeError, match="CUDA"):
        fastspec.Decoder.load(small_model, device="cuda")


def test_gpu_array_on_cpu_decoder_is_a_clear_error(decoder):
    class FakeCupy:  # anything exposing the CUDA array interface is device memory
        __cuda_array_interface__ = {"shape": (6,), "typestr": "<f8", "data": (0, False), "version": 3}

    with pytest.raises(TypeError, match="GPU"):
        decoder(FakeCupy())


def test_never_imports_torch(small_model):
    code = (
        "import sys, fastspec; d = fastspec.Decoder.load(sys.argv[1]); d([5777, 4.44, 2, 0, 1, 5e4]); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code, str(small_model)], check=True)


def test_default_model_is_shipped_and_loads():
    path = fastspec.default_model_path()
    assert path.stat().st_size <= 64 * 2**20
    decoder = fastspec.Decoder.load()
    flux = decoder(SUN)
    assert flux.shape == (19000,) and np.isfinite(flux).all()
    # A solar-type spectrum: mostly continuum, with absorption lines well below it.
    assert 0.9 < np.median(flux) <= 1.05 and flux.min() < 0.6
    assert decoder.info["provenance"], "the default model must carry its provenance"

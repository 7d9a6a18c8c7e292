"""fastspec._core (the C++ CPU backend) against a float64 NumPy reference, on fresh random models.

Accuracy criterion: max |out - ref| / max(|ref|, 0.1·|output_scale|) <= 1e-5. The core computes in
float32 (unit roundoff 6e-8) with float32 weights (16-bit weights are compared against a reference
that uses the same stored values, model_format.quantize), so relative errors of ~1e-6 are expected
after a few thousand-term dot products. The floor: the last step is flux = scale·σ(a) + offset in
float32, whose rounding is ~1e-7·|scale| whatever the result, so where offset cancels the product a
relative error is meaningless; the floor keeps the check at 1e-6·|scale| absolute there.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from fastspec import _core
from fastspec import model_format as mf

TOL = 1e-5


def reference_forward(layers, labels, z=None, *, latent_dim, weight_dtype="f32", output_scale=1.0, output_offset=0.0,
                      label_info=mf.STANDARD_LABELS, clip=False):
    """The decoder in float64 from the weights as stored in the file."""
    labels = np.asarray(labels, dtype=np.float64)
    n = labels.shape[0]
    x = np.zeros((n, latent_dim + len(label_info)))
    if z is not None:
        x[:, :latent_dim] = z
    for j, lab in enumerate(label_info):
        v = np.clip(labels[:, j], lab.min, lab.max) if clip else labels[:, j]
        s = np.log10(v) if lab.scaling == "log10" else v
        offset, scale = lab.normalisation()
        x[:, latent_dim + j] = (s - offset) / scale
    for layer in layers:
        a = x @ mf.quantize(layer.weight, weight_dtype).astype(np.float64).T + layer.bias.astype(np.float64)
        x = np.maximum(a, 0.0) if layer.activation == "relu" else 1.0 / (1.0 + np.exp(-a))
    return output_scale * x + output_offset


def rel_error(out, ref, output_scale=1.0):
    return float(np.max(np.abs(out.astype(np.float64) - ref) / np.maximum(np.abs(ref), 0.1 * abs(output_scale))))


def random_labels(rng, n, label_info=mf.STANDARD_LABELS):
    return np.stack([rng.uniform(lab.min, lab.max, n) for lab in label_info], axis=1)


def make_model(tmp_path, widths, *, latent_dim, n_pixels, weight_dtype="f32", seed=0, **kwargs):
    layers = mf.random_decoder(widths, latent_dim=latent_dim, n_pixels=n_pixels, seed=seed)
    path = mf.write_model(tmp_path / f"model_{weight_dtype}_{seed}.fsm", layers, latent_dim=latent_dim,
                          weight_dtype=weight_dtype, wavelength=(4450.0, 0.05, n_pixels, "air"), **kwargs)
    return layers, path


@pytest.mark.parametrize("weight_dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("widths,latent_dim,n_pixels", [([64, 128], 4, 300), ([256], 16, 1000), ([33, 65, 17], 0, 257)])
@pytest.mark.parametrize("threads", [1, 2])
def test_forward_matches_float64_reference(tmp_path, rng, weight_dtype, widths, latent_dim, n_pixels, threads):
    scale, offset = float(rng.uniform(0.5, 2.0)), float(rng.uniform(-0.5, 0.5))
    seed = int(rng.integers(1 << 31))
    layers, path = make_model(tmp_path, widths, latent_dim=latent_dim, n_pixels=n_pixels, weight_dtype=weight_dtype,
                              seed=seed, output_scale=scale, output_offset=offset)
    model = _core.Model.load(str(path))
    decoder = _core.Decoder(model, threads=threads)
    for n in (1, 2, 17, 1100):  # 1100 > the default max_chunk (1024): two chunks
        labels = random_labels(rng, n)
        for z in (None, rng.normal(size=(n, latent_dim)).astype(np.float32)):
            out = np.full((n, n_pixels), np.nan, dtype=np.float32)  # poisoned: every entry must be written
            result = decoder.forward(labels, z=z, out=out)
            assert result is out or np.shares_memory(result, out)
            ref = reference_forward(layers, labels, z, latent_dim=latent_dim, weight_dtype=weight_dtype,
                                    output_scale=scale, output_offset=offset)
            assert np.isfinite(out).all()
            err = rel_error(out, ref, scale)
            assert err <= TOL, f"n={n} z={'given' if z is not None else 'None'}: max relative error {err:.3g}"


def test_small_chunks_and_fresh_output(tmp_path, rng):
    layers, path = make_model(tmp_path, [40, 50], latent_dim=3, n_pixels=123, seed=int(rng.integers(1 << 31)))
    model = _core.Model.load(str(path))
    labels = random_labels(rng, 29)
    z = rng.normal(size=(29, 3)).astype(np.float32)
    ref = reference_forward(layers, labels, z, latent_dim=3)
    for chunk in (1, 4, 7, 29, 1000):
        out = _core.Decoder(model, max_chunk=chunk).forward(labels, z=z)
        assert out.shape == (29, 123) and out.dtype == np.float32
        assert rel_error(out, ref) <= TOL, f"max_chunk={chunk}"
    # batch 0 is allowed and writes nothing
    assert _core.Decoder(model).forward(np.zeros((0, 6))).shape == (0, 123)


@pytest.mark.parametrize("weight_dtype", ["f16", "bf16"])
def test_direct_16bit_gemv_at_batch_1(tmp_path, rng, weight_dtype):
    """Batch 1 on a 16-bit model reads the stored weights directly (AVX-512F CPUs): same accuracy as the
    float32 path, and both agree with the reference."""
    layers, path = make_model(tmp_path, [100, 300, 1000], latent_dim=6, n_pixels=1900, weight_dtype=weight_dtype,
                              seed=int(rng.integers(1 << 31)))
    model = _core.Model.load(str(path))
    direct, plain = _core.Decoder(model), _core.Decoder(model, direct_16bit=False)
    assert not plain.uses_direct_16bit
    if not direct.uses_direct_16bit:
        # FASTSPEC_FORCE_ISA=avx2 / baseline (CI runs this file so) turns the 16-bit GEMV off like such a CPU does:
        # the float32 path is then what runs, and is checked below. Otherwise only a CPU without AVX-512F may skip
        # (not on the CI allow-list: CI's machines have it).
        if os.environ.get("FASTSPEC_FORCE_ISA", "avx512") == "avx512":
            pytest.skip("this CPU has no AVX-512F: the direct 16-bit GEMV is not used")
    for _ in range(5):
        labels = random_labels(rng, 1)
        z = rng.normal(size=(1, 6)).astype(np.float32)
        ref = reference_forward(layers, labels, z, latent_dim=6, weight_dtype=weight_dtype)
        for dec in (direct, plain):
            out = np.full((1, 1900), np.nan, dtype=np.float32)
            dec.forward(labels, z=z, out=out)
            assert rel_error(out, ref) <= TOL
    f32_layers, f32_path = make_model(tmp_path, [10], latent_dim=2, n_pixels=30, weight_dtype="f32")
    assert not _core.Decoder(_core.Model.load(str(f32_path))).uses_direct_16bit


def test_model_properties(tmp_path):
    layers = mf.random_decoder([20], latent_dim=5, n_pixels=77, seed=3)
    path = mf.write_model(tmp_path / "m.fsm", layers, latent_dim=5, weight_dtype="bf16", output_scale=1.5,
                          output_offset=-0.25, wavelength=(5000.0, 0.1, 77, "vacuum"), provenance={"epochs": 7})
    m = _core.Model.load(str(path))
    assert (m.n_labels, m.latent_dim, m.n_pixels) == (6, 5, 77)
    assert (m.wavelength_start, m.wavelength_step, m.medium, m.weight_dtype) == (5000.0, 0.1, "vacuum", "bf16")
    assert (m.output_scale, m.output_offset) == (1.5, -0.25)
    assert '"epochs": 7' in m.provenance
    assert [lab["name"] for lab in m.labels] == [lab.name for lab in mf.STANDARD_LABELS]
    assert m.labels[5] == {"name": "resolution", "unit": "", "min": 1000.0, "max": 115000.0, "scaling": "log10",
                           "role": "network"}
    assert m.labels[0]["unit"] == "K"
    assert m.layers == [{"in": 11, "out": 20, "activation": "relu"}, {"in": 20, "out": 77, "activation": "sigmoid"}]
    wl = m.wavelength()
    assert wl.dtype == np.float64 and np.array_equal(wl, 5000.0 + 0.1 * np.arange(77))
    for (w, b), layer in zip(m.weights(), layers):
        assert w.dtype == np.float32 and w.shape == layer.weight.shape
        np.testing.assert_array_equal(w, mf.quantize(layer.weight, "bf16"))
        np.testing.assert_array_equal(b, layer.bias)


def test_labels_are_validated_before_anything_is_written(tmp_path):
    layers, path = make_model(tmp_path, [16], latent_dim=2, n_pixels=50)
    d = _core.Decoder(_core.Model.load(str(path)))
    good = np.array([[5777.0, 4.44, 2.0, 0.0, 1.0, 50000.0]] * 3)
    cases = [
        (1, 0, np.nan, "label 'logg' = nan is not finite"),
        (2, 0, np.inf, "label 'teff' = inf is not finite"),
        (0, 5, -np.inf, "label 'resolution' = -inf is not finite"),
        (1, 1, 7.0, "label 'logg' = 7 is outside [2, 5]; pass clip=true to clamp"),
        (2, 5, 500.0, "label 'resolution' = 500 is outside [1000, 115000]"),
        (0, 3, -1.6, "label 'mh' = -1.6 is outside [-1.5, 1.5]"),
    ]
    for row, col, value, message in cases:
        bad = good.copy()
        bad[row, col] = value if (row, col) != (1, 0) else good[row, col]
        if (row, col) == (1, 0):
            bad[1, 1] = value  # the NaN case is logg
        out = np.full((3, 50), -7.0, dtype=np.float32)
        with pytest.raises(ValueError) as info:
            d.forward(bad, out=out)
        assert message in str(info.value) and f"row {row}" in str(info.value)
        assert (out == -7.0).all(), "forward wrote output before rejecting a label"
    # NaN and inf are rejected even with clip
    bad = good.copy()
    bad[0, 2] = np.nan
    with pytest.raises(ValueError, match="'vsini' = nan is not finite"):
        d.forward(bad, clip=True)
    z = np.zeros((3, 2), dtype=np.float32)
    z[2, 1] = np.inf
    with pytest.raises(ValueError, match=r"row 2: z\[1\] = inf is not finite"):
        d.forward(good, z=z)


def test_clip_clamps_exactly_like_the_reference(tmp_path, rng):
    layers, path = make_model(tmp_path, [32, 32], latent_dim=2, n_pixels=64, seed=int(rng.integers(1 << 31)))
    d = _core.Decoder(_core.Model.load(str(path)))
    lo = np.array([lab.min for lab in mf.STANDARD_LABELS])
    hi = np.array([lab.max for lab in mf.STANDARD_LABELS])
    span = hi - lo
    labels = rng.uniform(lo - span, hi + span, size=(50, 6))  # most rows have something out of range
    labels[0] = hi + 1e9
    labels[1] = lo - 1e9
    out = d.forward(labels, clip=True)
    ref = reference_forward(layers, labels, latent_dim=2, clip=True)
    assert rel_error(out, ref) <= TOL
    # clip=True is exactly forward() of the clamped labels (same batch, so the same GEMM path)
    np.testing.assert_array_equal(out, d.forward(np.clip(labels, lo, hi)))


def test_strict_argument_checks(tmp_path):
    _, path = make_model(tmp_path, [8], latent_dim=3, n_pixels=20)
    d = _core.Decoder(_core.Model.load(str(path)))
    good = np.tile([5777.0, 4.44, 2.0, 0.0, 1.0, 50000.0], (4, 1))
    with pytest.raises(TypeError, match="labels must have dtype float64"):
        d.forward(good.astype(np.float32))
    with pytest.raises(TypeError, match="labels must be a numpy.ndarray"):
        d.forward(good.tolist())
    with pytest.raises(ValueError, match=r"labels must have shape \(4, 6\), not \(4, 5\)"):
        d.forward(np.ascontiguousarray(good[:, :5]))
    with pytest.raises(ValueError, match="labels must be 2-D"):
        d.forward(good[0])
    with pytest.raises(ValueError, match="labels must be C-contiguous"):
        d.forward(np.asfortranarray(good))
    with pytest.raises(ValueError, match=r"z must have shape \(4, 3\)"):
        d.forward(good, z=np.zeros((4, 2), dtype=np.float32))
    with pytest.raises(TypeError, match="z must have dtype float32"):
        d.forward(good, z=np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"out must have shape \(4, 20\)"):
        d.forward(good, out=np.zeros((4, 21), dtype=np.float32))
    with pytest.raises(TypeError, match="out must have dtype float32"):
        d.forward(good, out=np.zeros((4, 20)))
    ro = np.zeros((4, 20), dtype=np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        d.forward(good, out=ro)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        _core.Decoder(d.model, threads=0)


def test_concurrent_forward_from_python_threads(tmp_path, rng):
    layers, path = make_model(tmp_path, [128, 256], latent_dim=4, n_pixels=2000, seed=int(rng.integers(1 << 31)))
    d = _core.Decoder(_core.Model.load(str(path)), max_chunk=16)
    inputs = [random_labels(rng, n) for n in (1, 5, 33, 64, 2, 40)]
    expected = [d.forward(x) for x in inputs]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(5):
                out = np.full(expected[i].shape, np.nan, dtype=np.float32)
                d.forward(inputs[i], out=out)
                if not np.array_equal(out, expected[i]):
                    results[i] = out
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not results, f"concurrent results differ for inputs {sorted(results)}"
    for x, e in zip(inputs, expected):
        assert rel_error(e, reference_forward(layers, x, latent_dim=4)) <= TOL


@pytest.mark.parametrize("call", ["forward", "forward_jacobian"])
def test_forward_releases_the_gil(tmp_path, rng, call):
    """While one thread is inside a long core call, a pure-Python thread keeps running. test_concurrent_forward...
    above would pass even if the GIL were held throughout (the calls would just run one after another); here a
    held GIL stops the ticker for the whole call, whatever the machine's speed or load. The ticker records
    perf_counter stamps; with the GIL released, some fall in the middle half of the call (measured: thousands)."""
    layers, path = make_model(tmp_path, [256, 512], latent_dim=4, n_pixels=4000, seed=int(rng.integers(1 << 31)))
    d = _core.Decoder(_core.Model.load(str(path)), threads=1)
    n = 64 if call == "forward" else 8
    t0 = time.perf_counter()
    getattr(d, call)(random_labels(rng, n))
    one = time.perf_counter() - t0
    labels = random_labels(rng, max(n, int(n * 0.4 / max(one, 1e-4))))  # one call of about 0.4 s
    stamps, stop = [], threading.Event()

    def ticker():
        while not stop.is_set():
            stamps.append(time.perf_counter())
            for _ in range(200):  # pure Python work between stamps
                pass

    th = threading.Thread(target=ticker)
    th.start()
    time.sleep(0.02)
    try:
        begin = time.perf_counter()
        getattr(d, call)(labels)
        end = time.perf_counter()
    finally:
        stop.set()
        th.join()
    lo, hi = begin + 0.25 * (end - begin), begin + 0.75 * (end - begin)
    inside = sum(lo <= t <= hi for t in stamps)
    print(f"{call} of {len(labels)} spectra: {end - begin:.3f} s; ticker stamps in the middle half of it: {inside}")
    # With the GIL held the ticker cannot run at all during the call (checked with sorted() on a big list, a C
    # call that holds it: 0 stamps); with the GIL released it runs throughout (measured: tens of thousands).
    assert end - begin > 0.05 and inside > 100, (end - begin, inside)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.fsm"):
        _core.Model.load(str(tmp_path / "nope.fsm"))
    with pytest.raises(OSError):
        _core.Model.load(str(tmp_path))  # a directory


def test_build_info_and_cuda():
    info = _core.build_info()
    assert "OpenBLAS" in info["blas_config"] and isinstance(info["cuda"], bool)  # cuda: the backend was built
    assert {"version", "blas", "compiler", "cxx_flags"} <= set(info)
    # Usable only when built and a GPU is there; the reason says why not (tests/test_cuda_host.py has the rest).
    assert _core.cuda_available() == (_core.cuda_unavailable_reason() == "")
    if not info["cuda"]:
        assert _core.cuda_available() is False

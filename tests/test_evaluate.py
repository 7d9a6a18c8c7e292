"""The evaluation suite (`fastspec evaluate`): statistics helpers against direct NumPy, and the whole
pipeline end to end on a small random model whose 'SYNSPEC' spectra are its own output plus known noise."""

import json

import h5py
import numpy as np
import pytest

import matplotlib  # noqa: F401,E402 (the test extra has it: a missing matplotlib fails here, it does not skip)

from fastspec.evaluate import DataError, RecoveryOptions, evaluate  # noqa: E402
from fastspec.evaluate import recovery as rec_mod  # noqa: E402
from fastspec.evaluate import stats  # noqa: E402
from fastspec.model_format import random_decoder, write_model  # noqa: E402

SIGMA = 0.01
LABELS = ("teff", "logg", "vsini", "mh", "vmic", "resolution")
FIGURES = ("pixels_wavelength.png", "pixels_histogram.png", "heatmap_teff_logg.png", "heatmaps_all_pairs.png",
           "marginals.png", "overlays.png", "recovery_table.png", "recovery_scatter.png")
TINY = RecoveryOptions(widths=(32, 16), epochs=6, noise_draws=2, batch_size=64, patience=100)


# ------------------------------------------------------------------------------------ statistics
def test_log_histogram_percentiles_match_numpy():
    rng = np.random.default_rng(1)
    v = np.abs(rng.standard_normal(200_000)) * 10.0 ** rng.uniform(-6, -1, 200_000)
    v[:50] = 0.0  # exact zeros go to the underflow bin
    h = stats.LogHistogram()
    for part in np.array_split(v, 7):  # fed in chunks, as the pipeline does
        h.add(part)
    q = [1, 10, 50, 68.27, 90, 99, 99.9]
    np.testing.assert_allclose(h.percentile(q), np.percentile(v, q), rtol=1.5 * h.relative_resolution)
    assert h.percentile([0.01])[0] == 0.0 and h.percentile([100])[0] == v.max()
    assert h.total == v.size
    with pytest.raises(ValueError):
        h.add(np.array([-1.0]))


def test_residual_accumulator_matches_direct_numpy():
    rng = np.random.default_rng(2)
    n, p = 37, 500
    syn = rng.random((n, p)).astype(np.float32)
    mod = (syn + rng.normal(0.003, 0.02, (n, p))).astype(np.float32)
    acc = stats.ResidualAccumulator(p)
    for s, e in [(0, 5), (5, 6), (6, 30), (30, 37)]:
        acc.add(mod[s:e], syn[s:e])
    r = acc.result()
    res = mod.astype(np.float64) - syn.astype(np.float64)
    a = np.abs(res)
    np.testing.assert_allclose(r["per_pixel"]["mean_residual"], res.mean(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(r["per_pixel"]["std_residual"], res.std(axis=0), rtol=1e-9)
    np.testing.assert_allclose(r["per_pixel"]["mean_abs"], a.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(r["per_spectrum"]["mean_abs"], a.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(r["per_spectrum"]["mean_res"], res.mean(axis=1), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(r["per_spectrum"]["max_abs"], a.max(axis=1), rtol=1e-12)
    np.testing.assert_allclose(r["per_spectrum"]["rms"], np.sqrt((res**2).mean(axis=1)), rtol=1e-12)
    assert r["abs_mean"] == pytest.approx(a.mean(), rel=1e-12)
    assert r["residual_mean"] == pytest.approx(res.mean(), rel=1e-10)
    assert r["residual_rms"] == pytest.approx(np.sqrt((res**2).mean()), rel=1e-12)
    assert r["abs_max"] == pytest.approx(a.max(), rel=1e-12)
    assert r["abs_median"] == pytest.approx(np.median(a), rel=2 * acc.hist.relative_resolution)
    with pytest.raises(ValueError, match="non-finite"):
        acc.add(np.full((1, p), np.nan, np.float32), syn[:1])


def test_binned_1d_and_2d_match_loops():
    rng = np.random.default_rng(3)
    x = rng.uniform(-0.2, 10.2, 3000)
    x[:3] = [0.0, 10.0, 5.0]  # both range ends and an inner edge
    yv = rng.normal(size=x.size)
    w = rng.uniform(0, 4, x.size)
    xe, we = np.linspace(0, 10, 8), np.linspace(0, 4, 5)
    b = stats.binned_1d(x, yv, xe)
    for i in range(len(xe) - 1):
        last = i == len(xe) - 2
        m = (x >= xe[i]) & ((x <= xe[i + 1]) if last else (x < xe[i + 1]))
        assert b["count"][i] == m.sum()
        assert b["mean"][i] == pytest.approx(yv[m].mean(), rel=1e-12)
        assert b["std"][i] == pytest.approx(yv[m].std(), rel=1e-10)
    assert b["count"].sum() == np.count_nonzero((x >= 0) & (x <= 10))
    h = stats.binned_2d(x, w, yv, xe, we)
    for i in range(len(xe) - 1):
        for j in range(len(we) - 1):
            mi = (x >= xe[i]) & ((x <= xe[i + 1]) if i == len(xe) - 2 else (x < xe[i + 1]))
            mj = (w >= we[j]) & ((w <= we[j + 1]) if j == len(we) - 2 else (w < we[j + 1]))
            m = mi & mj
            assert h["count"][i, j] == m.sum()
            if m.any():
                assert h["mean"][i, j] == pytest.approx(yv[m].mean(), rel=1e-12)
            else:
                assert np.isnan(h["mean"][i, j])
    # An empty bin is NaN, not 0.
    e = stats.binned_1d(np.array([0.5, 0.6]), np.array([1.0, 3.0]), np.array([0.0, 1.0, 2.0]))
    assert e["mean"][0] == 2.0 and np.isnan(e["mean"][1]) and e["count"].tolist() == [2, 0]


def test_variance_explained():
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, 5000)
    edges = np.linspace(0, 1, 11)
    # Direct computation of the correlation ratio.
    yv = np.sin(6 * x) + rng.normal(0, 0.5, x.size)
    idx = np.minimum((x * 10).astype(int), 9)
    means = np.array([yv[idx == k].mean() for k in range(10)])
    counts = np.array([(idx == k).sum() for k in range(10)])
    eta2 = (counts * (means - yv.mean()) ** 2).sum() / ((yv - yv.mean()) ** 2).sum()
    v = stats.variance_explained(x, yv, edges)
    assert v["eta2"] == pytest.approx(eta2, rel=1e-10)
    assert v["bins_used"] == 10 and v["n"] == x.size
    # y a function of the bin only: all of it explained; y independent of x: adjusted ≈ 0.
    assert stats.variance_explained(x, idx.astype(float) ** 2, edges)["eta2"] == pytest.approx(1.0)
    noise = stats.variance_explained(x, rng.normal(size=x.size), edges)
    assert abs(noise["eta2_adjusted"]) < 0.005 and noise["eta2"] > noise["eta2_adjusted"]


def test_label_edges_log_for_resolution():
    e = stats.label_edges(1000, 115000, 4, log=True)
    np.testing.assert_allclose(np.diff(np.log10(e)), np.log10(115) / 4)
    assert e[0] == pytest.approx(1000) and e[-1] == pytest.approx(115000)


def test_import_pulls_in_neither_torch_nor_matplotlib():
    import subprocess
    import sys

    code = ("import sys, fastspec.evaluate, fastspec.evaluate.cli; "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_metrics_json_writer():
    from fastspec.evaluate.pipeline import _dumps, _jsonable

    obj = _jsonable({"a": np.array([1.0, 2.5e-7, np.nan, -3.0]), "s": "x [1,\n  2]", "n": {"m": [[1, 2], [3]]},
                     "f": np.float32(0.123456789), "i": np.int64(7), "e": []})
    assert obj["a"][2] is None and obj["f"] == 0.1234568 and obj["i"] == 7
    text = _dumps(obj)
    assert json.loads(text) == obj  # strings untouched, NaN as null
    assert '"a": [1.0, 2.5e-07, null, -3.0]' in text


# ------------------------------------------------------------------------------------ recovery pieces
def test_group_split_keeps_groups_together():
    rng = np.random.default_rng(5)
    groups = rng.random((40, 4))
    keys = np.repeat(groups, 3, axis=0)[rng.permutation(120)]
    s = rec_mod.group_split(keys, (0.6, 0.2, 0.2), seed=7)
    for g in groups:
        rows = np.all(keys == g, axis=1)
        assert len(set(s[rows])) == 1  # all draws of one intrinsic spectrum in one split
    assert [np.count_nonzero(s == k) // 3 for k in range(3)] == [24, 8, 8]
    np.testing.assert_array_equal(s, rec_mod.group_split(keys, (0.6, 0.2, 0.2), seed=7))
    assert not np.array_equal(s, rec_mod.group_split(keys, (0.6, 0.2, 0.2), seed=8))
    with pytest.raises(ValueError, match="only 2 distinct"):
        rec_mod.group_split(np.array([[1.0], [2.0], [2.0]]))
    with pytest.raises(ValueError, match="none for training"):
        rec_mod.group_split(np.arange(4.0), (0.2, 0.4, 0.4))


def test_pca_matches_covariance_eigenvectors():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(300, 40)) @ rng.normal(size=(40, 40)) + 5.0
    p = rec_mod.PCA(5).fit(x)
    np.testing.assert_allclose(p.components @ p.components.T, np.eye(5), atol=1e-12)
    evals, evecs = np.linalg.eigh(np.cov(x.T, bias=True))
    top = evecs[:, ::-1][:, :5]
    np.testing.assert_allclose(np.abs(np.sum(top * p.components.T, axis=0)), 1.0, atol=1e-8)
    np.testing.assert_allclose(p.explained_variance_ratio, evals[::-1][:5] / evals.sum(), rtol=1e-8)
    c = p.transform(x)
    np.testing.assert_allclose(c, (x - x.mean(0)) @ p.components.T, rtol=1e-12)


def test_label_scaler_round_trip():
    ranges = [(4000, 11000), (1000, 115000)]
    sc = rec_mod.LabelScaler(ranges, [False, True])
    y = np.array([[4000, 1000], [11000, 115000], [7500, np.sqrt(1000 * 115000)]])
    np.testing.assert_allclose(sc.forward(y), [[-1, -1], [1, 1], [0, 0]], atol=1e-12)
    np.testing.assert_allclose(sc.inverse(sc.forward(y)), y, rtol=1e-12)
    np.testing.assert_allclose(rec_mod.rmse(np.array([[1.0, 2], [3, 4]]), np.array([[0.0, 2], [0, 4]])),
                               [np.sqrt(5), 0.0])


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    """A random model, 'SYNSPEC' spectra = its own output + N(0, SIGMA²) at random labels, as a 6-label file."""
    from fastspec import Decoder

    d = tmp_path_factory.mktemp("evaluate")
    model_path = write_model(d / "small.fsm", random_decoder([32, 64], latent_dim=4), latent_dim=4)
    dec = Decoder.load(model_path)
    rng = np.random.default_rng(11)
    n_groups, draws = 30, 2
    lo = np.array([dec.label_ranges[k][0] for k in LABELS])
    hi = np.array([dec.label_ranges[k][1] for k in LABELS])
    labels = np.repeat(lo + (hi - lo) * rng.random((n_groups, 6)), draws, axis=0)
    labels[:, 2] = rng.uniform(0, 300, len(labels))  # each draw: its own v sin i and R
    labels[:, 5] = 10 ** rng.uniform(3, np.log10(115000), len(labels))
    clean = dec(labels)
    noise = SIGMA * rng.standard_normal(clean.shape)
    noisy = (clean + noise).astype(np.float32)
    data = d / "testset.h5"
    _write_h5(data, noisy, labels, LABELS)
    out = d / "report"
    metrics = evaluate(dec, data, out, recovery_options=TINY, progress=False, dpi=50, log=lambda *a: None)
    return {"dir": d, "model": model_path, "decoder": dec, "data": data, "out": out, "metrics": metrics,
            "labels": labels, "noisy": noisy, "residual": noisy.astype(np.float64) - clean}


def _write_h5(path, flux, labels, names, **attrs):
    with h5py.File(path, "w") as f:
        f.create_dataset("flux", data=flux, chunks=(1, flux.shape[1]), compression="gzip")
        ds = f.create_dataset("labels", data=labels)
        ds.attrs["names"] = list(names)
        f.attrs.update({"wavelength_start": 4450.0, "wavelength_step": 0.05, "n_pixels": flux.shape[1],
                        "wavelength_medium": "air", **attrs})


def test_end_to_end_numbers_match_the_known_noise(small_case):
    m = small_case["metrics"]
    px = m["pixels"]
    res = small_case["residual"]  # SYNSPEC − model here, the negative of the report's residual
    assert px["n_spectra"] == 60 and px["n_pixels_total"] == 60 * 19000
    assert px["abs_median"] == pytest.approx(0.6745 * SIGMA, rel=0.02)  # median of |N(0, σ²)|
    assert px["abs_mean"] == pytest.approx(np.sqrt(2 / np.pi) * SIGMA, rel=0.02)
    assert abs(px["residual_mean"]) < 5 * SIGMA / np.sqrt(px["n_pixels_total"])
    assert px["residual_mean"] == pytest.approx(-res.mean(), rel=1e-3, abs=1e-9)
    assert px["abs_percentiles"]["p99"] == pytest.approx(np.percentile(np.abs(res), 99), rel=3e-3)
    ps = m["per_spectrum"]
    np.testing.assert_allclose(ps["mean_abs"], np.abs(res).mean(axis=1), rtol=1e-5)
    assert ps["labels"]["teff"] == pytest.approx(small_case["labels"][:, 0].tolist())
    worst = m["worst_spectra"]
    assert worst[0]["mean_abs"] == pytest.approx(max(ps["mean_abs"])) and worst[0]["index"] == int(np.argmax(ps["mean_abs"]))
    for name in LABELS:
        marg = m["marginals"][name]
        filled = [c > 0 for c in marg["count"]]
        assert sum(marg["count"]) == 60 and any(filled)
        assert all(np.isfinite(v) for v, f in zip(marg["mean"], filled) if f)
        assert all(v is None for v, f in zip(marg["mean"], filled) if not f)  # empty bins: null, not 0
        assert np.isfinite(m["variance_explained"][name]["eta2"])
    assert len(m["heatmaps"]) == 15 and "teff__logg" in m["heatmaps"]
    assert sum(map(sum, m["heatmaps"]["teff__logg"]["count"])) == 60


def test_end_to_end_files(small_case):
    out = small_case["out"]
    for name in (*FIGURES, "report.md", "metrics.json", "per_pixel.npz"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["pixels"] == small_case["metrics"]["pixels"]
    md = (out / "report.md").read_text()
    for name in FIGURES:
        assert f"]({name})" in md  # every figure is linked from the report
    pp = np.load(out / "per_pixel.npz")
    np.testing.assert_allclose(pp["mean_residual"], -small_case["residual"].mean(axis=0), rtol=1e-4, atol=1e-7)


def test_end_to_end_recovery_finite(small_case):
    """The recovery stage runs end to end and reports every split (TINY options: 6 epochs on 42 spectra learn
    nothing -- measured test RMSEs at the predict-the-mean baseline; its skill is tested just below)."""
    rec = small_case["metrics"]["recovery"]
    assert rec["status"] == "ok"
    assert rec["epochs_run"] == TINY.epochs and rec["options"]["widths"] == [32, 16]
    assert sum(rec["split_sizes"].values()) == 60
    assert sum(rec["n_groups"].values()) == 30  # no intrinsic spectrum in two splits
    for split in ("train", "val", "test", "generated"):
        vals = rec["splits"][split]["rmse"]
        assert set(vals) == set(LABELS) and all(np.isfinite(v) and v >= 0 for v in vals.values()), split
    assert rec["splits"]["generated"]["n"] == rec["splits"]["test"]["n"]


def test_recovery_learns_a_known_map(test_seed):
    """run_recovery on PCA coefficients that are a known smooth function of the labels: the regressor must beat
    the predict-the-mean baseline by far on held-out spectra, and noise-free inputs must do at least as well
    as noisy ones. Measured (4 seeds): test RMSE / baseline 0.04-0.16 (R, in log10, the highest); bound 0.3."""
    rng = np.random.default_rng(test_seed)
    ranges = [(4000.0, 11000.0), (2.0, 5.0), (0.0, 300.0), (-1.5, 1.5), (0.0, 4.0), (1000.0, 115000.0)]
    scaler = rec_mod.LabelScaler(ranges, [False] * 5 + [True])
    a = rng.normal(size=(6, 12))
    sizes = {"train": 400, "val": 80, "test": 80}
    labels, coeffs = {}, {}
    for key, n in sizes.items():
        u = rng.uniform(-1, 1, (n, 6))
        labels[key] = scaler.inverse(u)
        coeffs[key] = 3.0 * (u @ a)  # linear, well above the added noise (sigma 1/SNR <= 0.2)
    labels["generated"], coeffs["generated"] = labels["test"], coeffs["test"]
    opts = RecoveryOptions(n_components=12, widths=(64, 32), epochs=60, noise_draws=2, batch_size=64, patience=100,
                           seed=int(rng.integers(1 << 30)))
    rec = rec_mod.run_recovery(coeffs, labels, scaler, opts, LABELS, log=lambda *a: None)
    assert rec["status"] == "ok"
    ratio = {n: rec["splits"]["test"]["rmse"][n] / rec["baseline_test_rmse_predict_mean"][n] for n in LABELS}
    print("test RMSE / predict-the-mean RMSE:", {n: round(v, 3) for n, v in ratio.items()})
    assert all(v < 0.3 for v in ratio.values()), ratio
    for n in LABELS:
        assert rec["splits"]["test"]["rmse_noise_free"][n] <= 1.05 * rec["splits"]["test"]["rmse"][n] + 1e-9, n
    assert rec["splits"]["generated"]["rmse"] == rec["splits"]["test"]["rmse"]  # same spectra, same noise


def test_labels_are_read_by_name(small_case, tmp_path):
    perm = [5, 2, 0, 4, 1, 3]
    data = tmp_path / "permuted.h5"
    _write_h5(data, small_case["noisy"], small_case["labels"][:, perm], [LABELS[i] for i in perm])
    m = evaluate(small_case["decoder"], data, tmp_path / "r", recovery=False, progress=False, dpi=40,
                 log=lambda *a: None)
    np.testing.assert_allclose(m["per_spectrum"]["mean_abs"], small_case["metrics"]["per_spectrum"]["mean_abs"],
                               rtol=1e-12)
    assert "disabled" in m["recovery"]["status"]


def test_report_texts_follow_the_grid(tmp_path):
    """A 40 Å model of 0.1 Å pixels: the report counts its 400 pixels (not 19000), bins them in 1 Å (10 pixels, not
    20 of 0.05 Å: metrics' per_pixel_1A agrees) and zooms on 19 Å of it (about half the grid, not 30 Å)."""
    from fastspec import Decoder

    from fastspec.evaluate import figures

    path = write_model(tmp_path / "short.fsm", random_decoder([16], latent_dim=4, n_pixels=400), latent_dim=4,
                       wavelength=(4450.0, 0.1, 400, "air"))
    dec = Decoder.load(path)
    rng = np.random.default_rng(2)
    lo = np.array([dec.label_ranges[k][0] for k in LABELS])
    hi = np.array([dec.label_ranges[k][1] for k in LABELS])
    labels = lo + (hi - lo) * rng.random((12, 6))
    flux = (dec(labels) + SIGMA * rng.standard_normal((12, 400))).astype(np.float32)
    _write_h5(tmp_path / "t.h5", flux, labels, LABELS, wavelength_step=0.1)
    m = evaluate(dec, tmp_path / "t.h5", tmp_path / "r", recovery=False, progress=False, dpi=40, log=lambda *a: None)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "over the 400 pixels of one spectrum (4450.00–4489.90 Å)" in md and "19000" not in md
    assert "blue: 1 Å bins" in md and "a 19 Å zoom" in md and "30 Å" not in md
    assert len(m["per_pixel_1A"]["wavelength"]) == 40
    wl = 4450.0 + 0.1 * np.arange(400)
    lo_z, hi_z = figures._zoom_window(wl, np.ones(400), np.zeros(400))
    assert hi_z - lo_z == pytest.approx(19.0) and wl[0] <= lo_z and hi_z <= wl[-1] + 1e-9


def test_operator_floor_reported_apart(small_case, tmp_path):
    """A test set with `perfect_decoder` (fastspec-train testset on fine-mesh data): the model's error and the floor
    are reported side by side, by subset; the floor's numbers are those of perfect_decoder against flux."""
    clean = small_case["decoder"](small_case["labels"])
    floor = (clean + 0.5 * (small_case["noisy"] - clean)).astype(np.float32)  # half the model's error, exactly
    data = tmp_path / "floor.h5"
    _write_h5(data, small_case["noisy"], small_case["labels"], LABELS, truth="reference: a test")
    with h5py.File(data, "a") as f:
        f["perfect_decoder"] = floor
    m = evaluate(small_case["decoder"], data, tmp_path / "r", recovery=False, progress=False, dpi=30,
                 log=lambda *a: None)
    assert m["truth"] == "reference: a test"
    rows = {r["subset"]: r for r in m["operator_floor"]["subsets"]}
    want = np.abs(floor.astype(np.float64) - small_case["noisy"]).mean(axis=1)
    assert rows["all"]["n"] == 60 and rows["all"]["floor_median"] == pytest.approx(np.median(want), rel=1e-5)
    assert rows["all"]["floor_median"] == pytest.approx(0.5 * rows["all"]["model_median"], rel=1e-3)
    assert "v sin i < 50, R > 20000" in rows or not ((small_case["labels"][:, 2] < 50) & (small_case["labels"][:, 5] > 2e4)).any()
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## 0. The model's error and the operator's floor" in md and "Truth: reference: a test." in md
    assert small_case["metrics"]["operator_floor"] is None  # a test set without one: nothing claimed
    with h5py.File(data, "a") as f:
        del f["perfect_decoder"]
        f["perfect_decoder"] = floor[:, :100]
    with pytest.raises(DataError, match="'perfect_decoder' has shape"):
        evaluate(small_case["decoder"], data, tmp_path / "r2", recovery=False, progress=False, log=lambda *a: None)


def test_recovery_split_groups_by_source_rows(small_case, tmp_path):
    """With `source_rows` (as fastspec-train testset writes), draws of one star share a split even when
    their intrinsic labels differ in the last digits."""
    labels = small_case["labels"].copy()
    labels[1::2, [0, 1, 3, 4]] *= 1 + 1e-9  # the second draw of each star: not equal by label any more
    data = tmp_path / "sources.h5"
    _write_h5(data, small_case["noisy"], labels, LABELS)
    with h5py.File(data, "a") as f:
        f["source_rows"] = np.repeat(np.arange(30), 2)
    m = evaluate(small_case["decoder"], data, tmp_path / "r", recovery_options=TINY, progress=False, dpi=30,
                 log=lambda *a: None)
    rec = m["recovery"]
    assert rec["grouped_by"] == "source_rows" and sum(rec["n_groups"].values()) == 30


def test_four_label_file_is_refused_with_instructions(small_case, tmp_path):
    data = tmp_path / "intrinsic.h5"
    _write_h5(data, small_case["noisy"][:3], small_case["labels"][:3][:, [0, 1, 3, 4]], ["teff", "logg", "mh", "vmic"])
    with pytest.raises(DataError, match="intrinsic spectra with the 4 labels") as e:
        evaluate(small_case["decoder"], data, tmp_path / "r", progress=False)
    assert "fastspec-train testset" in str(e.value) and "broadened" in str(e.value)


def test_wrong_grid_is_refused(small_case, tmp_path):
    data = tmp_path / "shifted.h5"
    _write_h5(data, small_case["noisy"][:3], small_case["labels"][:3], LABELS, wavelength_start=4450.05)
    with pytest.raises(DataError, match="wavelength grid"):
        evaluate(small_case["decoder"], data, tmp_path / "r", progress=False)
    with pytest.raises(DataError, match="no such file"):
        evaluate(small_case["decoder"], tmp_path / "missing.h5", tmp_path / "r", progress=False)


def test_recovery_skipped_without_torch(small_case, tmp_path, monkeypatch):
    def no_torch():
        raise rec_mod.TorchMissing("parameter recovery needs torch (pip install 'fastspec[train]')")

    monkeypatch.setattr(rec_mod, "_import_torch", no_torch)
    out = tmp_path / "r"
    m = evaluate(small_case["decoder"], small_case["data"], out, max_spectra=40, progress=False, dpi=40,
                 log=lambda *a: None)
    assert m["recovery"]["status"].startswith("skipped") and "torch" in m["recovery"]["status"]
    assert "torch" in (out / "report.md").read_text() and not (out / "recovery_table.png").exists()
    assert (out / "marginals.png").exists() and m["pixels"]["n_spectra"] == 40


def test_cli_subcommand(small_case, tmp_path, capsys):
    """Through `fastspec`'s own parser (fastspec.cli.main), so the subcommand cannot vanish unnoticed; the
    installed console script is checked in test_installed.py."""
    from fastspec.cli import build_parser, main

    parser = build_parser()
    out = tmp_path / "cli"
    argv = ["evaluate", "--model", str(small_case["model"]), "--data", str(small_case["data"]),
            "--out", str(out), "--no-recovery", "--quiet", "--dpi", "40", "--bins", "5"]
    assert main(argv) == 0
    assert "median |dF|" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["marginals"]["teff"]["count"]) == 5
    args = parser.parse_args(["evaluate", "--data", str(tmp_path / "none.h5"), "--out", str(out),
                              "--model", str(small_case["model"]), "--recovery-widths", "64-8"])
    assert args.recovery_widths == (64, 8)
    assert args.func(args) == 1 and "no such file" in capsys.readouterr().err  # a data error: 1, as the other commands

"""Accuracy regression of the shipped model (python/fastspec/data/default.fsm) on SYNSPEC spectra it never saw.

Measured as training/fastspec_train/accuracy.py measures it, against SYNSPEC on its own terms: the shared fine-mesh
set (../shared/data/synspec_fine_v4.h5, turned into the builder's layout by `fastspec-grid from-fine`; never
trained on), each star's 0.005 Å mesh broadened by the float64 reference at seeded stratified (v sin i, R) draws
and sampled at the pixel centres; the model at z = 0 through the C++ core; |ΔF| over the pixels more than 30 Å
from the ends -- on a small fixed subset (the first stars of the split its provenance's settings give) so that it
takes seconds (the conversion about 20 s). That set's enhancement-factor lines keep SYNSPEC's classical damping,
which the builder now converts: part of the measured error is that physics difference, not the network.

The thresholds live in ONE place, tests/shipped_model_accuracy.json (with the measurement they come from and the
model's sha256). When default.fsm is replaced, this test fails until the file is re-measured:

    python tests/test_shipped_model.py --update      # refuses a model worse than the current thresholds

which records the new model's numbers and thresholds = measured x margin. Thresholds only ever go down unless
--allow-worse is given on purpose.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SPEC_PATH = HERE / "shipped_model_accuracy.json"
METRICS = ("median_abs_dF", "per_spectrum_mean_abs_dF_p95", "per_spectrum_mean_abs_dF_max")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def measure(model_path: Path, data_path: Path, n_stars: int, draws: int, seed: int, edge: float) -> dict:
    """The accuracy of model_path on the first n_stars of its test split, with accuracy.py's own functions."""
    from fastspec_train.accuracy import broadened_test_set, error_stats, kept_pixels, z0_predictor

    sf, rows, labels, truth, prov, _, _ = broadened_test_set(model_path, data_path, draws, seed, "test", max_stars=n_stars)
    predict, _ = z0_predictor(model_path)
    keep = kept_pixels(sf, edge)
    stats = error_stats(np.abs(predict(labels)[:, keep] - truth[:, keep]))
    return {**{k: stats[k] for k in METRICS}, "n_spectra": stats["n_spectra"],
            "split_seed": prov["split"]["split_seed"], "test_rows": [int(r) for r in rows[::draws]]}


def _paths(spec: dict, workdir: Path) -> tuple[Path, Path]:
    """The shipped model and the data file measured on (a fine-mesh file converted into workdir first)."""
    from conftest import shared_file

    import fastspec

    data = shared_file(spec["data"])
    if spec.get("convert") == "from-fine":
        from fastspec_train.grid.build import STANDARD_GRID
        from fastspec_train.grid.fine import from_fine

        converted = workdir / (data.stem + "_pixel.h5")
        from_fine(data, converted, STANDARD_GRID)
        data = converted
    return fastspec.default_model_path(), data


def test_shipped_model_accuracy(tmp_path):
    spec = json.loads(SPEC_PATH.read_text())
    model, data = _paths(spec, tmp_path)
    sha = _sha256(model)
    assert sha == spec["model_sha256"], (
        f"{model} is not the model {SPEC_PATH.name} was measured on (sha256 {sha[:12]} vs {spec['model_sha256'][:12]}): "
        f"re-measure with `python tests/test_shipped_model.py --update` (it refuses a worse model) and commit the JSON")
    got = measure(model, data, spec["n_test_stars"], spec["draws"], spec["seed"], spec["edge_angstrom"])
    print("shipped model on", got["n_spectra"], "held-out spectra:", {k: f"{got[k]:.3e}" for k in METRICS})
    assert got["test_rows"] == spec["measured"]["test_rows"], "the test split changed (data file or split settings)"
    for k in METRICS:
        assert got[k] <= spec["max"][k], f"{k} = {got[k]:.3e} > {spec['max'][k]:.3e} ({SPEC_PATH.name})"


def _update(allow_worse: bool) -> int:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "training"))
    import tempfile

    spec = json.loads(SPEC_PATH.read_text())
    model, data = _paths(spec, Path(tempfile.mkdtemp(prefix="fastspec-shipped-")))
    got = measure(model, data, spec["n_test_stars"], spec["draws"], spec["seed"], spec["edge_angstrom"])
    new_max = {k: float(f"{got[k] * spec['margin']:.3g}") for k in METRICS}
    worse = [k for k in METRICS if got[k] > spec["max"][k]]
    print(json.dumps({k: got[k] for k in METRICS}, indent=1))
    if worse and not allow_worse:
        print(f"REFUSED: {model} is worse than the current thresholds on {worse}; pass --allow-worse to accept it",
              file=sys.stderr)
        return 1
    spec.update(model_sha256=_sha256(model), measured=got, max=new_max)
    SPEC_PATH.write_text(json.dumps(spec, indent=1) + "\n")
    print(f"wrote {SPEC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(_update("--allow-worse" in sys.argv[1:]) if "--update" in sys.argv[1:] else print(__doc__))

"""Score training runs against each other on the validation split: `python -m fastspec_train.ablation RUN... --out DIR`.

Each run's best weights are exported (float32) and scored like the final model (`accuracy.accuracy_report`:
the C++ core at z = 0 against the SYNSPEC spectra broadened in float64, pixels more than 30 Å from the ends),
but on the validation split, so the test split stays untouched for the shipped model's numbers. Writes
ablation.json and ablation.md (a table: median |ΔF| and per-spectrum p95 over the full ranges and by v sin i
and R, training minutes and epochs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from .accuracy import accuracy_report
from .export import export_run


def score(run: Path, draws: int, seed: int) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    history = json.loads((run / "history.json").read_text())
    cache = run / f"ablation_val_{draws}_{seed}.json"  # a finished run's score does not change
    if cache.is_file() and json.loads(cache.read_text()).get("best_epoch") == summary["best_epoch"]:
        return json.loads(cache.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        model = export_run(run, Path(tmp) / "m.fsm", weight_dtype="f32")
        report = accuracy_report(model, None, Path(tmp) / "acc", draws=draws, seed=seed, split="val")
    cfg = summary["config"]
    result = {"run": run.name, "target": cfg["model"]["target"], "decoder": cfg["model"]["decoder"],
            "autocast": cfg["train"]["autocast"], "line_weight": cfg["train"]["line_weight"],
            "epochs": summary["epochs"], "best_epoch": summary["best_epoch"],
            "minutes": round(sum(h["seconds"] for h in history) / 60, 1), "report": report}
    cache.write_text(json.dumps(result, indent=1))
    return result


def markdown(rows: list[dict]) -> str:
    bins = list(rows[0]["report"]["by_vsini"]) + list(rows[0]["report"]["by_resolution"])
    head = ("| run | target | decoder | minutes (epochs) | median \\|ΔF\\| | p95 per-spectrum mean | v sin i < 50, R > 20000 | "
            + " | ".join(f"v sin i {b}" for b in rows[0]["report"]["by_vsini"]) + " | "
            + " | ".join(f"R {b}" for b in rows[0]["report"]["by_resolution"]) + " |")
    lines = [head, "|" + "---|" * (7 + len(bins))]
    for r in rows:
        rep = r["report"]
        slow = rep["vsini_below_50_R_above_20000"]
        cells = [r["run"], r["target"], "-".join(map(str, r["decoder"])), f"{r['minutes']} ({r['epochs']})",
                 f"{rep['overall']['median_abs_dF']:.2e}", f"{rep['overall']['per_spectrum_mean_abs_dF_p95']:.2e}",
                 f"{slow['median_abs_dF']:.2e}" if slow else "–"]
        cells += [f"{s['median_abs_dF']:.2e}" for s in rep["by_vsini"].values()]
        cells += [f"{s['median_abs_dF']:.2e}" for s in rep["by_resolution"].values()]
        lines.append("| " + " | ".join(cells) + " |")
    r0 = rows[0]["report"]
    return (f"Validation split of `{r0['data']}`: {r0['n_test_stars']} stars × {r0['draws_per_star']} (v sin i, R) "
            f"draws (seed {r0['seed']}), z = 0, pixels more than {r0['edge_angstrom']:g} Å from the ends; bins give the "
            "median |ΔF|.\n\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastspec_train.ablation", description=__doc__)
    p.add_argument("runs", nargs="+", type=Path, help="run folders written by fastspec-train train")
    p.add_argument("--out", required=True, type=Path, help="folder for ablation.json and ablation.md")
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--seed", type=int, default=2027)
    a = p.parse_args(argv)
    rows = [score(run, a.draws, a.seed) for run in a.runs if (run / "summary.json").is_file()]
    if not rows:
        p.error("no finished runs (summary.json) among " + ", ".join(map(str, a.runs)))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ablation.json").write_text(json.dumps(rows, indent=1))
    (a.out / "ablation.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Export the decoder of a trained CVAE to the flat model file of the C++ core (docs/model-format.md).

Only the decoder travels: its Linear layers (ReLU hidden, sigmoid last), the output transform the model
used in training (flux = output_scale·sigmoid(a) + output_offset), the six standard labels with the
normalisation training used (fastspec.model_format.STANDARD_LABELS), the wavelength grid of the training
data, and provenance (data file + SHA-256, config, epochs, validation loss, git revision, versions).
"""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
from pathlib import Path

import numpy as np
import torch

from fastspec import model_format as mf
from .broadening import EPSILON
from .config import from_dict
from .labels import LABEL_NAMES, STANDARD_LABELS
from .model import Decoder


def git_revision(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def decoder_layers(decoder: Decoder) -> list:
    n = len(decoder.layers)
    return [mf.Layer(layer.weight.detach().cpu().numpy().astype(np.float32),
                     layer.bias.detach().cpu().numpy().astype(np.float32),
                     "sigmoid" if k == n - 1 else "relu") for k, layer in enumerate(decoder.layers)]


def export_decoder(decoder: Decoder, path: str | Path, *, weight_dtype: str = "f32",
                   wavelength: tuple[float, float, int, str] | None = None, provenance: dict | None = None) -> Path:
    """Write `decoder` as a model file. The decoder must take [z, 6 standard labels] (normalised)."""
    n_pixels = decoder.layers[-1].out_features
    if decoder.layers[0].in_features != decoder.latent + len(STANDARD_LABELS):
        raise ValueError(f"decoder takes {decoder.layers[0].in_features} inputs, expected latent "
                         f"{decoder.latent} + {len(STANDARD_LABELS)} labels")
    if wavelength is None:
        wavelength = mf.STANDARD_WAVELENGTH
    if wavelength[2] != n_pixels:
        raise ValueError(f"decoder has {n_pixels} outputs but the wavelength grid has {wavelength[2]} pixels")
    prov = {"labels": list(LABEL_NAMES), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__, "git_revision": git_revision(),
            "broadening": f"rotation (Gray profile, linear limb darkening eps={EPSILON}, half-width lambda*vsini/c) "
                          "then Gaussian FWHM = lambda/R, on the native grid (fastspec_train.broadening)",
            **(provenance or {})}
    return mf.write_model(path, decoder_layers(decoder), latent_dim=decoder.latent, labels=STANDARD_LABELS,
                          weight_dtype=weight_dtype, wavelength=tuple(wavelength), output_scale=decoder.output_scale,
                          output_offset=decoder.output_offset, provenance=prov)


def load_run_decoder(run: str | Path, which: str = "best") -> tuple[Decoder, dict, dict]:
    """(decoder, config dict, checkpoint state) of a run folder."""
    run = Path(run)
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    weights = ckpt["model"] if which == "last" else torch.load(run / "best.pt", map_location="cpu", weights_only=False)["model"]
    cfg = from_dict(ckpt["config"])
    n_pixels = weights["decoder.layers.%d.weight" % (len(cfg.model.decoder))].shape[0]
    dec = Decoder(cfg.model.latent, len(LABEL_NAMES), cfg.model.decoder, n_pixels, cfg.model.output_scale,
                  cfg.model.output_offset)
    dec.load_state_dict({k[len("decoder."):]: v for k, v in weights.items() if k.startswith("decoder.")})
    return dec.eval(), ckpt["config"], ckpt


def export_run(run: str | Path, out: str | Path, *, weight_dtype: str = "f32", which: str = "best") -> Path:
    from .data import SpectraFile, sha256_file

    run = Path(run)
    dec, cfg, ckpt = load_run_decoder(run, which)
    state = ckpt["state"]
    data_path = Path(ckpt["data"])
    sf = SpectraFile(data_path)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    sha = summary.get("data_sha256") or sha256_file(data_path)
    best_epoch = state["best_epoch"] if which == "best" else state["epoch"]
    hist = {h["epoch"]: h for h in state["history"]}
    prov = {"training_data": {"path": str(data_path), "sha256": sha, "n_spectra": sf.n},
            "split": {"val_fraction": cfg["data"]["val_fraction"], "test_fraction": cfg["data"]["test_fraction"],
                      "split_seed": cfg["data"]["split_seed"], "max_spectra": cfg["data"]["max_spectra"],
                      "sizes": ckpt.get("split_sizes")},
            "config": cfg, "epochs": state["epoch"], "weights_epoch": best_epoch, "weights": which,
            "val_reconstruction_mse": hist.get(best_epoch, {}).get("val_mse"),
            "val_reconstruction_mse_z0": hist.get(best_epoch, {}).get("val_mse_z0"),
            "val_mae_z0": hist.get(best_epoch, {}).get("val_mae_z0"),
            "training_seconds": state.get("elapsed_s"), "weight_dtype": weight_dtype}
    try:
        from importlib.metadata import version
        prov["fastspec_version"] = version("fastspec")
    except Exception:
        prov["fastspec_version"] = "unknown"
    wl = (sf.wavelength_start, sf.wavelength_step, sf.n_pixels, sf.wavelength_medium)
    return export_decoder(dec, out, weight_dtype=weight_dtype, wavelength=wl, provenance=prov)

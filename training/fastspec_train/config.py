"""Training configuration: a TOML file (training/configs/*.toml) read into nested dataclasses.

Every key has a default here; a config file overrides what it names, and unknown keys are an error (a typo
must not silently train the wrong model).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

# training/configs in a source checkout; fastspec_train/configs inside an installed wheel.
CONFIG_DIR = next((d for d in (Path(__file__).resolve().parents[1] / "configs", Path(__file__).resolve().parent / "configs")
                   if d.is_dir()), Path(__file__).resolve().parents[1] / "configs")


@dataclass
class DataConfig:
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 20261125  # the split depends on this and the labels only, never on the row order
    memory_limit_mb: float = 4096.0  # load the training flux into memory when it fits, else stream
    block_spectra: int = 4096  # streaming: spectra read per block (shuffled within the block)
    draws_per_epoch: int = 8  # (vsini, R) draws per training spectrum per epoch
    val_draws: int = 4  # fixed (seeded) draws per validation spectrum
    max_spectra: int = 0  # use only the first N rows of the file (0 = all); for tests


@dataclass
class SamplingConfig:
    vsini_max: float = 300.0
    vsini_low_fraction: float = 0.3  # this fraction of draws is uniform in [0, vsini_low_max] ...
    vsini_low_max: float = 30.0  # ... because the spectra change fastest at small v sin i
    resolution_min: float = 1000.0  # R is log-uniform in [resolution_min, resolution_max]
    resolution_max: float = 115000.0


@dataclass
class BroadeningConfig:
    epsilon: float = 0.6
    segments: int = 8


@dataclass
class ModelConfig:
    # "intrinsic": the network maps (z, teff, logg, mh, vmic) to the spectrum at v sin i = 0, R = ∞ and the
    # inference core applies rotation and the instrumental Gaussian exactly (model file format v2).
    # "broadened": the paper's CVAE on all six labels, learning the broadening from augmented draws.
    target: str = "broadened"  # the presets say which; checkpoints written before v2 had no target
    encoder: list[int] = field(default_factory=lambda: [512, 256])
    latent: int = 16
    decoder: list[int] = field(default_factory=lambda: [256, 512, 1024])
    encoder_activation: str = "relu"  # relu, gelu, elu, leaky_relu, tanh
    decoder_activation: str = "relu"  # the model file supports ReLU hidden layers only
    output_scale: float = 1.05  # flux = output_scale * sigmoid(a) + output_offset
    output_offset: float = 0.0
    # Start the decoder's weights on z at zero: the labels alone explain a SYNSPEC spectrum, and random weights
    # on a sampled z would add noise to every output from the first step on (z still trains from there).
    zero_init_latent: bool = False


@dataclass
class TrainConfig:
    batch_size: int = 512
    lr: float = 1e-3
    beta: float = 1.0  # loss = MSE (mean over pixels) + beta * KL (sum over latent dims) / n_pixels
    kl_warmup_epochs: int = 0  # beta ramps linearly from 0 over this many epochs
    # [[epoch, beta], ...]: from that epoch on, beta takes the new value (e.g. a larger beta late in training
    # makes z uninformative, so the decoder at z = 0 — what ships — is what the loss optimises).
    beta_steps: list = field(default_factory=list)
    # Cosine annealing of the LR from its value at anneal_start_epoch down to min_lr at anneal_end_epoch
    # (overrides the plateau schedule in that window; 0 = off). Epoch-based, so resume stays exact.
    anneal_start_epoch: int = 0
    anneal_end_epoch: int = 0
    # Cosine annealing over wall time instead: from the LR at the start down to min_lr at anneal_minutes of
    # training (0 = off). Fits a CPU budget on a machine whose epoch times vary; a resumed run continues from
    # the elapsed time in its checkpoint, so it is not bit-identical to an uninterrupted one.
    anneal_minutes: float = 0.0
    warmup_epochs: int = 0  # with anneal_minutes: the LR ramps up linearly over the first epochs
    # Start from the model weights of this checkpoint (an earlier run's best.pt; same architecture) with a fresh
    # optimizer: a second training stage, e.g. on more data. "" = random initialisation.
    init_from: str = ""
    # Warm restarts after that: [[start_epoch, end_epoch, peak_lr], ...], cosine from peak_lr to min_lr.
    lr_restarts: list = field(default_factory=list)
    scheduler: str = "plateau"  # plateau | cosine | none
    plateau_factor: float = 0.5
    plateau_patience: int = 8
    min_lr: float = 1e-6
    max_epochs: int = 200
    patience: int = 25  # early stopping on the validation metric
    min_delta: float = 0.0  # relative improvement needed to count as better
    early_stopping_metric: str = "val_mse_z0"  # val_mse_z0 (decoder at z = 0) | val_mse (z = posterior mean)
    max_minutes: float = 0.0  # stop gracefully after this much training wall time (0 = no limit)
    # Mixed precision: "bf16" runs the forward pass under torch.autocast(bfloat16) (weights, optimizer and
    # loss stay float32); "off" is plain float32.
    autocast: str = "off"
    # Weight of each pixel in the reconstruction loss: 1 + line_weight * (1 - mean training flux), so line
    # pixels (where the errors are) count more than the continuum; 0 = plain MSE.
    line_weight: float = 0.0
    # Fraction of each batch decoded at z = 0 (the shipped decoder) instead of z ~ q(z | x, labels). The rest of
    # the batch is the CVAE as before (encoder, reparameterised z, KL). With a collapsed posterior, sampled z is
    # pure N(0, 1) noise at the decoder's input; the z = 0 rows train what ships without it, and skip the
    # encoder (about half a training step's cost when every row is encoded). 0 = the paper's CVAE.
    z0_fraction: float = 0.0
    grad_clip: float = 0.0
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 1234


@dataclass
class Config:
    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    broadening: BroadeningConfig = field(default_factory=BroadeningConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fill(cls, values: dict, where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(names)
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in [{where}]; known: {sorted(names)}")
    kwargs = dict(values)
    return cls(**kwargs)


def from_dict(d: dict) -> Config:
    cfg = Config()
    for key, val in d.items():
        if key == "name":
            cfg.name = str(val)
        elif key in ("data", "sampling", "broadening", "model", "train"):
            sub = getattr(cfg, key)
            setattr(cfg, key, _fill(type(sub), {**dataclasses.asdict(sub), **val}, key))
        else:
            raise ValueError(f"unknown section {key!r} in config; known: name, data, sampling, broadening, model, train")
    validate(cfg)
    return cfg


def load_config(path_or_name: str | Path) -> Config:
    """Read a TOML config; a bare name (e.g. 'tiny') means training/configs/<name>.toml."""
    path = Path(path_or_name)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{path_or_name}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found (presets: {sorted(p.stem for p in CONFIG_DIR.glob('*.toml'))})")
    with open(path, "rb") as fh:
        return from_dict(tomllib.load(fh))


def with_overrides(cfg: Config, assignments: list[str]) -> Config:
    """A copy of cfg with `section.key=value` assignments applied (value parsed as TOML, bare words as strings),
    e.g. ["train.autocast=bf16", "model.decoder=[512, 1024]"]; validated like a file."""
    d = cfg.to_dict()
    for item in assignments:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in d or not isinstance(d[section], dict):
            raise ValueError(f"override {item!r} must look like section.key=value with a section of {sorted(d)}")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        d[section][name.strip()] = value
    return from_dict(d)


def validate(cfg: Config) -> None:
    m, t, d, s = cfg.model, cfg.train, cfg.data, cfg.sampling
    if m.target not in ("intrinsic", "broadened"):
        raise ValueError(f"model.target must be 'intrinsic' or 'broadened', got {m.target!r}")
    if m.decoder_activation != "relu":
        raise ValueError("model.decoder_activation must be 'relu': the model file format has ReLU hidden layers only")
    if m.latent < 1 or not m.encoder or not m.decoder or min(m.encoder + m.decoder) < 1:
        raise ValueError("model needs latent >= 1 and non-empty encoder/decoder widths >= 1")
    if m.output_scale <= 0:
        raise ValueError("model.output_scale must be > 0")
    if t.batch_size < 1 or t.lr <= 0 or t.beta < 0:
        raise ValueError("train needs batch_size >= 1, lr > 0, beta >= 0")
    if any(len(step) != 2 or step[0] < 1 or step[1] < 0 for step in t.beta_steps):
        raise ValueError("train.beta_steps must be [[epoch >= 1, beta >= 0], ...]")
    if t.anneal_end_epoch and not (1 <= t.anneal_start_epoch < t.anneal_end_epoch):
        raise ValueError("train: need 1 <= anneal_start_epoch < anneal_end_epoch")
    if t.warmup_epochs < 0 or (t.warmup_epochs and t.anneal_minutes <= 0):
        raise ValueError(f"train.warmup_epochs (got {t.warmup_epochs}) must be >= 0 and applies to the anneal_minutes "
                         "schedule only: set train.anneal_minutes too")
    if any(len(r) != 3 or not (1 <= r[0] < r[1]) or r[2] <= 0 for r in t.lr_restarts):
        raise ValueError("train.lr_restarts must be [[start_epoch >= 1, end_epoch > start, peak_lr > 0], ...]")
    if t.scheduler not in ("plateau", "cosine", "none"):
        raise ValueError(f"train.scheduler must be plateau, cosine or none, got {t.scheduler!r}")
    if t.anneal_minutes < 0 or (t.anneal_minutes > 0 and t.anneal_end_epoch):
        raise ValueError("train.anneal_minutes must be >= 0, and not combined with anneal_end_epoch")
    if t.autocast not in ("off", "bf16"):
        raise ValueError(f"train.autocast must be 'off' or 'bf16', got {t.autocast!r}")
    if not 0.0 <= t.z0_fraction < 1.0:
        raise ValueError("train.z0_fraction must be in [0, 1): some rows must train the encoder")
    if t.line_weight < 0:
        raise ValueError("train.line_weight must be >= 0")
    if t.early_stopping_metric not in ("val_mse_z0", "val_mse"):
        raise ValueError("train.early_stopping_metric must be val_mse_z0 or val_mse")
    if not (0 <= d.val_fraction < 1 and 0 <= d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1):
        raise ValueError("data.val_fraction and data.test_fraction must be in [0, 1) and sum to < 1")
    if not (0 <= s.vsini_low_fraction <= 1 and 0 < s.vsini_low_max <= s.vsini_max):
        raise ValueError("sampling: need 0 <= vsini_low_fraction <= 1 and 0 < vsini_low_max <= vsini_max")
    if not (0 < s.resolution_min < s.resolution_max):
        raise ValueError("sampling: need 0 < resolution_min < resolution_max")

"""Parameter recovery (the paper's Table 3): can a label regressor trained on SYNSPEC spectra read the
labels off model-generated spectra as well as off SYNSPEC spectra it has never seen?

PCA to 25 components (NumPy SVD, fitted on the training split) + a dense ReLU network
(5000-2000-1000-64 → 6 by default), Adamax, MSE on labels normalised to [−1, 1], batch 1024, Gaussian
noise at an SNR drawn per spectrum from U(5, 300). torch is imported lazily here only: the inference
package must work without it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


class TorchMissing(RuntimeError):
    pass


@dataclass
class RecoveryOptions:
    n_components: int = 25
    widths: tuple[int, ...] = (5000, 2000, 1000, 64)
    epochs: int = 100
    batch_size: int = 1024
    lr: float = 2e-3  # torch's Adamax default
    noise_draws: int = 4  # noisy copies of each training spectrum per epoch
    snr_range: tuple[float, float] = (5.0, 300.0)
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train / validation / test
    patience: int = 20  # epochs without validation improvement before stopping early
    seed: int = 0
    threads: int = 1
    extra: dict = field(default_factory=dict)


def group_split(group_keys: np.ndarray, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> np.ndarray:
    """Assign each row to split 0 (train), 1 (validation) or 2 (test), whole groups at a time.

    Rows with identical keys (draws of v sin i and R of one intrinsic spectrum: same teff, logg, mh,
    vmic) always land in the same split, so no intrinsic spectrum leaks from training into the test.
    """
    keys = np.ascontiguousarray(np.asarray(group_keys, dtype=np.float64))
    if keys.ndim == 1:
        keys = keys[:, None]
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    n_groups = int(inverse.max()) + 1
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or np.any(f < 0) or not np.isclose(f.sum(), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    if n_groups < 3:
        raise ValueError(f"only {n_groups} distinct intrinsic spectra: cannot split into train/validation/test")
    order = np.random.default_rng(seed).permutation(n_groups)
    n_val = max(1, int(round(f[1] * n_groups)))
    n_test = max(1, int(round(f[2] * n_groups)))
    group_split_of = np.zeros(n_groups, dtype=np.int64)
    group_split_of[order[:n_val]] = 1
    group_split_of[order[n_val:n_val + n_test]] = 2
    if n_val + n_test >= n_groups:
        raise ValueError(f"{n_groups} intrinsic spectra leave none for training with split fractions {tuple(f)}")
    return group_split_of[inverse]


class PCA:
    """Principal components by thin SVD of the mean-centred training spectra."""

    def __init__(self, n_components: int):
        self.n_components = n_components

    def fit(self, x: np.ndarray) -> "PCA":
        x = np.asarray(x, dtype=np.float64)
        k = min(self.n_components, x.shape[0], x.shape[1])
        self.mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.components = vt[:k]  # (k, n_pixels), orthonormal rows
        self.explained_variance_ratio = (s[:k] ** 2) / np.sum(s**2)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T


class LabelScaler:
    """Physical labels ↔ [−1, 1] over the model's label ranges (log10 for labels the model takes in log)."""

    def __init__(self, ranges: list[tuple[float, float]], log: list[bool]):
        self.log = np.asarray(log, dtype=bool)
        lo = np.array([r[0] for r in ranges], dtype=np.float64)
        hi = np.array([r[1] for r in ranges], dtype=np.float64)
        lo = np.where(self.log, np.log10(np.where(self.log, lo, 1.0)), lo)
        hi = np.where(self.log, np.log10(np.where(self.log, hi, 1.0)), hi)
        self.offset = (lo + hi) / 2
        self.scale = (hi - lo) / 2

    def forward(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        s = np.where(self.log, np.log10(np.where(self.log, y, 1.0)), y)
        return (s - self.offset) / self.scale

    def inverse(self, u: np.ndarray) -> np.ndarray:
        s = np.asarray(u, dtype=np.float64) * self.scale + self.offset
        s[..., self.log] = 10.0 ** s[..., self.log]  # only the log columns: 10**teff would overflow
        return s


def rmse(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Root-mean-square error per column."""
    return np.sqrt(np.mean((np.asarray(pred, float) - np.asarray(true, float)) ** 2, axis=0))


def _import_torch():
    try:
        import torch
    except ImportError as exc:  # the `train` extra is optional for inference users
        raise TorchMissing("parameter recovery needs torch (pip install 'fastspec[train]')") from exc
    return torch


def run_recovery(
    coeffs: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    scaler: LabelScaler,
    opts: RecoveryOptions,
    label_names: tuple[str, ...],
    log=print,
) -> dict:
    """Train the regressor on noisy PCA coefficients of the training split and report RMSEs.

    `coeffs` maps "train", "val", "test", "generated" to noise-free PCA coefficients (n, k); `labels` maps
    the same keys to the physical labels (n, 6) ("generated" = model spectra at the test labels).

    White noise of σ = 1/SNR per pixel (in continuum units) projects onto the orthonormal PCA components
    as independent N(0, σ²) in each coefficient, so noise is added to the coefficients directly: the
    same distribution as projecting noisy spectra, at 25 instead of 19000 numbers per draw.
    """
    torch = _import_torch()
    torch.manual_seed(opts.seed)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, opts.threads))
    rng = np.random.default_rng(opts.seed + 1)
    try:
        k = coeffs["train"].shape[1]
        # Standardise the inputs with the noisy-training spread: PCA coefficients range over orders of magnitude.
        snr_lo, snr_hi = opts.snr_range

        def noisy(c, draws_rng):
            sigma = 1.0 / draws_rng.uniform(snr_lo, snr_hi, size=(c.shape[0], 1))
            return c + sigma * draws_rng.standard_normal(c.shape)

        ref = noisy(np.repeat(coeffs["train"], 4, axis=0), np.random.default_rng(opts.seed + 2))
        c_mean, c_std = ref.mean(axis=0), ref.std(axis=0) + 1e-12

        def to_input(c):
            return torch.as_tensor((c - c_mean) / c_std, dtype=torch.float32)

        dims = [k, *opts.widths, len(label_names)]
        layers = []
        for i in range(len(dims) - 1):
            layers.append(torch.nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(torch.nn.ReLU())
        net = torch.nn.Sequential(*layers)
        optim = torch.optim.Adamax(net.parameters(), lr=opts.lr)
        loss_fn = torch.nn.MSELoss()

        y_train = scaler.forward(labels["train"])
        y_val_t = torch.as_tensor(scaler.forward(labels["val"]), dtype=torch.float32)
        # A fixed noisy validation set, so that early stopping compares like with like between epochs.
        x_val = to_input(noisy(coeffs["val"], np.random.default_rng(opts.seed + 3)))

        best = (np.inf, None, 0)
        history = []
        t0 = time.perf_counter()
        for epoch in range(opts.epochs):
            net.train()
            c = np.repeat(coeffs["train"], opts.noise_draws, axis=0)
            y = np.repeat(y_train, opts.noise_draws, axis=0)
            x_ep = to_input(noisy(c, rng))
            y_ep = torch.as_tensor(y, dtype=torch.float32)
            perm = torch.as_tensor(rng.permutation(len(c)))
            total = 0.0
            for s in range(0, len(c), opts.batch_size):
                idx = perm[s:s + opts.batch_size]
                optim.zero_grad()
                loss = loss_fn(net(x_ep[idx]), y_ep[idx])
                loss.backward()
                optim.step()
                total += loss.item() * len(idx)
            net.eval()
            with torch.no_grad():
                val = float(loss_fn(net(x_val), y_val_t))
            history.append({"epoch": epoch + 1, "train_mse": total / len(c), "val_mse": val})
            if val < best[0]:
                best = (val, {n: p.detach().clone() for n, p in net.state_dict().items()}, epoch + 1)
            elif epoch + 1 - best[2] >= opts.patience:
                log(f"recovery: early stop at epoch {epoch + 1} (best validation MSE {best[0]:.4g} at epoch {best[2]})")
                break
        train_seconds = time.perf_counter() - t0
        net.load_state_dict(best[1])
        net.eval()

        def predict(c):
            with torch.no_grad():
                return scaler.inverse(net(to_input(c)).double().numpy())

        # Evaluation noise: one seeded draw per spectrum; the test SYNSPEC and the generated spectra get
        # the very same noise (same SNR, same deviates), so their RMSEs differ only by the spectra.
        results = {}
        eval_rng = np.random.default_rng(opts.seed + 4)
        noise = {}
        for key in ("train", "val", "test"):
            c = coeffs[key]
            sigma = 1.0 / eval_rng.uniform(snr_lo, snr_hi, size=(c.shape[0], 1))
            noise[key] = sigma * eval_rng.standard_normal(c.shape)
        noise["generated"] = noise["test"]
        predictions = {}
        for key in ("train", "val", "test", "generated"):
            p_noisy = predict(coeffs[key] + noise[key])
            p_clean = predict(coeffs[key])
            predictions[key] = p_noisy
            results[key] = {
                "n": int(coeffs[key].shape[0]),
                "rmse": dict(zip(label_names, rmse(p_noisy, labels[key]).tolist())),
                "rmse_noise_free": dict(zip(label_names, rmse(p_clean, labels[key]).tolist())),
                # For labels the model takes in log10 (R), the RMSE in dex says more than in linear units.
                "rmse_log10": {n: float(rmse(np.log10(np.maximum(p_noisy[:, j:j + 1], 1e-300)),
                                              np.log10(labels[key][:, j:j + 1]))[0])
                               for j, n in enumerate(label_names) if scaler.log[j]},
            }
        # Context: the RMSE of always predicting the training mean (a regressor that learned nothing).
        baseline = rmse(np.broadcast_to(labels["train"].mean(axis=0), labels["test"].shape), labels["test"])
        return {
            "status": "ok",
            "splits": results,
            "baseline_test_rmse_predict_mean": dict(zip(label_names, baseline.tolist())),
            "best_epoch": best[2],
            "epochs_run": len(history),
            "best_val_mse": best[0],
            "train_seconds": train_seconds,
            "history": history,
            "predictions": {k: v for k, v in predictions.items() if k in ("test", "generated")},
            "truth": {"test": labels["test"]},
            "options": {
                "n_components": k,
                "widths": list(opts.widths),
                "epochs": opts.epochs,
                "batch_size": opts.batch_size,
                "lr": opts.lr,
                "optimizer": "Adamax",
                "loss": "MSE on labels scaled to [-1, 1]",
                "noise_draws_per_epoch": opts.noise_draws,
                "snr_range": list(opts.snr_range),
                "noise": "Gaussian, sigma = 1/SNR per pixel (continuum units), SNR uniform per spectrum",
                "patience": opts.patience,
                "seed": opts.seed,
                "fractions": list(opts.fractions),
            },
        }
    finally:
        torch.set_num_threads(prev_threads)

"""The conditional VAE of the paper: encoder [spectrum, labels] -> (mu, log sigma^2) of z; decoder [z, labels]
-> dense layers -> n_pixels with a sigmoid and the output transform flux = scale * sigmoid(a) + offset.

The decoder is exactly what the model file stores (Linear layers, ReLU hidden, sigmoid last, input row
[z, normalised labels]), so export is a copy of its weights.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh}


def _mlp(dims: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


class Decoder(nn.Module):
    def __init__(self, latent: int, n_labels: int, widths: list[int], n_pixels: int,
                 output_scale: float, output_offset: float):
        super().__init__()
        dims = [latent + n_labels, *widths, n_pixels]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.latent = latent
        self.output_scale = float(output_scale)
        self.output_offset = float(output_offset)

    def logits(self, z: torch.Tensor, labels_norm: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, labels_norm], dim=1)
        for layer in self.layers[:-1]:
            h = torch.relu(layer(h))
        return self.layers[-1](h)

    def forward(self, z: torch.Tensor, labels_norm: torch.Tensor) -> torch.Tensor:
        return self.output_scale * torch.sigmoid(self.logits(z, labels_norm)) + self.output_offset

    @torch.no_grad()
    def init_output_bias(self, mean_flux: torch.Tensor) -> None:
        """Start the last layer at the mean training spectrum (saves many epochs of learning the continuum)."""
        p = ((mean_flux - self.output_offset) / self.output_scale).clamp(1e-4, 1 - 1e-4)
        self.layers[-1].bias.copy_(torch.log(p / (1 - p)))


class CVAE(nn.Module):
    def __init__(self, n_pixels: int, n_labels: int, mcfg):
        super().__init__()
        self.encoder = _mlp([n_pixels + n_labels, *mcfg.encoder], mcfg.encoder_activation)
        self.mu = nn.Linear(mcfg.encoder[-1], mcfg.latent)
        self.logvar = nn.Linear(mcfg.encoder[-1], mcfg.latent)
        self.decoder = Decoder(mcfg.latent, n_labels, mcfg.decoder, n_pixels, mcfg.output_scale, mcfg.output_offset)
        if mcfg.zero_init_latent:
            with torch.no_grad():
                self.decoder.layers[0].weight[:, :mcfg.latent].zero_()

    def encode(self, flux: torch.Tensor, labels_norm: torch.Tensor):
        h = self.encoder(torch.cat([flux, labels_norm], dim=1))
        return self.mu(h), self.logvar(h)

    def forward(self, flux: torch.Tensor, labels_norm: torch.Tensor, eps: torch.Tensor, n_z0: int = 0):
        """Reconstruction with z = mu + sigma * eps (eps given, so runs are reproducible), mu, logvar.
        The first n_z0 rows are decoded at z = 0 and not encoded: mu and logvar cover rows n_z0: only."""
        mu, logvar = self.encode(flux[n_z0:], labels_norm[n_z0:])
        z = mu + torch.exp(0.5 * logvar) * eps[n_z0:]
        if n_z0:
            z = torch.cat([torch.zeros(n_z0, z.shape[1], dtype=z.dtype, device=z.device), z])
        return self.decoder(z, labels_norm), mu, logvar


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent dims, mean over the batch."""
    return (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(dim=1)).mean()

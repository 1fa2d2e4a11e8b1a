"""A convolutional VAE, built from torch.nn layers or genfast's from the same weights, and its
loss (the negative evidence lower bound).

The encoder and decoder are stacks of GroupNorm+SiLU and 3x3 convolutions, as in latent
diffusion's autoencoder: the encoder halves the resolution with stride-2 convolutions and ends in
the latent's mean and log-variance; the decoder doubles it with nearest-neighbour upsampling
before a convolution and ends in per-pixel logits. The genfast build fuses GroupNorm with SiLU
(genfast.nn.GroupNorm), runs the 3x3 stride-1 convolutions by Winograd's algorithm with the
upsampling fused into their reads (genfast.nn.Conv2d), and fuses the reparameterised sample, the
KL term and the reconstruction loss with its reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as genfast_nn
from .. import ops, reference
from .layers import use_channels_last
from .unet import GroupNormSiLU


def _conv(in_channels: int, out_channels: int, fused: bool, **kwargs) -> nn.Conv2d:
    return (genfast_nn.Conv2d if fused else nn.Conv2d)(in_channels, out_channels, 3, padding=1, **kwargs)


def _norm_silu(channels: int, groups: int, fused: bool) -> nn.GroupNorm:
    return genfast_nn.GroupNorm(groups, channels, activation="silu") if fused else GroupNormSiLU(groups, channels)


class ConvVAE(nn.Module):
    """images (B, in_channels, S, S), S divisible by 2^(len(channels) - 1), to latents (B,
    latent_channels, S / 2^(len(channels) - 1), ...) and back to logits of the images' pixels."""

    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = (32, 64, 128), latent_channels: int = 4,
                 groups: int = 8, fused: bool = False):
        super().__init__()
        self.fused = fused
        encoder = [_conv(in_channels, channels[0], fused)]
        previous = channels[0]
        for index, width in enumerate(channels):
            encoder += [_norm_silu(previous, groups, fused), _conv(previous, width, fused)]
            if index < len(channels) - 1:
                encoder.append(_conv(width, width, fused, stride=2))
            previous = width
        encoder += [_norm_silu(previous, groups, fused), _conv(previous, 2 * latent_channels, fused)]
        self.encoder = nn.Sequential(*encoder)
        self.decoder_in = _conv(latent_channels, channels[-1], fused)
        self.decoder = nn.ModuleList()
        self.upsample = nn.ModuleList()
        previous = channels[-1]
        for index in reversed(range(len(channels))):
            self.decoder.append(nn.ModuleList([_norm_silu(previous, groups, fused),
                                               _conv(previous, channels[index], fused)]))
            previous = channels[index]
            if index > 0:
                self.upsample.append(_conv(previous, previous, fused))
        self.decoder_out = nn.Sequential(_norm_silu(previous, groups, fused), _conv(previous, in_channels, fused))
        if fused:
            use_channels_last(self)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of the latent."""
        return self.encoder(images).chunk(2, dim=1)

    def decode(self, z: Tensor) -> Tensor:
        """The logits of the images' pixels."""
        h = self.decoder_in(z)
        for index, (norm, conv) in enumerate(self.decoder):
            h = conv(norm(h))
            if index < len(self.upsample):
                upsample = self.upsample[index]
                h = upsample(h, upsample=2) if self.fused else upsample(F.interpolate(h, scale_factor=2.0))
        return self.decoder_out(h)

    def forward(self, images: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, mu, logvar); noise (mu's shape): the standard normal sample, by default drawn."""
        mu, logvar = self.encode(images)
        noise = torch.randn_like(mu) if noise is None else noise
        z = ops.reparameterize(mu, logvar, noise) if self.fused else reference.losses.reparameterize(mu, logvar, noise)
        return self.decode(z), mu, logvar

    def loss(self, images: Tensor, noise: Tensor | None = None) -> Tensor:
        """The negative ELBO per image: the pixels' binary cross-entropy against images in [0, 1],
        summed over each image, plus the latent's KL divergence from N(0, I)."""
        logits, mu, logvar = self(images, noise)
        if self.fused:
            recon = ops.binary_cross_entropy_with_logits(logits, images, reduction="sum")
            return recon / images.shape[0] + ops.gaussian_kl_divergence(mu, logvar, reduction="batchmean")
        recon = F.binary_cross_entropy_with_logits(logits, images, reduction="sum")
        return recon / images.shape[0] + reference.losses.gaussian_kl_divergence(mu, logvar, "batchmean")

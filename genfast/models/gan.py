"""A DCGAN-style GAN, built from torch.nn layers or genfast's from the same weights, with the
non-saturating loss and the R1 penalty of StyleGAN's discriminator.

Both networks are stacks of 3x3 convolutions with leaky ReLU: the generator doubles the
resolution before each convolution (nearest-neighbour upsampling then a convolution, which
avoids the checkerboard artefacts of DCGAN's transposed convolutions), the discriminator halves
it after each by average pooling. The genfast build runs the convolutions by Winograd's algorithm
with the upsampling fused into their reads (genfast.nn.Conv2d), bias and leaky ReLU in one pass
(genfast.ops.bias_act, whose backward is differentiable again for R1), the minibatch standard
deviation in one pass (genfast.ops.minibatch_stddev), and the losses fused with their reductions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as genfast_nn
from .. import ops, reference
from .layers import use_channels_last

_SLOPE = 0.2


class ConvLayer(nn.Module):
    """leaky_relu(conv3x3(x, upsampled first if upsample) + bias): the bias a parameter of its own, so
    that the genfast build adds it in the activation's pass."""

    def __init__(self, in_channels: int, out_channels: int, fused: bool, upsample: bool = False):
        super().__init__()
        self.fused, self.upsample = fused, upsample
        self.conv = (genfast_nn.Conv2d if fused else nn.Conv2d)(in_channels, out_channels, 3, padding=1, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            h = self.conv(x, upsample=2) if self.upsample else self.conv(x)
            return ops.bias_act(h, self.bias, activation="leaky_relu", alpha=_SLOPE, gain=1.0)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return F.leaky_relu(self.conv(x) + self.bias[:, None, None], _SLOPE)


class Generator(nn.Module):
    """z (B, latent_dim) -> images (B, out_channels, 4 * 2^k, 4 * 2^k) in [-1, 1], k = len(channels) - 1."""

    def __init__(self, latent_dim: int = 64, channels: tuple[int, ...] = (128, 64, 32), out_channels: int = 3,
                 fused: bool = False):
        super().__init__()
        self.channels = channels
        self.project = nn.Linear(latent_dim, channels[0] * 16)
        self.blocks = nn.ModuleList(
            ConvLayer(a, b, fused, upsample=index > 0)
            for index, (a, b) in enumerate(zip((channels[0], *channels[:-1]), channels))
        )
        self.to_image = (genfast_nn.Conv2d if fused else nn.Conv2d)(channels[-1], out_channels, 3, padding=1)
        if fused:
            use_channels_last(self)

    def forward(self, z: Tensor) -> Tensor:
        h = F.leaky_relu(self.project(z), _SLOPE).view(z.shape[0], self.channels[0], 4, 4)
        for block in self.blocks:
            h = block(h)
        return torch.tanh(self.to_image(h))


class Discriminator(nn.Module):
    """images (B, in_channels, S, S) -> logits (B, 1); S = 4 * 2^(len(channels) - 1). Before its
    head, StyleGAN's minibatch standard deviation (groups of 4) shows it the batch's variety."""

    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = (32, 64, 128), fused: bool = False):
        super().__init__()
        self.fused = fused
        self.blocks = nn.ModuleList(ConvLayer(a, b, fused) for a, b in zip((in_channels, *channels[:-1]), channels))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear((channels[-1] + 1) * 16, channels[-1]),
                                  nn.LeakyReLU(_SLOPE), nn.Linear(channels[-1], 1))
        if fused:
            use_channels_last(self)

    def forward(self, x: Tensor) -> Tensor:
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index < len(self.blocks) - 1:
                x = F.avg_pool2d(x, 2)
        stddev = ops.minibatch_stddev if self.fused else reference.minibatch_stddev.minibatch_stddev
        return self.head(stddev(x))


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, fused: bool) -> Tensor:
    """The non-saturating loss: softplus(-D(real)) + softplus(D(fake)), averaged."""
    return (ops if fused else reference.losses).discriminator_loss(real_logits, fake_logits)


def generator_loss(fake_logits: Tensor, fused: bool) -> Tensor:
    return (ops if fused else reference.losses).generator_loss(fake_logits)


def r1_penalty(discriminator: Discriminator, real: Tensor, gamma: float = 10.0) -> Tensor:
    """gamma / 2 * E |d D(x) / dx|^2 over real images, differentiable for the discriminator's
    weights: the gradient is taken with create_graph, so the backward runs the layers' second order."""
    real = real.detach().requires_grad_()
    (gradient,) = torch.autograd.grad(discriminator(real).sum(), real, create_graph=True)
    return gamma / 2 * gradient.square().sum(dim=(1, 2, 3)).mean()


class GAN(nn.Module):
    """A generator and its discriminator, trained together: ``loss`` is the sum of both players'
    objectives on one batch (the discriminator's with the R1 penalty), whose gradient holds each
    network's update of one alternating step when taken for that network's parameters."""

    def __init__(self, latent_dim: int = 64, channels: tuple[int, ...] = (128, 64, 32), image_channels: int = 3,
                 r1_gamma: float = 10.0, fused: bool = False):
        super().__init__()
        self.fused, self.r1_gamma = fused, r1_gamma
        self.generator = Generator(latent_dim, channels, image_channels, fused)
        self.discriminator = Discriminator(image_channels, channels[::-1], fused)

    def forward(self, z: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
        """(fake images, the discriminator's logits on the real ones)."""
        return self.generator(z), self.discriminator(real)

    def loss(self, z: Tensor, real: Tensor) -> Tensor:
        fake = self.generator(z)
        d_loss = discriminator_loss(self.discriminator(real), self.discriminator(fake.detach()), self.fused)
        penalty = r1_penalty(self.discriminator, real, self.r1_gamma)
        return d_loss + penalty + generator_loss(self.discriminator(fake), self.fused)

"""VAE and GAN losses at the sizes they train at: the reconstruction term of a convolutional VAE
on 64x64 RGB images (BCE with logits, summed as the VAE's ELBO sums it) and of an MNIST MLP VAE
(MSE), the KL term of a 128-dimensional latent, and a GAN discriminator's non-saturating loss on
a batch of 64 logits (a call that costs its overhead alone). Backward differentiates every
floating-point input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import genfast
from genfast.reference import losses

from .harness import Case, Provider, op_providers

# source: (loss, shape, reduction)
CASES_BY_SOURCE = {
    "conv vae 64px rgb recon": ("bce_with_logits", (64, 3, 64, 64), "sum"),
    "mnist mlp vae recon": ("mse", (128, 784), "mean"),
    "vae kl 128-d latent": ("gaussian_kl", (128, 128), "batchmean"),
    "dcgan discriminator": ("non_saturating", (64, 1), "mean"),
}

_GENFAST = {
    "bce_with_logits": lambda x, t, reduction: genfast.ops.binary_cross_entropy_with_logits(x, t, reduction=reduction),
    "mse": lambda x, t, reduction: genfast.ops.mse_loss(x, t, reduction=reduction),
    "gaussian_kl": lambda x, t, reduction: genfast.ops.gaussian_kl_divergence(x, t, reduction=reduction),
    "non_saturating": lambda x, t, reduction: genfast.ops.discriminator_loss(x, t),
}

# What a VAE or GAN written in PyTorch runs today.
_TORCH = {
    "bce_with_logits": lambda x, t, reduction: F.binary_cross_entropy_with_logits(x, t, reduction=reduction),
    "mse": lambda x, t, reduction: F.mse_loss(x, t, reduction=reduction),
    "gaussian_kl": lambda x, t, reduction: -0.5 * torch.sum(1 + t - x.pow(2) - t.exp()) / x.shape[0],
    "non_saturating": lambda x, t, reduction: F.softplus(-x).mean() + F.softplus(t).mean(),
}


def _reference(loss, x, t, reduction):
    if loss == "non_saturating":
        return losses.discriminator_loss(x, t)
    return losses.loss(loss, x, t, reduction)


def loss_case(source: str, direction: str) -> Case:
    loss, shape, reduction = CASES_BY_SOURCE[source]

    def make_inputs(device: torch.device) -> dict:
        t = torch.rand(shape, device=device) if loss == "bce_with_logits" else torch.randn(shape, device=device)
        return {"x": torch.randn(shape, device=device), "t": t, "reduction": reduction, "loss": loss}

    tensor = math.prod(shape) * 4
    # Forward reads x and t; backward reads them and writes their gradients.
    traffic = {"forward": 2 * tensor, "backward": 4 * tensor}
    return Case(f"{source} {'x'.join(map(str, shape))} {loss}", "losses", direction, math.prod(shape), make_inputs,
                traffic[direction], quick=source != "vae kl 128-d latent", variant=loss)


CASES = [loss_case(source, direction) for source in CASES_BY_SOURCE for direction in ("forward", "backward")]


def providers(device_type: str) -> list[Provider]:
    return op_providers(
        device_type,
        lambda x, t, reduction, loss: _GENFAST[loss](x, t, reduction),
        lambda x, t, reduction, loss: _TORCH[loss](x, t, reduction),
        _reference,
    )

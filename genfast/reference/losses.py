"""The losses of VAEs and GANs, each an elementwise term reduced over its elements:

    mse                (x - t)^2                                  torch.nn.functional.mse_loss
    bce_with_logits    max(x, 0) - x t + log(1 + e^-|x|)          ...binary_cross_entropy_with_logits
    gaussian_kl        -(1 + logvar - mu^2 - e^logvar) / 2        KL(N(mu, e^logvar) || N(0, 1))
    softplus           log(1 + e^(s x))                           the non-saturating GAN loss's terms
    hinge              max(0, 1 + s x)                            the hinge GAN loss's terms

s is the sign a GAN loss gives its logits: -1 on real samples' (the discriminator wants them
high), +1 on fakes'. Reductions: "none", "sum", "mean" and, for the KL divergence, "batchmean"
(the sum divided by the batch size, the per-sample KL of a VAE's evidence lower bound).
"""

import torch
import torch.nn.functional as F

TERMS = {
    "mse": lambda x, t, sign: (x - t).square(),
    "bce_with_logits": lambda x, t, sign: x.clamp(min=0) - x * t + torch.log1p(torch.exp(-x.abs())),
    "gaussian_kl": lambda mu, logvar, sign: -0.5 * (1 + logvar - mu.square() - logvar.exp()),
    "softplus": lambda x, t, sign: F.softplus(sign * x),
    "hinge": lambda x, t, sign: F.relu(1 + sign * x),
}


def reduce(terms: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    if reduction == "batchmean":
        return terms.sum() / terms.shape[0]
    return terms.mean()


def loss(kind: str, x: torch.Tensor, t: torch.Tensor | None, reduction: str, sign: float = 1.0) -> torch.Tensor:
    """TERMS[kind] of x (and t), reduced; fp16/bf16 are computed in fp32 and rounded once."""
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    terms = TERMS[kind](x.to(compute), None if t is None else t.to(compute), sign)
    return reduce(terms, reduction).to(x.dtype)


def mse_loss(input, target, reduction="mean"):
    return loss("mse", input, target, reduction)


def binary_cross_entropy_with_logits(input, target, reduction="mean"):
    return loss("bce_with_logits", input, target, reduction)


def gaussian_kl_divergence(mu, logvar, reduction="mean"):
    return loss("gaussian_kl", mu, logvar, reduction)


def discriminator_loss(real_logits, fake_logits, kind="non_saturating"):
    """mean softplus(-real) + mean softplus(fake), or with hinge terms mean max(0, 1 - real) +
    mean max(0, 1 + fake)."""
    term = "softplus" if kind == "non_saturating" else "hinge"
    return loss(term, real_logits, None, "mean", -1.0) + loss(term, fake_logits, None, "mean", 1.0)


def generator_loss(fake_logits, kind="non_saturating"):
    """mean softplus(-fake) (non-saturating), or -mean fake (hinge)."""
    if kind == "non_saturating":
        return loss("softplus", fake_logits, None, "mean", -1.0)
    return -fake_logits.mean()


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A sample of N(mu, e^logvar): mu + e^(logvar / 2) noise."""
    return mu + torch.exp(0.5 * logvar) * noise

"""The diffusion ops in plain PyTorch: the oracle for their fused kernels and
the `reference` backend. A sampler step, the timestep embedding, and the
training ops: noising a batch and the denoising loss.

Every scheduler family genfast fuses (DDPM, DDIM, Euler, Euler ancestral,
DPM-Solver++ 2M, LCM, flow matching) updates the sample with the same
elementwise shape, once its per-step scalars are worked out on the host from
the schedule tables (genfast.schedulers does that):

    m        = model_output, or uncond + guidance_scale * (cond - uncond)
               (and so the variance channels v below)
    x        = sample + sample_noise * noise                Euler's churn; else x = sample
    x0       = x0_sample * x + x0_model * m                 the predicted clean sample
    x0       = clamp(x0, -clip, clip)                       when clip is set
    x0       = clamp(x0, -s_b, s_b) / s_b                   dynamic thresholding, s_b per sample
    prev     = prev_x0 * x0 + prev_sample * x + prev_model * m
               + prev_history * history + std * noise
    denoised = out_x0 * x0 + out_sample * x                 what step() returns beside prev

std is prev_noise, or with a learned variance (DDPM's "learned_range") the
per-element exp(0.5 * (frac * max_log + (1 - frac) * min_log)) with
frac = (v + 1) / 2, v being the model's variance output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .random import philox4x32


@dataclass(frozen=True)
class StepCoefficients:
    """The per-step scalars of the update above; unused terms stay 0."""

    sample_noise: float = 0.0
    x0_sample: float = 0.0
    x0_model: float = 0.0
    prev_x0: float = 0.0
    prev_sample: float = 0.0
    prev_model: float = 0.0
    prev_history: float = 0.0
    prev_noise: float = 0.0
    out_x0: float = 1.0
    out_sample: float = 0.0
    clip: float | None = None
    # (min_log, max_log) of a learned variance; model_output then holds 2C channels.
    learned_variance: tuple[float, float] | None = None


def philox_normal(seed: int, shape: tuple[int, ...], device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The standard normal noise of fused_noise: element e of the flattened shape is lane e % 4 of
    Philox4x32-10 at counter e // 4, its words (w0, w1, w2, w3) paired by Box-Muller,
        u = ((w >> 8) + 0.5) / 2^24,  r = sqrt(-2 ln u0),  lanes r cos(2 pi u1), r sin(2 pi u1)
    and likewise from (w2, w3). Reproducible per seed; not torch.randn's numbers."""
    elements = torch.arange(math.prod(shape), device=device)
    words = philox4x32(seed, elements // 4)
    lane = elements % 4
    pair = lane >= 2
    first = torch.where(pair, words[2], words[0])
    second = torch.where(pair, words[3], words[1])
    u0, u1 = (((w >> 8).to(dtype) + 0.5) / 2**24 for w in (first, second))
    radius = torch.sqrt(-2 * torch.log(u0))
    angle = 2 * math.pi * u1
    return (radius * torch.where(lane % 2 == 0, torch.cos(angle), torch.sin(angle))).reshape(shape)


def split_model_output(
    model_output: Tensor, batch: int, channels: int, guidance_scale: float | None, learned_variance: bool
) -> tuple[Tensor, Tensor | None]:
    """(m, v): the model prediction, guided when guidance_scale is given, and
    with a learned variance its variance channels (guided alike)."""
    if guidance_scale is not None:
        uncond, cond = model_output[:batch], model_output[batch:]
        model_output = uncond + guidance_scale * (cond - uncond)
    return model_output[:, :channels], (model_output[:, channels:] if learned_variance else None)


def denoise_step(
    sample: Tensor,
    model_output: Tensor,
    c: StepCoefficients,
    noise: Tensor | None = None,
    history: Tensor | None = None,
    guidance_scale: float | None = None,
    noise_seed: int | None = None,
    threshold: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(prev_sample, denoised) in float32 (float64 for float64 sample). With noise_seed,
    the noise is philox_normal(noise_seed, sample.shape) instead of the noise tensor;
    threshold (B,) holds dynamic thresholding's s_b."""
    math = torch.float64 if sample.dtype == torch.float64 else torch.float32
    if noise_seed is not None:
        noise = philox_normal(noise_seed, tuple(sample.shape), sample.device, math)
    x = sample.to(math)
    # A term whose coefficient is 0 is left out, not multiplied by 0, as diffusers leaves out the
    # churn at gamma 0 and the noise at the last step: a NaN there must not reach the sample.
    if noise is not None and c.sample_noise != 0:
        x = x + c.sample_noise * noise.to(math)
    m, v = split_model_output(
        model_output.to(math), sample.shape[0], sample.shape[1], guidance_scale, c.learned_variance is not None
    )
    x0 = c.x0_sample * x + c.x0_model * m
    if c.clip is not None:
        x0 = x0.clamp(-c.clip, c.clip)
    if threshold is not None:
        s = threshold.to(math).reshape(-1, *[1] * (x0.dim() - 1))
        x0 = torch.minimum(torch.maximum(x0, -s), s) / s
    prev = c.prev_x0 * x0 + c.prev_sample * x + c.prev_model * m
    if history is not None and c.prev_history != 0:
        prev = prev + c.prev_history * history.to(math)
    if noise is not None and c.prev_noise != 0:
        std = c.prev_noise
        if v is not None:
            min_log, max_log = c.learned_variance
            frac = (v + 1) / 2
            std = std * torch.exp(0.5 * (frac * max_log + (1 - frac) * min_log))
        prev = prev + std * noise.to(math)
    return prev, c.out_x0 * x0 + c.out_sample * x


def timestep_frequencies(
    half: int, downscale_freq_shift: float, max_period: float, dtype: torch.dtype = torch.float32, device=None
) -> Tensor:
    """The embedding's frequencies f_j = max_period^(-j / (half - shift)), j < half, as diffusers rounds them."""
    exponent = -math.log(max_period) * torch.arange(half, dtype=dtype, device=device)
    return torch.exp(exponent / (half - downscale_freq_shift))


def timestep_embedding(
    timesteps: Tensor,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> Tensor:
    """diffusers' get_timestep_embedding: for timesteps (N,), the (N, embedding_dim)
    [sin(scale t f), cos(scale t f)] over the frequencies f above (halves swapped with
    flip_sin_to_cos, a zero column last for an odd dim). float32, float64 for float64
    timesteps."""
    math_dtype = torch.float64 if timesteps.dtype == torch.float64 else torch.float32
    half = embedding_dim // 2
    frequencies = timestep_frequencies(half, downscale_freq_shift, max_period, math_dtype, timesteps.device)
    angles = scale * (timesteps[:, None].to(math_dtype) * frequencies[None, :])
    halves = [torch.sin(angles), torch.cos(angles)]
    embedding = torch.cat(halves[::-1] if flip_sin_to_cos else halves, dim=-1)
    return torch.nn.functional.pad(embedding, (0, embedding_dim % 2))


def add_noise(
    original_samples: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, velocity: bool = False
) -> tuple[Tensor, Tensor | None]:
    """diffusers' add_noise, and with velocity its get_velocity from the same
    inputs: with a = alphas_cumprod[timesteps] per sample,
        noisy = sqrt(a) x0 + sqrt(1 - a) noise,   v = sqrt(a) noise - sqrt(1 - a) x0.
    Computed in float32 (float64 for float64 samples), returned in x0's dtype."""
    math_dtype = torch.float64 if original_samples.dtype == torch.float64 else torch.float32
    alpha = alphas_cumprod.to(original_samples.device, math_dtype)[timesteps]
    alpha = alpha.reshape(-1, *[1] * (original_samples.dim() - 1))
    a, b = alpha.sqrt(), (1 - alpha).sqrt()
    x0, eps = original_samples.to(math_dtype), noise.to(math_dtype)
    noisy = (a * x0 + b * eps).to(original_samples.dtype)
    return noisy, (a * eps - b * x0).to(original_samples.dtype) if velocity else None


def denoising_loss(model_output: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """The diffusion training loss: the mean over samples of weights[b] times the
    sample's mean squared error (F.mse_loss without weights; min-SNR weighting
    with them). A float32 scalar (float64 for float64 inputs)."""
    math_dtype = torch.float64 if model_output.dtype == torch.float64 else torch.float32
    per_sample = (model_output.to(math_dtype) - target.to(math_dtype)).square().flatten(1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights.to(math_dtype)
    return per_sample.mean()

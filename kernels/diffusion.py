"""The diffusion ops (genfast/reference/diffusion.py has their formulas) as
Triton kernels and their launchers: the fused sampler step, then the timestep
embedding.

Tensors are viewed flat per sample: sample, noise, history and the outputs as
(B, N); model_output as (B or 2B, N or 2N), its per-sample stride given, so
one kernel reads the guided [uncond, cond] batch and the learned-variance
channels in place. Coefficients arrive as scalars and the optional terms as
constexpr flags, so each configuration compiles to the loads it needs.
"""

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _denoise_step_kernel(
    x_ptr, m_ptr, noise_ptr, history_ptr, prev_ptr, denoised_ptr,
    N, m_stride, cond_offset, guidance,
    sample_noise, x0_sample, x0_model, clip, prev_x0, prev_sample, prev_model, prev_history, prev_noise,
    out_x0, out_sample, min_log, max_log,
    GUIDED: tl.constexpr, CLIP: tl.constexpr, HISTORY: tl.constexpr, NOISE: tl.constexpr,
    LEARNED_VARIANCE: tl.constexpr, DENOISED: tl.constexpr, BLOCK: tl.constexpr,
):
    """One sampler step over BLOCK elements of sample b = program_id(1).

    Fuses Euler's churn, guidance, the x0 prediction, clipping, the update and
    the denoised output. Reads sample, model_output (both halves when guided, and the
    variance channels with a learned variance), noise and history when given;
    writes prev and, if DENOISED, denoised. Math in float32.
    """
    b = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    x = tl.load(x_ptr + b * N + i, mask=mask).to(tl.float32)
    if NOISE:
        noise = tl.load(noise_ptr + b * N + i, mask=mask).to(tl.float32)
        x += sample_noise * noise  # Euler's churn; sample_noise is 0 otherwise
    m_row = m_ptr + b * m_stride
    m = tl.load(m_row + i, mask=mask).to(tl.float32)
    if GUIDED:
        m = m + guidance * (tl.load(m_row + cond_offset + i, mask=mask).to(tl.float32) - m)
    x0 = x0_sample * x + x0_model * m
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip), clip)
    prev = prev_x0 * x0 + prev_sample * x + prev_model * m
    if HISTORY:
        prev += prev_history * tl.load(history_ptr + b * N + i, mask=mask).to(tl.float32)
    if NOISE:
        std = prev_noise
        if LEARNED_VARIANCE:
            v = tl.load(m_row + N + i, mask=mask).to(tl.float32)
            if GUIDED:
                v = v + guidance * (tl.load(m_row + cond_offset + N + i, mask=mask).to(tl.float32) - v)
            frac = (v + 1) / 2
            std = std * tl.exp(0.5 * (frac * max_log + (1 - frac) * min_log))
        prev += std * noise
    tl.store(prev_ptr + b * N + i, prev.to(prev_ptr.dtype.element_ty), mask=mask)
    if DENOISED:
        denoised = out_x0 * x0 + out_sample * x
        tl.store(denoised_ptr + b * N + i, denoised.to(denoised_ptr.dtype.element_ty), mask=mask)


def denoise_step(sample, model_output, c, noise, history, guidance_scale, want_denoised: bool):
    """(prev, denoised or None) for contiguous, non-empty inputs that
    genfast.ops.denoise_step has checked; c is a StepCoefficients."""
    batch, n = sample.shape[0], sample[0].numel()
    m_stride = model_output[0].numel()
    prev = torch.empty_like(sample)
    denoised = torch.empty_like(sample) if want_denoised else None
    min_log, max_log = c.learned_variance or (0.0, 0.0)
    _denoise_step_kernel[(triton.cdiv(n, _BLOCK), batch)](
        sample, model_output, noise if noise is not None else sample, history if history is not None else sample,
        prev, denoised if want_denoised else prev,
        n, m_stride, batch * m_stride, float(guidance_scale or 0.0),
        c.sample_noise, c.x0_sample, c.x0_model, float(c.clip or 0.0), c.prev_x0, c.prev_sample, c.prev_model,
        c.prev_history, c.prev_noise, c.out_x0, c.out_sample, min_log, max_log,
        GUIDED=guidance_scale is not None, CLIP=c.clip is not None, HISTORY=history is not None,
        NOISE=noise is not None, LEARNED_VARIANCE=c.learned_variance is not None, DENOISED=want_denoised,
        BLOCK=_BLOCK,
    )
    return prev, denoised


@triton.jit
def _timestep_embedding_kernel(
    t_ptr, frequency_ptr, out_ptr, half, embedding_dim, scale,
    FLIP: tl.constexpr, ODD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Row r = program_id(0) of diffusers' timestep embedding, columns j of one BLOCK.

    Fuses the angles scale * (t f_j) and their sine and cosine. Reads
    timesteps[r] and the frequencies; writes the row's sin and cos halves
    (swapped when FLIP) and, for an ODD dim, its zero last column.
    """
    r = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < half
    t = tl.load(t_ptr + r).to(tl.float32)
    angle = scale * (t * tl.load(frequency_ptr + j, mask=mask))
    row = out_ptr + r * embedding_dim
    tl.store(row + j + (half if FLIP else 0), tl.sin(angle), mask=mask)
    tl.store(row + j + (0 if FLIP else half), tl.cos(angle), mask=mask)
    if ODD:
        tl.store(row + embedding_dim - 1 + j, tl.zeros_like(angle), mask=j == 0)


def timestep_embedding(timesteps, frequencies, embedding_dim, flip_sin_to_cos, scale):
    """(N, embedding_dim) float32 for non-empty, contiguous 1-D timesteps and the float32
    frequencies, as genfast.ops.timestep_embedding checked and made them."""
    rows, half = timesteps.shape[0], embedding_dim // 2
    out = torch.empty(rows, embedding_dim, device=timesteps.device, dtype=torch.float32)
    block = min(triton.next_power_of_2(max(half, 1)), _BLOCK)
    _timestep_embedding_kernel[(rows, max(triton.cdiv(half, block), 1))](
        timesteps, frequencies, out, half, embedding_dim, scale,
        FLIP=flip_sin_to_cos, ODD=embedding_dim % 2 == 1, BLOCK=block,
    )
    return out

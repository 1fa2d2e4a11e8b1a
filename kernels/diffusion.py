"""The diffusion ops (genfast/reference/diffusion.py has their formulas) as
Triton kernels and their launchers: the fused sampler step, the timestep
embedding, and the training ops (noising a batch, the denoising loss and its
gradient).

Tensors are viewed flat per sample, (B, N), and grids are (blocks of N, B).
The step's model_output is (B or 2B, N or 2N), its per-sample stride given, so
one kernel reads the guided [uncond, cond] batch and the learned-variance
channels in place. Coefficients arrive as scalars and the optional terms as
constexpr flags, so each configuration compiles to the loads it needs.
"""

import dataclasses

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _philox_normal(seed, element):
    """Standard normals of the elements' fused noise: lane element % 4 of Philox4x32-10 at
    counter element // 4, Box-Muller on its word pairs."""
    w0, w1, w2, w3 = tl.randint4x(seed, (element // 4).to(tl.int32))
    lane = element % 4
    first = tl.where(lane >= 2, w2, w0).to(tl.uint32, bitcast=True)
    second = tl.where(lane >= 2, w3, w1).to(tl.uint32, bitcast=True)
    u0 = ((first >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24
    u1 = ((second >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
    angle = 6.283185307179586 * u1
    return tl.sqrt(-2.0 * tl.log(u0)) * tl.where(lane % 2 == 0, tl.cos(angle), tl.sin(angle))


@triton.jit
def _denoise_step_kernel(
    x_ptr, m_ptr, noise_ptr, history_ptr, threshold_ptr, prev_ptr, denoised_ptr,
    N, m_stride, cond_offset, guidance,
    sample_noise, x0_sample, x0_model, clip, prev_x0, prev_sample, prev_model, prev_history, prev_noise,
    out_x0, out_sample, min_log, max_log, noise_seed,
    GUIDED: tl.constexpr, CLIP: tl.constexpr, THRESHOLD: tl.constexpr, HISTORY: tl.constexpr, CHURN: tl.constexpr,
    NOISE: tl.constexpr, FUSED_NOISE: tl.constexpr, LEARNED_VARIANCE: tl.constexpr, DENOISED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One sampler step over BLOCK elements of sample b = program_id(1).

    Fuses Euler's churn, guidance, the x0 prediction, clipping, the update and
    the denoised output, and with FUSED_NOISE the noise itself (Philox and
    Box-Muller, genfast/reference/diffusion.py's philox_normal). Reads sample,
    model_output (both halves when guided, and the variance channels with a
    learned variance), noise (unless fused), history and the sample's
    dynamic threshold when given; writes prev and, if DENOISED, denoised. Math
    in float32. A term of coefficient 0 (CHURN, HISTORY, NOISE false) is left
    out, not multiplied by 0, as diffusers leaves it out: a NaN there must
    not reach prev.
    """
    b = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    x = tl.load(x_ptr + b * N + i, mask=mask).to(tl.float32)
    if FUSED_NOISE:
        noise = _philox_normal(noise_seed, b * N + i)
    elif CHURN or NOISE:
        noise = tl.load(noise_ptr + b * N + i, mask=mask).to(tl.float32)
    if CHURN:
        x += sample_noise * noise
    m_row = m_ptr + b * m_stride
    m = tl.load(m_row + i, mask=mask).to(tl.float32)
    if GUIDED:
        m = m + guidance * (tl.load(m_row + cond_offset + i, mask=mask).to(tl.float32) - m)
    x0 = x0_sample * x + x0_model * m
    # torch.clamp's NaN passes through; tl.minimum and tl.maximum would drop it on a GPU.
    if CLIP:
        x0 = tl.clamp(x0, -clip, clip, propagate_nan=tl.PropagateNan.ALL)
    if THRESHOLD:
        s = tl.load(threshold_ptr + b)
        x0 = tl.clamp(x0, -s, s, propagate_nan=tl.PropagateNan.ALL) / s
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


def _flush_subnormal(c):
    """c with its coefficients below float32's smallest normal made 0, as a GPU's float32 arithmetic
    flushes them: Triton's interpreter would take such a scalar argument as float64, and compute the
    step in float64 (its float64 to bfloat16 store then writes garbage)."""
    return dataclasses.replace(c, **{f.name: 0.0 for f in dataclasses.fields(c)
                                     if f.type == "float" and abs(getattr(c, f.name)) < 2.0**-126})


def denoise_step(sample, model_output, c, noise, history, guidance_scale, want_denoised: bool, noise_seed=None,
                 threshold=None):
    """(prev, denoised or None) for contiguous, non-empty inputs that
    genfast.ops.denoise_step has checked; c is a StepCoefficients. With
    noise_seed, the kernel makes the noise."""
    batch, n = sample.shape[0], sample[0].numel()
    m_stride = model_output[0].numel()
    prev = torch.empty_like(sample)
    denoised = torch.empty_like(sample) if want_denoised else None
    c = _flush_subnormal(c)
    min_log, max_log = c.learned_variance or (0.0, 0.0)
    has_noise = noise is not None or noise_seed is not None
    _denoise_step_kernel[(triton.cdiv(n, _BLOCK), batch)](
        sample, model_output, noise if noise is not None else sample, history if history is not None else sample,
        threshold if threshold is not None else sample, prev, denoised if want_denoised else prev,
        n, m_stride, batch * m_stride, float(guidance_scale or 0.0),
        c.sample_noise, c.x0_sample, c.x0_model, float(c.clip or 0.0), c.prev_x0, c.prev_sample, c.prev_model,
        c.prev_history, c.prev_noise, c.out_x0, c.out_sample, min_log, max_log, noise_seed or 0,
        GUIDED=guidance_scale is not None, CLIP=c.clip is not None, THRESHOLD=threshold is not None,
        HISTORY=history is not None and c.prev_history != 0, CHURN=has_noise and c.sample_noise != 0,
        NOISE=has_noise and c.prev_noise != 0, FUSED_NOISE=noise_seed is not None,
        LEARNED_VARIANCE=c.learned_variance is not None, DENOISED=want_denoised,
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


@triton.jit
def _add_noise_kernel(
    x0_ptr, noise_ptr, t_ptr, alphas_ptr, noisy_ptr, velocity_ptr, N, num_alphas,
    VELOCITY: tl.constexpr, BLOCK: tl.constexpr,
):
    """BLOCK elements of training sample b = program_id(1), noised.

    Fuses the gather a = alphas_cumprod[t], noisy = sqrt(a) x0 + sqrt(1 - a) noise
    and the velocity sqrt(a) noise - sqrt(1 - a) x0. Reads x0, noise, timesteps[b]
    and one table entry; writes noisy and, if VELOCITY, velocity. A timestep
    outside the table reads nothing and yields NaN (checking on the host would
    wait for the GPU).
    """
    b = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    t = tl.load(t_ptr + b)
    inside = (t >= 0) & (t < num_alphas)
    alpha = tl.load(alphas_ptr + tl.where(inside, t, 0))
    alpha = tl.where(inside, alpha, float("nan"))
    a, s = tl.sqrt(alpha), tl.sqrt(1 - alpha)
    x0 = tl.load(x0_ptr + b * N + i, mask=mask).to(tl.float32)
    noise = tl.load(noise_ptr + b * N + i, mask=mask).to(tl.float32)
    tl.store(noisy_ptr + b * N + i, (a * x0 + s * noise).to(noisy_ptr.dtype.element_ty), mask=mask)
    if VELOCITY:
        tl.store(velocity_ptr + b * N + i, (a * noise - s * x0).to(velocity_ptr.dtype.element_ty), mask=mask)


def add_noise(x0, noise, timesteps, alphas_cumprod, velocity: bool):
    """(noisy, velocity or None) for contiguous, non-empty inputs that genfast.ops.add_noise checked."""
    batch, n = x0.shape[0], x0[0].numel()
    noisy = torch.empty_like(x0)
    v = torch.empty_like(x0) if velocity else None
    _add_noise_kernel[(triton.cdiv(n, _BLOCK), batch)](
        x0, noise, timesteps, alphas_cumprod, noisy, v if velocity else noisy, n, alphas_cumprod.shape[0],
        VELOCITY=velocity, BLOCK=_BLOCK,
    )
    return noisy, v


@triton.jit
def _loss_kernel(m_ptr, t_ptr, weights_ptr, partial_ptr, gradient_ptr, N, gradient_scale,
                 WEIGHTED: tl.constexpr, GRADIENT: tl.constexpr, BLOCK: tl.constexpr):
    """The denoising loss over BLOCK elements of sample b = program_id(1), and its gradient.

    Fuses the difference, its square's partial sum and the gradient
    2 w[b] / (B N) (model_output - target). Reads model_output and target (and
    w[b]); writes partial[b, program_id(0)] and, if GRADIENT, the gradient.
    """
    b = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    # Masked lanes must load 0: they enter the sum.
    m = tl.load(m_ptr + b * N + i, mask=mask, other=0.0).to(tl.float32)
    diff = m - tl.load(t_ptr + b * N + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(partial_ptr + b * tl.num_programs(0) + tl.program_id(0), tl.sum(diff * diff, axis=0))
    if GRADIENT:
        scale = gradient_scale * tl.load(weights_ptr + b) if WEIGHTED else gradient_scale
        tl.store(gradient_ptr + b * N + i, (scale * diff).to(gradient_ptr.dtype.element_ty), mask=mask)


def denoising_loss(model_output, target, weights, want_gradient: bool):
    """(loss, per-sample mean squared errors, gradient or None) for inputs genfast.ops.denoising_loss
    checked; the loss in float32, its partial sums added in a fixed order (the same loss on every run)."""
    batch, n = model_output.shape[0], model_output[0].numel()
    chunks = triton.cdiv(n, _BLOCK)
    partial = torch.empty(batch, chunks, device=model_output.device, dtype=torch.float32)
    gradient = torch.empty_like(model_output) if want_gradient else None
    _loss_kernel[(chunks, batch)](
        model_output, target, weights if weights is not None else partial, partial,
        gradient if want_gradient else model_output, n, 2.0 / (batch * n),
        WEIGHTED=weights is not None, GRADIENT=want_gradient, BLOCK=_BLOCK,
    )
    per_sample = partial.sum(1) / n
    return (per_sample * weights if weights is not None else per_sample).mean(), per_sample, gradient

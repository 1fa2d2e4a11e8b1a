"""The diffusion ops: one fused sampler step (genfast::denoise_step), the
sinusoidal timestep embedding (genfast::timestep_embedding), and for training
the noised batch (genfast::add_noise) and the denoising loss
(genfast::denoising_loss, with its backward).

Each function checks its arguments and picks a backend. denoise_step's eager
calls run the kernel directly, and under torch.compile or torch.export the
graph holds the custom op. The formulas and StepCoefficients:
genfast/reference/diffusion.py.
"""

from __future__ import annotations

import functools
import numbers

import torch
from torch import Tensor

from .. import reference
from ..backends import extension, kernels, resolve
from ..reference.diffusion import StepCoefficients
from ._checks import check_int, check_tensor

_IMPLEMENTED = frozenset({"cpu", "triton"})
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_TIMESTEP_DTYPES = (*_DTYPES, torch.float64, *_INDEX_DTYPES)
# The scalar order of the op's `coefficients` argument and of csrc/bindings.cpp,
# which follows them with clip, min_log, max_log (and guidance).
_SCALARS = (
    "sample_noise", "x0_sample", "x0_model", "prev_x0", "prev_sample", "prev_model", "prev_history", "prev_noise",
    "out_x0", "out_sample",
)


def _kernel(backend, sample, model_output, noise, history, threshold, c, guidance_scale, want_denoised, noise_seed):
    if backend == "triton":
        from ..kernels import diffusion

        return diffusion.denoise_step(sample, model_output, c, noise, history, guidance_scale, want_denoised,
                                      noise_seed, threshold)
    return extension().denoise_step(
        sample, model_output, noise, history, threshold, _pack(c) + [float(guidance_scale or 0.0)], c.clip is not None,
        c.learned_variance is not None, guidance_scale is not None, want_denoised, noise_seed,
    )


def _unpack(coefficients: list[float], clipped: bool, learned_variance: bool) -> StepCoefficients:
    values = dict(zip(_SCALARS, coefficients))
    clip, min_log, max_log = coefficients[len(_SCALARS):]
    return StepCoefficients(
        **values, clip=clip if clipped else None, learned_variance=(min_log, max_log) if learned_variance else None
    )


def _pack(c: StepCoefficients) -> list[float]:
    min_log, max_log = c.learned_variance or (0.0, 0.0)
    return [float(getattr(c, name)) for name in _SCALARS] + [float(c.clip or 0.0), float(min_log), float(max_log)]


@torch.library.custom_op("genfast::denoise_step", mutates_args=())
def denoise_step_op(
    sample: Tensor,
    model_output: Tensor,
    noise: Tensor | None,
    history: Tensor | None,
    threshold: Tensor | None,
    coefficients: list[float],
    clipped: bool,
    learned_variance: bool,
    guidance_scale: float | None,
    want_denoised: bool,
    noise_seed: int | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(prev, denoised); denoised is empty unless want_denoised (an op returns tensors)."""
    c = _unpack(coefficients, clipped, learned_variance)
    prev, denoised = _kernel(backend, sample, model_output, noise, history, threshold, c, guidance_scale,
                             want_denoised, noise_seed)
    return prev, denoised if denoised is not None else sample.new_empty(0)


@denoise_step_op.register_fake
def _(sample, model_output, noise, history, threshold, coefficients, clipped, learned_variance, guidance_scale,
      want_denoised, noise_seed, backend):
    return torch.empty_like(sample), torch.empty_like(sample) if want_denoised else sample.new_empty(0)


def _check_model_output(sample: Tensor, model_output: Tensor, guided: bool, learned_variance: bool) -> None:
    batch, channels = sample.shape[0], sample.shape[1]
    expected = (batch * (2 if guided else 1), channels * (2 if learned_variance else 1), *sample.shape[2:])
    if tuple(model_output.shape) != expected:
        why = []
        if guided:
            why.append("the [uncond, cond] batch of guidance")
        if learned_variance:
            why.append("2C channels of a learned variance")
        raise ValueError(
            f"model_output must have shape {expected}{' for ' + ' and '.join(why) if why else ''}, "
            f"got {tuple(model_output.shape)} for sample {tuple(sample.shape)}"
        )


def denoise_step(
    sample: Tensor,
    model_output: Tensor,
    coefficients: StepCoefficients,
    *,
    noise: Tensor | None = None,
    history: Tensor | None = None,
    guidance_scale: float | None = None,
    return_denoised: bool = True,
    noise_seed: int | None = None,
    threshold: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One sampler step in one pass over memory: (prev_sample, denoised).

    sample: (B, C, ...) float32, float16 or bfloat16. model_output: sample's
    dtype; (2B, ...) as [uncond, cond] when guidance_scale is given, and 2C
    channels when coefficients.learned_variance is set. noise, history: like
    sample. noise_seed (in [0, 2^63), instead of noise): the kernel makes the
    noise, philox_normal(noise_seed, sample.shape) of genfast/reference/diffusion.py,
    reproducible per seed and backend but not torch.randn's numbers.
    threshold: (B,) float32, positive, dynamic thresholding's per-sample bound
    s_b: x0 = clamp(x0, -s_b, s_b) / s_b (after clip, if both are set). Outputs
    have sample's shape and dtype; denoised is None unless return_denoised.
    Math in float32.
    """
    check_tensor("sample", sample, dtypes=_DTYPES, min_dim=2)
    check_tensor("model_output", model_output, dtypes=(sample.dtype,), like=sample)
    if not isinstance(coefficients, StepCoefficients):
        raise TypeError(f"coefficients must be a StepCoefficients, got {type(coefficients).__name__}")
    if guidance_scale is not None and (
        isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real)
    ):
        raise TypeError(f"guidance_scale must be a real number or None, got {type(guidance_scale).__name__}")
    _check_model_output(sample, model_output, guidance_scale is not None, coefficients.learned_variance is not None)
    for name, t in (("noise", noise), ("history", history)):
        if t is not None:
            check_tensor(name, t, dtypes=(sample.dtype,), shape=tuple(sample.shape), like=sample)
    if threshold is not None:
        check_tensor("threshold", threshold, dtypes=(torch.float32,), shape=(sample.shape[0],), like=sample)
        if threshold.device.type == "cpu" and not bool((threshold > 0).all()):  # on a GPU it would wait for it
            raise ValueError(f"threshold must be positive, got {threshold.tolist()}")
    if noise_seed is not None:
        if noise is not None:
            raise ValueError("give noise or noise_seed, not both")
        if isinstance(noise_seed, bool) or not isinstance(noise_seed, int) or not 0 <= noise_seed < 2**63:
            raise ValueError(f"noise_seed must be an int in [0, 2^63), got {noise_seed!r}")

    backend = resolve("denoise_step", sample.device, _IMPLEMENTED)
    if backend == "reference" or sample.numel() == 0:
        prev, denoised = reference.diffusion.denoise_step(sample, model_output, coefficients, noise, history,
                                                          guidance_scale, noise_seed, threshold)
        return prev.to(sample.dtype), denoised.to(sample.dtype) if return_denoised else None
    sample, model_output = sample.contiguous(), model_output.contiguous()
    noise = noise.contiguous() if noise is not None else None
    history = history.contiguous() if history is not None else None
    threshold = threshold.contiguous() if threshold is not None else None
    guidance = float(guidance_scale) if guidance_scale is not None else None
    if torch.compiler.is_compiling():
        prev, denoised = denoise_step_op(
            sample, model_output, noise, history, threshold, _pack(coefficients), coefficients.clip is not None,
            coefficients.learned_variance is not None, guidance, return_denoised, noise_seed, backend,
        )
        return prev, denoised if return_denoised else None
    return _kernel(backend, sample, model_output, noise, history, threshold, coefficients, guidance,
                   return_denoised, noise_seed)


@functools.lru_cache(maxsize=64)
def _frequencies(half: int, downscale_freq_shift: float, max_period: float, device: torch.device) -> Tensor:
    """The embedding's float32 frequencies, made once per configuration and device."""
    return reference.diffusion.timestep_frequencies(half, downscale_freq_shift, max_period, device=device)


def _embedding_kernel(backend, timesteps, frequencies, embedding_dim, flip_sin_to_cos, scale):
    if backend == "triton":
        from ..kernels import diffusion

        return diffusion.timestep_embedding(timesteps, frequencies, embedding_dim, flip_sin_to_cos, scale)
    return extension().timestep_embedding(timesteps, frequencies, embedding_dim, flip_sin_to_cos, scale)


@torch.library.custom_op("genfast::timestep_embedding", mutates_args=())
def timestep_embedding_op(
    timesteps: Tensor, frequencies: Tensor, embedding_dim: int, flip_sin_to_cos: bool, scale: float, backend: str
) -> Tensor:
    return _embedding_kernel(backend, timesteps, frequencies, embedding_dim, flip_sin_to_cos, scale)


@timestep_embedding_op.register_fake
def _(timesteps, frequencies, embedding_dim, flip_sin_to_cos, scale, backend):
    return timesteps.new_empty(timesteps.shape[0], embedding_dim, dtype=torch.float32)


def timestep_embedding(
    timesteps: Tensor,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1,
    scale: float = 1,
    max_period: int = 10000,
) -> Tensor:
    """diffusers' get_timestep_embedding in one kernel: (N, embedding_dim) float32
    sinusoidal embeddings of the timesteps (N,), of any integer or float dtype.
    Arguments as diffusers'; the formula: genfast/reference/diffusion.py."""
    check_tensor("timesteps", timesteps, dtypes=_TIMESTEP_DTYPES)
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {tuple(timesteps.shape)}")
    check_int("embedding_dim", embedding_dim, minimum=0)
    for name, value in (("downscale_freq_shift", downscale_freq_shift), ("scale", scale), ("max_period", max_period)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if max_period <= 0:
        raise ValueError(f"max_period must be positive, got {max_period}")
    half = embedding_dim // 2
    if half > 0 and half == downscale_freq_shift:
        raise ValueError(
            f"embedding_dim // 2 ({half}) equals downscale_freq_shift: the frequencies divide by their difference"
        )

    backend = resolve("timestep_embedding", timesteps.device, _IMPLEMENTED)
    if backend == "reference" or timesteps.numel() == 0:
        embedding = reference.diffusion.timestep_embedding(
            timesteps, embedding_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period
        )
        return embedding.float()
    settings = (embedding_dim, bool(flip_sin_to_cos), float(scale))
    if torch.compiler.is_compiling():  # the graph computes the frequencies (dynamo does not trace caches)
        frequencies = reference.diffusion.timestep_frequencies(half, downscale_freq_shift, max_period,
                                                               device=timesteps.device)
        return timestep_embedding_op(timesteps.contiguous(), frequencies, *settings, backend)
    frequencies = _frequencies(half, float(downscale_freq_shift), float(max_period), timesteps.device)
    return _embedding_kernel(backend, timesteps.contiguous(), frequencies, *settings)


@torch.library.custom_op("genfast::add_noise", mutates_args=())
def add_noise_op(
    original_samples: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, velocity: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """(noisy, velocity); velocity is empty unless asked for."""
    noisy, v = kernels(backend, "diffusion").add_noise(original_samples, noise, timesteps, alphas_cumprod, velocity)
    return noisy, v if v is not None else noisy.new_empty(0)


@add_noise_op.register_fake
def _(original_samples, noise, timesteps, alphas_cumprod, velocity, backend):
    return torch.empty_like(original_samples), torch.empty_like(original_samples) if velocity else noise.new_empty(0)


def add_noise(
    original_samples: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, *, velocity: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """diffusers' scheduler.add_noise in one pass: per sample a = alphas_cumprod[t],
    sqrt(a) x0 + sqrt(1 - a) noise; with velocity=True also get_velocity's target
    sqrt(a) noise - sqrt(1 - a) x0 from the same reads, as (noisy, velocity).

    original_samples, noise: (B, ...) float32, float16 or bfloat16 (math in
    float32). timesteps: (B,) integers indexing alphas_cumprod, the schedule's
    1-D table, both on the samples' device. CPU timesteps outside the table are
    an error; on a GPU, checking would wait for it: the kernel reads nothing
    there and those samples come out NaN.
    """
    check_tensor("original_samples", original_samples, dtypes=_DTYPES, min_dim=1)
    check_tensor("noise", noise, dtypes=(original_samples.dtype,), shape=tuple(original_samples.shape),
                 like=original_samples)
    check_tensor("timesteps", timesteps, dtypes=_INDEX_DTYPES, shape=(original_samples.shape[0],),
                 like=original_samples)
    check_tensor("alphas_cumprod", alphas_cumprod, dtypes=(torch.float32, torch.float64), like=original_samples)
    if alphas_cumprod.dim() != 1:
        raise ValueError(f"alphas_cumprod must be 1-D, got shape {tuple(alphas_cumprod.shape)}")
    backend = resolve("add_noise", original_samples.device, _IMPLEMENTED)
    if backend == "reference" or original_samples.numel() == 0:
        noisy, v = reference.diffusion.add_noise(original_samples, noise, timesteps, alphas_cumprod, velocity)
    else:
        noisy, v = add_noise_op(
            original_samples.contiguous(), noise.contiguous(), timesteps.long().contiguous(),
            alphas_cumprod.float().contiguous(), bool(velocity), backend,
        )
    return (noisy, v) if velocity else noisy


@torch.library.custom_op("genfast::denoising_loss", mutates_args=())
def denoising_loss_op(
    model_output: Tensor, target: Tensor, weights: Tensor | None, want_gradient: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, each sample's mean squared error, d loss / d model_output or empty unless want_gradient).

    The gradient comes from the forward's pass over the inputs: backward then
    scales it, reading one tensor instead of two."""
    loss, per_sample, gradient = kernels(backend, "diffusion").denoising_loss(model_output, target, weights,
                                                                           want_gradient)
    return loss, per_sample, gradient if gradient is not None else model_output.new_empty(0)


@denoising_loss_op.register_fake
def _(model_output, target, weights, want_gradient, backend):
    return (model_output.new_empty((), dtype=torch.float32),
            model_output.new_empty(model_output.shape[0], dtype=torch.float32),
            torch.empty_like(model_output) if want_gradient else model_output.new_empty(0))


def _loss_setup_context(ctx, inputs, output):
    model_output, target, weights, _want_gradient, backend = inputs
    _loss, per_sample, gradient = output
    ctx.save_for_backward(gradient, per_sample, model_output, target, weights)
    ctx.backend = backend
    ctx.set_materialize_grads(False)  # else autograd fills a zero tensor for the unused gradient output


def _scaled(gradient: Tensor, grad: Tensor, backend: str) -> Tensor:
    if backend == "cpu" and not torch.compiler.is_compiling():
        # Into the C++ output cache: a fresh 4 MB tensor from torch pays a page fault per 4 KB (memory.h).
        return extension().scale(gradient, grad.item())
    return gradient * grad


def _loss_backward(ctx, grad, _grad_per_sample, _grad_gradient):
    gradient, per_sample, model_output, target, weights = ctx.saved_tensors
    want_model_output, want_target, want_weights = ctx.needs_input_grad[:3]
    grad_m = None
    if torch.is_grad_enabled() and (want_model_output or want_target):
        # create_graph: the gradient as a differentiable expression of the inputs (the kernel's is not).
        diff = model_output.float() - target.float()
        grad_m = (2 / diff.numel()) * grad * diff
        if weights is not None:
            grad_m = grad_m * weights.reshape(-1, *[1] * (diff.dim() - 1))
        grad_m = grad_m.to(model_output.dtype)
    elif want_model_output or want_target:
        grad_m = _scaled(gradient, grad, ctx.backend)
    return (
        grad_m if want_model_output else None,
        -grad_m if want_target else None,
        grad * per_sample / per_sample.shape[0] if want_weights else None,  # d loss / d weights[b]
        None,
        None,
    )


denoising_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


def denoising_loss(model_output: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """The diffusion training loss in one pass that also writes its gradient, which backward scales:
    F.mse_loss(model_output.float(), target.float()), or with per-sample weights
    (e.g. min-SNR) the mean over samples of weights[b] times that sample's mean
    squared error, as diffusers' training scripts compute it.

    model_output, target: (B, ...) float32, float16 or bfloat16, one dtype.
    weights: (B,) float or None. Returns a float32 scalar; differentiable in all three.
    """
    check_tensor("model_output", model_output, dtypes=_DTYPES, min_dim=1)
    check_tensor("target", target, dtypes=(model_output.dtype,), shape=tuple(model_output.shape), like=model_output)
    if weights is not None:
        check_tensor("weights", weights, dtypes=(*_DTYPES, torch.float64), shape=(model_output.shape[0],),
                     like=model_output)
    backend = resolve("denoising_loss", model_output.device, _IMPLEMENTED)
    if backend == "reference" or model_output.numel() == 0:
        return reference.diffusion.denoising_loss(model_output, target, weights)
    want_gradient = torch.is_grad_enabled() and (model_output.requires_grad or target.requires_grad)
    weights_float = weights.float().contiguous() if weights is not None else None
    return denoising_loss_op(model_output.contiguous(), target.contiguous(), weights_float, want_gradient,
                             backend)[0]

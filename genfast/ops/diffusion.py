"""One fused sampler step, as the custom op genfast::denoise_step.

denoise_step() checks its arguments and picks a backend; eager calls run the
kernel directly, and under torch.compile or torch.export the graph holds the
custom op. The formula and StepCoefficients: genfast/reference/diffusion.py.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .. import reference
from ..backends import extension, resolve
from ..reference.diffusion import StepCoefficients
from ._checks import check_tensor

_IMPLEMENTED = frozenset({"cpu", "triton"})
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The scalar order of the op's `coefficients` argument and of csrc/bindings.cpp,
# which follows them with clip, min_log, max_log (and guidance).
_SCALARS = (
    "sample_noise", "x0_sample", "x0_model", "prev_x0", "prev_sample", "prev_model", "prev_history", "prev_noise",
    "out_x0", "out_sample",
)


def _kernel(backend, sample, model_output, noise, history, c, guidance_scale, want_denoised):
    if backend == "triton":
        from ..kernels import diffusion

        return diffusion.denoise_step(sample, model_output, c, noise, history, guidance_scale, want_denoised)
    return extension().denoise_step(
        sample, model_output, noise, history, _pack(c) + [float(guidance_scale or 0.0)], c.clip is not None,
        c.learned_variance is not None, guidance_scale is not None, want_denoised,
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
    coefficients: list[float],
    clipped: bool,
    learned_variance: bool,
    guidance_scale: float | None,
    want_denoised: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(prev, denoised); denoised is empty unless want_denoised (an op returns tensors)."""
    c = _unpack(coefficients, clipped, learned_variance)
    prev, denoised = _kernel(backend, sample, model_output, noise, history, c, guidance_scale, want_denoised)
    return prev, denoised if denoised is not None else sample.new_empty(0)


@denoise_step_op.register_fake
def _(sample, model_output, noise, history, coefficients, clipped, learned_variance, guidance_scale, want_denoised,
      backend):
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
) -> tuple[Tensor, Tensor | None]:
    """One sampler step in one pass over memory: (prev_sample, denoised).

    sample: (B, C, ...) float32, float16 or bfloat16. model_output: sample's
    dtype; (2B, ...) as [uncond, cond] when guidance_scale is given, and 2C
    channels when coefficients.learned_variance is set. noise, history: like
    sample. Outputs have sample's shape and dtype; denoised is None unless
    return_denoised. Math in float32.
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

    backend = resolve("denoise_step", sample.device, _IMPLEMENTED)
    if backend == "reference" or sample.numel() == 0:
        prev, denoised = reference.diffusion.denoise_step(sample, model_output, coefficients, noise, history,
                                                          guidance_scale)
        return prev.to(sample.dtype), denoised.to(sample.dtype) if return_denoised else None
    sample, model_output = sample.contiguous(), model_output.contiguous()
    noise = noise.contiguous() if noise is not None else None
    history = history.contiguous() if history is not None else None
    guidance = float(guidance_scale) if guidance_scale is not None else None
    if torch.compiler.is_compiling():
        prev, denoised = denoise_step_op(
            sample, model_output, noise, history, _pack(coefficients), coefficients.clip is not None,
            coefficients.learned_variance is not None, guidance, return_denoised, backend,
        )
        return prev, denoised if return_denoised else None
    return _kernel(backend, sample, model_output, noise, history, coefficients, guidance, return_denoised)

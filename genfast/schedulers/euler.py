"""The Euler schedulers (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
FlowMatchEulerDiscreteScheduler) with diffusers' API, each step() one fused kernel."""

from __future__ import annotations

import diffusers
import torch
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import logger as diffusers_logger
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from . import coefficients
from ._fused import FusedStepMixin


class _SigmaStep(FusedStepMixin):
    """What the two Euler schedulers check and count around their step, as diffusers does."""

    def _begin_step(self, timestep) -> tuple[float, float]:
        """(sigma, next sigma) of this step, from the host copy of the sigmas."""
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
                f" `{type(self).__name__}.step()` is not supported. Make sure to pass"
                " one of the `scheduler.timesteps` as a timestep."
            )
        if not getattr(self, "is_scale_input_called", True):  # flow matching scales no input
            diffusers_logger.warning(
                "The `scale_model_input` function should be called before `step` to ensure correct denoising. "
                "See `StableDiffusionPipeline` for a usage example."
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        sigmas = self.__dict__.get("_host_sigmas") or self.sigmas.tolist()
        return sigmas[self.step_index], sigmas[self.step_index + 1]


class EulerDiscreteScheduler(_SigmaStep, diffusers.EulerDiscreteScheduler):
    """diffusers.EulerDiscreteScheduler, its step fused: churn, guidance (given the
    [uncond, cond] model output and guidance_scale), the x0 prediction and the
    update in one pass."""

    def step(
        self,
        model_output,
        timestep,
        sample,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator=None,
        return_dict: bool = True,
        guidance_scale: float | None = None,
    ):
        sigma, sigma_next = self._begin_step(timestep)
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        c = coefficients.euler(sigma, sigma_next, self.config.prediction_type, gamma, s_noise)
        noise, seed = self._draw_noise(sample, model_output, generator) if gamma > 0 else (None, None)
        output = self._fused_step(EulerDiscreteSchedulerOutput, sample, model_output, c, noise, guidance_scale,
                                  return_dict, noise_seed=seed)
        self._step_index += 1
        return output


class EulerAncestralDiscreteScheduler(_SigmaStep, diffusers.EulerAncestralDiscreteScheduler):
    """diffusers.EulerAncestralDiscreteScheduler, its step fused: guidance (given the
    [uncond, cond] model output and guidance_scale), the x0 prediction, the
    Euler step and the ancestral noise in one pass."""

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True,
             guidance_scale: float | None = None):
        sigma, sigma_next = self._begin_step(timestep)
        c = coefficients.euler_ancestral(sigma, sigma_next, self.config.prediction_type)
        noise, seed = self._draw_noise(sample, model_output, generator)  # at every step, as diffusers does
        output = self._fused_step(EulerAncestralDiscreteSchedulerOutput, sample, model_output, c, noise,
                                  guidance_scale, return_dict, noise_seed=seed)
        self._step_index += 1
        return output


class FlowMatchEulerDiscreteScheduler(_SigmaStep, diffusers.FlowMatchEulerDiscreteScheduler):
    """diffusers.FlowMatchEulerDiscreteScheduler, its step fused: guidance (given the
    [uncond, cond] model output and guidance_scale) and the Euler update of the
    velocity, or with stochastic sampling the x0 prediction and the re-noising,
    in one pass. Per-token timesteps run diffusers' step (with a warning)."""

    def step(
        self,
        model_output,
        timestep,
        sample,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator=None,
        per_token_timesteps=None,
        return_dict: bool = True,
        guidance_scale: float | None = None,
    ):
        if per_token_timesteps is not None:
            if guidance_scale is not None:
                raise ValueError("guidance_scale is fused only without per_token_timesteps: guide the model output")
            self._warn_unfused("per_token_timesteps")
            return super().step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                                per_token_timesteps, return_dict)
        sigma, sigma_next = self._begin_step(timestep)
        stochastic = self.config.stochastic_sampling
        c = coefficients.flow_match_euler(sigma, sigma_next, stochastic)
        noise, seed = None, None
        if stochastic:  # diffusers draws it in float32, the dtype it computes in
            noise, seed = self._draw_noise(sample, model_output, generator, torch.float32)
        output = self._fused_step(FlowMatchEulerDiscreteSchedulerOutput, sample, model_output, c, noise,
                                  guidance_scale, return_dict, denoised_field=None, noise_seed=seed)
        self._step_index += 1
        return output


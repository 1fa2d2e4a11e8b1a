"""DPMSolverMultistepScheduler with diffusers' API whose step() is one fused kernel."""

from __future__ import annotations

import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from .. import ops
from . import coefficients
from ._fused import FusedStepMixin

_STOCHASTIC = {"dpmsolver++": False, "sde-dpmsolver++": True}


class DPMSolverMultistepScheduler(FusedStepMixin, diffusers.DPMSolverMultistepScheduler):
    """diffusers.DPMSolverMultistepScheduler, its step fused: guidance (given the
    [uncond, cond] model output and guidance_scale), the x0 prediction, and the
    first- or second-order update reading the previous step's x0, in one pass.

    DPM-Solver++ and its SDE variant, solver orders 1 and 2, both solver types,
    dynamic thresholding (one more pass, for its quantile). A learned variance,
    order 3 and the deprecated noise-prediction algorithms run diffusers' step
    (with a warning)."""

    def _unfused_branch(self) -> str | None:
        config = self.config
        if config.algorithm_type not in _STOCHASTIC:
            return f"algorithm_type={config.algorithm_type!r}"
        if config.solver_order > 2:
            return f"solver_order={config.solver_order}"
        if config.variance_type is not None:
            return f"variance_type={config.variance_type!r}"
        return None

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict: bool = True,
             guidance_scale: float | None = None):
        if unfused := self._unfused_branch():
            if guidance_scale is not None:
                raise ValueError(f"guidance_scale is fused only without {unfused}: guide the model output first")
            self._warn_unfused(unfused)
            return super().step(model_output, timestep, sample, generator, variance_noise, return_dict)
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        index, steps, config = self.step_index, len(self._schedule()), self.config
        # diffusers' rules for dropping to a lower order near the end, for stability.
        lower_order_final = index == steps - 1 and (
            config.euler_at_final or (config.lower_order_final and steps < 15) or config.final_sigmas_type == "zero"
        )
        first_order = config.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final
        sigmas = self.__dict__.get("_host_sigmas") or self.sigmas.tolist()
        stochastic = _STOCHASTIC[config.algorithm_type]
        c = coefficients.dpm_solver_multistep(
            sigmas[index], sigmas[index + 1], config.prediction_type,
            sigma_before=None if first_order else sigmas[index - 1],
            solver_type=config.solver_type, stochastic=stochastic, flow=config.use_flow_sigmas,
        )
        noise = seed = None
        if stochastic and variance_noise is not None:
            noise = variance_noise.to(sample.device, sample.dtype)
        elif stochastic:  # diffusers draws it in float32, the dtype it computes in
            noise, seed = self._draw_noise(sample, model_output, generator, torch.float32)
        prev_sample, x0 = ops.denoise_step(
            sample, model_output, c, noise=noise, history=None if first_order else self.model_outputs[-1],
            guidance_scale=guidance_scale, noise_seed=seed,
            threshold=self._threshold(sample, model_output, c, guidance_scale),
        )
        # The x0 predictions are the solver's history, kept where diffusers keeps them.
        self.model_outputs = [*self.model_outputs[1:], x0]
        self.lower_order_nums = min(self.lower_order_nums + 1, config.solver_order)
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

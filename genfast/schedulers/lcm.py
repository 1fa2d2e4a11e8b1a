"""LCMScheduler with diffusers' API whose step() is one fused kernel."""

from __future__ import annotations

import diffusers
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

from . import coefficients
from ._fused import AlphaNoisingMixin, FusedStepMixin


class LCMScheduler(FusedStepMixin, AlphaNoisingMixin, diffusers.LCMScheduler):
    """diffusers.LCMScheduler, its step fused: guidance (given the [uncond, cond]
    model output and guidance_scale), the x0 prediction, clipping, the
    consistency boundary condition and the re-noising in one pass (dynamic
    thresholding: one more, for its quantile)."""

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True,
             guidance_scale: float | None = None):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        schedule, index = self._schedule(), self.step_index
        t = schedule[index]
        prev_t = schedule[index + 1] if index + 1 < len(schedule) else t
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(t)
        last = index == self.num_inference_steps - 1
        c = coefficients.lcm(
            self._alpha_prod(t, None),
            self._alpha_prod(prev_t, self.final_alpha_cumprod),
            self.config.prediction_type,
            float(c_skip),
            float(c_out),
            self._clip(),
            last,
        )
        noise, seed = (None, None) if last else self._draw_noise(sample, model_output, generator)
        output = self._fused_step(LCMSchedulerOutput, sample, model_output, c, noise, guidance_scale, return_dict,
                                  denoised_field="denoised", noise_seed=seed)
        self._step_index += 1
        return output

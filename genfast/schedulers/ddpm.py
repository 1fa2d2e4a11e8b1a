"""DDPMScheduler with diffusers' API whose step() is one fused kernel."""

from __future__ import annotations

import diffusers
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

from . import coefficients
from ._fused import AlphaNoisingMixin, FusedStepMixin


class DDPMScheduler(FusedStepMixin, AlphaNoisingMixin, diffusers.DDPMScheduler):
    """diffusers.DDPMScheduler, its step fused: guidance (given the [uncond,
    cond] model output and guidance_scale), the x0 prediction, clipping, the
    posterior mean and the noise, a learned variance's included, in one pass
    (dynamic thresholding: one more, for its quantile). The variance types
    "learned" and "fixed_large_log" run diffusers' step (with a warning)."""

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True,
             guidance_scale: float | None = None):
        if self.variance_type not in coefficients.DDPM_VARIANCE_TYPES:
            unfused = f"variance_type {self.variance_type!r}"
            if guidance_scale is not None:
                raise ValueError(f"guidance_scale is fused only without {unfused}: guide the model output first")
            self._warn_unfused(unfused)
            return super().step(model_output, timestep, sample, generator, return_dict)
        t = self._host_timestep(timestep)
        prev_t = self._previous_in_schedule(t) if self.custom_timesteps or self.num_inference_steps else t - 1
        c = coefficients.ddpm(
            self._alpha_prod(t, None),
            self._alpha_prod(prev_t, self.one),
            self.config.prediction_type,
            self.variance_type,
            self._clip(),
        )
        noise, seed = self._draw_noise(sample, model_output, generator) if t > 0 else (None, None)
        return self._fused_step(DDPMSchedulerOutput, sample, model_output, c, noise, guidance_scale, return_dict,
                                noise_seed=seed)

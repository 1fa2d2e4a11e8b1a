"""DDIMScheduler with diffusers' API whose step() is one fused kernel."""

from __future__ import annotations

import diffusers
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from . import coefficients
from ._fused import AlphaNoisingMixin, FusedStepMixin


class DDIMScheduler(FusedStepMixin, AlphaNoisingMixin, diffusers.DDIMScheduler):
    """diffusers.DDIMScheduler, its step fused: guidance (given the [uncond,
    cond] model output and guidance_scale), the x0 prediction, clipping and
    the update in one pass (dynamic thresholding: one more, for its quantile)."""

    def step(
        self,
        model_output,
        timestep,
        sample,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise=None,
        return_dict: bool = True,
        guidance_scale: float | None = None,
    ):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        t = self._host_timestep(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        c = coefficients.ddim(
            self._alpha_prod(t, None),
            self._alpha_prod(prev_t, self.final_alpha_cumprod),
            self.config.prediction_type,
            eta,
            use_clipped_model_output,
            self._clip(),
        )
        noise = seed = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None`."
                )
            if variance_noise is not None:
                noise = variance_noise
            else:
                noise, seed = self._draw_noise(sample, model_output, generator)
        return self._fused_step(DDIMSchedulerOutput, sample, model_output, c, noise, guidance_scale, return_dict,
                                noise_seed=seed)

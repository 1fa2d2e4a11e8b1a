"""What the fused schedulers share: the fused_noise option; the timesteps on
the host, so that step() never reads a device tensor; noise drawn as diffusers
draws it, or its seed; the fused step and diffusers' output types; one warning
for configurations that run diffusers' own step."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import torch
from diffusers.utils.torch_utils import randn_tensor

from .. import ops


class FusedStepMixin:
    """Mixed into a diffusers scheduler class, before it.

    Adds the constructor and config argument fused_noise: False draws each
    step's noise as diffusers does (torch.randn from the generator: the same
    trajectory for the same seed); True lets the step kernel make it from a
    seed drawn from the generator (Philox, genfast/reference/diffusion.py's
    philox_normal): one pass less over memory and no torch.randn, reproducible
    for the same seed and backend but not diffusers' numbers."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        diffusers_class = next((c for c in cls.__mro__ if c.__module__.startswith("diffusers.")), None)
        # An intermediate mixin (the Euler schedulers' shared steps) has no diffusers class yet; a
        # subclass of a genfast scheduler inherits the argument, or defines its own __init__.
        if diffusers_class is None or "__init__" in cls.__dict__ or hasattr(cls.__init__, "_adds_fused_noise"):
            return
        diffusers_init = diffusers_class.__init__

        def __init__(self, *args, fused_noise: bool = False, **kwargs):
            diffusers_init(self, *args, **kwargs)
            self.register_to_config(fused_noise=bool(fused_noise))

        # diffusers takes a scheduler's config keys from its __init__ signature (from_config):
        # diffusers' parameters, then fused_noise.
        parameters = list(inspect.signature(diffusers_init).parameters.values())
        at = len(parameters) - (parameters[-1].kind == inspect.Parameter.VAR_KEYWORD)
        parameters.insert(at, inspect.Parameter("fused_noise", inspect.Parameter.KEYWORD_ONLY, default=False))
        __init__.__signature__ = inspect.Signature(parameters)
        __init__.__doc__ = diffusers_init.__doc__
        __init__._adds_fused_noise = True
        cls.__init__ = __init__

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        # One read of the schedule here, so that step() needs none.
        self._host_timesteps = self.timesteps.tolist()
        self._host_index = 0
        if isinstance(getattr(self, "sigmas", None), torch.Tensor):
            self._host_sigmas = self.sigmas.tolist()

    def _schedule(self) -> list[int]:
        if getattr(self, "_host_timesteps", None) is None:  # no set_timesteps yet: the training schedule
            self._host_timesteps = self.timesteps.tolist()
            self._host_index = 0
        return self._host_timesteps

    def _host_timestep(self, timestep):
        """The timestep as a Python number, and its place in the schedule recorded.

        Reading a device tensor would wait for the GPU; as pipelines step
        through the schedule in order, such a timestep is taken to be the next
        one of the schedule."""
        schedule = self._schedule()
        if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
            index = min(self._host_index, len(schedule) - 1)
        else:
            t = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
            if t not in schedule:
                raise ValueError(f"timestep {t} is not in the schedule {schedule}")
            index = schedule.index(t)
        self._host_index = index + 1
        return schedule[index]

    def _init_step_index(self, timestep) -> None:
        """For the schedulers that count steps (Euler's): diffusers looks the timestep up on its
        device, a sync; the host copy serves here, and a device tensor is taken to be the first
        timestep (pipelines that start later call set_begin_index)."""
        if self.begin_index is not None:
            self._step_index = self.begin_index
        elif isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
            self._step_index = 0
        else:
            t = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
            indices = [i for i, s in enumerate(self._schedule()) if s == t]
            if not indices:
                raise ValueError(f"timestep {t} is not in the schedule {self._schedule()}")
            # diffusers' rule: a timestep listed twice starts at its second place.
            self._step_index = indices[1] if len(indices) > 1 else indices[0]

    def _alpha_prod(self, t: int, before_start) -> float:
        """alphas_cumprod[t] from a host copy (indexing the tensor costs microseconds a step), or
        before_start (the table's value before t = 0) for negative t."""
        if t < 0:
            return float(before_start)
        table = self.__dict__.get("_host_alphas")
        if table is None:
            table = self._host_alphas = self.alphas_cumprod.tolist()
        return table[t]

    def _previous_in_schedule(self, t: int) -> int:
        """The next timestep of the schedule after t, or -1 after the last."""
        schedule = self._schedule()
        index = schedule.index(t)
        return schedule[index + 1] if index + 1 < len(schedule) else -1

    def _draw_noise(self, sample, model_output, generator, dtype=None) -> tuple[torch.Tensor | None, int | None]:
        """(noise, None) drawn as diffusers draws it (same call, same generator, in dtype, by default
        model_output's), so a seed gives diffusers' trajectory; with fused_noise, (None, seed) for the
        kernel to make it."""
        if self.config.get("fused_noise", False):
            return None, _noise_seed(generator)
        noise = randn_tensor(sample.shape, generator=generator, device=model_output.device,
                             dtype=dtype or model_output.dtype)
        return noise.to(sample.dtype), None

    def _clip(self) -> float | None:
        """The x0 clipping range of the schedulers that clip: thresholding replaces clipping, as in diffusers."""
        return self.config.clip_sample_range if self.config.clip_sample and not self.config.thresholding else None

    def _threshold(self, sample, model_output, coefficients, guidance_scale) -> torch.Tensor | None:
        """With thresholding, its per-sample bound s as diffusers' _threshold_sample works it out, from
        one extra pass: the step's x0 prediction, then its quantile (the step then clamps and divides)."""
        if not self.config.get("thresholding", False):  # the Euler schedulers have no such option
            return None
        x0_only = dataclasses.replace(coefficients, clip=None, out_x0=1.0, out_sample=0.0)
        _, x0 = ops.denoise_step(sample, model_output, x0_only, guidance_scale=guidance_scale)
        s = torch.quantile(x0.float().flatten(1).abs(), self.config.dynamic_thresholding_ratio, dim=1)
        return s.clamp(1, self.config.sample_max_value)

    def _fused_step(self, output_class, sample, model_output, coefficients, noise, guidance_scale, return_dict,
                    denoised_field: str | None = "pred_original_sample", noise_seed: int | None = None):
        """The step's outputs as diffusers returns them: prev_sample and, under the name
        denoised_field unless it is None, the denoised sample."""
        prev_sample, denoised = ops.denoise_step(
            sample, model_output, coefficients, noise=noise, guidance_scale=guidance_scale,
            return_denoised=denoised_field is not None, noise_seed=noise_seed,
            threshold=self._threshold(sample, model_output, coefficients, guidance_scale),
        )
        outputs = {"prev_sample": prev_sample}
        if denoised_field is not None:
            outputs[denoised_field] = denoised
        return output_class(**outputs) if return_dict else tuple(outputs.values())

    def _warn_unfused(self, what: str) -> None:
        warned = self.__dict__.setdefault("_unfused_warned", set())
        if what not in warned:
            warned.add(what)
            warnings.warn(
                f"genfast.schedulers.{type(self).__name__}: {what} has no fused kernel; this scheduler runs "
                "diffusers' own step for it",
                stacklevel=3,
            )


def _noise_seed(generator) -> int:
    """A seed for fused noise, drawn from the generator (torch's default one for None) without
    waiting for a GPU."""
    if isinstance(generator, list):
        raise ValueError("fused_noise takes one generator, not one per sample")
    if generator is not None and generator.device.type != "cpu":
        # A GPU generator's state is its seed and Philox offset, both kept on the host.
        offset = generator.get_offset()
        generator.set_offset(offset + 4)
        return (generator.initial_seed() * 0x9E3779B97F4A7C15 + offset) % 2**63
    return int(torch.randint(0, 2**63 - 1, (), generator=generator))


class AlphaNoisingMixin:
    """add_noise and get_velocity of the schedulers with an alphas_cumprod table
    (DDPM, DDIM, LCM) as one fused pass each, and both from one pass by
    add_noise_and_velocity, for training loops."""

    def _alphas_on(self, device: torch.device) -> torch.Tensor:
        tables = self.__dict__.setdefault("_alphas_by_device", {})
        if device not in tables:
            tables[device] = self.alphas_cumprod.to(device, torch.float32)
        return tables[device]

    @staticmethod
    def _per_sample(timesteps, original_samples) -> torch.Tensor:
        """timesteps as (B,) on the samples' device: diffusers broadcasts one timestep to the batch."""
        timesteps = torch.as_tensor(timesteps, device=original_samples.device).reshape(-1)
        return timesteps.expand(original_samples.shape[0]) if timesteps.numel() == 1 else timesteps

    def add_noise_and_velocity(self, original_samples, noise, timesteps):
        """(add_noise(...), get_velocity(...)) of the same arguments, reading the inputs once."""
        return ops.add_noise(original_samples, noise, self._per_sample(timesteps, original_samples),
                             self._alphas_on(original_samples.device), velocity=True)

    def add_noise(self, original_samples, noise, timesteps):
        return ops.add_noise(original_samples, noise, self._per_sample(timesteps, original_samples),
                             self._alphas_on(original_samples.device))

    def get_velocity(self, sample, noise, timesteps):
        return self.add_noise_and_velocity(sample, noise, timesteps)[1]

"""The U-Net denoiser's guided sampling loop end to end: 50 DDIM steps with
classifier-free guidance, the model run on the [uncond, cond] batch each step.

genfast builds the model from its layers and samples with its fused DDIM
scheduler (guidance in the step); torch.nn builds it from torch's layers with
the same weights and samples with diffusers' DDIM scheduler and the guidance
by hand, as a pipeline does; torch.nn+torch.compile compiles that model. In
the channels_last case every model runs channels-last, the layout oneDNN's
convolutions prefer on CPU.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

import genfast
from genfast.models import UNet, sample

from .harness import Case, Provider, genfast_providers

LATENTS = (2, 4, 32, 32)
STEPS = 50
MODEL = {"channels": (32, 64, 128), "num_classes": 10}


@functools.cache
def _model_cost() -> tuple[int, int]:
    """(bytes of weights, flops) of one forward on the guided batch; the loop runs STEPS of them.
    Counted on the meta device: shapes only, no arithmetic."""
    batch = 2 * LATENTS[0]
    with torch.device("meta"), FlopCounterMode(display=False) as counter, torch.no_grad():
        model = UNet(**MODEL)
        model(torch.zeros(batch, *LATENTS[1:]), torch.zeros(batch), torch.zeros(batch, dtype=torch.long))
    return sum(p.numel() * p.element_size() for p in model.parameters()), counter.get_total_flops()


def sampling_case(channels_last: bool) -> Case:
    def make_inputs(device: torch.device) -> dict:
        torch.manual_seed(0)
        reference = UNet(**MODEL).eval()
        fused = UNet(**MODEL, fused=True).eval()
        fused.load_state_dict(reference.state_dict())
        layout = torch.channels_last if channels_last else torch.contiguous_format
        reference, fused = (m.to(device=device, memory_format=layout) for m in (reference, fused))
        return {
            "models": {"genfast": fused, "torch": reference, "compiled": torch.compile(reference)},
            "class_labels": torch.arange(LATENTS[0], device=device) % MODEL["num_classes"],
            "layout": layout,
        }

    weight_bytes, flops = _model_cost()
    variant = "channels_last" if channels_last else "contiguous"
    return Case(f"ddim {STEPS} steps guided {'x'.join(map(str, LATENTS))} {variant}", "unet_sampling", "forward",
                math.prod(LATENTS), make_inputs, STEPS * weight_bytes, STEPS * flops, variant=variant)


CASES = [sampling_case(channels_last=False), sampling_case(channels_last=True)]


def _loop(model, scheduler, class_labels, layout):
    generator = torch.Generator(class_labels.device).manual_seed(0)
    latents = sample(model, scheduler, class_labels, LATENTS, guidance_scale=4.0, num_inference_steps=STEPS,
                     generator=generator)
    return latents.contiguous(memory_format=layout)


def _genfast(models, class_labels, layout):
    return _loop(models["genfast"], genfast.schedulers.DDIMScheduler(clip_sample=False), class_labels, layout)


def _torch(which: str):
    def run(models, class_labels, layout):
        import diffusers

        return _loop(models[which], diffusers.DDIMScheduler(clip_sample=False), class_labels, layout)

    return run


def providers(device_type: str) -> list[Provider]:
    try:
        import diffusers  # noqa: F401
    except ImportError as error:
        missing = f"diffusers is not installed ({error})"
        return [Provider(p, None, unavailable=missing) for p in ("genfast", "torch.nn", "torch.nn+torch.compile")]
    return [
        *genfast_providers(_genfast, device_type),
        Provider("torch.nn", _torch("torch")),
        # The model compiled, not the loop: its first (untimed) call compiles.
        Provider("torch.nn+torch.compile", _torch("compiled")),
    ]

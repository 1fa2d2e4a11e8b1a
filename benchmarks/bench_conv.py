"""The convolutions of a small latent U-Net (genfast.models.UNet's benchmark
model: 32, 64, 128 channels at 32, 16, 8 pixels, batch 4), and one of Stable
Diffusion's 3x3 convolutions at 32 x 32 latents, forward.

Each provider runs a module holding its weights, as a model does: genfast.nn.Conv2d
keeps its Winograd-transformed filters between calls, and torch.nn.Conv2d runs
oneDNN. Contiguous and channels-last inputs. The flop count is direct
convolution's, so both providers are measured against the same work. No
backward case: genfast's is ATen's convolution backward.
"""

from __future__ import annotations

import torch

import genfast

from .harness import Case, Provider, genfast_providers

# source: (input shape, output channels, kernel size)
SHAPES = {
    "unet level 0": ((4, 32, 32, 32), 32, 3),
    "unet up level 0": ((4, 64, 32, 32), 32, 3),
    "unet level 1": ((4, 64, 16, 16), 64, 3),
    "unet middle": ((4, 128, 8, 8), 128, 3),
    "unet up level 2": ((4, 256, 8, 8), 128, 3),
    "unet attention qkv": ((4, 128, 8, 8), 384, 1),
    "sd-unet mid": ((2, 640, 32, 32), 640, 3),
}


def conv_case(source: str, channels_last: bool) -> Case:
    shape, out_channels, kernel = SHAPES[source]
    batch, channels, height, width = shape

    def make_inputs(device: torch.device) -> dict:
        torch.manual_seed(0)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        reference = torch.nn.Conv2d(channels, out_channels, kernel, padding=kernel // 2)
        fused = genfast.nn.Conv2d(channels, out_channels, kernel, padding=kernel // 2)
        fused.load_state_dict(reference.state_dict())
        modules = {name: m.to(device=device, memory_format=layout) for name, m in
                   (("genfast", fused), ("torch", reference))}
        return {"x": torch.randn(shape, device=device).contiguous(memory_format=layout), "modules": modules}

    pixels = batch * height * width
    weight_bytes = out_channels * channels * kernel * kernel * 4
    traffic = 4 * pixels * (channels + out_channels) + weight_bytes
    flops = 2 * pixels * channels * out_channels * kernel * kernel
    variant = "channels_last" if channels_last else "contiguous"
    return Case(f"{source} {'x'.join(map(str, shape))} to {out_channels} {kernel}x{kernel} {variant}", "conv2d",
                "forward", pixels, make_inputs, traffic, flops, quick=source == "unet middle", variant=variant,
                devices=("cpu",))


CASES = [conv_case(source, channels_last) for source in SHAPES for channels_last in (False, True)]


def _run(which: str):
    def run(x, modules):
        with torch.no_grad():
            return modules[which](x)

    return run


def providers(device_type: str) -> list[Provider]:
    return [
        *genfast_providers(_run("genfast"), device_type),
        Provider("torch.nn", _run("torch")),
        Provider("torch.nn+torch.compile", _run("torch"), compiled=True),
    ]

"""The convolutions of a small latent U-Net (genfast.models.UNet's benchmark
model: 32, 64, 128 channels at 32, 16, 8 pixels, batch 4), and one of Stable
Diffusion's 3x3 convolutions at 32 x 32 latents, forward; and the U-Net's and
the VAE's 3x3 ones (batch 16, 32 to 128 channels at 64 to 16 pixels) backward.

A forward case runs a module holding its weights, as a model does: genfast.nn.Conv2d
keeps its Winograd-transformed filters between calls, and torch.nn.Conv2d runs
oneDNN. A backward case takes the gradients of the input, the weight and the bias,
as a training step does (the weight then changes every step: genfast.ops.conv2d
transforms it each call). Contiguous and channels-last inputs (and weights, for
the backward). The flop count is direct convolution's, so both providers are
measured against the same work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


# The 3x3 convolutions timed backward: (input shape, output channels)
BACKWARD_SHAPES = {
    "unet level 0": ((4, 32, 32, 32), 32),
    "unet level 1": ((4, 64, 16, 16), 64),
    "unet middle": ((4, 128, 8, 8), 128),
    "vae level 0": ((16, 32, 64, 64), 32),
    "vae level 1": ((16, 64, 32, 32), 64),
    "vae level 2": ((16, 128, 16, 16), 128),
}


def conv_backward_case(source: str, channels_last: bool) -> Case:
    shape, out_channels = BACKWARD_SHAPES[source]
    batch, channels, height, width = shape

    def make_inputs(device: torch.device) -> dict:
        generator = torch.Generator().manual_seed(0)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(shape, generator=generator)
        weight = torch.randn(out_channels, channels, 3, 3, generator=generator) / (3 * channels**0.5)
        return {"x": x.to(device).contiguous(memory_format=layout),
                "weight": weight.to(device).contiguous(memory_format=layout),
                "bias": torch.randn(out_channels, generator=generator).to(device)}

    pixels = batch * height * width
    # Read x, the weight and dy; write dx and dweight. Two products the forward's size.
    traffic = 4 * (2 * pixels * channels + pixels * out_channels + 2 * out_channels * channels * 9)
    variant = "channels_last" if channels_last else "contiguous"
    return Case(f"{source} {'x'.join(map(str, shape))} to {out_channels} 3x3 {variant}", "conv2d", "backward", pixels,
                make_inputs, traffic, 2 * 2 * pixels * channels * out_channels * 9,
                quick=source == "vae level 1" and channels_last, variant=f"backward {variant}", devices=("cpu",))


CASES = [
    *(conv_case(source, channels_last) for source in SHAPES for channels_last in (False, True)),
    *(conv_backward_case(source, channels_last) for source in BACKWARD_SHAPES for channels_last in (False, True)),
]


def _run(which: str):
    """A forward case's module call, or a backward case's function of x, weight and bias."""
    function = genfast.ops.conv2d if which == "genfast" else F.conv2d

    def run(x, modules=None, weight=None, bias=None):
        if modules is None:
            return function(x, weight, bias, padding=1)
        with torch.no_grad():
            return modules[which](x)

    return run


def providers(device_type: str) -> list[Provider]:
    return [
        *genfast_providers(_run("genfast"), device_type),
        Provider("torch.nn", _run("torch")),
        Provider("torch.nn+torch.compile", _run("torch"), compiled=True),
    ]

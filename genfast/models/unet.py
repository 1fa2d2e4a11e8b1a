"""A small class-conditional U-Net denoiser, built from torch.nn layers or
from genfast's from the same weights, and its sampling loop.

The two builds share one module tree and state_dict; the genfast one runs
GroupNorm+SiLU as one kernel (genfast.nn.GroupNorm), its 3x3 convolutions by
Winograd's algorithm with the decoder's upsampling and the ResNet blocks' sums
fused into them (genfast.nn.Conv2d), the timestep embedding as one kernel,
attention with genfast.ops.scaled_dot_product_attention, and guidance inside
the scheduler's fused step.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as genfast_nn
from .. import ops, reference
from .layers import use_channels_last


class GroupNormSiLU(nn.GroupNorm):
    """GroupNorm then SiLU in torch.nn layers: what genfast.nn.GroupNorm(activation="silu") fuses."""

    def forward(self, input: Tensor) -> Tensor:
        return F.silu(super().forward(input))


def _norm(channels: int, groups: int, fused: bool, silu: bool) -> nn.GroupNorm:
    if fused:
        return genfast_nn.GroupNorm(groups, channels, activation="silu" if silu else None)
    return GroupNormSiLU(groups, channels) if silu else nn.GroupNorm(groups, channels)


def _conv(in_channels: int, out_channels: int, kernel_size: int, fused: bool, **kwargs) -> nn.Conv2d:
    return (genfast_nn.Conv2d if fused else nn.Conv2d)(in_channels, out_channels, kernel_size, **kwargs)


class ResBlock(nn.Module):
    """GroupNorm+SiLU, conv, plus the embedding's projection, GroupNorm+SiLU, conv, plus the skip."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, groups: int, fused: bool):
        super().__init__()
        self.fused = fused
        self.norm1 = _norm(in_channels, groups, fused, silu=True)
        self.conv1 = _conv(in_channels, out_channels, 3, fused, padding=1)
        self.embedding = nn.Linear(embedding_dim, out_channels)
        self.norm2 = _norm(out_channels, groups, fused, silu=True)
        self.conv2 = _conv(out_channels, out_channels, 3, fused, padding=1)
        self.skip = _conv(in_channels, out_channels, 1, fused) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        projected = self.embedding(embedding)[:, :, None, None]
        if self.fused:  # the sums added as the convolutions write their outputs
            h = self.conv1(self.norm1(x), residual=projected)
            return self.conv2(self.norm2(h), residual=self.skip(x))
        h = self.conv1(self.norm1(x)) + projected
        return self.skip(x) + self.conv2(self.norm2(h))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual."""

    def __init__(self, channels: int, heads: int, groups: int, fused: bool):
        super().__init__()
        self.heads = heads
        self.attend = ops.scaled_dot_product_attention if fused else F.scaled_dot_product_attention
        self.norm = _norm(channels, groups, fused, silu=False)
        self.qkv = _conv(channels, 3 * channels, 1, fused)
        self.out = _conv(channels, channels, 1, fused)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        shape = (batch, 3, self.heads, channels // self.heads)
        qkv = self.qkv(self.norm(x))
        # q, k and v (batch, heads, pixels, head_dim) as views of qkv in its layout, and the heads
        # merged into x's: a channels-last image through channels-first reshapes took a copy each
        # way, and sent its projections' gradients back channels-first.
        if x.is_contiguous(memory_format=torch.channels_last):
            q, k, v = qkv.permute(0, 2, 3, 1).unflatten(-1, shape[1:]).flatten(1, 2).permute(2, 0, 3, 1, 4).unbind(0)
            merged = self.attend(q, k, v).transpose(1, 2).reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        else:
            q, k, v = qkv.unflatten(1, shape[1:]).flatten(-2).transpose(-1, -2).unbind(1)
            merged = self.attend(q, k, v).transpose(-1, -2).reshape(batch, channels, height, width)
        return x + self.out(merged)


class UNet(nn.Module):
    """predicts the noise of a latent (B, in_channels, H, W) at timesteps (B,) for class labels (B,);
    label num_classes means "no class", the unconditional half of classifier-free guidance.

    channels: per resolution level, halving H and W between levels (H and W divisible by
    2^(levels - 1)); attention at the levels listed and in the middle. fused: genfast layers."""

    def __init__(
        self,
        in_channels: int = 4,
        channels: tuple[int, ...] = (32, 64, 128),
        num_classes: int = 10,
        groups: int = 8,
        heads: int = 4,
        attention_levels: tuple[int, ...] = (2,),
        fused: bool = False,
    ):
        super().__init__()
        self.fused = fused
        self.num_classes = num_classes
        self.frequency_dim = channels[0]
        embedding_dim = 4 * channels[0]
        self.time_mlp = nn.Sequential(
            nn.Linear(channels[0], embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim)
        )
        self.class_embedding = nn.Embedding(num_classes + 1, embedding_dim)
        self.conv_in = _conv(in_channels, channels[0], 3, fused, padding=1)

        def level(in_ch: int, out_ch: int, index: int) -> nn.ModuleList:
            attention = SelfAttention(out_ch, heads, groups, fused) if index in attention_levels else nn.Identity()
            return nn.ModuleList([ResBlock(in_ch, out_ch, embedding_dim, groups, fused), attention])

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        previous = channels[0]
        for index, width in enumerate(channels):
            self.down.append(level(previous, width, index))
            if index < len(channels) - 1:
                self.downsample.append(_conv(width, width, 3, fused, stride=2, padding=1))
            previous = width
        self.middle = nn.ModuleList([
            ResBlock(previous, previous, embedding_dim, groups, fused),
            SelfAttention(previous, heads, groups, fused),
            ResBlock(previous, previous, embedding_dim, groups, fused),
        ])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for index in reversed(range(len(channels))):
            self.up.append(level(previous + channels[index], channels[index], index))
            if index > 0:
                self.upsample.append(_conv(channels[index], channels[index - 1], 3, fused, padding=1))
                previous = channels[index - 1]
        self.norm_out = _norm(channels[0], groups, fused, silu=True)
        self.conv_out = _conv(channels[0], in_channels, 3, fused, padding=1)
        if fused:
            use_channels_last(self)

    def _embed(self, timesteps: Tensor, class_labels: Tensor) -> Tensor:
        args = (timesteps, self.frequency_dim, True, 0)  # diffusers' Stable Diffusion settings
        frequencies = ops.timestep_embedding(*args) if self.fused else reference.diffusion.timestep_embedding(*args)
        return F.silu(self.time_mlp(frequencies) + self.class_embedding(class_labels))

    def _upsample(self, conv: nn.Conv2d, h: Tensor) -> Tensor:
        """conv of h upsampled twice by nearest neighbours; genfast's reads h in place."""
        return conv(h, upsample=2) if self.fused else conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))

    def forward(self, sample: Tensor, timesteps: Tensor, class_labels: Tensor) -> Tensor:
        embedding = self._embed(timesteps, class_labels)
        h = self.conv_in(sample)
        skips = []
        for index, (block, attention) in enumerate(self.down):
            h = attention(block(h, embedding))
            skips.append(h)
            if index < len(self.downsample):
                h = self.downsample[index](h)
        first, attention, second = self.middle
        h = second(attention(first(h, embedding)), embedding)
        for index, (block, attention) in enumerate(self.up):
            h = attention(block(torch.cat([h, skips.pop()], dim=1), embedding))
            if index < len(self.upsample):
                h = self._upsample(self.upsample[index], h)
        return self.conv_out(self.norm_out(h))


@torch.no_grad()
def sample(
    model: UNet,
    scheduler,
    class_labels: Tensor,
    shape: tuple[int, ...],
    guidance_scale: float = 4.0,
    num_inference_steps: int = 50,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A classifier-free guided sampling loop: latents of shape (B, ...) for class_labels (B,).

    Each step runs the model once on the [unconditional, conditional] batch. A
    genfast scheduler takes both halves and guides inside its fused step; any
    other diffusers scheduler gets the guided output, as pipelines give it."""
    device = class_labels.device
    # Drawn where the generator lives, as diffusers' randn_tensor does, then moved.
    latents = torch.randn(shape, generator=generator, device=generator.device if generator else device).to(device)
    scheduler.set_timesteps(num_inference_steps, device=device)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    labels = torch.cat([torch.full_like(class_labels, model.num_classes), class_labels])
    fused_guidance = "guidance_scale" in inspect.signature(scheduler.step).parameters
    for t in scheduler.timesteps:
        model_input = torch.cat([latents, latents])
        if hasattr(scheduler, "scale_model_input"):
            model_input = scheduler.scale_model_input(model_input, t)
        output = model(model_input, t.expand(labels.shape[0]).to(device), labels)
        if fused_guidance:
            latents = scheduler.step(output, t, latents, generator=generator, guidance_scale=guidance_scale)[0]
        else:
            uncond, cond = output.chunk(2)
            latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents, generator=generator)[0]
    return latents

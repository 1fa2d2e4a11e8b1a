"""The seed architectures, each buildable from torch.nn layers or genfast's from the same weights."""

from .unet import UNet, sample

__all__ = ["UNet", "sample"]

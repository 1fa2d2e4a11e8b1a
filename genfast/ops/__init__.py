"""genfast ops: each a torch.library custom op behind a checked Python function."""

from .norm import group_norm

__all__ = ["group_norm"]

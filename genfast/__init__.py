"""genfast: fused, verified kernels for generative models.

    import genfast
    y = genfast.ops.group_norm(x, 32, weight, bias, activation="silu")
    norm = genfast.nn.GroupNorm(32, 320, activation="silu")
    genfast.optimize(model)  # its torch.nn norms and activations, swapped in place
    with genfast.use_backend("reference"):
        ...
"""

from . import backends, models, nn, ops, reference, schedulers
from .compile_cache import tag_compile_cache
from .backends import get_backend, set_backend, use_backend
from .optimize import optimize

__version__ = "0.1.0"
tag_compile_cache()
__all__ = [
    "backends", "models", "nn", "ops", "reference", "schedulers", "get_backend", "optimize", "set_backend",
    "use_backend",
]

"""Diffusion schedulers with diffusers' API whose step() is one fused kernel.

Each is a subclass of the diffusers class of the same name, so it swaps into
any pipeline:

    pipe.scheduler = genfast.schedulers.DDIMScheduler.from_config(pipe.scheduler.config)

diffusers is an optional dependency: without it genfast.schedulers.coefficients
and genfast.ops.denoise_step still work, and the classes raise ImportError.
"""

from . import coefficients

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "LCMScheduler",
    "coefficients",
]

_CLASSES = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "DPMSolverMultistepScheduler": "dpm_solver",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler",
    "FlowMatchEulerDiscreteScheduler": "euler",
    "LCMScheduler": "lcm",
}


def __getattr__(name: str):
    if name not in _CLASSES:
        raise AttributeError(f"module 'genfast.schedulers' has no attribute {name!r}")
    try:
        import diffusers  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"genfast.schedulers.{name} subclasses diffusers' scheduler: pip install diffusers"
        ) from error
    from importlib import import_module

    return getattr(import_module(f".{_CLASSES[name]}", __name__), name)

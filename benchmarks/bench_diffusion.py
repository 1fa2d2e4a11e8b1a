"""The diffusion ops as diffusers' sampling loops and training scripts run
them, on Stable Diffusion latents: (16, 4, 128, 128), 16 SDXL-sized images.

Scheduler cases are one step() at a mid-schedule timestep. genfast's
schedulers are timed against diffusers' own, against torch.compile of
diffusers' step, and, in the guided case, against diffusers' step after the
pipeline's classifier-free guidance, which genfast fuses into the step.
Training cases are the noised batch with its velocity target (add_noise and
get_velocity), and the min-SNR weighted loss with its backward, against
diffusers' train_text_to_image.py code and its torch.compile. Every case names
its task; each provider runs it its way.
"""

from __future__ import annotations

import math

import torch

import genfast

from .harness import Case, Provider, genfast_providers

LATENTS = (16, 4, 128, 128)
STEPS = 50
GUIDANCE_SCALE = 7.5

# name: (scheduler class, its config, step() keyword arguments)
SCHEDULERS = {
    "ddpm": ("DDPMScheduler", {}, {}),
    "ddpm fused_noise": ("DDPMScheduler", {"fused_noise": True}, {}),
    "ddim eta=0": ("DDIMScheduler", {}, {}),
    "ddim eta=1": ("DDIMScheduler", {}, {"eta": 1.0}),
    "euler": ("EulerDiscreteScheduler", {}, {}),
    "euler ancestral": ("EulerAncestralDiscreteScheduler", {}, {}),
    "flow match euler": ("FlowMatchEulerDiscreteScheduler", {}, {}),
    "lcm": ("LCMScheduler", {}, {}),
    "dpm++ 2m": ("DPMSolverMultistepScheduler", {}, {}),
}
# The schedulers whose step reads noise drawn by torch.randn (with fused_noise, the kernel makes it).
NOISY = {"ddpm", "ddim eta=1", "euler ancestral", "lcm"}


def _step_bytes(shape: tuple[int, ...], noise: bool, guided: bool, denoised: bool, history: bool) -> int:
    """Reads sample, model_output (both halves when guided), noise (written
    first by torch.randn) and DPM-Solver's previous x0; writes prev_sample and,
    but for flow matching, the denoised sample."""
    tensor = math.prod(shape) * 4
    return tensor * (1 + (2 if guided else 1) + (2 if noise else 0) + (2 if denoised else 1) + history)


def step_case(scheduler: str, guided: bool = False, quick: bool = False) -> Case:
    name = f"{scheduler}{' guided' if guided else ''} {'x'.join(map(str, LATENTS))}"

    def make_inputs(device: torch.device) -> dict:
        batch = LATENTS[0] * (2 if guided else 1)
        ours, theirs = (_scheduler(library, scheduler) for library in ("genfast", "diffusers"))
        return {
            "task": "step",
            "sample": torch.randn(LATENTS, device=device),
            "model_output": torch.randn(batch, *LATENTS[1:], device=device),
            "ours": ours,
            "theirs": theirs,
            "index": STEPS // 2,
            "step_kwargs": SCHEDULERS[scheduler][2],
            "guidance_scale": GUIDANCE_SCALE if guided else None,
        }

    denoised = not scheduler.startswith("flow match")
    return Case(name, "scheduler_step", "forward", math.prod(LATENTS), make_inputs,
                _step_bytes(LATENTS, scheduler in NOISY, guided, denoised, scheduler.startswith("dpm")), quick=quick)


CASES = [
    step_case("ddpm", quick=True),
    step_case("ddpm fused_noise", quick=True),
    step_case("ddim eta=0", quick=True),
    step_case("ddim eta=1"),
    step_case("ddim eta=0", guided=True),
    step_case("euler", quick=True),
    step_case("euler ancestral"),
    step_case("flow match euler"),
    step_case("lcm"),
    step_case("dpm++ 2m", quick=True),
]


def _scheduler(library: str, scheduler: str):
    """A scheduler of the library, its timesteps set."""
    import diffusers

    class_name, config, _ = SCHEDULERS[scheduler]
    module = genfast.schedulers if library == "genfast" else diffusers
    if library != "genfast":
        config = {key: value for key, value in config.items() if key != "fused_noise"}
    instance = getattr(module, class_name)(**config)
    instance.set_timesteps(STEPS)
    instance.is_scale_input_called = True  # pipelines scale the model input each step; not timed here
    return instance


def _diffusers_missing() -> str | None:
    try:
        import diffusers  # noqa: F401
    except ImportError as error:
        return f"diffusers is not installed ({error})"
    return None


def _at_step(scheduler, index: int):
    """The timestep of step `index`, the schedulers that count steps set there: every timed call
    is the same step of the schedule (DPM-Solver's second-order one from the second call on)."""
    if hasattr(scheduler, "_step_index"):
        scheduler._step_index = index
    return scheduler.timesteps[index]


def _genfast_step(sample, model_output, ours, theirs, index, step_kwargs, guidance_scale):
    timestep = _at_step(ours, index)
    return ours.step(model_output, timestep, sample, guidance_scale=guidance_scale, **step_kwargs).prev_sample


def _diffusers_step(sample, model_output, ours, theirs, index, step_kwargs, guidance_scale):
    """What a pipeline runs: its guidance, then diffusers' step."""
    if guidance_scale is not None:
        uncond, cond = model_output.chunk(2)
        model_output = uncond + guidance_scale * (cond - uncond)
    return theirs.step(model_output, _at_step(theirs, index), sample, **step_kwargs).prev_sample


def noising_case() -> Case:
    def make_inputs(device: torch.device) -> dict:
        ours, theirs = (_scheduler(library, "ddpm") for library in ("genfast", "diffusers"))
        return {
            "task": "noising",
            "original_samples": torch.randn(LATENTS, device=device),
            "noise": torch.randn(LATENTS, device=device),
            "timesteps": torch.randint(0, 1000, LATENTS[:1], device=device),
            "ours": ours,
            "theirs": theirs,
        }

    # Reads x0 and noise, writes the noisy batch and the velocity.
    return Case(f"add_noise + velocity {'x'.join(map(str, LATENTS))}", "training", "forward", math.prod(LATENTS),
                make_inputs, 4 * math.prod(LATENTS) * 4, quick=True)


def loss_case(direction: str) -> Case:
    def make_inputs(device: torch.device) -> dict:
        return {
            "task": "loss",
            "model_output": torch.randn(LATENTS, device=device),
            # Inside a tuple, the harness's backward leaves them out: training differentiates the model output only.
            "target_and_weights": (torch.randn(LATENTS, device=device), torch.rand(LATENTS[0], device=device)),
        }

    # Forward: model_output and target read. Backward: read again, the gradient written (torch.compile
    # instead saves their difference in its forward, a write there and a read less here).
    tensors = 2 if direction == "forward" else 3
    return Case(f"min-snr loss {'x'.join(map(str, LATENTS))}", "training", direction, math.prod(LATENTS),
                make_inputs, tensors * math.prod(LATENTS) * 4, quick=True)


CASES += [noising_case(), loss_case("forward"), loss_case("backward")]


def _genfast_noising(original_samples, noise, timesteps, ours, theirs):
    return ours.add_noise_and_velocity(original_samples, noise, timesteps)


def _diffusers_noising(original_samples, noise, timesteps, ours, theirs):
    return theirs.add_noise(original_samples, noise, timesteps), theirs.get_velocity(original_samples, noise, timesteps)


def _genfast_loss(model_output, target_and_weights):
    return genfast.ops.denoising_loss(model_output, *target_and_weights)


def _torch_loss(model_output, target_and_weights):
    """diffusers' train_text_to_image.py with snr_gamma: the per-sample MSE, weighted, averaged."""
    target, weights = target_and_weights
    loss = torch.nn.functional.mse_loss(model_output.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.dim()))) * weights).mean()


_GENFAST = {"step": _genfast_step, "noising": _genfast_noising, "loss": _genfast_loss}
_DIFFUSERS = {"step": _diffusers_step, "noising": _diffusers_noising, "loss": _torch_loss}


def _genfast(task, **inputs):
    return _GENFAST[task](**inputs)


def _diffusers(task, **inputs):
    return _DIFFUSERS[task](**inputs)


def providers(device_type: str) -> list[Provider]:
    if missing := _diffusers_missing():
        return [Provider(p, None, unavailable=missing) for p in ("genfast", "diffusers", "diffusers+torch.compile")]
    return [
        *genfast_providers(_genfast, device_type),
        Provider("diffusers", _diffusers),
        # diffusers' DDPM step branches on a tensor (previous_timestep): it compiles in pieces.
        Provider("diffusers+torch.compile", _diffusers, compiled=True, fullgraph=False),
    ]

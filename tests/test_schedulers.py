"""genfast.schedulers against diffusers' own schedulers: whole sampling
trajectories from the same seeds, over random configurations."""

import inspect
import random
import sys
import warnings

import pytest
import torch
from helpers import relative_error, require

import genfast
from genfast.schedulers import coefficients

diffusers = pytest.importorskip("diffusers")

STEPS = 50
SHAPE = (2, 4, 9, 7)
# dtype and the bound on the trajectory's relative error (DESIGN.md's table; the issue asks 1e-5 in fp32).
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]


def fake_model(sample: torch.Tensor, t: int, channels: int) -> torch.Tensor:
    """A deterministic stand-in for a denoiser: smooth in the sample, different per timestep."""
    field = torch.randn(sample.shape[0], channels, *sample.shape[2:], generator=torch.Generator().manual_seed(t))
    out = torch.tanh(0.5 * sample.float()).repeat(1, channels // sample.shape[1], *[1] * (sample.dim() - 2))
    return (out + 0.3 * field.to(sample.device)).to(sample.dtype)


def run(scheduler, dtype, device, guidance_scale=None, step_kwargs=None, fused_guidance=False, channels=None,
        steps=STEPS):
    """The sample after a full sampling loop; model outputs are guided by hand
    unless fused_guidance, in which case the scheduler gets both halves."""
    channels = channels or SHAPE[1]
    scheduler.set_timesteps(steps, device=device)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    generator = torch.Generator(device).manual_seed(2)
    for t in scheduler.timesteps:
        t_int = int(t)
        # What pipelines feed the model (flow matching scales nothing).
        model_input = scheduler.scale_model_input(sample, t) if hasattr(scheduler, "scale_model_input") else sample
        if guidance_scale is None:
            model_output, extra = fake_model(model_input, t_int, channels), {}
        else:
            uncond, cond = fake_model(model_input, t_int, channels), fake_model(model_input, t_int + 1000, channels)
            if fused_guidance:
                model_output, extra = torch.cat([uncond, cond]), {"guidance_scale": guidance_scale}
            else:
                model_output, extra = uncond + guidance_scale * (cond - uncond), {}
        sample = scheduler.step(model_output, t, sample, generator=generator, **(step_kwargs or {}), **extra)[0]
    return sample


def random_configs(count, seed, choices):
    rng = random.Random(seed)
    return [{key: rng.choice(values) for key, values in choices.items()} for _ in range(count)]


DDIM_CHOICES = {
    "prediction_type": coefficients.PREDICTION_TYPES,
    "clip_sample": (False, True),
    "set_alpha_to_one": (False, True),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "eta": (0.0, 0.5, 1.0),
    "use_clipped_model_output": (False, True),
    "thresholding": (False, False, True),
    "sample_max_value": (1.5, 3.0),
}
DDPM_CHOICES = {
    "prediction_type": coefficients.PREDICTION_TYPES,
    "clip_sample": (False, True),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "variance_type": coefficients.DDPM_VARIANCE_TYPES,
    "thresholding": (False, False, True),
    "sample_max_value": (1.5, 3.0),
}
EULER_CHOICES = {
    "prediction_type": coefficients.PREDICTION_TYPES,
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "beta_schedule": ("linear", "scaled_linear"),
    "use_karras_sigmas": (False, True),
    "s_churn": (0.0, 0.0, 1.0),
}
EULER_ANCESTRAL_CHOICES = {
    "prediction_type": ("epsilon", "v_prediction"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "beta_schedule": ("linear", "scaled_linear"),
}
FLOW_MATCH_CHOICES = {
    "shift": (1.0, 3.0),
    "stochastic_sampling": (False, True),
    "use_dynamic_shifting": (False,),
    "invert_sigmas": (False, True),
}
LCM_CHOICES = {
    "prediction_type": coefficients.PREDICTION_TYPES,
    "clip_sample": (False, True),
    "beta_schedule": ("linear", "scaled_linear"),
    "timestep_scaling": (10.0, 1.0),
    "thresholding": (False, True),
    "sample_max_value": (1.5, 3.0),
}
DPM_SOLVER_CHOICES = {
    "prediction_type": coefficients.PREDICTION_TYPES,
    "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
    "solver_type": coefficients.DPM_SOLVER_TYPES,
    "solver_order": (1, 2, 2),
    "lower_order_final": (False, True),
    "euler_at_final": (False, True),
    "final_sigmas_type": ("zero", "sigma_min"),
    "use_karras_sigmas": (False, True),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "beta_schedule": ("linear", "scaled_linear"),
    # Fewer than 15 steps turns lower_order_final on.
    "steps": (STEPS, STEPS, 10),
    "thresholding": (False, False, True),
    "sample_max_value": (1.5, 3.0),
}
# Keys of a configuration that are not the scheduler's: step() arguments and the step count.
STEP_ARGUMENTS = {"eta", "use_clipped_model_output", "s_churn"}


def float64_oracle(name, scheduler_config, monkeypatch):
    """diffusers' scheduler computing in float64 throughout, its schedule
    tables included, and drawing the same float32 noise as a float32 run.

    diffusers works out its per-step scalars in float32, and some cancel (DDPM's
    1 - a_t / a_prev near t = 0 loses 5 digits); genfast works them out in
    float64. So both are compared with this oracle, and with each other beyond
    diffusers' own error."""
    exact = getattr(diffusers, name)(**scheduler_config)
    set_timesteps = exact.set_timesteps

    def set_timesteps_then_float64(*args, **kwargs):
        # The schedule itself comes from the float32 tables, as in the runs compared: Karras
        # sigmas from float64 tables move timesteps, and the fake model is seeded by timestep.
        set_timesteps(*args, **kwargs)
        for table in ("alphas_cumprod", "final_alpha_cumprod", "one", "sigmas"):
            if isinstance(getattr(exact, table, None), torch.Tensor):
                setattr(exact, table, getattr(exact, table).double())

    exact.set_timesteps = set_timesteps_then_float64
    module = sys.modules[type(exact).__module__]
    draw = module.randn_tensor

    def float32_draw(shape, generator=None, device=None, dtype=None, **kwargs):
        return draw(shape, generator=generator, device=device, dtype=torch.float32, **kwargs).to(dtype)

    monkeypatch.setattr(module, "randn_tensor", float32_draw)
    return exact


def compare(name, config, backend, monkeypatch, dtype=torch.float32, bound=1e-5, guidance_scale=None):
    """genfast's trajectory within `bound` of the float64 oracle's, and of
    diffusers' own in the same dtype beyond that one's error."""
    device = require(backend)
    step_kwargs = {k: v for k, v in config.items() if k in STEP_ARGUMENTS}
    scheduler_config = {k: v for k, v in config.items() if k not in STEP_ARGUMENTS and k != "steps"}
    steps = config.get("steps", STEPS)
    channels = 2 * SHAPE[1] if config.get("variance_type") == "learned_range" else None
    ours = getattr(genfast.schedulers, name)(**scheduler_config)
    with genfast.use_backend(backend):
        got = run(ours, dtype, device, guidance_scale, step_kwargs, guidance_scale is not None, channels, steps)
    theirs = run(getattr(diffusers, name)(**scheduler_config), dtype, device, guidance_scale, step_kwargs, False,
                 channels, steps)
    exact = run(float64_oracle(name, scheduler_config, monkeypatch), torch.float64, device, guidance_scale,
                step_kwargs, False, channels, steps)
    assert got.dtype == theirs.dtype == dtype
    if dtype == torch.float32:  # lower precisions draw other noise than the float32 oracle
        assert relative_error(got, exact) <= bound, config
    assert relative_error(got, theirs.double()) <= bound + relative_error(theirs, exact), config


# Each fused scheduler over random configurations of its options.
TRAJECTORIES = [
    *(("DDIMScheduler", config) for config in random_configs(12, 0, DDIM_CHOICES)),
    *(("DDPMScheduler", config) for config in random_configs(12, 1, DDPM_CHOICES)),
    *(("EulerDiscreteScheduler", config) for config in random_configs(8, 2, EULER_CHOICES)),
    *(("EulerAncestralDiscreteScheduler", config) for config in random_configs(6, 3, EULER_ANCESTRAL_CHOICES)),
    *(("FlowMatchEulerDiscreteScheduler", config) for config in random_configs(6, 4, FLOW_MATCH_CHOICES)),
    *(("LCMScheduler", config) for config in random_configs(6, 5, LCM_CHOICES)),
    *(("DPMSolverMultistepScheduler", config) for config in random_configs(12, 6, DPM_SOLVER_CHOICES)),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}),
]


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("name, config", TRAJECTORIES, ids=str)
def test_matches_diffusers(name, config, backend, monkeypatch):
    compare(name, config, backend, monkeypatch)


@pytest.mark.parametrize("name, config", [
    ("DDIMScheduler", {"eta": 1.0, "clip_sample": True}),
    ("DDPMScheduler", {"thresholding": True, "sample_max_value": 2.0}),
    ("DDPMScheduler", {"variance_type": "learned_range"}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}),
    ("LCMScheduler", {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
], ids=str)
@pytest.mark.parametrize("dtype, bound", DTYPES, ids=str)
def test_fused_guidance(name, config, dtype, bound, monkeypatch):
    compare(name, config, "cpu", monkeypatch, dtype, bound, guidance_scale=7.5)


def test_step_signature_extends_diffusers():
    """Pipelines inspect step()'s parameters (eta, generator): every diffusers one is there, in order."""
    for name in genfast.schedulers.__all__[:-1]:
        ours = list(inspect.signature(getattr(genfast.schedulers, name).step).parameters)
        theirs = list(inspect.signature(getattr(diffusers, name).step).parameters)
        assert ours[: len(theirs)] == theirs


def test_swaps_in_from_a_pipeline_config():
    config = diffusers.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False).config
    scheduler = genfast.schedulers.DDIMScheduler.from_config(config)
    assert isinstance(scheduler, diffusers.DDIMScheduler)
    assert dict(scheduler.config) == {**config, "fused_noise": False}
    fused = genfast.schedulers.DDIMScheduler.from_config(config, fused_noise=True)
    assert fused.config.fused_noise and genfast.schedulers.DDPMScheduler.from_config(fused.config).config.fused_noise


@pytest.mark.parametrize("name, config, model_output_shape, message", [
    ("DDPMScheduler", {"variance_type": "learned_range"}, (2, 7, 5, 5), "2C channels of a learned variance"),
    ("DDIMScheduler", {}, (2, 4, 5, 6), r"model_output must have shape \(2, 4, 5, 5\)"),
    ("EulerDiscreteScheduler", {}, (2, 3, 5, 5), r"model_output must have shape \(2, 4, 5, 5\)"),
], ids=str)
def test_step_rejects_model_output_that_does_not_fit(name, config, model_output_shape, message):
    scheduler = getattr(genfast.schedulers, name)(**config)
    scheduler.set_timesteps(10)
    sample = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=message):
        scheduler.step(torch.randn(model_output_shape), scheduler.timesteps[0], sample)


def test_subclass_keeps_its_own_init():
    class Custom(genfast.schedulers.DDIMScheduler):
        def __init__(self, *args, extra=3, **kwargs):
            super().__init__(*args, **kwargs)
            self.extra = extra

    custom = Custom(extra=5, fused_noise=True)
    assert custom.extra == 5 and custom.config.fused_noise


def test_timestep_outside_the_schedule():
    scheduler = genfast.schedulers.DDIMScheduler()
    scheduler.set_timesteps(10)
    sample = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="timestep 5 is not in the schedule"):
        scheduler.step(sample, 5, sample)


@pytest.mark.parametrize("name, config, branch", [
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
     "algorithm_type='dpmsolver'"),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, "solver_order=3"),
], ids=str)
def test_unfused_branch_runs_diffusers_step_and_warns_once(name, config, branch):
    ours, theirs = getattr(genfast.schedulers, name)(**config), getattr(diffusers, name)(**config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run(ours, torch.float32, "cpu")
    ours_warned = [str(w.message) for w in caught if "genfast.schedulers" in str(w.message)]
    assert len(ours_warned) == 1 and f"{branch} has no fused kernel" in ours_warned[0]
    assert torch.equal(got, run(theirs, torch.float32, "cpu"))


NOISY_SCHEDULERS = [
    ("DDPMScheduler", {}, {}),
    ("DDIMScheduler", {}, {"eta": 1.0}),
    ("EulerDiscreteScheduler", {}, {"s_churn": 1.0}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("LCMScheduler", {}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("name, config, step_kwargs", NOISY_SCHEDULERS, ids=str)
def test_fused_noise_is_reproducible_and_the_references(name, config, step_kwargs, backend):
    """fused_noise: the same seed gives the same trajectory, another seed another one, and each
    backend follows the reference's (the same Philox stream)."""
    device = require(backend)

    def trajectory(backend, seed):
        scheduler = getattr(genfast.schedulers, name)(**config, fused_noise=True)
        scheduler.set_timesteps(10)
        sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(device)
        generator = torch.Generator().manual_seed(seed)
        with genfast.use_backend(backend):
            for t in scheduler.timesteps:
                model_input = scheduler.scale_model_input(sample, t) if hasattr(scheduler, "scale_model_input") else sample
                model_output = fake_model(model_input, int(t), SHAPE[1])
                sample = scheduler.step(model_output, t, sample, generator=generator, **step_kwargs)[0]
        return sample

    ours = trajectory(backend, 3)
    assert torch.equal(ours, trajectory(backend, 3))
    assert relative_error(trajectory(backend, 4), ours.double()) > 0.1
    assert relative_error(ours, trajectory("reference", 3).double()) <= 1e-4

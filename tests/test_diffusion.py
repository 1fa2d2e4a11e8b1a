"""genfast's diffusion ops (the sampler step, the timestep embedding, the
training noise and loss) against the float64 reference, on every backend here."""

import dataclasses
import math

import pytest
import torch
from helpers import BACKENDS, assert_close_to_reference, relative_error, require

import genfast
from genfast.backends import triton_interpreted
from genfast.ops import StepCoefficients
from genfast.reference.diffusion import add_noise as reference_add_noise
from genfast.reference.diffusion import denoise_step as reference_step
from genfast.reference.diffusion import denoising_loss as reference_loss
from genfast.reference.diffusion import philox_normal
from genfast.reference.diffusion import timestep_embedding as reference_embedding

# dtype and the absolute term of the error rule (DESIGN.md's tolerance table).
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]

SHAPES = [(1, 1, 1, 1), (2, 4, 7, 13), (3, 3, 5), (2, 4, 33, 31)]

# Which optional terms a configuration uses: every one alone, and all together.
CONFIGS = {
    "plain": {},
    "guided": {"guided": True},
    "clip": {"clip": True},
    "history": {"history": True},
    "noise": {"noise": True},
    "learned_variance": {"noise": True, "learned_variance": True},
    "threshold": {"threshold": True},
    "everything": {"guided": True, "clip": True, "history": True, "noise": True, "learned_variance": True,
                   "threshold": True},
}


def make_step(shape, dtype, device, guided=False, clip=False, history=False, noise=False, learned_variance=False,
              threshold=False):
    """Random inputs and coefficients for one step: (args, kwargs) of denoise_step."""
    generator = torch.Generator().manual_seed(
        hash((shape, guided, clip, history, noise, learned_variance, threshold)) % 2**31
    )

    def randn(*size):
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    def uniform(low, high):
        return low + (high - low) * torch.rand((), generator=generator).item()

    batch, channels, *spatial = shape
    c = StepCoefficients(
        **{f.name: uniform(-2, 2) for f in dataclasses.fields(StepCoefficients) if f.type == "float"},
        clip=uniform(0.5, 1.5) if clip else None,
        learned_variance=(uniform(-8, -4), uniform(-3, -1)) if learned_variance else None,
    )
    model_output = randn(batch * (2 if guided else 1), channels * (2 if learned_variance else 1), *spatial)
    if learned_variance:
        # Variance outputs lie in [-1, 1], the same in both halves so that guidance keeps them there
        # (beyond, exp() of the extrapolated log variance overflows float16).
        v = 2 * torch.rand(batch, channels, *spatial, generator=generator) - 1
        model_output[:, channels:] = v.repeat(2 if guided else 1, *[1] * len(shape[1:])).to(device, dtype)
    kwargs = {
        "noise": randn(*shape) if noise else None,
        "history": randn(*shape) if history else None,
        "guidance_scale": uniform(1, 9) if guided else None,
        # Dynamic thresholding's bounds lie in [1, sample_max_value].
        "threshold": (1 + torch.rand(batch, generator=generator)).to(device) if threshold else None,
    }
    return (randn(*shape), model_output, c), kwargs


def reference64(args, kwargs):
    sample, model_output, c = args
    upcast = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return reference_step(sample.double(), model_output.double(), c, **upcast)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=str)
def test_matches_reference(backend, shape, config, dtype, atol):
    device = require(backend)
    args, kwargs = make_step(shape, dtype, device, **CONFIGS[config])
    with genfast.use_backend(backend):
        prev, denoised = genfast.ops.denoise_step(*args, **kwargs)
    ref_prev, ref_denoised = reference64(args, kwargs)
    assert prev.dtype == dtype and prev.shape == args[0].shape
    assert relative_error(prev, ref_prev) <= atol
    assert relative_error(denoised, ref_denoised) <= atol


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_denoised_output(backend):
    device = require(backend)
    args, kwargs = make_step((2, 4, 5, 6), torch.float32, device, noise=True)
    with genfast.use_backend(backend):
        prev, denoised = genfast.ops.denoise_step(*args, **kwargs, return_denoised=False)
    assert denoised is None
    assert relative_error(prev, reference64(args, kwargs)[0]) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    device = require(backend)
    (sample, model_output, c), kwargs = make_step((2, 4, 6, 10), torch.float32, device, guided=True, noise=True)
    sample_view = sample.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    noise_view = torch.stack([kwargs["noise"], kwargs["noise"]], -1)[..., 0]
    with genfast.use_backend(backend):
        prev, denoised = genfast.ops.denoise_step(sample_view, model_output, c, **{**kwargs, "noise": noise_view})
    ref_prev, ref_denoised = reference64((sample, model_output, c), kwargs)
    assert relative_error(prev, ref_prev) <= 1e-5
    assert relative_error(denoised, ref_denoised) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    device = require(backend)
    sample = torch.empty(0, 4, 3, 3, device=device)
    with genfast.use_backend(backend):
        prev, denoised = genfast.ops.denoise_step(sample, sample, StepCoefficients(prev_sample=1.0))
    assert prev.shape == sample.shape and denoised.shape == sample.shape



@pytest.mark.parametrize("backend", BACKENDS)
def test_terms_of_coefficient_zero_are_left_out_and_nan_passes_the_clip(backend):
    """A NaN noise or history under a coefficient of 0 (diffusers' last step, Euler without churn)
    does not reach prev, as diffusers leaves those terms out; a NaN model output passes clipping
    and thresholding, as torch.clamp lets it."""
    device = require(backend)
    (sample, model_output, c), kwargs = make_step((2, 3, 5, 7), torch.float32, device, clip=True, history=True,
                                                  noise=True, threshold=True)
    c = dataclasses.replace(c, sample_noise=0.0, prev_history=0.0, prev_noise=0.0)
    kwargs["noise"][0, 1, 2, 3] = kwargs["history"][1, 0, 4, 6] = math.nan
    model_output[1, 2, 0, 0] = math.nan
    with genfast.use_backend(backend):
        prev, denoised = genfast.ops.denoise_step(sample, model_output, c, **kwargs)
    ref_prev, ref_denoised = reference64((sample, model_output, c), kwargs)
    for got, want in ((prev, ref_prev), (denoised, ref_denoised)):
        assert want.isnan().sum() == 1 and torch.equal(got.isnan(), want.isnan())
        assert relative_error(got[want.isfinite()], want[want.isfinite()]) <= 1e-5

def test_outputs_reuse_memory():
    """Latents of 2 MB or more come from the CPU output cache: the next step reuses a freed
    output's memory and overwrites all of it."""
    require("cpu")
    (sample, model_output, c), kwargs = make_step((8, 4, 128, 128), torch.float32, "cpu", noise=True)  # 2 MB
    with genfast.use_backend("cpu"):
        first, _ = genfast.ops.denoise_step(sample * 3 + 1, model_output, c, **kwargs)
        address = first.data_ptr()
        del first
        prev, denoised = genfast.ops.denoise_step(sample, model_output, c, **kwargs)
    assert address in (prev.data_ptr(), denoised.data_ptr())
    ref_prev, ref_denoised = reference64((sample, model_output, c), kwargs)
    assert relative_error(prev, ref_prev) <= 1e-5
    assert relative_error(denoised, ref_denoised) <= 1e-5


def test_compiles_without_graph_break():
    require("cpu")
    (sample, model_output, c), kwargs = make_step((2, 4, 8, 8), torch.float32, "cpu", guided=True, noise=True)

    def step(sample, model_output, noise):
        return genfast.ops.denoise_step(sample, model_output, c, noise=noise, guidance_scale=kwargs["guidance_scale"])

    compiled = torch.compile(step, fullgraph=True)
    with genfast.use_backend("cpu"):
        prev, denoised = compiled(sample, model_output, kwargs["noise"])
    ref_prev, ref_denoised = reference64((sample, model_output, c), kwargs)
    assert relative_error(prev, ref_prev) <= 1e-5
    assert relative_error(denoised, ref_denoised) <= 1e-5


BAD_INPUTS = {
    "model output of another shape": (
        lambda s: {"model_output": torch.randn(2, 4, 5, 7)}, ValueError, "model_output must have shape"),
    "learned variance with C channels": (
        lambda s: {"coefficients": StepCoefficients(learned_variance=(-5.0, -1.0))}, ValueError, "2C channels"),
    "guidance without the doubled batch": (lambda s: {"guidance_scale": 7.5}, ValueError, "uncond, cond"),
    "integer sample": (lambda s: {"sample": s.long(), "model_output": s.long()}, TypeError, "sample must have dtype"),
    "model output of another dtype": (lambda s: {"model_output": s.half()}, TypeError, "model_output must have dtype"),
    "noise of another shape": (lambda s: {"noise": torch.randn(2, 4, 5)}, ValueError, "noise must have shape"),
    "threshold per element": (lambda s: {"threshold": torch.ones(2, 4)}, ValueError, r"threshold must have shape \(2,\)"),
    "threshold of zero": (lambda s: {"threshold": torch.zeros(2)}, ValueError, "threshold must be positive"),
    "coefficients as a dict": (lambda s: {"coefficients": {"prev_sample": 1.0}}, TypeError, "StepCoefficients"),
    "guidance scale as a string": (lambda s: {"guidance_scale": "7.5"}, TypeError, "guidance_scale"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(case):
    sample = torch.randn(2, 4, 5, 6)
    change, error, message = BAD_INPUTS[case]
    kwargs = {"sample": sample, "model_output": torch.randn_like(sample), "coefficients": StepCoefficients(),
              **change(sample)}
    with pytest.raises(error, match=message):
        genfast.ops.denoise_step(kwargs.pop("sample"), kwargs.pop("model_output"), kwargs.pop("coefficients"),
                                 **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensors_on_different_devices():
    sample = torch.randn(2, 4, 5, 6)
    with pytest.raises(ValueError, match="model_output must be on cpu"):
        genfast.ops.denoise_step(sample, sample.cuda(), StepCoefficients())


# The timestep embedding: (timesteps, embedding_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period).
EMBEDDINGS = [
    (torch.tensor([999]), 320, True, 0, 1, 10000),  # Stable Diffusion's
    (torch.arange(0, 1000, 37), 64, False, 1, 1, 10000),  # diffusers' defaults
    (torch.rand(13, generator=torch.Generator().manual_seed(0)), 7, True, 1, 1000, 10000),  # odd dim, flow sigmas
    (torch.tensor([0.0, 1.5, 250.25]), 2, False, 0, 2.5, 1000),
    (torch.tensor([3, 1], dtype=torch.int32), 1, False, 1, 1, 10000),  # a lone zero column
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("timesteps, dim, flip, shift, scale, max_period", EMBEDDINGS, ids=str)
def test_timestep_embedding_matches_reference(backend, timesteps, dim, flip, shift, scale, max_period):
    device = require(backend)
    timesteps = timesteps.to(device)
    with genfast.use_backend(backend):
        out = genfast.ops.timestep_embedding(timesteps, dim, flip, shift, scale, max_period)
    assert out.dtype == torch.float32 and out.shape == (len(timesteps), dim)
    exact = reference_embedding(timesteps.double(), dim, flip, shift, scale, max_period)
    # Angles up to 1000 radians round in float32 as in diffusers: the rule is against its error.
    assert_close_to_reference(out, exact, reference_embedding(timesteps, dim, flip, shift, scale, max_period),
                              1e-6, "timestep embedding")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_timestep_embedding_of_every_timestep_dtype_and_views(backend, dtype):
    device = require(backend)
    timesteps = torch.arange(0, 960, 40, device=device).to(dtype)[::3]  # non-contiguous
    with genfast.use_backend(backend):
        out = genfast.ops.timestep_embedding(timesteps, 33, True)
    as_float = timesteps.float()  # what diffusers embeds: the timesteps as float32
    assert_close_to_reference(out, reference_embedding(as_float.double(), 33, True), reference_embedding(as_float, 33,
                              True), 1e-6, f"{dtype} timesteps")


def test_timestep_embedding_is_diffusers():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    for timesteps, dim, flip, shift, scale, max_period in EMBEDDINGS:
        theirs = embeddings.get_timestep_embedding(timesteps, dim, flip, shift, scale, max_period)
        assert torch.equal(reference_embedding(timesteps, dim, flip, shift, scale, max_period), theirs)
    module = embeddings.Timesteps(320, True, 0)
    timesteps = torch.tensor([999, 500, 1])
    assert_close_to_reference(genfast.nn.Timesteps(320, True, 0)(timesteps),
                              reference_embedding(timesteps.double(), 320, True, 0), module(timesteps), 1e-6,
                              "genfast.nn.Timesteps")


def test_timestep_embedding_compiles_without_graph_break():
    require("cpu")
    timesteps = torch.tensor([999.0, 10.0])
    compiled = torch.compile(lambda t: genfast.ops.timestep_embedding(t, 16, True, 0), fullgraph=True)
    with genfast.use_backend("cpu"):
        out = compiled(timesteps)
    assert_close_to_reference(out, reference_embedding(timesteps.double(), 16, True, 0),
                              reference_embedding(timesteps, 16, True, 0), 1e-6, "compiled")


@pytest.mark.parametrize("kwargs, error, message", [
    ({"timesteps": torch.zeros(2, 3)}, ValueError, "timesteps must be 1-D"),
    ({"timesteps": torch.ones(3, dtype=torch.bool)}, TypeError, "timesteps must have dtype"),
    ({"embedding_dim": -1}, ValueError, "embedding_dim must be >= 0"),
    ({"embedding_dim": 2, "downscale_freq_shift": 1}, ValueError, "equals downscale_freq_shift"),
    ({"max_period": 0}, ValueError, "max_period must be positive"),
    ({"scale": "1"}, TypeError, "scale must be a real number"),
], ids=str)
def test_timestep_embedding_bad_input(kwargs, error, message):
    arguments = {"timesteps": torch.arange(4), "embedding_dim": 8, **kwargs}
    with pytest.raises(error, match=message):
        genfast.ops.timestep_embedding(**arguments)


def training_batch(shape, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x0, noise = (torch.randn(shape, generator=generator).to(device, dtype) for _ in range(2))
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0).to(device)
    timesteps = torch.randint(0, 1000, (shape[0],), generator=generator).to(device)
    return x0, noise, timesteps, alphas_cumprod


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1,), (3, 1, 1), (2, 4, 7, 13), (5, 3, 33, 31)], ids=str)
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=str)
def test_add_noise_and_velocity(backend, shape, dtype, atol):
    device = require(backend)
    x0, noise, timesteps, alphas_cumprod = training_batch(shape, dtype, device)
    with genfast.use_backend(backend):
        noisy, velocity = genfast.ops.add_noise(x0, noise, timesteps, alphas_cumprod, velocity=True)
        alone = genfast.ops.add_noise(x0, noise, timesteps.int(), alphas_cumprod)
    exact_noisy, exact_velocity = reference_add_noise(x0.double(), noise.double(), timesteps, alphas_cumprod.double(),
                                                      velocity=True)
    assert noisy.dtype == velocity.dtype == dtype and noisy.shape == x0.shape
    assert relative_error(noisy, exact_noisy) <= atol
    assert relative_error(velocity, exact_velocity) <= atol
    assert torch.equal(alone, noisy)


def test_add_noise_is_diffusers():
    """The scheduler's add_noise and get_velocity run the fused op and agree with diffusers'."""
    diffusers = pytest.importorskip("diffusers")
    ours, theirs = genfast.schedulers.DDPMScheduler(), diffusers.DDPMScheduler()
    x0, noise, timesteps, _ = training_batch((4, 3, 8, 8), torch.float32, "cpu")
    assert relative_error(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps).double()) < 1e-6
    assert relative_error(ours.get_velocity(x0, noise, timesteps),
                          theirs.get_velocity(x0, noise, timesteps).double()) < 1e-6


def test_add_noise_broadcasts_one_timestep():
    """As diffusers' add_noise: one timestep, as () or (1,), noises the whole batch (inpainting pipelines)."""
    diffusers = pytest.importorskip("diffusers")
    ours, theirs = genfast.schedulers.DDPMScheduler(), diffusers.DDPMScheduler()
    x0, noise, _, _ = training_batch((3, 4, 8, 8), torch.float32, "cpu")
    for timestep in (torch.tensor([10]), torch.tensor(10)):
        assert relative_error(ours.add_noise(x0, noise, timestep),
                              theirs.add_noise(x0, noise, timestep).double()) < 1e-6


def test_add_noise_timestep_outside_the_schedule():
    require("cpu")
    x0, noise, timesteps, alphas_cumprod = training_batch((2, 3), torch.float32, "cpu")
    with genfast.use_backend("cpu"), pytest.raises(RuntimeError, match=r"timesteps must lie in \[0, 1000\)"):
        genfast.ops.add_noise(x0, noise, torch.tensor([5, 1000]), alphas_cumprod)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1, 1), (2, 4, 7, 13), (5, 3, 33, 31)], ids=str)
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_denoising_loss_and_gradients(backend, shape, dtype, atol, weighted):
    device = require(backend)
    generator = torch.Generator().manual_seed(1)
    model_output, target = (torch.randn(shape, generator=generator).to(device, dtype).requires_grad_()
                            for _ in range(2))
    weights = torch.rand(shape[0], generator=generator).to(device).requires_grad_() if weighted else None
    with genfast.use_backend(backend):
        loss = genfast.ops.denoising_loss(model_output, target, weights)
    inputs = [model_output, target] + ([weights] if weighted else [])
    grads = torch.autograd.grad(loss, inputs, torch.tensor(0.7, device=device))
    upcast = [t.detach().double().requires_grad_() for t in inputs]
    exact = reference_loss(*upcast)
    exact_grads = torch.autograd.grad(exact, upcast, torch.tensor(0.7, dtype=torch.float64, device=device))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert relative_error(loss, exact) <= 1e-5
    for name, got, want in zip(["model_output", "target", "weights"], grads, exact_grads):
        # Gradients are about 2 / numel: the error is relative to their size.
        scale = want.abs().max().item() or 1.0
        assert relative_error(got / scale, want / scale) <= atol, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_denoising_loss_twice_differentiable(backend):
    """create_graph=True: the gradient is itself differentiable, as torch's is (e.g. for gradient penalties)."""
    device = require(backend)
    model_output = torch.randn(3, 4, 5, device=device, requires_grad=True)
    target, weights = torch.randn(3, 4, 5, device=device), torch.rand(3, device=device)
    with genfast.use_backend(backend):
        (grad,) = torch.autograd.grad(genfast.ops.denoising_loss(model_output, target, weights), model_output,
                                      create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), model_output)
    exact_input = model_output.detach().double().requires_grad_()
    (exact_grad,) = torch.autograd.grad(reference_loss(exact_input, target.double(), weights.double()), exact_input,
                                        create_graph=True)
    (exact_second,) = torch.autograd.grad(exact_grad.square().sum(), exact_input)
    assert relative_error(grad / exact_grad.abs().max(), exact_grad / exact_grad.abs().max()) <= 1e-6
    assert relative_error(second / exact_second.abs().max(), exact_second / exact_second.abs().max()) <= 1e-6


def test_denoising_loss_is_torch_mse_loss():
    require("cpu")
    model_output, target = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    with genfast.use_backend("cpu"):
        loss = genfast.ops.denoising_loss(model_output, target)
    assert relative_error(loss, torch.nn.functional.mse_loss(model_output.double(), target.double())) <= 1e-6


def test_denoising_loss_compiles_without_graph_break():
    require("cpu")
    model_output = torch.randn(3, 4, 5, requires_grad=True)
    target, weights = torch.randn(3, 4, 5), torch.rand(3)
    compiled = torch.compile(genfast.ops.denoising_loss, fullgraph=True)
    with genfast.use_backend("cpu"):
        loss = compiled(model_output, target, weights)
        loss.backward()
    exact_input = model_output.detach().double().requires_grad_()
    exact = reference_loss(exact_input, target.double(), weights.double())
    exact.backward()
    assert relative_error(loss, exact) <= 1e-6
    assert relative_error(model_output.grad, exact_input.grad) <= 1e-6


TRAINING_BAD_INPUTS = {
    "noise of another shape": (lambda x: genfast.ops.add_noise(x, x[:1], torch.tensor([1, 2]), torch.rand(10)),
                               ValueError, "noise must have shape"),
    "float timesteps": (lambda x: genfast.ops.add_noise(x, x, torch.tensor([1.0, 2.0]), torch.rand(10)),
                        TypeError, "timesteps must have dtype"),
    "a 2-D table": (lambda x: genfast.ops.add_noise(x, x, torch.tensor([1, 2]), torch.rand(10, 1)),
                    ValueError, "alphas_cumprod must be 1-D"),
    "target of another dtype": (lambda x: genfast.ops.denoising_loss(x, x.half()), TypeError,
                                "target must have dtype"),
    "weights per element": (lambda x: genfast.ops.denoising_loss(x, x, torch.rand(2, 3)), ValueError,
                            r"weights must have shape \(2,\)"),
}


@pytest.mark.parametrize("case", TRAINING_BAD_INPUTS)
def test_training_bad_input(case):
    call, error, message = TRAINING_BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        call(torch.randn(2, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_noise_statistics(backend):
    """noise_seed's noise is standard normal: mean, variance, tails and neighbours' correlation within
    5 standard errors; the same seed gives the same noise; and it is the reference's philox_normal."""
    device = require(backend)
    # 2^20 elements; 2^16 in Triton's interpreter, which takes 45 s for a million.
    side = 64 if backend == "triton" and triton_interpreted() else 256
    sample = torch.zeros(4, 4, side, side, device=device)
    identity = StepCoefficients(prev_noise=1.0)
    with genfast.use_backend(backend):
        noise, _ = genfast.ops.denoise_step(sample, sample, identity, noise_seed=2**40 + 17, return_denoised=False)
        again, _ = genfast.ops.denoise_step(sample, sample, identity, noise_seed=2**40 + 17, return_denoised=False)
        other, _ = genfast.ops.denoise_step(sample, sample, identity, noise_seed=2**40 + 18, return_denoised=False)
    n = noise.numel()
    flat = noise.flatten().double().cpu()
    assert torch.equal(noise, again)
    assert abs(flat.mean().item()) < 5 / n**0.5
    assert abs(flat.var().item() - 1) < 5 * (2 / n) ** 0.5
    tail = (flat.abs() > 2).double().mean().item()  # P(|z| > 2) = 0.0455
    assert abs(tail - 0.0455) < 5 * (0.0455 * (1 - 0.0455) / n) ** 0.5
    for lag in (1, 2, 3, 4):  # within a Philox block's lanes and across blocks
        assert abs((flat[:-lag] * flat[lag:]).mean().item()) < 5 / n**0.5, lag
    assert abs((flat * other.flatten().double().cpu()).mean().item()) < 5 / n**0.5
    reference = philox_normal(2**40 + 17, tuple(sample.shape), device, torch.float64)
    assert relative_error(noise, reference) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 1, 5, 7), (2, 3, 37, 41)], ids=str)
def test_fused_noise_odd_sizes(backend, shape):
    """Samples whose sizes are not multiples of Philox's four lanes start and end tiles inside a
    block: the noise is still the reference's philox_normal, element for element."""
    device = require(backend)
    sample = torch.zeros(shape, device=device)
    with genfast.use_backend(backend):
        noise, _ = genfast.ops.denoise_step(sample, sample, StepCoefficients(prev_noise=1.0), noise_seed=12345,
                                            return_denoised=False)
    assert relative_error(noise, philox_normal(12345, shape, device, torch.float64)) <= 1e-5


def test_fused_noise_bad_input():
    sample = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="noise or noise_seed, not both"):
        genfast.ops.denoise_step(sample, sample, StepCoefficients(), noise=sample, noise_seed=1)
    with pytest.raises(ValueError, match=r"noise_seed must be an int in \[0, 2\^63\)"):
        genfast.ops.denoise_step(sample, sample, StepCoefficients(), noise_seed=-1)

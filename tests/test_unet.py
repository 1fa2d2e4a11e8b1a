"""The U-Net denoiser built from genfast layers against the same weights in
torch.nn layers: one forward, and a whole guided sampling loop."""

import pytest
import torch
import helpers
from helpers import relative_error, require

import genfast
from genfast.models import UNet, sample

SHAPE = (3, 4, 16, 16)  # batch 3: an odd number of samples; 16 = 2^2 * 4 for the three levels


def twin_models(**kwargs):
    return helpers.twin_models(lambda fused: UNet(**kwargs, fused=fused).eval())


def test_same_state_dict_both_ways():
    reference, fused = twin_models()
    assert reference.state_dict().keys() == fused.state_dict().keys()
    assert any(isinstance(m, genfast.nn.GroupNorm) for m in fused.modules())
    assert not any(isinstance(m, genfast.nn.GroupNorm) for m in reference.modules())


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_forward_matches_torch_layers(backend):
    device = require(backend)
    reference, fused = (m.to(device) for m in twin_models(channels=(16, 32, 48), groups=4))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=generator).to(device)
    t, labels = torch.tensor([999, 500, 0], device=device), torch.tensor([1, 10, 3], device=device)
    with torch.no_grad(), genfast.use_backend(backend):
        got = fused(x, t, labels)
        want = reference(x.double().float(), t, labels)
        exact = reference.double()(x.double(), t.double(), labels)
    assert relative_error(got, exact) <= 2 * relative_error(want, exact) + 1e-5


def test_guided_sampling_loop_matches_torch_layers():
    """50 DDIM steps with classifier-free guidance: genfast's layers and its fused scheduler (guidance
    in the step) against torch.nn layers and diffusers' scheduler (guidance by hand).

    Without clipping, as latent diffusion samples: an untrained model drives x0 to the clip
    boundary, where a rounding difference flips which side a value lands on, and the two
    trajectories part (even torch's own layers under the two schedulers)."""
    diffusers = pytest.importorskip("diffusers")
    require("cpu")
    reference, fused = twin_models(channels=(16, 32, 48), groups=4)
    labels = torch.tensor([0, 4, 9])
    kwargs = {"shape": SHAPE, "guidance_scale": 3.0, "num_inference_steps": 50}
    with genfast.use_backend("cpu"):
        got = sample(fused, genfast.schedulers.DDIMScheduler(clip_sample=False), labels,
                     generator=torch.Generator().manual_seed(2), **kwargs)
    want = sample(reference, diffusers.DDIMScheduler(clip_sample=False), labels,
                  generator=torch.Generator().manual_seed(2), **kwargs)
    assert got.shape == SHAPE
    assert relative_error(got, want.double()) <= 1e-4
    assert relative_error(got, torch.zeros(SHAPE, dtype=torch.float64)) > 0.1  # it moved

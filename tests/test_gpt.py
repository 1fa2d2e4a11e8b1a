"""The GPT-style decoder LM built from genfast layers against the same weights in
torch.nn layers: logits, and every gradient of a training step's loss."""

import pytest
import torch
import helpers
from helpers import relative_error, require

import genfast
from genfast.models import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=53, max_positions=32, dim=48, heads=3, layers=2)


def twin_models():
    return helpers.twin_models(lambda fused: GPT(CONFIG, fused=fused))


def test_same_state_dict_both_ways():
    reference, fused = twin_models()
    assert reference.state_dict().keys() == fused.state_dict().keys()
    assert any(isinstance(m, genfast.nn.LayerNorm) for m in fused.modules())
    assert not any(isinstance(m, genfast.nn.LayerNorm) for m in reference.modules())


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_training_step_matches_torch_layers(backend):
    """Loss (genfast.ops.linear_cross_entropy in the genfast build, F.cross_entropy in the
    others) and the gradient of every parameter, within twice the error torch's layers make
    in fp32 against the float64 model, plus DESIGN.md's fp32 term."""
    device = require(backend)
    reference, fused = (m.to(device) for m in twin_models())
    exact = GPT(CONFIG).to(device).double()
    exact.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 19), generator=torch.Generator().manual_seed(1)).to(device)

    def step(model):
        logits = model(tokens[:, :-1])
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        return [logits, loss, *torch.autograd.grad(loss, list(model.parameters()))]

    with genfast.use_backend(backend):
        got = step(fused)
    names = ["logits", "loss", *(name for name, _ in fused.named_parameters())]
    helpers.assert_like_torch_build(names, got, step(reference), step(exact))


def test_too_many_positions():
    _, fused = twin_models()
    with pytest.raises(ValueError, match="must end by position 32, got 33"):
        fused(torch.zeros(1, 33, dtype=torch.long))
    cache = fused.new_cache(1, 32)
    fused(torch.zeros(1, 4, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="one per sequence"):
        fused(torch.zeros(1, 2, dtype=torch.long), cache)


@pytest.mark.parametrize("fused", [False, True], ids=["torch.nn", "genfast"])
@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_cached_steps_match_a_full_forward(backend, fused):
    """Logits of a prompt, then of one token at a time through the KV cache, equal the last
    position's logits of the whole sequence run at once."""
    device = require(backend)
    model = twin_models()[fused].to(device)
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 12), generator=torch.Generator().manual_seed(2)).to(device)
    cache = model.new_cache(3, 12)
    with torch.no_grad(), genfast.use_backend(backend):
        steps = [model(tokens[:, :7], cache)[:, -1]] + [model(tokens[:, i:i + 1], cache)[:, -1] for i in range(7, 12)]
        for i, logits in enumerate(steps):
            whole = model(tokens[:, :7 + i])[:, -1]
            assert relative_error(logits, whole.double()) <= 1e-5, f"step {i}"
    assert cache.length == 12 and cache.lengths.tolist() == [12] * 3


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_generation_matches_torch_layers(backend):
    """Sampled continuations from the same seed: the genfast build (KV-cache attention and
    the sampling kernel) draws the torch.nn build's tokens."""
    device = require(backend)
    reference, fused = (m.to(device) for m in twin_models())
    prompt = torch.randint(0, CONFIG.vocab_size, (4, 5), generator=torch.Generator().manual_seed(3)).to(device)
    settings = {"max_new_tokens": 10, "temperature": 0.8, "top_k": 20, "top_p": 0.9}
    with genfast.use_backend(backend):
        got = fused.generate(prompt, generator=torch.Generator(device).manual_seed(4), **settings)
    want = reference.generate(prompt, generator=torch.Generator(device).manual_seed(4), **settings)
    assert got.shape == (4, 15) and torch.equal(got[:, :5], prompt)
    assert torch.equal(got, want)
    assert not torch.equal(got, fused.generate(prompt, generator=torch.Generator(device).manual_seed(5), **settings))

"""The GPT-style decoder LM built from genfast layers against the same weights in
torch.nn layers: logits, and every gradient of a training step's loss."""

import pytest
import torch
import torch.nn.functional as F
from helpers import relative_error, require

import genfast
from genfast.models import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=53, max_positions=32, dim=48, heads=3, layers=2)


def twin_models():
    torch.manual_seed(0)
    reference = GPT(CONFIG)
    fused = GPT(CONFIG, fused=True)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def test_same_state_dict_both_ways():
    reference, fused = twin_models()
    assert reference.state_dict().keys() == fused.state_dict().keys()
    assert any(isinstance(m, genfast.nn.LayerNorm) for m in fused.modules())
    assert not any(isinstance(m, genfast.nn.LayerNorm) for m in reference.modules())


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_training_step_matches_torch_layers(backend):
    """Loss and the gradient of every parameter, within twice the error torch's layers make
    in fp32 against the float64 model, plus DESIGN.md's fp32 term."""
    device = require(backend)
    reference, fused = (m.to(device) for m in twin_models())
    exact = GPT(CONFIG).to(device).double()
    exact.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 19), generator=torch.Generator().manual_seed(1)).to(device)

    def step(model):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        return logits, loss, torch.autograd.grad(loss, list(model.parameters()))

    with genfast.use_backend(backend):
        got = step(fused)
    want, ref = step(reference), step(exact)
    for name, g, w, r in zip(("logits", "loss"), got[:2], want[:2], ref[:2]):
        assert relative_error(g, r) <= 2 * relative_error(w, r) + 1e-5, name
    for (name, _), g, w, r in zip(fused.named_parameters(), got[2], want[2], ref[2]):
        assert relative_error(g, r) <= 2 * relative_error(w, r) + 1e-5, name


def test_too_many_positions():
    _, fused = twin_models()
    with pytest.raises(ValueError, match="at most 32 positions"):
        fused(torch.zeros(1, 33, dtype=torch.long))

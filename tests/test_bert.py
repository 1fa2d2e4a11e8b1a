"""The BERT-style encoder built from genfast layers against the same weights in torch.nn
layers: hidden states with a padding mask, and every gradient."""

import pytest
import torch
import helpers
from helpers import require

import genfast
from genfast.models import BERT, BERTConfig

CONFIG = BERTConfig(vocab_size=61, max_positions=24, dim=48, heads=4, layers=2)


def twin_models():
    return helpers.twin_models(lambda fused: BERT(CONFIG, fused=fused))


def test_same_state_dict_both_ways():
    reference, fused = twin_models()
    assert reference.state_dict().keys() == fused.state_dict().keys()
    assert any(isinstance(m, genfast.nn.LayerNorm) for m in fused.modules())


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_matches_torch_layers(backend):
    """Hidden states of padded sequences and the gradient of every parameter, within twice
    the error torch's layers make in fp32 against the float64 model, plus DESIGN.md's fp32 term."""
    device = require(backend)
    reference, fused = (m.to(device) for m in twin_models())
    exact = BERT(CONFIG).to(device).double()
    exact.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 17), generator=generator).to(device)
    types = torch.randint(0, 2, (3, 17), generator=generator).to(device)
    lengths = torch.tensor([17, 9, 1], device=device)
    mask = torch.arange(17, device=device)[None, :] < lengths[:, None]
    weights = torch.randn(3, 17, CONFIG.dim, generator=generator).to(device)

    def run(model):
        hidden = model(tokens, mask, types)
        # Padded positions' outputs are meaningless: the loss reads the real ones.
        loss = (hidden * weights.to(hidden.dtype) * mask[..., None]).sum()
        return [hidden[mask], *torch.autograd.grad(loss, list(model.parameters()))]

    with genfast.use_backend(backend):
        got = run(fused)
    names = ["hidden states", *(name for name, _ in fused.named_parameters())]
    helpers.assert_like_torch_build(names, got, run(reference), run(exact))


def test_padding_does_not_leak():
    """A sequence's real tokens get the same states whatever fills its padding."""
    _, fused = twin_models()
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * 6 + [0] * 4] * 2)
    tokens[1, 6:] = (tokens[0, 6:] + 1) % CONFIG.vocab_size
    tokens[1, :6] = tokens[0, :6]
    hidden = fused(tokens, mask)
    torch.testing.assert_close(hidden[0, :6], hidden[1, :6], rtol=1e-5, atol=1e-5)


def test_too_many_positions():
    _, fused = twin_models()
    with pytest.raises(ValueError, match="at most 24 positions"):
        fused(torch.zeros(1, 25, dtype=torch.long))

"""The T5-style encoder-decoder built from genfast layers against the same weights in
torch.nn layers: logits, loss and every gradient with a padded encoder input."""

import pytest
import torch
import helpers
from helpers import require

import genfast
from genfast.models import T5, T5Config
from genfast.models.t5 import relative_position_bucket

CONFIG = T5Config(vocab_size=71, dim=40, heads=4, head_dim=12, ff_dim=56, encoder_layers=2, decoder_layers=2,
                  relative_buckets=8, max_distance=12)


def twin_models():
    return helpers.twin_models(lambda fused: T5(CONFIG, fused=fused))


def test_same_state_dict_both_ways():
    reference, fused = twin_models()
    assert reference.state_dict().keys() == fused.state_dict().keys()
    assert any(isinstance(m, genfast.nn.RMSNorm) for m in fused.modules())
    assert not any(isinstance(m, genfast.nn.RMSNorm) for m in reference.modules())


def test_relative_position_buckets():
    """T5's defaults, 32 buckets up to distance 128. Both ways: 16 per direction, 8 exact,
    then log-spaced: 8 + floor(8 log(d / 8) / log(16)). Backward only: 16 exact, then
    16 + floor(16 log(d / 16) / log(8)); keys after the query fall in bucket 0."""
    relative = torch.tensor([0, -1, 1, -7, -8, -20, 20, -127, -128, -1000])
    both_ways = relative_position_bucket(relative, True, 32, 128)
    assert both_ways.tolist() == [0, 1, 17, 7, 8, 10, 26, 15, 15, 15]
    backward_only = relative_position_bucket(relative, False, 32, 128)
    assert backward_only.tolist() == [0, 1, 0, 7, 8, 17, 0, 31, 31, 31]


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_training_step_matches_torch_layers(backend):
    """Logits of the real positions, the loss and the gradient of every parameter, within
    twice the error torch's layers make in fp32 against the float64 model, plus DESIGN.md's
    fp32 term."""
    device = require(backend)
    reference, fused = (m.to(device) for m in twin_models())
    exact = T5(CONFIG).to(device).double()
    exact.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 13), generator=generator).to(device)
    mask = (torch.arange(13)[None, :] < torch.tensor([13, 7, 1])[:, None]).to(device)
    decoder_tokens = torch.randint(0, CONFIG.vocab_size, (3, 9), generator=generator).to(device)
    targets = torch.randint(0, CONFIG.vocab_size, (3, 9), generator=generator).to(device)
    targets[:, -2:] = -100

    def step(model):
        logits = model(tokens, decoder_tokens, mask)
        loss = model.loss(tokens, decoder_tokens, targets, mask)
        return [logits, loss, *torch.autograd.grad(loss, list(model.parameters()))]

    with genfast.use_backend(backend):
        got = step(fused)
    names = ["logits", "loss", *(name for name, _ in fused.named_parameters())]
    helpers.assert_like_torch_build(names, got, step(reference), step(exact))


def test_padding_does_not_leak():
    """The decoder's logits do not depend on what fills the encoder's padding."""
    _, fused = twin_models()
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 10), generator=generator)
    tokens[1, :6] = tokens[0, :6]
    mask = torch.tensor([[1] * 6 + [0] * 4] * 2)
    decoder_tokens = torch.randint(0, CONFIG.vocab_size, (1, 5), generator=generator).expand(2, 5)
    logits = fused(tokens, decoder_tokens, mask)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)

"""The LSTM language model and the GRU encoder-decoder built from genfast layers against the
same weights in torch.nn layers: logits, loss and every gradient, and generated tokens."""

import pytest
import torch
import helpers
from helpers import require

import genfast
from genfast.models import LSTMLM, GRUEncoderDecoder, RNNConfig

CONFIG = RNNConfig(vocab_size=41, dim=24, layers=2)


def builds(model_class):
    reference, fused = helpers.twin_models(lambda fused: model_class(CONFIG, fused=fused))
    exact = model_class(CONFIG).double()
    exact.load_state_dict(reference.state_dict())
    return reference, fused, exact


def tokens(*shape, seed):
    return torch.randint(0, CONFIG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# Not "cuda": the models' loss (linear_cross_entropy) has no CUDA C++ kernel, and an explicit backend
# refuses it (test_rnn.py tests the recurrences' CUDA kernel).
@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_lstm_lm_training_step_matches_torch_layers(backend):
    device = require(backend)
    reference, fused, exact = builds(LSTMLM)
    sequence = tokens(3, 12, seed=1)
    targets = sequence[:, 1:].clone()
    targets[0, -3:] = -100

    def step(model, device="cpu"):
        logits, (h, c) = model(sequence[:, :-1].to(device))
        loss = model.loss(sequence[:, :-1].to(device), targets.to(device))
        return [t.cpu() for t in (logits, h, c, loss, *torch.autograd.grad(loss, list(model.parameters())))]

    with genfast.use_backend(backend):
        got = step(fused.to(device), device)
    names = ["logits", "h_n", "c_n", "loss", *(name for name, _ in fused.named_parameters())]
    helpers.assert_like_torch_build(names, got, step(reference), step(exact))


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_gru_encoder_decoder_training_step_matches_torch_layers(backend):
    """Padded sources of different lengths, which the encoder reads packed."""
    device = require(backend)
    reference, fused, exact = builds(GRUEncoderDecoder)
    source, lengths = tokens(4, 9, seed=2), torch.tensor([9, 4, 1, 6])
    target = tokens(4, 7, seed=3)

    def step(model, device="cpu"):
        source_, target_ = source.to(device), target.to(device)
        logits = model(source_, lengths, target_[:, :-1])
        loss = model.loss(source_, lengths, target_[:, :-1], target_[:, 1:])
        return [t.cpu() for t in (logits, loss, *torch.autograd.grad(loss, list(model.parameters())))]

    with genfast.use_backend(backend):
        got = step(fused.to(device), device)
    names = ["logits", "loss", *(name for name, _ in fused.named_parameters())]
    helpers.assert_like_torch_build(names, got, step(reference), step(exact))


def test_generation_matches_torch_layers():
    """With the same generator, both builds draw the same tokens (temperature sampling)."""
    require("cpu")
    lm_reference, lm_fused, _ = builds(LSTMLM)
    seq_reference, seq_fused, _ = builds(GRUEncoderDecoder)
    prompt, source, lengths = tokens(2, 5, seed=4), tokens(2, 6, seed=5), torch.tensor([6, 3])
    with genfast.use_backend("cpu"):
        drawn = [
            lm_fused.generate(prompt, 8, temperature=0.8, generator=torch.Generator().manual_seed(6)),
            seq_fused.generate(source, lengths, torch.zeros(2, dtype=torch.long), 8, 0.8,
                               torch.Generator().manual_seed(7)),
        ]
    expected = [
        lm_reference.generate(prompt, 8, temperature=0.8, generator=torch.Generator().manual_seed(6)),
        seq_reference.generate(source, lengths, torch.zeros(2, dtype=torch.long), 8, 0.8,
                               torch.Generator().manual_seed(7)),
    ]
    assert drawn[0].shape == (2, 13) and torch.equal(drawn[0][:, :5], prompt)
    assert drawn[1].shape == (2, 8)
    for got, want in zip(drawn, expected):
        assert torch.equal(got, want)

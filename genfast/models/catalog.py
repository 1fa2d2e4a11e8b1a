"""Every seed architecture as `genfast check` and the benchmarks run it: how to build it (from
torch.nn layers or genfast's), a batch, its outputs and its training loss, at two sizes: "check"
(small, seconds on a laptop CPU) and "bench" (the sizes the speed goals are measured at)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bert import BERT, BERTConfig
from .gan import GAN
from .gpt import GPT, GPTConfig
from .mlp import MLP
from .rnn import LSTMLM, GRUEncoderDecoder, RNNConfig
from .t5 import T5, T5Config
from .unet import UNet
from .vae import ConvVAE

SIZES = ("check", "bench")


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[bool, str], nn.Module]
    """build(fused, size): the model, from genfast's layers where fused."""
    batch: Callable[[str, torch.Generator], tuple]
    """batch(size, generator): the model's inputs, on the CPU."""
    outputs: Callable[[nn.Module, tuple], Tensor]
    """What the forward pass returns that the two builds must agree on."""
    loss: Callable[[nn.Module, tuple], Tensor]
    """The training loss of one step."""


def _tokens(vocab: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.randint(0, vocab, shape, generator=generator)


def _pick(size: str, check, bench):
    return check if size == "check" else bench


def _mlp_batch(size, generator):
    batch, features = _pick(size, (8, 32), (128, 784))
    return torch.randn(batch, features, generator=generator), _tokens(10, (batch,), generator)


def _vae_batch(size, generator):
    batch, pixels, latent = _pick(size, (2, 16, 8), (16, 64, 16))
    return torch.rand(batch, 3, pixels, pixels, generator=generator), torch.randn(batch, 4, latent, latent,
                                                                                 generator=generator)


def _gan_batch(size, generator):
    batch, pixels = _pick(size, (3, 16), (32, 32))
    images = torch.rand(batch, 3, pixels, pixels, generator=generator) * 2 - 1
    return torch.randn(batch, 64, generator=generator), images


def _unet_batch(size, generator):
    batch, pixels = _pick(size, (3, 16), (4, 32))
    noise = torch.randn(batch, 4, pixels, pixels, generator=generator)
    # Float timesteps: a float64 build embeds them in float64.
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).float()
    return (torch.randn(batch, 4, pixels, pixels, generator=generator), timesteps,
            torch.randint(0, 11, (batch,), generator=generator), noise)


_GPT = {"check": GPTConfig(vocab_size=97, max_positions=32, dim=64, heads=4, layers=2),
        "bench": GPTConfig(vocab_size=50257, max_positions=512, dim=768, heads=12, layers=12)}
_BERT = {"check": BERTConfig(vocab_size=97, max_positions=32, dim=64, heads=4, layers=2),
         "bench": BERTConfig(layers=12)}
_T5 = {"check": T5Config(vocab_size=97, dim=64, heads=4, head_dim=16, ff_dim=96, encoder_layers=2, decoder_layers=2),
       "bench": T5Config()}
_RNN = {"check": RNNConfig(vocab_size=41, dim=24, layers=2), "bench": RNNConfig()}
_SEQUENCE = {"check": (2, 12), "bench": (4, 128)}


def _sequence_batch(vocab: int):
    def batch(size, generator):
        return (_tokens(vocab, _SEQUENCE[size], generator),)

    return batch


def _seq2seq_batch(size, generator):
    vocab = _pick(size, 97, 32128)
    batch, length = _SEQUENCE[size]
    return _tokens(vocab, (batch, length), generator), _tokens(vocab, (batch, length // 2 + 1), generator)


def _gru_batch(size, generator):
    vocab = _RNN[size].vocab_size
    batch, length = _SEQUENCE[size]
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    return _tokens(vocab, (batch, length), generator), lengths, _tokens(vocab, (batch, length // 2 + 1), generator)


ARCHITECTURES = {
    a.name: a
    for a in [
        Architecture(
            "mlp",
            lambda fused, size: MLP(*_pick(size, (32, (48, 48), 10), (784, (1024, 1024), 10)), fused=fused),
            _mlp_batch,
            lambda model, batch: model(batch[0]),
            lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        ),
        Architecture(
            "vae",
            lambda fused, size: ConvVAE(channels=_pick(size, (16, 32), (32, 64, 128)), groups=_pick(size, 4, 8),
                                        fused=fused),
            _vae_batch,
            lambda model, batch: model(*batch)[0],
            lambda model, batch: model.loss(*batch),
        ),
        Architecture(
            "gan",
            lambda fused, size: GAN(channels=_pick(size, (32, 16, 8), (256, 128, 64, 32)), fused=fused),
            _gan_batch,
            lambda model, batch: torch.cat([t.flatten() for t in model(*batch)]),
            lambda model, batch: model.loss(*batch),
        ),
        Architecture(
            "unet",
            lambda fused, size: UNet(channels=_pick(size, (16, 32, 48), (32, 64, 128)), groups=_pick(size, 4, 8),
                                     fused=fused),
            _unet_batch,
            lambda model, batch: model(*batch[:3]),
            lambda model, batch: F.mse_loss(model(*batch[:3]), batch[3]),
        ),
        Architecture(
            "gpt",
            lambda fused, size: GPT(_GPT[size], fused=fused),
            lambda size, generator: _sequence_batch(_GPT[size].vocab_size)(size, generator),
            lambda model, batch: model(batch[0][:, :-1]),
            lambda model, batch: model.loss(batch[0][:, :-1], batch[0][:, 1:]),
        ),
        Architecture(
            "bert",
            lambda fused, size: BERT(_BERT[size], fused=fused),
            lambda size, generator: _sequence_batch(_BERT[size].vocab_size)(size, generator),
            lambda model, batch: model(batch[0]),
            # The states are layer-normalised: their plain mean or mean square hardly depends on the weights.
            lambda model, batch: (model(batch[0]) * torch.linspace(-1, 1, model.config.dim)).mean(),
        ),
        Architecture(
            "t5",
            lambda fused, size: T5(_T5[size], fused=fused),
            _seq2seq_batch,
            lambda model, batch: model(batch[0], batch[1][:, :-1]),
            lambda model, batch: model.loss(batch[0], batch[1][:, :-1], batch[1][:, 1:]),
        ),
        Architecture(
            "lstm_lm",
            lambda fused, size: LSTMLM(_RNN[size], fused=fused),
            lambda size, generator: _sequence_batch(_RNN[size].vocab_size)(size, generator),
            lambda model, batch: model(batch[0][:, :-1])[0],
            lambda model, batch: model.loss(batch[0][:, :-1], batch[0][:, 1:]),
        ),
        Architecture(
            "gru_encoder_decoder",
            lambda fused, size: GRUEncoderDecoder(_RNN[size], fused=fused),
            _gru_batch,
            lambda model, batch: model(batch[0], batch[1], batch[2][:, :-1]),
            lambda model, batch: model.loss(batch[0], batch[1], batch[2][:, :-1], batch[2][:, 1:]),
        ),
    ]
}


def twins(architecture: Architecture, size: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(torch.nn build, genfast build) with the same weights, both in float32 on the CPU."""
    torch.manual_seed(seed)
    reference = architecture.build(False, size)
    fused = architecture.build(True, size)
    fused.load_state_dict(reference.state_dict())
    return reference, fused

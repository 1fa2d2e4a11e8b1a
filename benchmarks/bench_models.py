"""The MLP, the convolutional VAE, the GAN, the U-Net and the recurrent language models end to
end, each a forward and a training step (forward, loss, backward), at genfast.models.catalog's
"bench" sizes: genfast's build against the torch.nn build with the same weights and that build
compiled. (The transformers have their own cases in bench_transformers.py.)
- MLP: 784 -> 1024 -> 1024 -> 10 with ReLU, batch 128, cross-entropy;
- VAE: 64x64 RGB images, batch 16, channels 32-64-128, the negative ELBO;
- GAN: 32x32 RGB, batch 32, both players' non-saturating losses and the R1 penalty;
- U-Net: 4 x 4 x 32 x 32 latents, channels 32-64-128, the noise-prediction MSE;
- the LSTM language model and the GRU encoder-decoder: 2 layers of 512, vocabulary 10,000,
  batch 4 x 128 tokens (the GRU's sources of random lengths), the next-token cross-entropy.

genfast's builds of the image models run channels-last (genfast.models.layers.use_channels_last);
"torch.nn channels-last" shows what that layout alone gives the torch.nn build.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from genfast.models.catalog import ARCHITECTURES, Architecture, twins

from .harness import Case, Provider, Unsupported, model_providers, model_step

NAMES = ("mlp", "vae", "gan", "unet", "lstm_lm", "gru_encoder_decoder")
IMAGE_MODELS = ("vae", "gan", "unet")


def _step(model: torch.nn.Module, architecture: Architecture, batch: tuple, training: bool):
    return model_step(model, training, lambda: architecture.outputs(model, batch),
                      lambda: architecture.loss(model, batch))


@functools.cache
def _cost(name: str, training: bool) -> tuple[int, int]:
    """(bytes of weights, flops) of one call, counted by torch's flop counter. It cannot follow
    the GAN's R1 penalty (autograd.grad inside a backward): there the training step counts as
    three forwards, the usual estimate."""
    architecture = ARCHITECTURES[name]
    model = architecture.build(False, "bench")
    batch = architecture.batch("bench", torch.Generator().manual_seed(0))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        with FlopCounterMode(display=False) as counter:
            _step(model, architecture, batch, training)
    except RuntimeError:
        return weight_bytes, 3 * _cost(name, False)[1]
    return weight_bytes, counter.get_total_flops()


def model_case(name: str, training: bool) -> Case:
    architecture = ARCHITECTURES[name]

    def make_inputs(device: torch.device) -> dict:
        reference, fused = (m.to(device) for m in twins(architecture, "bench"))
        batch = tuple(t.to(device) for t in architecture.batch("bench", torch.Generator().manual_seed(0)))
        models = {"genfast": fused, "torch": reference, "compiled": torch.compile(reference)}
        if name in IMAGE_MODELS:
            models["channels_last"] = copy.deepcopy(reference).to(memory_format=torch.channels_last)
        return {"architecture": architecture, "models": models, "batch": batch, "training": training}

    weight_bytes, flops = _cost(name, training)
    what = "training step" if training else "forward"
    batch = architecture.batch("bench", torch.Generator().manual_seed(0))[0]
    return Case(f"{name} {what} {'x'.join(map(str, batch.shape))}", "models", "forward", batch.numel(), make_inputs,
                weight_bytes, flops, quick=name in ("mlp", "vae", "gan"), variant=what)


CASES = [model_case(name, training) for name in NAMES for training in (False, True)]


def _channels_last_step(models: dict, **inputs):
    if "channels_last" not in models:
        raise Unsupported("not an image model")
    return _step(models["channels_last"], **inputs)


def providers(device_type: str) -> list[Provider]:
    return [*model_providers(device_type, _step), Provider("torch.nn channels-last", _channels_last_step)]

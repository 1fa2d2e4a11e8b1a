"""The seed architectures, each buildable from torch.nn layers or genfast's from the same weights."""

from .bert import BERT, BERTConfig
from .gan import GAN, Discriminator, Generator, r1_penalty
from .gpt import GPT, GPTConfig, KVCache
from .mlp import MLP
from .rnn import LSTMLM, GRUEncoderDecoder, RNNConfig
from .t5 import T5, T5Config
from .unet import UNet, sample
from .vae import ConvVAE

__all__ = [
    "BERT", "BERTConfig", "ConvVAE", "Discriminator", "GAN", "GPT", "GPTConfig", "GRUEncoderDecoder", "Generator",
    "KVCache", "LSTMLM", "MLP", "RNNConfig", "T5", "T5Config", "UNet", "r1_penalty", "sample",
]

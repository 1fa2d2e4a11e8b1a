"""The seed architectures, each buildable from torch.nn layers or genfast's from the same weights."""

from .bert import BERT, BERTConfig
from .gpt import GPT, GPTConfig, KVCache
from .rnn import LSTMLM, GRUEncoderDecoder, RNNConfig
from .t5 import T5, T5Config
from .unet import UNet, sample

__all__ = [
    "BERT", "BERTConfig", "GPT", "GPTConfig", "GRUEncoderDecoder", "KVCache", "LSTMLM", "RNNConfig", "T5", "T5Config",
    "UNet", "sample",
]

"""The math of every genfast op in plain PyTorch: the spec, the test oracle and
the ``reference`` backend. Nothing here imports anything but torch."""

from . import activation, attention, bias_act, conv, cross_entropy, diffusion, losses, minibatch_stddev, norm, random, rnn, rotary, sampling

__all__ = ["activation", "attention", "bias_act", "conv", "cross_entropy", "diffusion", "losses", "minibatch_stddev", "norm", "random", "rnn", "rotary", "sampling"]

"""A call of each of several CPU ops, forward and backward, from a random generator: what the
threads and memory tests run many times."""

import torch

import genfast


def _conv(generator, channels):
    """A 3x3 convolution's output and its three gradients; 64 channels over 32x32 images take the
    filters' gradient's per-thread sums, 8 channels its every-tile-first way."""
    x = torch.randn(2, channels, 32, 32, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, channels, 3, 3, generator=generator) / (3 * channels)
    bias = torch.randn(channels, generator=generator)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    y = genfast.ops.conv2d(*leaves, padding=1)
    return (y, *torch.autograd.grad(y, leaves, torch.randn(y.shape, generator=generator)))


def _with_gradients(fn, *shapes):
    def run(generator):
        leaves = [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]
        y = fn(*leaves)
        return (y, *torch.autograd.grad(y, leaves, torch.randn(y.shape, generator=generator)))

    return run


CALLS = {
    "conv2d per-thread sums": lambda g: _conv(g, 64),
    "conv2d every tile first": lambda g: _conv(g, 8),
    "bias_act": _with_gradients(lambda x, b: genfast.ops.bias_act(x, b, activation="leaky_relu"), (4, 16, 9, 9), (16,)),
    "group_norm silu": _with_gradients(lambda x: genfast.ops.group_norm(x, 4, activation="silu"), (3, 16, 11, 7)),
    "layer_norm": _with_gradients(lambda x: genfast.ops.layer_norm(x, 96), (5, 13, 96)),
    "attention": _with_gradients(lambda q, k, v: genfast.ops.scaled_dot_product_attention(q, k, v, is_causal=True),
                                 (2, 3, 37, 16), (2, 3, 37, 16), (2, 3, 37, 16)),
    "gelu": _with_gradients(genfast.ops.gelu, (7, 300)),
    "minibatch_stddev": _with_gradients(genfast.ops.minibatch_stddev, (8, 12, 5, 5)),
}

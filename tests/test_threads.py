"""Ops called from eight threads at once give what each gives alone (issue 7's threads point,
for the CPU kernels): no kernel keeps state between calls that another call can change."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import require

import genfast

THREADS = 8


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


OPS = {
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


@pytest.mark.parametrize("name", OPS)
def test_threads_get_what_each_gets_alone(name):
    require("cpu")
    op = OPS[name]

    def run(seed):
        return op(torch.Generator().manual_seed(seed))

    # The backend is chosen once: use_backend sets the process's choice, not a thread's.
    with genfast.use_backend("cpu"):
        alone = [run(seed) for seed in range(THREADS)]
        seeds = [seed for _ in range(3) for seed in range(THREADS)]
        with ThreadPoolExecutor(THREADS) as pool:
            together = list(pool.map(run, seeds))
    for seed, outputs in zip(seeds, together, strict=True):
        for got, want in zip(outputs, alone[seed], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"seed {seed}")

"""3000 calls of an op, forward and backward, grow the process's resident memory by less than
50 MB (issue 7's memory point, for the CPU kernels): nothing they allocate outlives them, and no
cache keeps tensors without bound."""

import gc
import os

import pytest
import torch
from helpers import require
from op_calls import CALLS

import genfast

CALLS_TIMED = 3000
LIMIT_BYTES = 50 << 20


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from Linux's /proc")
@pytest.mark.parametrize("name", CALLS)
def test_calls_do_not_grow_memory(name):
    require("cpu")
    op, generator = CALLS[name], torch.Generator().manual_seed(0)
    with genfast.use_backend("cpu"):
        for _ in range(100):  # the allocator's and the kernels' first allocations
            op(generator)
        gc.collect()
        before = _resident_bytes()
        for _ in range(CALLS_TIMED):
            op(generator)
        gc.collect()
    grown = _resident_bytes() - before
    assert grown < LIMIT_BYTES, f"{name}: {CALLS_TIMED} calls grew resident memory by {grown / 2**20:.1f} MB"

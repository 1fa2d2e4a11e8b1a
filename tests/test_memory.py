"""3000 calls of an op, forward and backward, grow the process's resident memory by less than
50 MB (issue 7's memory point, for the CPU kernels): nothing they allocate outlives them, and no
cache keeps tensors without bound."""

import contextlib
import gc
import os

import pytest
import torch
from helpers import require
from op_calls import CALLS

import genfast
from genfast.backends import extension

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


def _lazy_free_bytes() -> int | None:
    """Memory marked MADV_FREE and still resident, from Linux's /proc; None where it does not say."""
    with contextlib.suppress(OSError), open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("LazyFree:"):
                return int(line.split()[1]) << 10
    return None


def test_output_memory_marks_only_idle_blocks_free():
    """The output cache hands idle blocks back to the system (MADV_FREE) but leaves the ones a
    loop reuses alone: marking walks every page, a tenth of a LayerNorm's time."""
    require("cpu")
    if _lazy_free_bytes() is None:
        pytest.skip("reads LazyFree from Linux's /proc/self/smaps_rollup")
    ext, block = extension(), 16 << 20
    like = torch.empty(0)

    def output() -> torch.Tensor:
        return ext.empty_output([block // 4], like).fill_(1.0)

    output()  # the first give marks whatever older blocks other tests left past the line
    held = output()  # written, so none of its pages counts as lazily free
    before = _lazy_free_bytes()
    del held
    assert _lazy_free_bytes() - before < block // 2, "a block given back just now was marked free"
    held = [output() for _ in range(ext.output_memory_warm_bytes // block + 6)]
    before = _lazy_free_bytes()
    del held
    marked = _lazy_free_bytes() - before
    assert marked >= 3 * block, f"blocks past the warm {ext.output_memory_warm_bytes >> 20} MB: {marked >> 20} MB marked"

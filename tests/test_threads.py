"""Ops called from eight threads at once give what each gives alone (issue 7's threads point,
for the CPU kernels): no kernel keeps state between calls that another call can change."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import require
from op_calls import CALLS

import genfast

THREADS = 8


@pytest.mark.parametrize("name", CALLS)
def test_threads_get_what_each_gets_alone(name):
    require("cpu")
    op = CALLS[name]

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

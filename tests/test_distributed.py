"""Distributed training over gloo on the CPU with genfast's layers (LSTM, attention, GroupNorm):
two DDP ranks, each given half the batch, end with the same gradients, and those are one process's
over the whole batch; likewise with FSDP2's fully_shard."""

import faulthandler
import multiprocessing
import os
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import genfast

WORLD_SIZE = 2
RANK_DEADLINE_S = 300
BATCH, LENGTH, FEATURES, HIDDEN, HEADS, GROUPS = 6, 7, 5, 24, 3, 4


class Tagger(nn.Module):
    """A sequence model of genfast layers: LSTM, self-attention, GroupNorm+SiLU over the hidden
    channels, then a per-step projection."""

    def __init__(self):
        super().__init__()
        self.lstm = genfast.nn.LSTM(FEATURES, HIDDEN, batch_first=True)
        self.attention = genfast.nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
        self.norm = genfast.nn.GroupNorm(GROUPS, HIDDEN, activation="silu")
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        h, _ = self.lstm(x)
        a, _ = self.attention(h, h, h, need_weights=False)
        h = self.norm((h + a).transpose(1, 2)).transpose(1, 2)
        return self.head(h).squeeze(-1)


def _model_and_batch():
    torch.manual_seed(0)
    model = Tagger()
    inputs, targets = torch.randn(BATCH, LENGTH, FEATURES), torch.randn(BATCH, LENGTH)
    return model, inputs, targets


def _gradients(model, inputs, targets) -> dict[str, torch.Tensor]:
    nn.functional.mse_loss(model(inputs), targets).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _rank(rank: int, directory: str, wrapping: str) -> None:
    # A rank still running near the test's deadline prints where it is stuck and exits.
    faulthandler.dump_traceback_later(RANK_DEADLINE_S - 30, exit=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=WORLD_SIZE)
    model, inputs, targets = _model_and_batch()
    share = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
    if wrapping == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
        gradients = _gradients(wrapped, inputs[share], targets[share])
        gradients = {name.removeprefix("module."): g for name, g in gradients.items()}
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in (model.lstm, model.attention, model.norm):
            fully_shard(layer)
        fully_shard(model)
        sharded = _gradients(model, inputs[share], targets[share])
        gradients = {name: g.full_tensor() for name, g in sharded.items()}
    torch.save(gradients, f"{directory}/rank{rank}.pt")
    dist.barrier()
    # Leave without tearing the process group down. torch's backward stashes a Python object in
    # thread-local state, which the collectives it launches copy; gloo's worker thread frees
    # them once done, taking the GIL, while ~ProcessGroupGloo joins that thread holding the GIL.
    # Destroyed right after a collective, the group deadlocked within a few runs here (torch 2.13,
    # both ranks stuck in ~ProcessGroupGloo under gdb).
    os._exit(0)


@pytest.mark.parametrize("wrapping", ["ddp", "fsdp"])
def test_two_ranks_give_one_process_gradients(tmp_path, wrapping):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch has no gloo backend")
    if wrapping == "fsdp" and not hasattr(torch.distributed.fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    context = multiprocessing.get_context("spawn")
    ranks = [context.Process(target=_rank, args=(rank, os.fspath(tmp_path), wrapping)) for rank in range(WORLD_SIZE)]
    for process in ranks:
        process.start()
    try:
        deadline = time.monotonic() + 300
        for process in ranks:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        exitcodes = [process.exitcode for process in ranks]
        written = sorted(path.name for path in tmp_path.glob("rank*.pt"))
        assert exitcodes == [0] * WORLD_SIZE, (
            f"the ranks exited with {exitcodes} (None: still running after {RANK_DEADLINE_S} s), having written "
            f"{written}; a stuck rank prints its stack above"
        )
    finally:
        for process in ranks:
            process.kill()
    gathered = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    model, inputs, targets = _model_and_batch()
    alone = _gradients(model, inputs, targets)
    for name, want in alone.items():
        assert torch.equal(gathered[0][name], gathered[1][name]), name
        torch.testing.assert_close(gathered[0][name], want, rtol=1e-5, atol=1e-6, msg=name)

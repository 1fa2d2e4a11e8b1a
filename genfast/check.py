"""`genfast check`: every seed architecture in its torch.nn and its genfast build, from the same
weights, on the CPU (and the GPU when there is one). Per architecture it reports the forward
outputs' and the gradients' largest error against a float64 torch.nn build, the training step's
speedup, and whether a few steps of training give the same losses; it fails on any mismatch.

The error rule is the tests': genfast's error is at most twice the float32 torch.nn build's, plus
an absolute term.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from .models.catalog import ARCHITECTURES, Architecture, twins

ATOL = 1e-5  # the absolute term of the error rule, float32's (DESIGN.md)
TRAINING_STEPS = 3
LEARNING_RATE = 1e-3
LOSS_TOLERANCE = 1e-4  # relative: each step's loss, genfast against torch.nn


@dataclass
class Result:
    architecture: str
    device: str
    forward_error: float
    forward_bound: float
    gradient_error: float  # the largest over the parameters, as a share of that parameter's bound
    gradient_bound_share: float
    speedup: float
    losses: tuple[list[float], list[float]]  # (genfast, torch.nn) per training step

    @property
    def losses_match(self) -> bool:
        return all(abs(g - t) <= LOSS_TOLERANCE * max(1.0, abs(t)) for g, t in zip(*self.losses))

    @property
    def passed(self) -> bool:
        return self.forward_error <= self.forward_bound and self.gradient_bound_share <= 1 and self.losses_match


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max(1, max |ref|)."""
    if ref.numel() == 0:
        return 0.0
    return (out.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())


def _to(batch: tuple, device: torch.device, dtype: torch.dtype) -> tuple:
    return tuple(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in batch)


def _gradients(architecture: Architecture, model: torch.nn.Module, batch: tuple) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(architecture.loss(model, batch), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _step_time(architecture: Architecture, model: torch.nn.Module, batch: tuple, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        architecture.loss(model, batch).backward()
        if batch[0].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times[2:])


def _train(architecture: Architecture, model: torch.nn.Module, batches: list[tuple]) -> list[float]:
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = architecture.loss(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def check(architecture: Architecture, device: torch.device) -> Result:
    reference, fused = (m.to(device) for m in twins(architecture, "check"))
    exact = copy.deepcopy(reference).double()
    generator = torch.Generator().manual_seed(1)
    batch = architecture.batch("check", generator)
    batch32, batch64 = _to(batch, device, torch.float32), _to(batch, device, torch.float64)
    with torch.no_grad():
        got, want, truth = (architecture.outputs(m, b) for m, b in ((fused, batch32), (reference, batch32),
                                                                     (exact, batch64)))
    grads = zip(*(_gradients(architecture, m, b) for m, b in ((fused, batch32), (reference, batch32),
                                                            (exact, batch64))))
    gradient_error, share = 0.0, 0.0
    for g, w, t in grads:
        error = relative_error(g, t)
        gradient_error = max(gradient_error, error)
        share = max(share, error / (2 * relative_error(w, t) + ATOL))
    speedup = _step_time(architecture, reference, batch32) / _step_time(architecture, fused, batch32)
    batches = [_to(architecture.batch("check", generator), device, torch.float32) for _ in range(TRAINING_STEPS)]
    losses = (_train(architecture, fused, batches), _train(architecture, reference, batches))
    return Result(architecture.name, str(device), relative_error(got, truth), 2 * relative_error(want, truth) + ATOL,
                  gradient_error, share, speedup, losses)


def run(names: Iterable[str] | None = None, devices: Iterable[str] | None = None) -> int:
    """Check the architectures named (default: all) on each device (default: the CPU, and CUDA
    where available); print the table; return the exit status, 1 on any mismatch."""
    names = list(names or ARCHITECTURES)
    unknown = [name for name in names if name not in ARCHITECTURES]
    if unknown:
        raise ValueError(f"unknown architectures {unknown}; choose from {list(ARCHITECTURES)}")
    devices = list(devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]))
    table = Table(title="genfast check: genfast build against torch.nn build, same weights")
    for column in ("architecture", "device", "forward error (bound)", "gradient error (% of bound)", "step speedup",
                   f"{TRAINING_STEPS} steps' losses", "result"):
        table.add_column(column)
    console = Console(width=max(Console().width, 120))  # CI logs are 80 columns
    failed = False
    for device in devices:
        for name in names:
            with console.status(f"checking {name} on {device}"):
                result = check(ARCHITECTURES[name], torch.device(device))
            failed |= not result.passed
            table.add_row(
                name, device, f"{result.forward_error:.2g} ({result.forward_bound:.2g})",
                f"{result.gradient_error:.2g} ({result.gradient_bound_share:.0%})", f"{result.speedup:.2f}x",
                "match" if result.losses_match else f"differ: {result.losses[0]} vs {result.losses[1]}",
                "ok" if result.passed else "MISMATCH",
            )
    console.print(table)
    console.print("speedups are of small check-sized models; `genfast bench` times the real sizes")
    return 1 if failed else 0

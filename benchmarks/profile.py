"""Where a benchmark case's time goes: the kernels each call launches, their
device time, and the host time per call, for every provider.

    python -m genfast.benchmarks.profile [--providers genfast[cuda] torch] FILTER...

It selects cases as `genfast bench` does (filters match op, case name or
direction). On a GPU a provider whose host time per call exceeds its kernels'
time is bound by launch overhead, which a benchmark would only show as a
time that does not shrink with the size.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from .harness import DIRECTIONS, plan

CALLS = 20


def _kernel_times(prof) -> dict[str, float]:
    """Device microseconds per kernel name, summed over the profiled calls."""
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time
    return totals


def profile_call(call, device: torch.device) -> tuple[float, dict[str, float]]:
    """Host microseconds per call, and each kernel's device microseconds per call."""
    for _ in range(3):
        call()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(CALLS):
        call()
    host_us = (time.perf_counter() - start) / CALLS * 1e6
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            call()
        torch.cuda.synchronize(device)
    return host_us, {name: us / CALLS for name, us in _kernel_times(prof).items()}


def print_python_hotspots(call, top: int = 8) -> None:
    """The Python functions that take the most host time of a call, by their own time."""
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [call() for _ in range(CALLS)])
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:top]  # item[1][2]: own time
    for (file, line, name), (_, calls, own, _cumulative, _) in rows:
        print(f"      {own / CALLS * 1e6:8.1f} us own  {calls // CALLS:>3}x  {name} ({file.rsplit('/', 1)[-1]}:{line})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("filters", nargs="*")
    parser.add_argument("--providers", nargs="*", help="provider names (default: every available one)")
    parser.add_argument("--python", action="store_true", help="also list the Python functions that cost host time")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    for case, providers in plan(False, args.filters, device.type, args.providers):
        inputs = case.make_inputs(device)
        print(f"\n{case.op} {case.name} {case.direction} ({case.bytes / 1e6:.1f} MB moved at least)")
        for provider in providers:
            if provider.unavailable or provider.compiled:
                continue
            with provider.context():
                call = DIRECTIONS[case.direction](provider.fn, inputs)
                host_us, kernels = profile_call(call, device)
                print(f"  {provider.name:<16} host {host_us:8.1f} us/call  kernels {sum(kernels.values()):8.1f} us/call")
                for name, us in sorted(kernels.items(), key=lambda item: -item[1])[:6]:
                    print(f"      {us:8.1f} us  {name[:110]}")
                if args.python:
                    print_python_hotspots(call)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

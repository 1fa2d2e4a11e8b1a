"""The benchmark harness every op family shares.

A family is a module ``bench_<family>.py`` in this package that declares

    CASES: list[Case]                                  what to time
    def providers(device_type: str) -> list[Provider]  what to time it with

``run()`` finds the families, measures this machine's memory bandwidth and
matmul rate, times every selected case with every provider in the same
process, and writes the report (report.py): results.json, results.md and one
plot per op. Each provider is compared with the fastest genfast backend, and
genfast with the roofline those measured rates draw.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import importlib.metadata
import math
import os
import pkgutil
import platform
import statistics
import time
import traceback
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

import genfast
from genfast.backends import BackendUnavailableError

from .report import write_report

# ---------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Case:
    """One thing to time: an op at one shape, dtype and layout, in one direction."""

    name: str
    """Where the shape comes from and what it is, e.g. "sd-unet 8x320x64x64"."""
    op: str
    """The op timed; the cases of one op share a table and a plot."""
    direction: str
    """A key of DIRECTIONS: "forward", "backward" (the gradients of every floating-point input),
    or "forward+backward" (both, timed together)."""
    size: float
    """How big the problem is, the x axis of the op's plot: by convention the elements of the main input."""
    make_inputs: Callable[[torch.device], dict[str, Any]]
    """Fresh random inputs on a device, passed to every provider's fn as keyword arguments."""
    bytes: int
    """The fewest bytes the op must move to and from memory: the roofline's memory bound."""
    flops: int = 0
    """The fewest floating-point operations it must do: the roofline's compute bound."""
    quick: bool = False
    """Part of the --quick suite."""
    variant: str = ""
    """What sets it apart from other cases of its op besides size (dtype, layout); each variant is a plot line."""
    devices: tuple[str, ...] = ("cpu", "cuda")
    """The device types it runs on."""


@dataclass(frozen=True)
class Provider:
    """One implementation of a family's op."""

    name: str
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]] | None
    """Takes a case's inputs as keyword arguments and returns the op's output (or outputs); None when unavailable."""
    genfast: bool = False
    """A genfast backend: every provider is compared with the fastest of these."""
    compiled: bool = False
    """Time torch.compile(fn); it compiles during the untimed warm-up."""
    fullgraph: bool = True
    """With compiled: compile fn whole, or let it break into graphs where it must (e.g. diffusers' DDPM step)."""
    context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
    """Entered around building and timing the calls, e.g. genfast.use_backend(...)."""
    unavailable: str | None = None
    """Why it cannot run on this machine; it is then reported, not timed."""


class Unsupported(Exception):
    """Raised by a provider's fn for a case it cannot run, e.g. a layout it does not take."""


# A provider that cannot run one case is reported beside the others; it does not stop the run.
CANNOT_RUN_CASE = (Unsupported, BackendUnavailableError)

# The genfast backends worth timing on each device type; the reference has a provider of its own.
NATIVE_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}


def genfast_providers(fn: Callable[..., torch.Tensor], device_type: str) -> list[Provider]:
    """A provider "genfast[<backend>]" per native backend of device_type, each running fn under that backend."""
    return [
        Provider(
            f"genfast[{backend}]",
            fn,
            genfast=True,
            context=functools.partial(genfast.use_backend, backend),
            unavailable=genfast.backends.unavailable_reason(backend, device_type),
        )
        for backend in NATIVE_BACKENDS.get(device_type, ())
    ]


def op_providers(
    device_type: str,
    genfast_fn: Callable[..., Any],
    torch_fn: Callable[..., Any],
    reference_fn: Callable[..., Any] | None = None,
) -> list[Provider]:
    """An op's usual providers: genfast per native backend, what users run today in eager torch,
    torch.compile of that, and (where it differs from torch's) genfast's plain-PyTorch reference."""
    providers = [
        *genfast_providers(genfast_fn, device_type),
        Provider("torch", torch_fn),
        Provider("torch.compile", torch_fn, compiled=True),
    ]
    return providers if reference_fn is None else [*providers, Provider("reference", reference_fn)]


def model_step(model: torch.nn.Module, training: bool, outputs: Callable[[], Any],
               loss: Callable[[], torch.Tensor]) -> Any:
    """What a model case times: the forward, outputs() without autograd, or a training step,
    loss() and its backward from zeroed gradients (returning the loss)."""
    if not training:
        with torch.no_grad():
            return outputs()
    model.zero_grad(set_to_none=True)
    value = loss()
    value.backward()
    return value.detach()


def model_providers(device_type: str, run: Callable[..., Any]) -> list[Provider]:
    """An architecture's providers: its genfast build per native backend, its torch.nn build, and
    that build compiled (its first, untimed call compiles). A case's inputs hold the three models
    as models["genfast" | "torch" | "compiled"]; run(model, **the other inputs) runs one."""

    def provider(which: str) -> Callable[..., Any]:
        return lambda models, **inputs: run(models[which], **inputs)

    return [
        *genfast_providers(provider("genfast"), device_type),
        Provider("torch.nn", provider("torch")),
        Provider("torch.nn+torch.compile", provider("compiled")),
    ]


def cuda_peer(name: str, device_type: str, what: str, load: Callable[[], Callable[..., Any]]) -> Provider:
    """A peer library's provider that runs CUDA tensors only. ``load()`` imports the library and
    returns the provider's fn; where that raises ImportError the provider is reported unavailable."""
    if device_type != "cuda":
        return Provider(name, None, unavailable=f"{what} runs CUDA tensors only")
    try:
        return Provider(name, load())
    except ImportError as error:
        return Provider(name, None, unavailable=f"{what} is not installed ({error})")


# ---------------------------------------------------------------- the calls timed


def forward(fn: Callable[..., torch.Tensor], inputs: dict[str, Any]) -> Callable[[], Any]:
    return functools.partial(fn, **inputs)


def _leaves(inputs: dict[str, Any]) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """The inputs with every floating-point tensor a fresh leaf that requires grad, and those leaves."""
    leaves = {
        name: value.detach().requires_grad_()
        if isinstance(value, torch.Tensor) and value.is_floating_point()
        else value
        for name, value in inputs.items()
    }
    return leaves, [value for value in leaves.values() if isinstance(value, torch.Tensor) and value.requires_grad]


def _as_outputs(outputs) -> tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def backward(fn: Callable[..., torch.Tensor], inputs: dict[str, Any]) -> Callable[[], Any]:
    """Runs the forward once here, untimed; the call then differentiates through that graph."""
    leaves, wrt = _leaves(inputs)
    outputs = _as_outputs(fn(**leaves))
    grads = tuple(torch.randn_like(output) for output in outputs)
    return functools.partial(torch.autograd.grad, outputs, wrt, grads, retain_graph=True)


def forward_backward(fn: Callable[..., torch.Tensor], inputs: dict[str, Any]) -> Callable[[], Any]:
    """The forward and the gradients of every floating-point input in one call: the measure for
    an op whose forward does some of its backward's work (genfast's linear_cross_entropy)."""
    leaves, wrt = _leaves(inputs)

    def call():
        outputs = _as_outputs(fn(**leaves))
        return torch.autograd.grad(outputs, wrt, tuple(torch.ones_like(output) for output in outputs))

    return call


DIRECTIONS = {"forward": forward, "backward": backward, "forward+backward": forward_backward}

# ---------------------------------------------------------------- timing

QUICK_BUDGET_S = 0.3  # timed seconds per (case, provider) with --quick
# A GPU runs thousands of repetitions in half a second and its timings barely
# spread; a CPU's spread needs the longer budget to settle the median.
FULL_BUDGET_S = {"cpu": 2.0, "cuda": 0.5}
# On a CPU the case's providers take turns, each its budget in this many slices: a spell of
# other work on a shared machine, often seconds long, then slows every provider of the case
# rather than whichever was running, and moves the ratios far less than the times. (Timed one
# after the other, the same build's cell-loop ratio came out 2.31x, then 1.13x.)
CPU_ROUNDS = 5
WARMUP_FRACTION = 0.2  # of the budget, spent running untimed before the timed runs
MIN_RUNS = 5  # even when one run takes longer than the budget, over all rounds
MAX_RUNS = 2000  # enough for a stable median
MAX_INPUT_SETS = 32
DEFAULT_CACHE_BYTES = 32 << 20


def time_on_cpu(
    calls: list[Callable[[], Any]], budget_s: float, min_runs: int = MIN_RUNS, first_turn: bool = True
) -> list[float]:
    """Seconds of each timed call, cycling through calls (one per input set). On a provider's
    first turn every call runs once untimed first: first calls compile, fault pages in and fill
    the allocator's caches. Later turns skip it (at the fastrnns shape, 21 calls of 0.25 s)."""
    for call in calls if first_turn else ():
        call()
    warm_until = time.perf_counter() + budget_s * WARMUP_FRACTION
    while time.perf_counter() < warm_until:
        for call in calls:
            call()
    times = []
    deadline = time.perf_counter() + budget_s
    gc.disable()  # a collection would be charged to whichever provider happened to trigger it
    try:
        while len(times) < min_runs or (len(times) < MAX_RUNS and time.perf_counter() < deadline):
            call = calls[len(times) % len(calls)]
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


def time_on_cuda(
    calls: list[Callable[[], Any]], budget_s: float, min_runs: int = MIN_RUNS, first_turn: bool = True
) -> list[float]:
    """Seconds of each timed call, from CUDA events; do_bench warms up and runs as many as
    budget_s holds (min_runs and first_turn are time_on_cpu's).

    do_bench flushes the L2 cache before every run, so one input set is enough; its first,
    untimed call is where torch.compile compiles."""
    from triton.testing import do_bench  # imported here: triton is needed, and installed, for GPUs only

    warmup_ms = max(25, 1000 * budget_s * WARMUP_FRACTION)
    milliseconds = do_bench(calls[0], warmup=warmup_ms, rep=1000 * budget_s, return_mode="all")
    return [ms / 1000 for ms in milliseconds]


def input_set_count(case: Case, device: torch.device, cache_bytes: int) -> int:
    """How many input sets to rotate through so that a call rarely finds its inputs still in the CPU's cache."""
    if device.type != "cpu":
        return 1
    return max(1, min(MAX_INPUT_SETS, math.ceil(2 * cache_bytes / max(1, case.bytes))))


def _parse_cache_size(text: str) -> int:
    """sysfs cache sizes read like "49152K"."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def last_level_cache_bytes() -> int:
    """The CPU's largest cache in bytes, from sysfs; DEFAULT_CACHE_BYTES where sysfs does not say."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            sizes.append(_parse_cache_size((index / "size").read_text()))
    return max(sizes, default=DEFAULT_CACHE_BYTES)


# ---------------------------------------------------------------- the machine

# Far larger than any cache, so the copy streams from memory: CPU last-level caches, an H100's 50 MB L2.
COPY_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}
# The matmul measures the peak a compute-bound op could reach: fp32 on CPUs, bf16 tensor cores on GPUs.
MATMUL = {"cpu": (2048, torch.float32), "cuda": (8192, torch.bfloat16)}


def measure_rates(device: torch.device, timer: Callable, budget_s: float) -> dict[str, Any]:
    """Memory bandwidth (bytes read + written per second by a large copy) and matmul rate, measured now."""
    src = torch.ones(COPY_BYTES[device.type] // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = statistics.median(timer([functools.partial(dst.copy_, src)], budget_s))
    del src, dst
    n, dtype = MATMUL[device.type]
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul_s = statistics.median(timer([functools.partial(torch.mm, a, b)], budget_s))
    return {
        "memory_bytes_per_s": 2 * COPY_BYTES[device.type] / copy_s,
        "matmul_flops_per_s": 2 * n**3 / matmul_s,
        "matmul": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}",
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        # Other work on the machine skews timings, badly so for OpenMP code on few cores.
        "load_average_before": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "genfast": genfast.__version__,
    }


# ---------------------------------------------------------------- measuring


@dataclass
class Measurement:
    """What one provider did on one case."""

    provider: str
    genfast: bool
    status: str
    """One of "ok", "unavailable" (cannot run on this machine), "unsupported" (cannot run this case), "error"."""
    times_s: list[float] = field(default_factory=list)
    reason: str = ""

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None


@dataclass
class CaseResult:
    case: Case
    input_sets: int
    measurements: list[Measurement]

    def fastest_genfast(self) -> Measurement | None:
        ran = [m for m in self.measurements if m.genfast and m.status == "ok"]
        return min(ran, key=lambda m: m.median_s, default=None)

    def genfast_speedup(self, measurement: Measurement) -> float | None:
        """measurement's time / the fastest genfast backend's time: above 1, genfast is faster."""
        best = self.fastest_genfast()
        if best is None or measurement.status != "ok":
            return None
        return measurement.median_s / best.median_s

    def roofline_fraction(self, measurement: Measurement, rates: dict[str, Any]) -> float | None:
        """The share of the memory or compute bound (whichever is slower) that measurement reaches."""
        if measurement.status != "ok":
            return None
        bound_s = max(self.case.bytes / rates["memory_bytes_per_s"], self.case.flops / rates["matmul_flops_per_s"])
        return bound_s / measurement.median_s


def measure(
    case: Case,
    providers: list[Provider],
    input_sets: list[dict[str, Any]],
    timer: Callable,
    budget_s: float,
    rounds: int,
    console: Console,
    announce: Callable[[Case, Provider], None],
) -> list[Measurement]:
    """What each provider did on case: its budget timed in rounds, the providers taking turns
    (CPU_ROUNDS); announce(case, provider) runs before its first turn."""
    # A fresh compile cache per case: across many shapes dynamo would reach its recompile limit
    # and silently run eager, and every call would first check the guards of all earlier shapes.
    torch.compiler.reset()
    calls: dict[str, list[Callable[[], Any]]] = {}
    times: dict[str, list[float]] = {provider.name: [] for provider in providers}
    ended: dict[str, Measurement] = {}  # a provider that cannot run, or failed, ends here

    def end(provider: Provider, status: str, reason: str) -> None:
        ended[provider.name] = Measurement(provider.name, provider.genfast, status, [], reason)

    for provider in providers:
        if provider.unavailable:
            end(provider, "unavailable", provider.unavailable)
    for turn in range(rounds):
        for provider in providers:
            if provider.name in ended:
                continue
            try:
                with provider.context():
                    if turn == 0:
                        announce(case, provider)
                        fn = provider.fn
                        if provider.compiled:
                            fn = torch.compile(fn, dynamic=False, fullgraph=provider.fullgraph)
                        calls[provider.name] = [DIRECTIONS[case.direction](fn, inputs) for inputs in input_sets]
                    times[provider.name] += timer(calls[provider.name], budget_s / rounds, math.ceil(MIN_RUNS / rounds),
                                                  first_turn=turn == 0)
            except CANNOT_RUN_CASE as error:
                end(provider, "unsupported", str(error))
            except Exception as error:  # noqa: BLE001 - one provider failing is reported beside the others, not fatal
                console.print(f"{case.op} {case.name} {case.direction} with {provider.name} failed:", style="red",
                              markup=False)
                console.print(traceback.format_exc(), markup=False)
                end(provider, "error", f"{type(error).__name__}: {error}")
    return [ended.get(p.name) or Measurement(p.name, p.genfast, "ok", times[p.name]) for p in providers]


# ---------------------------------------------------------------- choosing what runs


def families() -> list[Any]:
    """The bench_* modules of this package."""
    package = importlib.import_module(__package__)
    return [
        importlib.import_module(f"{__package__}.{module.name}")
        for module in pkgutil.iter_modules(package.__path__)
        if module.name.startswith("bench_")
    ]


def _selected(case: Case, quick: bool, filters: list[str], device_type: str) -> bool:
    if device_type not in case.devices or (quick and not case.quick):
        return False
    fields = (case.op.lower(), case.name.lower(), case.direction)
    return not filters or any(f.lower() in text for f in filters for text in fields)


def provider_names() -> set[str]:
    """Every provider name some family offers, on any device."""
    return {p.name for family in families() for device in ("cpu", "cuda") for p in family.providers(device)}


def plan(
    quick: bool, filters: list[str], device_type: str, provider_names: Collection[str] | None
) -> list[tuple[Case, list[Provider]]]:
    planned = []
    for family in families():
        cases = [case for case in family.CASES if _selected(case, quick, filters, device_type)]
        if cases:
            chosen = [p for p in family.providers(device_type) if provider_names is None or p.name in provider_names]
            planned += [(case, chosen) for case in cases]
    return planned


# ---------------------------------------------------------------- entry point


def run(
    quick: bool,
    filters: list[str],
    out_dir: str,
    device: str | None = None,
    *,
    providers: Collection[str] | None = None,
) -> int:
    """Time the selected cases and write the report to out_dir; returns the process exit code.

    filters: substrings of op names, case names or directions ("backward"); none selects all.
    device: "cpu", "cuda", ...; None picks cuda when available. providers: the provider names
    to run (None: all), e.g. to leave out the slow-to-compile torch.compile.
    Exit code 0: all ran or were reported unavailable; 1: some provider failed; 2: nothing selected.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    console = Console()
    if not console.is_terminal:  # a log: rich would assume 80 columns and cut the table's cells short
        console.width = 160
    planned = plan(quick, filters, device.type, providers)
    if not planned:
        console.print(f"no benchmark case matches filters {filters} on {device.type}", style="red", markup=False)
        return 2
    machine = machine_info(device)
    torch.manual_seed(0)
    timer, rounds = (time_on_cuda, 1) if device.type == "cuda" else (time_on_cpu, CPU_ROUNDS)
    budget_s = QUICK_BUDGET_S if quick else FULL_BUDGET_S.get(device.type, FULL_BUDGET_S["cpu"])
    cache_bytes = last_level_cache_bytes()
    results = []
    with Progress(console=console) as progress:
        task = progress.add_task("measuring memory bandwidth and matmul rate", total=sum(len(p) for _, p in planned))

        def announce(case: Case, provider: Provider) -> None:
            step = f"{case.op} {case.name} {case.direction}: {provider.name}"
            if not console.is_terminal:  # the live bar only draws on terminals; a log gets a line per step
                console.print(step, markup=False)
            progress.update(task, description=escape(step))

        rates = measure_rates(device, timer, budget_s)
        for case, case_providers in planned:
            input_sets = [case.make_inputs(device) for _ in range(input_set_count(case, device, cache_bytes))]
            measurements = measure(case, case_providers, input_sets, timer, budget_s, rounds, console, announce)
            progress.advance(task, len(case_providers))
            results.append(CaseResult(case, len(input_sets), measurements))
            del input_sets  # before the next case's sets are made, not after
    settings = {
        "quick": quick,
        "filters": filters,
        "providers": sorted(providers) if providers else None,
        "device": str(device),
        "budget_s": budget_s,
    }
    write_report(Path(out_dir), results, machine, rates, settings, console)
    return 1 if any(m.status == "error" for r in results for m in r.measurements) else 0

"""The genfast command: `genfast info`, `genfast check` and `genfast bench`."""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from . import __version__, backends


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def info() -> int:
    """Print versions, and which backends can run here and why the others cannot."""
    print(f"genfast {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU build'}), triton {_version('triton')}")
    print(f"cpu: {_cpu_name()}, {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        print(f"gpu: {torch.cuda.get_device_name()}")
    else:
        print("gpu: none visible to torch")
    if problem := backends.extension_problem():
        print(f"extension genfast._C: {problem}")
    else:
        print(f"extension genfast._C: built, CUDA kernels {'included' if backends.extension().has_cuda else 'not included'}")
    source = "GENFAST_BACKEND" if "GENFAST_BACKEND" in os.environ else "default"
    print(f"selected backend: {backends.get_backend()} ({source})")
    for device_type in ("cpu", "cuda"):
        print(f"backends for {device_type} tensors:")
        for name in backends.BACKENDS[1:]:
            reason = backends.unavailable_reason(name, device_type)
            print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def bench(args: argparse.Namespace) -> int:
    from .benchmarks import harness

    providers = None if args.skip is None else [name for name in harness.provider_names() if name not in args.skip]
    return harness.run(quick=args.quick, filters=args.filters, out_dir=args.out, device=args.device,
                       providers=providers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genfast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions and the backends available here")
    check_parser = commands.add_parser(
        "check", help="every architecture's genfast build against its torch.nn build; non-zero exit on a mismatch"
    )
    check_parser.add_argument("architectures", nargs="*", help="the ones to check (default: all)")
    check_parser.add_argument("--device", action="append", choices=["cpu", "cuda"],
                              help="default: cpu, and cuda where available")
    bench_parser = commands.add_parser("bench", help="time every op against eager torch, torch.compile and peers")
    bench_parser.add_argument("filters", nargs="*", help="run only cases whose op or name contains one of these")
    bench_parser.add_argument("--quick", action="store_true",
                              help="the headline cases only (about 30 minutes on a 2-core CPU, torch.compile included)")
    bench_parser.add_argument("--out", default="bench-out", help="directory for results.json, results.md and plots")
    bench_parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    bench_parser.add_argument("--skip", nargs="+", metavar="PROVIDER",
                              help="providers to leave out, e.g. torch.compile (slow to compile)")
    args = parser.parse_args(argv)
    if args.command == "check":
        from . import check

        return check.run(args.architectures, args.device)
    return info() if args.command == "info" else bench(args)


if __name__ == "__main__":
    sys.exit(main())

"""Builds genfast._C from csrc/: the C++ CPU kernels always, the CUDA kernels
when torch was built with CUDA and nvcc is present.

Set GENFAST_ARCH to the -march of the machines you deploy on (default: this
host's), GENFAST_CUDA=0 to skip the CUDA kernels, GENFAST_EXTENSION=0 to build
nothing (the Triton kernels and the reference still run), GENFAST_SANITIZE=1 to
build the C++ kernels with AddressSanitizer and UndefinedBehaviorSanitizer (run
Python with libasan preloaded: .ci/sanitize shows how).
"""

import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _extension():
    sources = ["csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -fno-trapping-math (Clang's default) lets GCC turn the branches of clamps into vector
    # selects: without it, on hosts without AVX-512 masking, the fused activations stay scalar
    # and GroupNorm+SiLU runs 6x slower. No kernel here reads floating-point exception flags.
    # -fno-math-errno likewise lets sqrt vectorise (no errno branch): fused noise was 17x slower
    # without it. No kernel reads errno.
    cxx = [
        "-O3",
        "-std=c++20",
        "-fopenmp",
        "-fno-trapping-math",
        "-fno-math-errno",
        f"-march={os.environ.get('GENFAST_ARCH', 'native')}",
    ]
    if platform.machine() in ("x86_64", "AMD64"):
        # GCC defaults to 256-bit vectors even on AVX-512 hosts; the fused
        # activations run about 2x faster on 512-bit ones.
        cxx.append("-mprefer-vector-width=512")
    link = ["-fopenmp"]
    if os.environ.get("GENFAST_SANITIZE") == "1":
        # -O1 keeps the reports' stacks readable; any UB report aborts, so none goes unnoticed.
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        cxx += [*sanitize, "-O1"]
        link += sanitize
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("GENFAST_CUDA") != "0"
    if not with_cuda:
        return CppExtension("genfast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return CUDAExtension(
        "genfast._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        define_macros=[("GENFAST_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20"]},
        extra_link_args=link,
    )


setup(
    packages=[
        "genfast",
        "genfast.ops",
        "genfast.reference",
        "genfast.nn",
        "genfast.models",
        "genfast.schedulers",
        "genfast.kernels",
        "genfast.benchmarks",
    ],
    package_dir={"genfast.kernels": "kernels", "genfast.benchmarks": "benchmarks"},
    ext_modules=[] if os.environ.get("GENFAST_EXTENSION") == "0" else [_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

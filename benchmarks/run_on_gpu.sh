#!/usr/bin/env bash
# Build, test and benchmark on a GPU machine in one call (the lent device
# machine has no network: everything must already be installed there).
# Writes logs, results.json, results.md and plots to $OUT (default bench-out/gpu),
# 8 files at most: what the device tool brings back. Commit results.json and
# results.md under benchmarks/results/<gpu name>/.
# Each stage has a time limit so that a hang in one still leaves the others' output.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-out/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
# Only the GPU that is here: one architecture compiles in a third of the time.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$out/info.txt"
# Packages the machine lacks (it has no network) travel as wheels in .whl/, e.g. diffusers.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps .whl/*.whl >>"$out/build.log" 2>&1 || echo "carried wheels failed to install"
fi
install() { timeout 300 python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >>"$out/build.log" 2>&1; }
if ! install; then
  grep -E "error|Error" "$out/build.log" | head -30
  echo "CUDA build failed; building the C++ CPU kernels alone so the Triton kernels still get tested"
  GENFAST_CUDA=0 install || { tail -30 "$out/build.log"; exit 1; }
fi
python3 -m genfast.cli info | tee -a "$out/info.txt"

workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 240 python3 -m pytest -q -p no:cacheprovider $workers tests 2>&1 | tee "$out/tests.log" | grep -vE "^\.|PASSED" | tail -25
timeout 300 python3 -m genfast.cli bench --out "$out" "$@" 2>&1 | tee "$out/bench.log" | tail -40
# Host and kernel time per call of the headline cases: where a benchmark's time goes.
timeout 120 python3 -m genfast.benchmarks.profile --python --providers 'genfast[triton]' 'genfast[cuda]' torch \
  -- 'sd-unet 8x320x64x64' >"$out/profile.txt" 2>&1
# The scheduler steps: one kernel launch each (the issue's count), fused noise included.
timeout 90 python3 -m genfast.benchmarks.profile --providers 'genfast[triton]' diffusers \
  -- 'ddim eta=0 16x4x128x128' 'ddpm fused_noise 16x4x128x128' 'dpm++ 2m 16x4x128x128' >>"$out/profile.txt" 2>&1

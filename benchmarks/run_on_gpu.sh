#!/usr/bin/env bash
# Build, test and benchmark on a GPU machine in one call (the lent device
# machine has no network: everything must already be installed there).
#
#   bash benchmarks/run_on_gpu.sh ["bench filters" ...]
#
# Each argument is one `genfast bench` run, its filters separated by spaces, run in the order
# given: a timeout then cuts the last run, not the first (the harness writes its results at the
# end of a run). No argument: one run of every case.
#
# Environment: GENFAST_EXTENSION=0 skips building the C++/CUDA extension (the Triton kernels,
# the reference and their tests need none, and the build takes minutes of the lease);
# GENFAST_SKIP lists bench providers to leave out (default: the torch.compile ones, which
# take longest to warm up); TESTS, the pytest paths (default: tests) and TEST_K, a pytest -k
# expression (e.g. "cuda or triton": the GPU's own tests); TILES=1 also runs
# benchmarks/experiments/attention_tiles.py; PROFILE, bench filters whose host and kernel time
# per call benchmarks/profile.py then lists; SANITIZE=1 runs, last, compute-sanitizer's memcheck
# and racecheck over the CUDA and Triton tests (SANITIZE_TESTS, SANITIZE_K, SANITIZE_S seconds
# per tool). Each stage has a time limit (TEST_S, TILES_S, BENCH_S per run, PROFILE_S).
#
# Everything lands in $OUT (default bench-out/gpu): a short summary.txt, and the full logs,
# results and plots in gpu.tar.gz, remade after each stage so that a timeout still leaves the
# stages before it. Commit results.json and results.md under benchmarks/results/<gpu name>/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-out/gpu}"
work="$(mktemp -d)"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
# Only the GPU that is here: one architecture compiles in a third of the time.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
pack() { tar -czf "$out/gpu.tar.gz" -C "$work" . ; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$work/info.txt"
# Packages the machine lacks (it has no network) travel as wheels in .whl/, e.g. diffusers.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps .whl/*.whl >>"$work/build.log" 2>&1 || echo "carried wheels failed to install"
fi
install() { timeout 300 python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >>"$work/build.log" 2>&1; }
if ! install; then
  grep -E "error|Error" "$work/build.log" | head -30
  echo "CUDA build failed; building the C++ CPU kernels alone so the Triton kernels still get tested"
  GENFAST_CUDA=0 install || { tail -30 "$work/build.log"; pack; exit 1; }
fi
python3 -m genfast.cli info | tee -a "$work/info.txt"
pack


workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12")
# A kernel that never returns fails its test after 90 s instead of taking the stage with it.
per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 90 --timeout-method thread")
# The fuzz tests' examples per op and backend: each new shape and dtype may compile Triton kernels
# anew, so a GPU run draws fewer than CI's 500 on the CPU.
export GENFAST_FUZZ_EXAMPLES="${GENFAST_FUZZ_EXAMPLES:-50}"
read -r -a tests <<<"${TESTS:-tests}"
# -v: each test's verdict is logged as it ends, so a stage cut by its time limit still tells.
timeout -s INT -k 15 "${TEST_S:-240}" python3 -m pytest -v -rfE -p no:cacheprovider $workers $per_test \
  -k "${TEST_K:-}" "${tests[@]}" >"$work/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|(passed|failed|error).* in [0-9.]+s" "$work/tests.log" | tail -40 | tee "$out/summary.txt"
echo "$(grep -c ' PASSED' "$work/tests.log") tests logged PASSED, $(grep -c ' FAILED' "$work/tests.log") FAILED" \
  | tee -a "$out/summary.txt"
pack

if [ "${TILES:-0}" = 1 ]; then
  timeout "${TILES_S:-120}" python3 benchmarks/experiments/attention_tiles.py "$work/attention_tiles.json" \
    >"$work/attention_tiles.log" 2>&1
  tail -30 "$work/attention_tiles.log" | cut -c1-400 >>"$out/summary.txt"
  pack
fi

read -r -a skip <<<"${GENFAST_SKIP:-torch.compile torch.nn+torch.compile diffusers+torch.compile}"
[ $# -gt 0 ] || set -- ""
run=0
for group in "$@"; do
  run=$((run + 1))
  read -r -a filters <<<"$group"
  timeout "${BENCH_S:-300}" python3 -m genfast.cli bench --out "$work/bench-$run" --skip "${skip[@]}" \
    -- "${filters[@]}" >"$work/bench-$run.log" 2>&1
  tail -60 "$work/bench-$run.log" | cut -c1-300 >>"$out/summary.txt"
  cp "$work/bench-$run/results.md" "$out/results-$run.md" 2>/dev/null
  pack
done

if [ -n "${PROFILE:-}" ]; then
  read -r -a profiled <<<"$PROFILE"
  timeout "${PROFILE_S:-120}" python3 -m genfast.benchmarks.profile --providers 'genfast[triton]' torch torch.nn \
    -- "${profiled[@]}" >"$work/profile.txt" 2>&1
  pack
fi

if [ "${SANITIZE:-0}" = 1 ]; then
  # One process (no xdist): compute-sanitizer follows the kernels of the process it starts. Each
  # tool's log ends in its summary ("ERROR SUMMARY: N errors", "RACECHECK SUMMARY: N hazards");
  # a test that fails goes on to the next (the test stage judges results, this one memory).
  # At the time limit SIGINT stops pytest, which then reports what ran, and the tool its summary.
  # torch's caching allocator would hide an access past a tensor inside its larger block.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  kernel_tests="tests/test_norm.py tests/test_rnn.py tests/test_attention.py tests/test_cross_entropy.py"
  kernel_tests+=" tests/test_diffusion.py tests/test_bias_act.py tests/test_losses.py"
  read -r -a sanitized <<<"${SANITIZE_TESTS:-$kernel_tests}"
  for tool in memcheck racecheck; do
    # Exit 99: the tool found errors; otherwise pytest's status (2: stopped at the time limit).
    timeout -s INT -k 30 "${SANITIZE_S:-200}" "$sanitizer" --tool "$tool" --error-exitcode 99 \
      --target-processes all --print-limit 20 python3 -m pytest -v -p no:cacheprovider \
      -k "${SANITIZE_K:-cuda or triton}" "${sanitized[@]}" >"$work/sanitize-$tool.log" 2>&1
    code=$?
    found=$(grep -E 'SUMMARY:|(passed|failed).* in [0-9.]+s' "$work/sanitize-$tool.log" | tail -3 | tr '\n' ' ')
    echo "$tool (exit $code): $(grep -c ' PASSED' "$work/sanitize-$tool.log") tests passed; $found" \
      | tee -a "$out/summary.txt"
    pack
  done
fi

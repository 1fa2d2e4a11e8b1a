#!/usr/bin/env bash
# Build, test and benchmark on a GPU machine in one call (the lent device
# machine has no network: everything must already be installed there).
# Writes logs, results.json, results.md and plots to $OUT (default bench-out/gpu);
# commit results.json and results.md under benchmarks/results/<gpu name>/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-out/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$out/build.log" 2>&1 \
  || { tail -30 "$out/build.log"; exit 1; }
genfast info | tee "$out/info.txt"
python3 -m pytest -q tests -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -15
genfast bench --out "$out" "$@" 2>&1 | tee "$out/bench.log" | tail -40

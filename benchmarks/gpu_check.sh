#!/usr/bin/env bash
# The CUDA check of sb-hf (issue 26), one prepared script for a machine with a GPU, in under 8 minutes on an H100:
#   1. the versions (GPU, torch, transformers, triton);
#   2. the tests parametrised over the available devices (tests/test_block_support_flex.py, tests/test_devices.py),
#      their CUDA cases (pytest -k cuda);
#   3. op level: SDPA (flash), dense FlexAttention and block support through FlexAttention on a Llama-3-8B-shaped
#      layer at 8k, 64k and 128k tokens (benchmarks/gpu_bench.py op);
#   4. end to end: prefill and decoding, SDPA against block_support, for random-weight SmolLM2-135M- and 1B-shaped
#      Llamas at 8k and 32k tokens (benchmarks/gpu_bench.py model);
#   5. the tables (report.md) from the JSON files.
# Runs anywhere: without CUDA every GPU part writes {"skipped": ...}. Usage, from the repository root:
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]      (default: $OUT where set, else runs/gpu_check)
# Each part has its own time limit (seconds; environment: TEST_LIMIT, OP_LIMIT, MODEL_LIMIT) and writes what it has
# measured as it goes, so a part that runs out of time leaves its earlier points. The lengths: OP_LENGTHS,
# MODEL_LENGTHS (comma-separated). The package is used from this checkout (PYTHONPATH), not installed.
set -uo pipefail
out=${1:-${OUT:-runs/gpu_check}}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - start )) s)"; }

stamp versions
"$python" benchmarks/gpu_bench.py versions --output "$out"

stamp "tests on CUDA"
timeout "${TEST_LIMIT:-140}" "$python" -m pytest -q -p no:cacheprovider -k cuda tests/test_block_support_flex.py tests/test_devices.py \
  --junitxml "$out/tests.xml" >"$out/tests.log" 2>&1
status=$?
tail -n 15 "$out/tests.log"
case $status in
  0) echo "tests: passed" ;;
  5) echo "tests: none selected (no CUDA device: every case is a cpu one)" ;;
  124) echo "tests: stopped at the time limit" ;;
  *) echo "tests: FAILED (exit $status; $out/tests.log)" ;;
esac

stamp "op level"
timeout "${OP_LIMIT:-150}" "$python" benchmarks/gpu_bench.py op --lengths "${OP_LENGTHS:-8192,65536,131072}" --output "$out"
stamp "end to end"
timeout "${MODEL_LIMIT:-170}" "$python" benchmarks/gpu_bench.py model --lengths "${MODEL_LENGTHS:-8192,32768}" \
  --new-tokens 8 --repeats 2 --output "$out"
stamp report
"$python" benchmarks/gpu_bench.py report --output "$out"
echo "tests exit status: $status" >>"$out/report.md"
stamp done

#!/usr/bin/env bash
# plait's one GPU entry point (issue 20): the GPU tests, benchmarks/gpu_bench.py, then the same case through
# `plait bench --suite full --device cuda`; results under $OUT.
#
#   OUT=/some/folder bash benchmarks/gpu.sh
#
# Runs plait from source (PYTHONPATH=src) with the machine's own python3 and installs nothing.
# Writes $OUT/gpu_tests.log, $OUT/gpu_bench.log, $OUT/gpu.json, $OUT/nvidia-smi.txt and $OUT/bench/
# (plait bench's results.json/.md). Budget: the tests get at most 240 s, the benchmark 330 s (it skips the
# eager 1B past 240 s) and plait bench 330 s; on an H200 the two benchmarks took ~70 s each.
# Exit status: 0 when all three passed, else the first failure's (2: no CUDA device).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

echo "== $(date -u +%H:%M:%S) device check"
check='import sys
try:
    import torch
except ImportError as error:
    sys.exit(f"gpu.sh: {sys.executable} has no torch ({error}); set PYTHON to the python that has it")
if not torch.cuda.is_available():
    sys.exit(f"gpu.sh: no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False); this script needs a GPU")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, python {sys.version.split()[0]}")'
if ! timeout 120 "$PYTHON" -c "$check"; then
    echo "        To test the benchmark's code on a CPU: PYTHONPATH=src python3 benchmarks/gpu_bench.py --dry-run --device cpu --out /tmp/gpu.json" >&2
    exit 2
fi
if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
fi

echo "== $(date -u +%H:%M:%S) GPU tests (tests/gpu)"
timeout 240 "$PYTHON" -m pytest tests/gpu -p no:cacheprovider --timeout 120 --durations=10 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu tests exit status: $tests_rc"

echo "== $(date -u +%H:%M:%S) benchmark (benchmarks/gpu_bench.py)"
timeout 330 "$PYTHON" benchmarks/gpu_bench.py --out "$OUT/gpu.json" --budget-s 240 "$@" 2>&1 | tee "$OUT/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
echo "benchmark exit status: $bench_rc"

echo "== $(date -u +%H:%M:%S) plait bench --suite full --device cuda"
timeout 330 "$PYTHON" -m plait.cli bench --suite full --device cuda --out "$OUT/bench" 2>&1 | tee "$OUT/plait_bench.log"
plait_bench_rc=${PIPESTATUS[0]}
echo "plait bench exit status: $plait_bench_rc"
echo "== $(date -u +%H:%M:%S) done"

[ "$tests_rc" -ne 0 ] && exit "$tests_rc"
[ "$bench_rc" -ne 0 ] && exit "$bench_rc"
exit "$plait_bench_rc"

#!/usr/bin/env bash
# GPU check of the loss kernels, sized for one ~10-minute device call:
#   1. the two kernel test files on the real GPU (compiled Triton, gpu and slow tests included),
#   2. the quick benchmark grid (benchmarks/kernels_loss.py --quick).
# Usage from the repo root: OUT=/some/dir bash benchmarks/gpu_loss.sh   (OUT defaults to outputs/gpu_loss)
# Writes $OUT/env.txt, tests.txt, loss_tables.md (the tables), bench_progress.txt.
set -u
OUT=${OUT:-outputs/gpu_loss}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1
timeout 240 python -m pytest tests/test_kernel_cross_entropy.py tests/test_kernel_linear_cross_entropy.py -q -rs \
  > "$OUT/tests.txt" 2>&1
echo "pytest exit $?" >> "$OUT/tests.txt"
timeout 330 python benchmarks/kernels_loss.py --quick --out "$OUT/loss_tables.md" \
  > /dev/null 2> "$OUT/bench_progress.txt"
echo "benchmark exit $?" >> "$OUT/bench_progress.txt"
tail -n 3 "$OUT/tests.txt"; cat "$OUT/loss_tables.md" 2>/dev/null

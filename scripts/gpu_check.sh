#!/usr/bin/env bash
# Everything that needs the GPU, as one device call (~10 minutes on one H200):
#   1. the gpu-marked tests (compiled Triton kernels, no-host-sync checks, N*V >= 2^31,
#      a checkpoint of GPU tensors),
#   2. the loss kernel tables (benchmarks/kernels_loss.py --quick),
#   3. the metric kernel tables (benchmarks/kernels_metrics.py --device cuda).
# The GPU image lacks optuna/hydra/omegaconf: put their wheels in the checkout's ignored .whl/
# folder (and name it in the device run's carry); this script installs them to /tmp/site. It
# needs nothing outside the repository. Tables land in $OUT (default outputs/gpu_check).
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
if ! python3 -c "import optuna, hydra, omegaconf" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "optuna/hydra missing and no wheels in .whl/" >&2; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1
export PYTHONPATH=.:${PYTHONPATH:-}
timeout 200 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_kernel_cross_entropy.py \
  tests/test_kernel_linear_cross_entropy.py tests/test_kernel_classification.py \
  tests/test_kernel_regression.py tests/test_metrics.py tests/test_checkpoint.py > "$OUT/gpu_tests.txt" 2>&1
echo "pytest exit $?" >> "$OUT/gpu_tests.txt"
timeout 200 python3 benchmarks/kernels_loss.py --quick --out "$OUT/loss_tables.md" > /dev/null 2> "$OUT/loss_progress.txt"
echo "loss benchmark exit $?" >> "$OUT/loss_progress.txt"
timeout 180 python3 benchmarks/kernels_metrics.py --device cuda --out "$OUT/metric_tables.md" > /dev/null 2> "$OUT/metric_progress.txt"
echo "metric benchmark exit $?" >> "$OUT/metric_progress.txt"
tail -n 3 "$OUT/gpu_tests.txt"; cat "$OUT/loss_tables.md" "$OUT/metric_tables.md" 2>/dev/null

#!/usr/bin/env bash
# Everything that needs the GPU, as one device call (at most ~8 minutes on one H200):
#   tests    the gpu-marked tests: compiled Triton kernels, N*V >= 2^31, a checkpoint of GPU
#            tensors, and no CUDA synchronisation between log steps (test_step_guard.py)
#   loss     kernels.cross_entropy / linear_cross_entropy against eager, torch.compile and Liger
#   metrics  the metric kernels against torchmetrics at 1M rows, C in {10, 1000, 32000}
#   train    training throughput: engine vs a raw loop vs Lightning, syncs per step counted
#   sweep    a two-worker sweep sharing the one GPU
# Each part runs under its own `timeout`, so one that hangs cannot eat the others' time, and
# writes its table when it ends (the benchmarks rewrite theirs after every case). At most 8
# files land in $OUT (default outputs/gpu_check), which is what the device tool brings back:
#   env.txt tests.txt loss.md metrics.md train.md sweep.txt progress.txt summary.md
#
#   scripts/gpu_check.sh            # on the GPU machine
#   scripts/gpu_check.sh --dry-run  # here, on the CPU: every part with tiny sizes and the CPU
#                                   # fallbacks, so that nothing but the GPU can fail there
#
# The GPU image lacks optuna/hydra/omegaconf: put their wheels in the checkout's ignored .whl/
# folder (and name it in the device run's carry); this script installs them to /tmp/site. From a
# session's checkout: `mkdir -p .whl && cp ../shared/wheels-gpu/*.whl .whl/`, then one device
# run of `bash scripts/gpu_check.sh` with carry [".whl"] and a 540 s limit ($OUT is set there).
set -u
cd "$(dirname "$0")/.." || exit 1
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
: > "$OUT/progress.txt"
export PYTHONUNBUFFERED=1

if ! python3 -c "import optuna, hydra, omegaconf" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "optuna/hydra missing and no wheels in .whl/" >&2; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null; date -u; } > "$OUT/env.txt" 2>&1

if [ $DRY = 1 ]; then
  TESTS=(--collect-only)  # the gpu tests skip without a GPU: check that they import and collect
  # The GPU run's own flags where they parse on the CPU too (the vocab sizes apply to CUDA only).
  LOSS=(--device cpu --quick --mode forward+backward --vocabs 32768 --linear-vocabs 131072
        --reps 1 --warmup 0)
  METRICS=(--device cpu --n 20000 --classes 10 --dtypes fp32 --repeats 1)
  TRAIN=(--device cpu --quick --epochs 2 --rounds 1 --count-syncs)
  SWEEP=(search.n_trials=2 trainer.max_epochs=2 trainer.device=cpu search.pruner=median)
else
  TESTS=()
  LOSS=(--device cuda --quick --mode forward+backward --vocabs 32768 131072 262144
        --linear-vocabs 131072 262144 --reps 20)
  METRICS=(--device cuda --n 1000000 --repeats 3)
  TRAIN=(--device cuda --epochs 4 --rounds 2 --count-syncs)
  SWEEP=(search.n_trials=8 trainer.max_epochs=6 search.pruner=median)
fi

# part NAME SECONDS COMMAND...: run it under its own timeout; its exit code and time to summary.md
echo "# gpu_check $(date -u +%FT%TZ)$([ $DRY = 1 ] && echo ' (dry run on CPU)')" > "$OUT/summary.md"
part() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit}s)" >> "$OUT/progress.txt"
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/progress.txt" 2>&1
  rc=$?
  local verdict=ok
  [ $rc = 124 ] || [ $rc = 137 ] && verdict="TIMED OUT"
  [ $rc != 0 ] && [ "$verdict" = ok ] && verdict="FAILED (exit $rc)"
  echo "- $name: $verdict in $(( $(date +%s) - start )) s" >> "$OUT/summary.md"
  echo "== $name: exit $rc" >> "$OUT/progress.txt"
}

part tests 120 bash -c "python3 -m pytest -m gpu -q -rs -p no:cacheprovider ${TESTS[*]:-} \
  tests/test_kernel_cross_entropy.py tests/test_kernel_linear_cross_entropy.py \
  tests/test_kernel_classification.py tests/test_kernel_regression.py tests/test_metrics.py \
  tests/test_checkpoint.py tests/test_step_guard.py > '$OUT/tests.txt' 2>&1; rc=\$?; tail -n 3 '$OUT/tests.txt'; exit \$rc"
part loss 140 python3 benchmarks/kernels_loss.py "${LOSS[@]}" --out "$OUT/loss.md"
part metrics 75 python3 benchmarks/kernels_metrics.py "${METRICS[@]}" --out "$OUT/metrics.md"
part train 90 python3 benchmarks/train_throughput.py "${TRAIN[@]}" --out "$OUT/train.md"

# Two workers on the one GPU (round-robin CUDA_VISIBLE_DEVICES), a median pruner: every trial
# finishes or is pruned, and the GPU is shared. The sweep's own files stay in /tmp; its console
# (the leaderboard) and summary.csv come back in sweep.txt.
SWEEP_DIR=$(mktemp -d /tmp/gpu_check_sweep.XXXX)
part sweep 50 bash -c "{ python3 -m engine.train -m search=random search.n_workers=2 ${SWEEP[*]} \
  trainer.progress=epoch hydra.sweep.dir='$SWEEP_DIR'; rc=\$?; echo \"exit \$rc\"; \
  echo; cat '$SWEEP_DIR/summary.csv'; exit \$rc; } > '$OUT/sweep.txt' 2>&1"

cat "$OUT/summary.md"
[ -f "$OUT/train.md" ] && cat "$OUT/train.md"
grep -h "ratio\|target\|MISSED" "$OUT/loss.md" 2>/dev/null | head -n 20
exit 0

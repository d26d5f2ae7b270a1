#!/usr/bin/env bash
# More workers for a study that is already running, started by hand on this machine (or on any
# machine with the code, the data and a path to the storage): each claims waiting trials until
# the budget is spent, so the trial count stays exact however many join.
#
#   scripts/attach_workers.sh exp1 2                                   # 2 workers, study exp1
#   ENGINE_SEARCH_STORAGE='postgresql://user:password@db/optuna' scripts/attach_workers.sh exp1 4
#   STORAGE=outputs/sweeps/2026-12-02_10-00-00/study.journal scripts/attach_workers.sh 2026-12-02_10-00-00 1
#
# Arguments:
#   STUDY   the study name (search.study_name; by default a sweep's study is named after its dir)
#   N       how many workers to start (default 1)
# Environment:
#   ENGINE_SEARCH_STORAGE  a storage URL with a password: read by the workers from their
#                          environment, never from their command line
#   STORAGE                a journal file path or a URL without a password (instead)
#   THREADS                torch CPU threads per worker (default: this machine's cores / N)
#   SWEEP_DIR              where the trial folders go (default: the study's own sweep dir)
#   PYTHON                 the interpreter (default python)
# Waits for its workers; exit code: 0, or the first failing worker's.
set -euo pipefail

if [ $# -lt 1 ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
STUDY=$1
N=${2:-1}
if [ -z "${STORAGE:-}" ] && [ -z "${ENGINE_SEARCH_STORAGE:-}" ]; then
  echo "attach_workers.sh: set STORAGE (a journal file or URL) or ENGINE_SEARCH_STORAGE" >&2
  exit 2
fi
THREADS=${THREADS:-$(( $(nproc) / N > 0 ? $(nproc) / N : 1 ))}
args=(--study "$STUDY" --threads "$THREADS")
[ -n "${STORAGE:-}" ] && args+=(--storage "$STORAGE")
[ -n "${SWEEP_DIR:-}" ] && args+=(--sweep-dir "$SWEEP_DIR")
cd "$(dirname "$0")/.."

pids=()
for ((k = 0; k < N; k++)); do
  # Worker indices from 100 up tell these apart from the sweep command's own in trial lines.
  "${PYTHON:-python}" -m engine.search.worker "${args[@]}" --worker $((100 + k)) &
  pids+=($!)
done
code=0
for pid in "${pids[@]}"; do
  wait "$pid" || { rc=$?; [ "$code" -ne 0 ] || code=$rc; }
done
exit "$code"

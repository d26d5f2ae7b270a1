#!/usr/bin/env bash
# A sweep on a SLURM cluster with a shared PostgreSQL study: the sweep command submits
# search.n_workers worker jobs through hydra/launcher=slurm_cpu (slurm_gpu on GPU nodes), prints
# each job's id and state and every trial's line, retries the trial of a cancelled or lost job,
# resumes a trial whose job was warned before its time limit, and writes the reports.
#
#   export ENGINE_SEARCH_STORAGE='postgresql://user:password@db-host/optuna'
#   scripts/slurm_sweep.sh /shared/sweeps/exp1 search.n_trials=60 search.n_workers=8 \
#       hydra.launcher.partition=cpu
#
# Arguments:
#   SWEEP_DIR     the sweep dir, on a filesystem every node mounts (trial folders, reports)
#   OVERRIDE ...  more Hydra overrides (the search space, data, model, hydra.launcher.* keys)
# Environment:
#   ENGINE_SEARCH_STORAGE  the study's database URL (required). It is read inside the engine
#                          (${oc.env:...}), so its password is in no process argument, and the
#                          worker jobs inherit it from this shell, never from a file.
#   STUDY                  the study name (default: the sweep dir's folder name)
#   SEARCH                 the search preset (default tpe)
#   LAUNCHER               the launcher preset (default slurm_cpu; slurm_gpu on GPU nodes)
#   PYTHON                 the interpreter (default python)
# Running the same command again (after the command itself was killed, or with a larger
# search.n_trials) re-attaches to the study and to the worker jobs still in the queue.
set -euo pipefail

if [ $# -lt 1 ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
SWEEP_DIR=$1
shift
: "${ENGINE_SEARCH_STORAGE:?set it to the study database URL (postgresql://user:password@host/db)}"
export ENGINE_SEARCH_STORAGE
STUDY=${STUDY:-$(basename "$SWEEP_DIR")}
cd "$(dirname "$0")/.."
# The single quotes keep ${oc.env:...} for Hydra: the URL is resolved inside the engine.
# shellcheck disable=SC2016
exec "${PYTHON:-python}" -m engine.train -m "search=${SEARCH:-tpe}" \
  'search.storage=${oc.env:ENGINE_SEARCH_STORAGE}' "search.study_name=$STUDY" \
  "hydra/launcher=${LAUNCHER:-slurm_cpu}" "hydra.sweep.dir=$SWEEP_DIR" "$@"

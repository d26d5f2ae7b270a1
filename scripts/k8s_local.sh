#!/usr/bin/env bash
# Run the Kubernetes sweep's containers as local processes against a local study: the driver of
# the Job engine-study (deploy/k8s/10-study-job.yaml) and N workers of the Indexed Job
# engine-workers (deploy/k8s/20-workers-job.yaml), with the command and args read from the
# manifests themselves. A worked example of what the Jobs do, and how tests/test_deploy.py checks
# that the manifests' commands work.
#
#   ENGINE_SEARCH_STORAGE=/tmp/k8s/study.journal scripts/k8s_local.sh /tmp/k8s \
#       search.n_trials=3 trainer.max_epochs=1 model=linear
#
# Arguments:
#   SWEEPS        a local folder standing for the shared volume (the manifests' /sweeps)
#   OVERRIDE ...  Hydra overrides for the driver: one whose key the manifest already sets replaces
#                 that argument (search.n_trials=3), the others are added after them
# Environment:
#   ENGINE_SEARCH_STORAGE  the study's storage, as the Secret gives it to the pods (required): a
#                          journal file path, sqlite:///<file>, postgresql://user:password@host/db.
#                          It reaches the processes through their environment only.
#   K8S_LOCAL_WORKERS      worker processes (default 2; the Job runs `completions` of them)
#   K8S_LOCAL_THREADS      what the CPU limit gives the workers' OMP_NUM_THREADS (default 1)
#   K8S_LOCAL_STUDY        a study name other than the manifests' (e.g. on a shared database)
#   PYTHON                 the interpreter standing for the image's `python` (default: python)
#
# What is substituted, and nothing else: the mount path of the sweeps volume by SWEEPS; each
# $(VAR) by that env entry's value (the downward API's job-completion index by the worker's
# index 0..N-1, the CPU limit by K8S_LOCAL_THREADS); the study name by K8S_LOCAL_STUDY when set;
# `python` by $PYTHON. The workers start first, so they wait for the study (--wait-for-study) as
# pods scheduled before the driver's do. Exit code: the driver's, else the first failing worker's.
set -euo pipefail

if [ $# -lt 1 ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
SWEEPS=$(mkdir -p "$1" && cd "$1" && pwd)
shift
: "${ENGINE_SEARCH_STORAGE:?set it to the study storage (a journal file path, or a database URL)}"
export ENGINE_SEARCH_STORAGE
WORKERS=${K8S_LOCAL_WORKERS:-2}
THREADS=${K8S_LOCAL_THREADS:-1}
PYTHON=${PYTHON:-python}
MANIFESTS=$(cd "$(dirname "$0")/../deploy/k8s" && pwd)

# manifest JOB INDEX: the container of Job JOB, as NUL-terminated words: its argv, an empty word,
# then NAME=value for each env entry that is not a secret (a secret stays in this environment).
manifest() {
  "$PYTHON" - "$MANIFESTS" "$1" "$2" "$SWEEPS" "$THREADS" "${K8S_LOCAL_STUDY:-}" "${@:3}" <<'PY'
import re
import sys
from pathlib import Path

import yaml

folder, job, index, sweeps, threads, study, *overrides = sys.argv[1:]
docs = [d for f in sorted(Path(folder).glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
jobs = {d["metadata"]["name"]: d for d in docs if d and d.get("kind") == "Job"}
pod = jobs[job]["spec"]["template"]["spec"]
(container,) = pod["containers"]
claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
(mount,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims]
study_job = jobs["engine-study"]["spec"]["template"]["spec"]["containers"][0]
(old_study,) = [a.split("=", 1)[1] for a in study_job["args"] if a.startswith("search.study_name=")]


def fail(message):
    sys.exit(f"k8s_local.sh: {job}: {message}")


values, secrets = {}, set()
for e in container.get("env", []):
    source = e.get("valueFrom", {})
    field = source.get("fieldRef", {}).get("fieldPath", "")
    if "value" in e:
        values[e["name"]] = str(e["value"])
    elif "secretKeyRef" in source:
        secrets.add(e["name"])
    elif field == "metadata.annotations['batch.kubernetes.io/job-completion-index']":
        values[e["name"]] = index
    elif source.get("resourceFieldRef", {}).get("resource") == "limits.cpu":
        values[e["name"]] = threads
    else:
        fail(f"no local value for the env entry {e['name']}")
missing = secrets - {"ENGINE_SEARCH_STORAGE"}
if missing:
    fail(f"secret env entries other than ENGINE_SEARCH_STORAGE: {sorted(missing)}")


def expand(word):
    def one(m):
        if m.group(1) in secrets:  # Kubernetes would put the secret into a process argument
            fail(f"$({m.group(1)}) is a secret: it must not be expanded into an argument")
        if m.group(1) not in values:
            fail(f"$({m.group(1)}) names no env entry of the container")
        return values[m.group(1)]

    word = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, word)
    return re.sub(rf"(?<![\w/.]){re.escape(mount)}(?=/|$)", sweeps, word)


argv = [expand(w) for w in container["command"] + container.get("args", [])]
if study:
    argv = [
        study if w == old_study and i and argv[i - 1] == "--study"
        else f"search.study_name={study}" if w == f"search.study_name={old_study}"
        else w
        for i, w in enumerate(argv)
    ]
for override in overrides:
    key = override.split("=", 1)[0].lstrip("+~")
    same = [i for i, w in enumerate(argv) if "=" in w and w.split("=", 1)[0].lstrip("+~") == key]
    if same:
        argv[same[0]] = override
    else:
        argv.append(override)
words = argv + [""] + [f"{k}={v}" for k, v in values.items()]
sys.stdout.write("".join(w + "\0" for w in words))
PY
}

pids=()
# alive PID ...: whether any of them still runs.
alive() {
  local pid
  for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}
# stop PID ...: SIGTERM, as a pod's deletion sends (a worker then hands its trial back at the next
# step); a second SIGTERM after 10 s (the engine's "stop now"), SIGKILL 10 s after that.
stop() {
  local signal pid _
  for signal in TERM TERM KILL; do
    for pid in "$@"; do kill -"$signal" "$pid" 2>/dev/null || true; done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      alive "$@" || return 0
      [ "$signal" = TERM ] || break
      sleep 1
    done
  done
}
cleanup() {
  if [ ${#pids[@]} -gt 0 ]; then stop "${pids[@]}"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start TAG JOB INDEX [OVERRIDE ...]: one container as a background process.
start() {
  local tag=$1 words argv=() envs=() end=0 w
  shift
  words=$(mktemp)
  manifest "$@" >"$words" || { rm -f "$words"; exit 2; }
  while IFS= read -r -d '' w; do
    if [ "$end" = 0 ] && [ -z "$w" ]; then end=1; elif [ "$end" = 0 ]; then argv+=("$w"); else envs+=("$w"); fi
  done <"$words"
  rm -f "$words"
  [ "${argv[0]}" = python ] && argv[0]=$PYTHON
  echo "[$tag] ${argv[*]}"
  (
    for w in "${envs[@]}"; do export "${w?}"; done
    # Each line tagged with its container, as `kubectl logs --prefix` does.
    exec "${argv[@]}" > >(sed -u "s/^/[$tag] /") 2>&1
  ) &
  pids+=($!)
}

for ((i = 0; i < WORKERS; i++)); do
  start "worker $i" engine-workers "$i"
done
start study engine-study 0 "$@"
driver=${pids[-1]}

rc=0
wait "$driver" || rc=$?
if [ "$rc" != 0 ]; then
  echo "[study] exited with code $rc; stopping the workers" >&2
  stop "${pids[@]:0:WORKERS}"
fi
for pid in "${pids[@]:0:WORKERS}"; do
  code=0
  wait "$pid" || code=$?
  if [ "$rc" = 0 ] && [ "$code" != 0 ]; then
    echo "[worker] pid $pid exited with code $code" >&2
    rc=$code
  fi
done
pids=()
exit "$rc"

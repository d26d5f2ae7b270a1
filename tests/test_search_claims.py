"""Claims under contention: several processes race for one study's waiting trials. Each trial is
claimed once, and the worker named on it is the process that claimed it (recovery checks that
process: naming a rival that lost the race would fail a live trial, or miss a dead one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
from conftest import REPO
from optuna.trial import TrialState

from engine.search.storage import claim, open_storage

N_CLAIMERS, N_TRIALS = 8, 120
CLAIMER = """
import json, os, sys
from optuna.trial import TrialState
from engine.search.storage import claim, open_storage
storage = open_storage(sys.argv[1])
study_id = storage.get_study_id_from_name("race")
got = []
while (t := claim(storage, study_id, int(sys.argv[2]))) is not None:
    got.append(t.number)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
    storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.0])
print(json.dumps({"pid": os.getpid(), "claimed": got}))
"""


def test_racing_claimers_take_each_trial_once_and_name_themselves_on_it(tmp_path):
    journal = str(tmp_path / "study.journal")
    study = optuna.create_study(study_name="race", storage=open_storage(journal))
    for _ in range(N_TRIALS):
        study.enqueue_trial({})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, journal, str(k)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for k in range(N_CLAIMERS)
    ]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    claimed = [n for r in results for n in r["claimed"]]
    assert sorted(claimed) == list(range(N_TRIALS))  # every trial once: none lost, none twice
    owner = {n: r["pid"] for r in results for n in r["claimed"]}
    trials = optuna.load_study(study_name="race", storage=open_storage(journal)).get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.number: t.user_attrs["worker"]["pid"] for t in trials} == owner


def test_a_retried_trial_is_claimed_before_new_slots(tmp_path):
    storage = open_storage(str(tmp_path / "study.journal"))
    study = optuna.create_study(study_name="s", storage=storage)
    for _ in range(10):
        study.enqueue_trial({})
    study.enqueue_trial({}, user_attrs={"retry_of": 3, "attempt": 2})
    first = claim(storage, storage.get_study_id_from_name("s"))
    assert first is not None and first.number == 10

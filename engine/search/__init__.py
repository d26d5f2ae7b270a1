"""Hyperparameter sweeps with Optuna: ``python -m engine.train -m search=<preset>``.

space.py     Hydra sweep grammar -> Optuna distributions; grid expansion
samplers.py  grid | random | tpe | gp | cmaes | nsga2, seeded per trial
pruners.py   none | median | hyperband, and the per-epoch reporter a trial's trainer calls
spec.py      what a worker needs, stored in the study itself
storage.py   journal file / RDB URL, exact trial slots, recovery of interrupted trials
worker.py    claim a trial, compose its config, run it in-process, tell; repeat
driver.py    plan (checks before any compute), start workers, wait, report
summary.py   summary.csv, best.yaml, pareto.csv, the leaderboard
tb.py        per-trial HPARAMS sessions with their state; the study-level run

The Hydra glue is hydra_plugins/engine_sweeper/ (Hydra only loads sweepers from there).
"""

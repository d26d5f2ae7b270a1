"""Sweep trials as DDP groups (``search.gpus_per_trial=k``, engine/search/ddp.py): the prune
verdict stops every rank after the same epoch, a failing rank fails the trial with one line and
no hang, GPUs are handed out k per worker, and a real sweep of 2-rank gloo trials ends each
trial with the weights ``torchrun --nproc-per-node=2`` gives its overrides."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import REPO
from omegaconf import OmegaConf
from optuna.trial import TrialState

from engine import checkpoint as ckpt
from engine.config import ConfigError, SearchConfig, validate_search
from engine.search import ddp
from engine.search.pruners import Pruned, make_pruner
from engine.search.storage import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail, instead of hanging the suite, when the ranks do not come back in time."""

    def expire(signum, frame):
        raise TimeoutError(f"the ranks did not exit within {seconds} s")

    before = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


# --------------------------------------------------------------------------------------------
# the prune verdict and rank failures, with 2 real gloo ranks (functions run by ddp.launch)


class PruneAt:
    """Rank 0's stand-in for the trial's Reporter: prunes after epoch ``epoch`` (1-based), or
    fails there with ``error``."""

    def __init__(self, epoch: int, error: Exception | None = None):
        self.epoch, self.error = epoch, error

    def __call__(self, epoch: int, metrics: dict[str, float], final: bool = False) -> None:
        if epoch + 1 == self.epoch and not final:
            if self.error is not None:
                raise self.error
            raise Pruned(epoch, metrics["val/acc"])


def epochs_until_stopped(mode: str, stop_at: int, epochs: int) -> dict:
    """A training loop's skeleton on each rank: a collective per epoch (as the gradient and
    metric all-reduces are), then the epoch callback. Returns where this rank stopped."""
    import torch

    from engine import distributed as dist

    rank, _ = dist.init(torch.device("cpu"))
    reporter = None
    if rank == 0:
        reporter = PruneAt(stop_at, ConfigError("no such metric") if mode == "report" else None)
    sync = ddp.PruneSync(reporter)
    done = 0
    try:
        for epoch in range(epochs):
            if mode == "crash" and rank == 1 and epoch + 1 == stop_at:
                raise ValueError(f"rank 1 broke in epoch {epoch + 1}")
            if mode == "kill" and rank == 1 and epoch + 1 == stop_at:
                os.kill(os.getpid(), signal.SIGKILL)
            total = dist.all_reduce_sum(torch.ones(()))  # the peers wait here for each other
            done = epoch + 1
            sync(epoch, {"val/acc": float(total) / 4}, final=epoch + 1 == epochs)
    except Pruned as pruned:
        dist.shutdown()  # a barrier: it returns only if every rank got here
        return {"rank": rank, "pruned_after": pruned.epoch + 1, "epochs": done}
    except ddp.PeerStopped:
        dist.shutdown(wait_for_peers=False)
        return {"rank": rank, "peer_stopped_after": done}
    dist.shutdown()
    return {"rank": rank, "pruned_after": None, "epochs": done}


def test_a_prune_verdict_on_rank_0_stops_every_rank_after_the_same_epoch():
    handler = signal.getsignal(signal.SIGTERM)
    with deadline(120):
        answers = ddp.launch(2, epochs_until_stopped, "prune", 3, 10)
    assert answers == {
        0: {"rank": 0, "pruned_after": 3, "epochs": 3},
        1: {"rank": 1, "pruned_after": 3, "epochs": 3},
    }
    # The launcher's agent replaces the signal handlers while ranks run: the worker's own
    # (SIGTERM: stop and retry the trial) are back afterwards.
    assert signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("crash", "rank 1 of 2 failed: ValueError: rank 1 broke in epoch 2"),
        # SIGKILL when the launcher saw it first, else known from rank 0's note that it was gone.
        pytest.param(
            "kill",
            "rank 1 of 2 (was killed by SIGKILL|died without a Python error)",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "report", "rank 0 of 2 failed: ConfigError: no such metric", marks=pytest.mark.slow
        ),
    ],
)
def test_a_failing_rank_fails_the_launch_with_one_line_and_no_rank_hangs(mode, reason):
    """The peer of a crashed or killed rank is waiting in a collective: the launcher stops it.
    A failure of rank 0's report stops the other ranks too (they leave; rank 0's error is the
    reason)."""
    with deadline(120), pytest.raises(ddp.RankFailed) as failed:
        ddp.launch(2, epochs_until_stopped, mode, 2, 10)
    message = str(failed.value)
    assert re.match(reason, message), message
    assert "\n" not in message


# --------------------------------------------------------------------------------------------
# GPUs per worker, the key's validation, the storage rank 0 opens again


def test_workers_get_gpus_in_groups_of_gpus_per_trial():
    four = ["0", "1", "2", "3"]
    assert ddp.gpu_slots(2, None, four) == (2, ["0,1", "2,3"])
    assert ddp.gpu_slots(2, 1, four) == (1, ["0,1", "2,3"])
    assert ddp.gpu_slots(3, None, four) == (1, ["0,1,2"])
    assert ddp.gpu_slots(1, None, four) == (4, four)  # one GPU per trial: as before
    assert ddp.gpu_slots(1, 6, ["0", "1"]) == (6, ["0", "1"])  # round-robin
    assert ddp.gpu_slots(2, None, []) == (1, [])  # CPU: one worker, gloo ranks
    ddp.check_gpus(2, 2, four)
    ddp.check_gpus(4, None, [])  # nothing to check on CPU


def test_the_driver_pins_each_worker_to_its_group_of_gpus(monkeypatch):
    from engine.search import driver

    monkeypatch.setattr(ddp, "visible_gpus", lambda: ["4", "5", "6", "7"])
    n, slots = driver._worker_count(None, waiting=10, per_trial=2)
    assert (n, slots) == (2, ["4,5", "6,7"])
    started = []
    monkeypatch.setattr(driver.subprocess, "Popen", lambda cmd, env: started.append(env))
    workers = driver.Workers("/x/study.journal", "S", n, slots)
    workers.start(0)
    workers.start(1)
    assert [env["CUDA_VISIBLE_DEVICES"] for env in started] == ["4,5", "6,7"]


def test_too_few_gpus_for_gpus_per_trial_are_refused_naming_the_key_and_the_count():
    with pytest.raises(ConfigError, match=r"search.gpus_per_trial=2 but only 1 GPU\(s\)"):
        ddp.check_gpus(2, None, ["0"])
    with pytest.raises(ConfigError, match=r"search.n_workers=3 x search.gpus_per_trial=2 needs 6"):
        ddp.check_gpus(2, 3, ["0", "1", "2", "3"])
    with pytest.raises(ConfigError, match=r"search.gpus_per_trial=0 is invalid"):
        validate_search(OmegaConf.structured(SearchConfig(gpus_per_trial=0)))


def test_a_storage_password_reaches_the_ranks_in_their_environment_only(monkeypatch):
    """run_ranks hands rank 0 the masked URL and the real one through $ENGINE_SEARCH_STORAGE
    (what rank 0's resolve_storage reads), and gives the worker rank 0's answer."""
    import pickle
    from types import SimpleNamespace

    from engine.search.storage import STORAGE_ENV

    url = "postgresql://u:s3cret@db/optuna"
    rdb = object.__new__(optuna.storages.RDBStorage)  # no server: only its url is read
    rdb.url = url
    seen = {}

    def fake_launch(nprocs, entrypoint, task, start_method):
        seen.update(task=task, env=os.environ.get(STORAGE_ENV), method=start_method)
        return {0: {"pruned": (1, 0.5), "last": {"val/acc": 0.5}, "epochs": 2}, 1: None}

    monkeypatch.setattr(ddp, "launch", fake_launch)
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    trial = SimpleNamespace(storage=rdb, study=SimpleNamespace(study_name="S"), number=3)
    spec = SimpleNamespace(
        metrics=["val/acc"], pruner="hyperband", max_epochs=4, wilcoxon_p_threshold=0.1
    )
    reporter = SimpleNamespace(last={}, epochs=0)
    cfg = OmegaConf.create({"trainer": {"device": "cpu"}})
    with pytest.raises(Pruned, match="after epoch 2 "):
        ddp.run_ranks(2, cfg, Path("/x/trial_3"), trial, spec, reporter, "%(message)s")
    assert seen["env"] == url and STORAGE_ENV not in os.environ
    assert seen["task"].storage == "postgresql://u:***@db/optuna"
    assert b"s3cret" not in pickle.dumps(seen["task"])
    assert seen["method"] == "forkserver"  # no GPU here
    assert (reporter.last, reporter.epochs) == ({"val/acc": 0.5}, 2)


def test_rank_0_reopens_the_storage_the_worker_has_open(tmp_path):
    for arg in (str(tmp_path / "study.journal"), f"sqlite:///{tmp_path / 'studies.db'}"):
        storage = open_storage(arg)
        optuna.create_study(storage=storage, study_name="S")
        study = optuna.load_study(study_name="S", storage=storage)
        assert ddp.storage_url(study.ask().storage) == arg


# --------------------------------------------------------------------------------------------
# a real sweep of 2-rank trials, each checked against the same trial run alone with torchrun


def torchrun(*args: str) -> subprocess.Popen:
    launcher = Path(sys.executable).with_name("torchrun")
    command = (
        [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [*command, "--standalone", "--nproc-per-node=2", "-m", "engine.train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def replayed_states(trials: list[optuna.trial.FrozenTrial], name: str, max_epochs: int) -> list:
    """The states the sweep's pruner gives these trials' reported values when they run one
    after another (one worker), as the trainer reports them: after every epoch, never pruned
    at the last one."""
    study = optuna.create_study(
        study_name=name, direction="maximize", pruner=make_pruner("hyperband", max_epochs)
    )
    states = []
    for t in trials:
        trial = study.ask()
        assert trial.number == t.number
        state = TrialState.COMPLETE
        for step in sorted(t.intermediate_values):
            trial.report(t.intermediate_values[step], step)
            if step < max_epochs and trial.should_prune():
                state = TrialState.PRUNED
                break
        study.tell(trial, t.value if state == TrialState.COMPLETE else None, state=state)
        states.append(state)
    return states


def assert_same_tensors(a: dict, b: dict, where: str) -> None:
    import torch

    assert a.keys() == b.keys(), where
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{where}.{key} differs"


@pytest.mark.slow
def test_a_sweep_of_two_rank_trials_prunes_and_each_trial_equals_its_torchrun_run(cli, tmp_path):
    sweep = tmp_path / "S"
    max_epochs = 2  # Hyperband's one bracket then has its rung at epoch 1
    result = cli(
        "-m",
        "search=random",
        "search.n_trials=4",
        "search.gpus_per_trial=2",
        "search.pruner=hyperband",
        f"trainer.max_epochs={max_epochs}",
        # A constant lr: a trial pruned after epoch e holds the weights of a run of e epochs.
        "sched=none",
        "data.batch_size=128",
        "trainer.device=cpu",
        "trainer.num_threads=1",
        "trainer.progress=none",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    trials = optuna.load_study(
        study_name="S", storage=open_storage(str(sweep / "study.journal"))
    ).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    states = [t.state for t in trials]
    assert TrialState.FAIL not in states and TrialState.PRUNED in states, states
    # Rank 0 reported every epoch, and the pruner stopped exactly the trials it stops when given
    # those values one trial after another.
    assert states == replayed_states(trials, "S", max_epochs)
    with (sweep / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(int(r["number"]), r["state"]) for r in table] == [
        (t.number, "pruned" if t.state == TrialState.PRUNED else "complete") for t in trials
    ]

    runs = {}
    for t in trials:
        run_dir = sweep / f"trial_{t.number}"
        epochs = max(t.intermediate_values)
        assert sorted(t.intermediate_values) == list(range(1, epochs + 1))
        assert epochs == (1 if t.state == TrialState.PRUNED else max_epochs)
        state = ckpt.load(run_dir / "checkpoints" / "last.pt")
        assert state["world_size"] == 2 and state["fit"]["epoch"] == epochs
        log = (run_dir / "train.log").read_text()
        assert "2 DDP ranks" in log and "world_size=2" in log
        if t.state == TrialState.PRUNED:
            assert f"pruned after epoch {epochs} " in log
        else:
            assert (run_dir / "metrics.json").exists()
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        overrides = [o for o in overrides if not o.startswith("trainer.max_epochs=")]
        alone = tmp_path / f"alone_{t.number}"
        runs[t.number] = (
            alone,
            state,
            [*overrides, f"trainer.max_epochs={epochs}", f"hydra.run.dir={alone}"],
        )
    # Two standalone runs at a time (4 processes on this machine's cores).
    numbers = sorted(runs)
    for pair in (numbers[:2], numbers[2:]):
        procs = {n: torchrun(*runs[n][2]) for n in pair}
        for n, proc in procs.items():
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"trial {n} alone: {out[-3000:]}"
    for n, (alone, state, _) in runs.items():
        standalone = ckpt.load(alone / "checkpoints" / "last.pt")
        assert standalone["fit"]["epoch"] == state["fit"]["epoch"]
        assert_same_tensors(state["model"], standalone["model"], f"trial {n} model")
        assert_same_tensors(state["optimizer"], standalone["optimizer"], f"trial {n} optimizer")

"""Every sampler on every kind of storage, the way a cluster runs them (two workers claiming
trials from one study), and what a sweep does with a storage password: it reaches the workers
and nothing else (no file under the sweep dir, no console line, no process's command line).

The PostgreSQL cases need the server `.ci/run` starts (`.ci/postgres.sh`); they skip without it.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
from conftest import REPO
from optuna.trial import TrialState

from engine.config import SAMPLERS
from engine.search.storage import open_storage

FAST = ["data.batch_size=256", "trainer.progress=none", "trainer.num_threads=1"]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _postgres(var: str) -> str:
    url = os.environ.get(var)
    if not url:
        pytest.skip(f"{var} is not set (.ci/run starts a PostgreSQL for it)")
    return url


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def _storage(kind: str, tmp_path: Path) -> tuple[list[str], str, str]:
    """(overrides, storage URL or journal path, study name) for one kind of storage."""
    if kind == "journal":
        return [], str(tmp_path / "S" / "study.journal"), "S"
    name = f"test-{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{tmp_path / 'studies.db'}" if kind == "sqlite" else None
    url = url or _postgres("ENGINE_TEST_POSTGRES_URL")
    return [f"search.storage={url}", f"search.study_name={name}"], url, name


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["journal", "sqlite", "postgresql"])
@pytest.mark.parametrize("preset", SAMPLERS)  # each preset is named after its sampler
def test_every_preset_on_every_storage_runs_the_exact_count_with_two_workers(
    cli, tmp_path, preset, storage
):
    overrides, url, name = _storage(storage, tmp_path)
    s = tmp_path / "S"
    result = cli(
        "-m",
        f"search={preset}",
        "search.n_trials=3",
        "search.n_workers=2",
        "trainer.max_epochs=1",
        *FAST,
        *overrides,
        f"hydra.sweep.dir={s}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    trials = optuna.load_study(study_name=name, storage=open_storage(url)).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3, [
        t.user_attrs.get("fail_reason") for t in trials
    ]
    assert f"({preset}, pruner none," in result.stdout
    if preset == "grid":  # three different combinations, none twice
        assert len({tuple(sorted(t.params.items())) for t in trials}) == 3
    else:  # the sampler explores (three draws of the first generation / startup trials)
        assert len({t.params["optim.lr"] for t in trials}) == 3
    table = _rows(s)
    assert [r["state"] for r in table] == ["complete"] * 3
    assert result.stdout.count("[sweep] trial ") == 3  # one console line per trial
    assert (s / "best.yaml").exists()
    if preset == "nsga2":  # two objectives: a value per metric and a Pareto front
        assert {"val/acc", "val/ece"} <= set(table[0])
        assert "Pareto front" in result.stdout and (s / "pareto.csv").exists()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_storage_is_refused_with_the_key_named_and_the_password_masked(
    cli, tmp_path
):
    url = f"postgresql://someone:hunter2secret@127.0.0.1:{_closed_port()}/optuna"
    result = cli("-m", "search=tpe", f"search.storage={url}", f"hydra.sweep.dir={tmp_path / 'S'}")
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "error: search.storage=postgresql://someone:***@127.0.0.1" in out
    assert "could not be opened" in out and "Traceback" not in out
    assert "hunter2secret" not in out


@pytest.mark.parametrize(
    "storage", [["--storage", "postgresql://u:***@127.0.0.1/db"], []], ids=["masked", "none"]
)
def test_a_worker_without_a_usable_url_says_where_the_url_goes(storage):
    env = {k: v for k, v in os.environ.items() if k != "ENGINE_SEARCH_STORAGE"}
    result = subprocess.run(
        [sys.executable, "-m", "engine.search.worker", *storage, "--study", "x"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "error: " in result.stderr and "ENGINE_SEARCH_STORAGE" in result.stderr


class CommandLines:
    """Records the command line of every worker process (``engine.search.worker``, or a
    submitit job running one) while a sweep runs: what ``ps`` shows any user."""

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) in self.seen:
                    continue
                try:
                    argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if "engine.search.worker" in argv or "submitit.core" in argv:
                    self.seen[int(entry.name)] = argv
            time.sleep(0.05)

    def __enter__(self) -> CommandLines:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _files_holding(root: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return [
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and needle in path.read_bytes()
    ]


def _password(url: str) -> str:
    return url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["processes", "submitit_local"])
def test_a_storage_password_reaches_the_workers_and_nothing_else(cli, tmp_path, launch):
    """The password is typed on the sweep command line (the user's own choice); the workers
    authenticate with it (the role needs it), yet no file under the sweep dir, no console line
    and no worker's command line holds it."""
    url = _postgres("ENGINE_TEST_POSTGRES_SECRET_URL")
    password = _password(url)
    name = f"secret-{uuid.uuid4().hex[:8]}"
    s = tmp_path / "S"
    launcher = ["hydra/launcher=submitit_local"] if launch == "submitit_local" else []
    with CommandLines() as ps:
        result = cli(
            "-m",
            "search=random",
            f"search.storage={url}",
            f"search.study_name={name}",
            "search.n_trials=3",
            "search.n_workers=2",
            "trainer.max_epochs=1",
            *FAST,
            *launcher,
            f"hydra.sweep.dir={s}",
        )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert [r["state"] for r in _rows(s)] == ["complete"] * 3  # the workers did get in
    assert password not in out
    assert ":***@" in out  # shown, masked
    assert _files_holding(s, password) == []
    assert (s / "multirun.yaml").exists() and list(s.rglob("config.yaml"))
    assert ps.seen, "no worker process was seen"
    assert [argv for argv in ps.seen.values() if password in argv] == []


@pytest.mark.slow
def test_an_env_interpolated_storage_url_stays_unresolved_in_what_is_written(cli, tmp_path):
    url = _postgres("ENGINE_TEST_POSTGRES_SECRET_URL")
    name = f"secret-{uuid.uuid4().hex[:8]}"
    s = tmp_path / "S"
    result = cli(
        "-m",
        "search=random",
        "search.storage=${oc.env:ENGINE_TEST_DB_URL}",
        f"search.study_name={name}",
        "search.n_trials=2",
        "trainer.max_epochs=1",
        *FAST,
        f"hydra.sweep.dir={s}",
        env={"ENGINE_TEST_DB_URL": url},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "${oc.env:ENGINE_TEST_DB_URL}" in (s / "multirun.yaml").read_text()
    assert "${oc.env:ENGINE_TEST_DB_URL}" in (s / "trial_0" / ".hydra" / "config.yaml").read_text()
    assert _files_holding(s, _password(url)) == []


@pytest.mark.slow
def test_launcher_jobs_split_the_cores_and_print_the_same_trial_lines_as_processes(cli, tmp_path):
    """submitit_local runs each worker as a job on this machine: the cores are shared out as
    in process mode, and the sweep command prints each trial's line either way."""
    outputs = {}
    for mode, extra in (("processes", []), ("launcher", ["hydra/launcher=submitit_local"])):
        s = tmp_path / mode
        result = cli(
            "-m",
            "search=grid",
            "optim.lr=choice(1e-3,3e-3,1e-2)",
            "model.hidden=32",
            "search.n_workers=2",
            "trainer.max_epochs=1",
            "data.batch_size=256",
            "trainer.progress=none",
            *extra,
            f"hydra.sweep.dir={s}",
        )
        assert result.returncode == 0, result.stdout + result.stderr
        outputs[mode] = result.stdout
        threads = max(1, len(os.sched_getaffinity(0)) // 2)
        for number in range(3):
            log = (s / f"trial_{number}" / "train.log").read_text()
            assert f", {threads} torch threads)" in log, log
        lines = [line for line in result.stdout.splitlines() if line.startswith("[sweep] trial ")]
        assert sorted(line.split()[2] for line in lines) == ["0", "1", "2"], result.stdout
        assert all(" complete " in line and "val/acc=" in line for line in lines)
        assert f"{threads} thread" in result.stdout

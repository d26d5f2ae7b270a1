"""The model registry (`python -m engine.registry`): versions with their lineage, aliases with
promote and rollback, and `engine.registry.load`, on SQLite and on PostgreSQL.

Two real digits runs (trained once for the module) are registered through the CLI's `main`, in
this process; a few commands run as real `python -m engine.registry` processes. The PostgreSQL
cases need `ENGINE_TEST_POSTGRES_URL` (`.ci/postgres.sh`) and get a fresh database each run.
"""

from __future__ import annotations

import contextlib
import csv
import getpass
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from conftest import REPO
from omegaconf import OmegaConf

from engine import datacard, predictor
from engine.data import split_table
from engine.preprocess import feature_names
from engine.registry import RegistryError, load, reference_sample, resolve
from engine.registry.cli import main

FAST = ["trainer.progress=none", "trainer.num_threads=1", "data.batch_size=128"]


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


def train(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "engine.train", *FAST, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(*procs: subprocess.Popen) -> None:
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err


@dataclass
class Runs:
    a: Path  # digits, 2 epochs
    b: Path  # digits, 1 epoch at another learning rate


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("runs")
    a, b = root / "a", root / "b"
    finished(train(a, "trainer.max_epochs=2"), train(b, "trainer.max_epochs=1", "optim.lr=0.01"))
    return Runs(a, b)


def _superuser_url() -> str:
    url = os.environ.get("ENGINE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("ENGINE_TEST_POSTGRES_URL is not set (.ci/postgres.sh starts a PostgreSQL)")
    return url


def _admin(url: str) -> sa.Engine:
    from engine.search.storage import driver_url

    return sa.create_engine(driver_url(url), isolation_level="AUTOCOMMIT")


@contextlib.contextmanager
def fresh_database():
    """A new, empty PostgreSQL database for this test run (dropped after): reruns are clean."""
    base = sa.make_url(_superuser_url())
    name = f"registry_test_{uuid.uuid4().hex[:10]}"
    admin = _admin(base.render_as_string(hide_password=False))
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@dataclass
class Where:
    """A registry's location, as CLI arguments and as keyword arguments of the Python calls."""

    storage: str
    store: str

    @property
    def args(self) -> list[str]:
        return ["--storage", self.storage, "--store", self.store]

    @property
    def kwargs(self) -> dict[str, str]:
        return {"storage": self.storage, "store": self.store}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def where(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "sqlite":
        yield Where(str(folder / "registry.db"), str(folder / "registry"))
        return
    with fresh_database() as url:
        yield Where(url, str(folder / "store"))


@pytest.fixture
def sqlite(tmp_path) -> Where:
    return Where(str(tmp_path / "registry.db"), str(tmp_path / "registry"))


def registry(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def shown(capsys, where: Where, ref: str) -> dict:
    code, out, err = registry(capsys, "show", ref, "--json", *where.args)
    assert code == 0, err
    return json.loads(out)


def model_name() -> str:  # the module's registries are shared by its tests
    return f"digits-{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------------------------
# the command line


def test_register_records_the_lineage_of_the_run(runs, where, capsys):
    name = model_name()
    code, out, err = registry(capsys, "register", str(runs.a), "--name", name, *where.args)
    assert code == 0, err
    assert f"registered {name}@1" in out
    record = shown(capsys, where, name)
    lineage, run = record["lineage"], runs.a
    assert record["version"] == 1 and record["created_by"] == getpass.getuser()
    assert lineage["config"] == OmegaConf.to_container(OmegaConf.load(run / ".hydra/config.yaml"))
    assert lineage["data_fingerprint"] == datacard.read(run)["fingerprint"]
    assert lineage["metrics"] == json.loads((run / "metrics.json").read_text())
    best = run / "checkpoints" / "best.pt"
    assert lineage["checkpoint"] == {
        "which": "best",
        "sha256": datacard.file_sha256(best),
        "bytes": best.stat().st_size,
    }
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert lineage["git"]["commit"] == head.stdout.strip()  # run dir outside: the cwd's project
    assert lineage["init_from"] is None and lineage["run_dir"] == str(run)
    assert lineage["reference"]["rows"] == len(
        split_table(OmegaConf.load(run / ".hydra/config.yaml").data).train
    )


def test_promote_rollback_and_the_alias_history(runs, where, capsys):
    name = model_name()
    for run in (runs.a, runs.b, runs.a):
        assert registry(capsys, "register", str(run), "--name", name, *where.args)[0] == 0
    code, out, _ = registry(capsys, "promote", f"{name}@1", "--alias", "production", *where.args)
    assert code == 0 and f"{name}@production -> {name}@1" in out
    code, out, _ = registry(capsys, "promote", f"{name}@3", "--alias", "production", *where.args)
    assert f"-> {name}@3 (was {name}@1)" in out
    registry(capsys, "promote", f"{name}@2", "--alias", "staging", *where.args)
    assert shown(capsys, where, f"{name}@production")["version"] == 3

    code, out, _ = registry(capsys, "rollback", name, "--alias", "production", *where.args)
    assert code == 0 and f"{name}@production -> {name}@1 (rolled back from {name}@3)" in out
    record = shown(capsys, where, f"{name}@production")
    assert record["version"] == 1 and record["aliases"] == ["production"]
    moves = [(e["alias"], e["action"], e["version"], e["previous"]) for e in record["history"]]
    assert moves == [
        ("production", "promote", 1, None),
        ("production", "promote", 3, 1),
        ("staging", "promote", 2, None),
        ("production", "rollback", 1, 3),
    ]
    code, _, err = registry(capsys, "rollback", name, "--alias", "production", *where.args)
    assert code == 2 and "no earlier version to roll back to" in err

    code, out, _ = registry(capsys, "show", f"{name}@production", *where.args)
    assert "alias history" in out and f"rollback  @production -> {name}@1 (was {name}@3)" in out
    code, out, _ = registry(capsys, "list", *where.args)
    assert f"{name}  (3 versions; aliases: @production -> 1, @staging -> 2)" in out
    listing = json.loads(registry(capsys, "list", "--json", *where.args)[1])
    model = next(m for m in listing["models"] if m["name"] == name)
    assert [v["version"] for v in model["versions"]] == [1, 2, 3]
    assert model["aliases"] == {"production": 1, "staging": 2}


def test_delete_is_refused_while_an_alias_points_at_the_version(runs, where, capsys):
    name = model_name()
    for _ in range(2):
        registry(capsys, "register", str(runs.a), "--name", name, *where.args)
    registry(capsys, "promote", f"{name}@1", "--alias", "production", *where.args)
    code, _, err = registry(capsys, "delete", f"{name}@1", *where.args)
    assert code == 2 and f"error: {name}@1 is not deleted: alias @production points at it" in err
    assert shown(capsys, where, f"{name}@1")["state"] == "ready"

    assert registry(capsys, "delete", f"{name}@2", *where.args)[0] == 0
    code, _, err = registry(capsys, "show", f"{name}@2", *where.args)
    assert code == 2 and f"version 2 of '{name}' was deleted" in err
    assert shown(capsys, where, name)["version"] == 1  # latest: the newest not deleted
    registry(capsys, "register", str(runs.a), "--name", name, *where.args)
    assert shown(capsys, where, name)["version"] == 3  # a deleted number is not given out again


def test_diff_puts_the_config_and_metrics_that_differ_side_by_side(runs, where, capsys):
    name = model_name()
    for run in (runs.a, runs.b):
        registry(capsys, "register", str(run), "--name", name, *where.args)
    code, out, err = registry(capsys, "diff", f"{name}@1", f"{name}@2", "--json", *where.args)
    assert code == 0, err
    diff = json.loads(out)
    assert diff["config"]["optim.lr"][1] == 0.01 and diff["config"]["optim.lr"][0] != 0.01
    assert diff["config"]["trainer.max_epochs"] == [2, 1]
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (runs.a, runs.b))
    assert diff["metrics"]["val/loss"] == [a["val/loss"], b["val/loss"]]
    assert "data.name" not in diff["config"] and "data fingerprint" not in diff["lineage"]
    assert "checkpoint sha256" in diff["lineage"]
    code, out, _ = registry(capsys, "diff", f"{name}@1", f"{name}@2", *where.args)
    header = next(line for line in out.splitlines() if line.strip().startswith("key"))
    assert header.split() == ["key", f"{name}@1", f"{name}@2"]
    assert any(line.split()[:1] == ["optim.lr"] for line in out.splitlines())


# --------------------------------------------------------------------------------------------
# loading


def _test_rows(run: Path) -> pd.DataFrame:
    table = split_table(predictor.run_config(run).data)
    names = feature_names(table.info)
    return pd.DataFrame(table.x[table.test], columns=names)


def test_load_predicts_what_the_run_dir_predicts_also_after_it_is_deleted(
    runs, where, capsys, tmp_path
):
    copy = tmp_path / "run"
    shutil.copytree(runs.a, copy)
    name = model_name()
    registry(capsys, "register", str(copy), "--name", name, *where.args)
    registry(capsys, "promote", f"{name}@1", "--alias", "production", *where.args)
    shutil.rmtree(copy)

    rows = _test_rows(runs.a)
    expected = predictor.load_run(runs.a).predict(rows)
    got = load(f"{name}@production", device="cpu", **where.kwargs).predict(rows)
    assert np.array_equal(got.outputs, expected.outputs)
    assert got.labels == expected.labels
    assert np.array_equal(got.probabilities, expected.probabilities)


def test_the_reference_sample_is_the_raw_training_rows(runs, where, capsys):
    name = model_name()
    registry(capsys, "register", str(runs.a), "--name", name, *where.args)
    table = split_table(predictor.run_config(runs.a).data)
    sample = reference_sample(name, **where.kwargs)
    assert sample["features"] == feature_names(table.info)
    assert np.array_equal(sample["rows"], table.train)
    assert np.array_equal(sample["x"], table.x[table.train])
    assert np.array_equal(sample["y"], table.y[table.train])
    assert resolve(f"{name}@1", **where.kwargs).lineage["reference"]["rows"] == len(table.train)


def test_a_stored_file_changed_on_disk_is_refused(runs, sqlite, capsys):
    registry(capsys, "register", str(runs.a), "--name", "m", *sqlite.args)
    digest = resolve("m", **sqlite.kwargs).files["checkpoint.pt"]
    blob = Path(sqlite.store) / "sha256" / digest[:2] / digest
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="is damaged: its SHA-256 is"):
        load("m", **sqlite.kwargs)


def _csv_run(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 3))
    path = folder / "rows.csv"
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["a", "b", "c", "label"])
        for row in x:
            out.writerow([*row, "yes" if row[0] + row[1] > 0 else "no"])
    run = folder / "run"
    finished(
        train(run, "data=csv", f"data.path={path}", "data.target=label", "trainer.max_epochs=1")
    )
    path.unlink()  # the training file is gone by the time the run is registered
    return run


def test_a_run_whose_csv_is_gone_registers_without_a_reference_and_still_loads(
    sqlite, capsys, tmp_path
):
    run = _csv_run(tmp_path)
    code, out, err = registry(capsys, "register", str(run), "--name", "rows", *sqlite.args)
    assert code == 0, err
    assert "warning: rows: registered without a reference sample" in err and "rows.csv" in err
    about = resolve("rows", **sqlite.kwargs).lineage["reference"]
    assert about["rows"] == 0 and "could not be read" in about["reason"]
    assert reference_sample("rows", **sqlite.kwargs) is None
    frame = pd.DataFrame({"a": [2.0, -2.0], "b": [2.0, -2.0], "c": [0.0, 0.0]})
    assert load("rows", **sqlite.kwargs).predict(frame).labels == (
        predictor.load_run(run).predict(frame).labels
    )


# --------------------------------------------------------------------------------------------
# errors


def _without(runs: Runs, tmp_path: Path, part: str) -> Path:
    copy = tmp_path / f"no-{part.replace('/', '-')}"
    shutil.copytree(runs.a, copy)
    target = copy / part
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return copy


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["register", "{no metrics.json}", "--name", "m"], "has no metrics.json"),
        (["register", "{no checkpoints}", "--name", "m"], "it has no checkpoints/best.pt"),
        (["register", "{run}", "--name", "bad name"], "model name 'bad name' is not allowed"),
        (["show", "m@@1"], "'m@@1' is not a model reference"),
        (["show", "nope@1"], "no model named 'nope' in the registry"),
        (["show", "m@9"], "version 9 of 'm' does not exist (latest: m@1)"),
        (["show", "m@canary"], "has no alias 'canary'"),
        (["promote", "m@1", "--alias", "Prod"], "alias 'Prod' is not allowed"),
        (["promote", "m@1", "--alias", "latest"], "alias 'latest' is reserved"),
        (["rollback", "m", "--alias", "production"], "no such alias to roll back"),
        (["delete", "m@latest"], "name the version by its number"),
    ],
)
def test_a_request_that_cannot_be_done_is_an_error_and_changes_nothing(
    runs, sqlite, capsys, tmp_path, argv, message
):
    registry(capsys, "register", str(runs.a), "--name", "m", *sqlite.args)
    before = registry(capsys, "list", "--json", *sqlite.args)[1]
    paths = {
        "{run}": str(runs.a),
        "{no metrics.json}": "metrics.json",
        "{no checkpoints}": "checkpoints",
    }
    argv = [
        str(_without(runs, tmp_path, paths[a])) if a.startswith("{no") else paths.get(a, a)
        for a in argv
    ]
    code, out, err = registry(capsys, *argv, *sqlite.args)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert registry(capsys, "list", "--json", *sqlite.args)[1] == before


def _cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.registry", *argv],
        cwd=REPO,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_module_runs_as_a_command_with_key_value_location(runs, tmp_path):
    db, store = tmp_path / "r.db", tmp_path / "files"
    location = [f"registry.storage={db}", f"registry.store={store}"]
    done = _cli("register", str(runs.a), "--name", "digits-mlp", *location)
    assert done.returncode == 0, done.stderr
    assert "registered digits-mlp@1" in done.stdout
    done = _cli("show", "digits-mlp@1", "--json", *location)
    assert done.returncode == 0 and json.loads(done.stdout)["store"] == str(store)
    assert db.is_file() and list(store.glob("sha256/*/*"))


# --------------------------------------------------------------------------------------------
# secrets


@pytest.mark.parametrize("spelling", ["--storage", "registry.storage="])
def test_a_password_url_as_an_argument_is_refused_and_never_printed(capsys, spelling):
    url = "postgresql://alice:hunter2-secret@127.0.0.1:9/registry"
    argv = [spelling, url] if spelling == "--storage" else [spelling + url]
    code, out, err = registry(capsys, "list", *argv)
    assert code == 2
    assert "refused as an argument" in err
    assert "Put it in the environment variable ENGINE_REGISTRY_STORAGE" in err
    assert "postgresql://alice:***@127.0.0.1:9/registry" in err
    assert "hunter2-secret" not in out + err


def test_a_password_url_from_the_environment_is_used_and_stored_nowhere(runs, tmp_path):
    secret_url = os.environ.get("ENGINE_TEST_POSTGRES_SECRET_URL")
    if not secret_url:
        pytest.skip("ENGINE_TEST_POSTGRES_SECRET_URL is not set (.ci/postgres.sh sets it)")
    parsed = sa.make_url(secret_url)
    password = parsed.password
    schema = f"registry_{uuid.uuid4().hex[:10]}"  # this run's own tables in the role's database
    admin = _admin(
        sa.make_url(_superuser_url()).set(database=parsed.database).render_as_string(False)
    )
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema} AUTHORIZATION {parsed.username}")
    try:
        url = f"{secret_url}?options=-csearch_path%3D{schema}"
        env = _env(ENGINE_REGISTRY_STORAGE=url, ENGINE_REGISTRY_STORE=str(tmp_path / "store"))
        runs_out = [
            _cli("register", str(runs.a), "--name", "m", env=env),
            _cli("show", "m", env=env),
            _cli("list", "--json", env=env),
        ]
        for done in runs_out:
            assert done.returncode == 0, done.stderr
            assert password not in done.stdout + done.stderr
        stored = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
        assert stored and not [p for p in stored if password.encode() in p.read_bytes()]
        with admin.connect() as conn:
            tables = (
                conn.exec_driver_sql(
                    f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{schema}'"
                )
                .scalars()
                .all()
            )
            assert "registry_versions" in tables
            for table in tables:
                for row in conn.exec_driver_sql(f"SELECT * FROM {schema}.{table}"):
                    assert password not in str(row)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.dispose()


# --------------------------------------------------------------------------------------------
# from a sweep


def test_search_register_registers_the_best_trial_when_the_sweep_ends(tmp_path):
    sweep_dir, db = tmp_path / "S", tmp_path / "r.db"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.train",
            "-m",
            "search=random",
            "search.n_trials=2",
            "trainer.max_epochs=1",
            *FAST,
            "search.register=sweep-best",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=REPO,
        env=_env(ENGINE_REGISTRY_STORAGE=str(db)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with (sweep_dir / "summary.csv").open() as f:
        trials = [r for r in csv.DictReader(f) if r["state"] == "complete"]
    best = max(trials, key=lambda r: (float(r["value"]), -int(r["number"])))
    assert "registered the best trial as sweep-best@1" in done.stdout
    version = resolve("sweep-best", storage=str(db))
    assert version.lineage["run_dir"] == str((sweep_dir / f"trial_{best['number']}").resolve())
    assert version.lineage["metrics"]["val/acc"] == pytest.approx(float(best["value"]))

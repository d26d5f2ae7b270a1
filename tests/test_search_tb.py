"""`tensorboard --logdir <sweep dir>` shows every trial in HPARAMS with its params, final metrics
and state, and the study's best-so-far curve: checked through a real TensorBoard server's HTTP
data API on 127.0.0.1 (the routes the dashboard itself calls), and in a headless Chromium
screenshot of the HPARAMS tab when Chromium is installed. `optuna-dashboard <sweep
dir>/study.journal` names the objective: checked through its HTTP API."""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

STATUS = {"complete": "STATUS_SUCCESS", "pruned": "STATUS_UNKNOWN", "failed": "STATUS_FAILURE"}
SWEPT = {"optim.lr", "model"}  # the fixture's space; model is a config-group choice


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A grid run in order by one worker, lr slowest, then model (mlp, cnn): four complete
    trials, then the two with lr=1e-5 (pruned by the median rule at their second epoch), then the
    two with lr=1e8 without clipping (non-finite: failed)."""
    from conftest import run_cli

    s = tmp_path_factory.mktemp("tb") / "S"
    result = run_cli(
        "-m",
        "search=grid",
        "optim.lr=choice(3e-2,1e-2,1e-5,1e8)",
        "model=choice(mlp,cnn)",
        "model.hidden=64",
        "search.pruner=median",
        "trainer.grad_clip=0",
        "trainer.max_epochs=4",
        "data.batch_size=128",
        "trainer.progress=none",
        "trainer.num_threads=1",
        f"hydra.sweep.dir={s}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return s


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TensorBoard:
    """A real `tensorboard` process on 127.0.0.1; stopped on exit, whatever happens."""

    def __init__(self, logdir):
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                str(logdir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--reload_interval",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def get(self, route: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{route}",
            data=data,
            headers={"Content-Type": "application/json"},
            method="POST" if data else "GET",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def poll(self, route: str, body: dict | None, ready, timeout: float = 90):
        """Ask until ``ready(answer)``: the server starts, then loads the event files."""
        deadline, answer = time.time() + timeout, None
        while time.time() < deadline:
            assert self.proc.poll() is None, "tensorboard exited"
            try:
                answer = self.get(route, body)
                if ready(answer):
                    return answer
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"{route} not ready after {timeout}s; last answer: {answer}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def tb(sweep_dir):
    with TensorBoard(sweep_dir) as server:
        yield server


# What the HPARAMS tab asks for (it sends hparamsLimit 1000 and shows the first five).
EXPERIMENT = {"experimentName": "", "includeMetrics": True, "hparamsLimit": 1000}


def _groups_request(col_params: list | None = None) -> dict:
    return {
        "experimentName": "",
        "allowedStatuses": list(STATUS.values()) + ["STATUS_RUNNING"],
        "colParams": col_params or [],
        "startIndex": 0,
        "sliceSize": 100,
        "includeMetrics": True,
    }


def _loaded_experiment(tb: TensorBoard) -> dict:
    """The experiment once TensorBoard has read every event file. Until it has read the study
    run's, it serves one it computes from the sessions instead. The study run's last curve point
    is written after its experiment summary, in the same file."""
    tb.poll(
        "/data/plugin/scalars/scalars?run=study&tag=study/best_value",
        None,
        lambda c: isinstance(c, list) and len(c) == 8,
    )
    tb.poll(
        "/data/plugin/hparams/session_groups",
        _groups_request(),
        lambda g: len(g.get("sessionGroups", [])) == 8,
    )
    return tb.get("/data/plugin/hparams/experiment", EXPERIMENT)


def test_every_trial_is_in_hparams_with_its_state_and_the_study_run_has_the_best_curve(
    sweep_dir, tb
):
    with (sweep_dir / "summary.csv").open() as f:
        table = {int(r["number"]): r for r in csv.DictReader(f)}
    states = ["complete"] * 4 + ["pruned"] * 2 + ["failed"] * 2
    assert [table[n]["state"] for n in range(8)] == states

    experiment = tb.poll(
        "/data/plugin/hparams/experiment", EXPERIMENT, lambda e: e.get("hparamInfos")
    )
    hparams = {h["name"] for h in experiment["hparamInfos"]}
    assert {"trial.state", "trial.number", "optim.lr", "model", "model.hidden"} <= hparams
    metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert {"trial/value", "val/acc", "test/acc"} <= metrics

    groups = tb.poll(
        "/data/plugin/hparams/session_groups",
        _groups_request(),
        lambda g: len(g.get("sessionGroups", [])) == 8,
    )["sessionGroups"]
    for group in groups:
        number = int(group["hparams"]["trial.number"])
        row = table[number]
        assert group["hparams"]["trial.state"] == row["state"]
        assert group["hparams"]["optim.lr"] == pytest.approx(float(row["params_optim.lr"]))
        assert group["hparams"]["model"] == row["params_model"]
        assert [s["status"] for s in group["sessions"]] == [STATUS[row["state"]]]
        values = {m["name"]["tag"]: m["value"] for m in group.get("metricValues", [])}
        if row["state"] != "failed":  # the objective, or a pruned trial's last value
            assert values["trial/value"] == pytest.approx(float(row["value"]), rel=1e-6)
        if row["state"] == "complete":
            assert values["test/acc"] == pytest.approx(float(row["test/acc"]), rel=1e-5)

    curve = tb.poll(
        "/data/plugin/scalars/scalars?run=study&tag=study/best_value",
        None,
        lambda c: isinstance(c, list) and len(c) == 8,
    )
    best = [value for _, _, value in curve]
    assert best == sorted(best)  # maximize: never goes down
    top = max(float(r["value"]) for r in table.values() if r["state"] == "complete")
    assert best[-1] == pytest.approx(top, rel=1e-6)


def test_hparams_lists_the_swept_params_and_trial_state_first_and_the_objective_first(
    sweep_dir, tb
):
    """The HPARAMS tab shows the first five hparams as served, differing ones first (the server
    sorts by (not differs, name)), and the first five metrics in the order served."""
    experiment = _loaded_experiment(tb)
    infos = {h["name"]: h for h in experiment["hparamInfos"]}
    differing = {name for name, h in infos.items() if h.get("differs")}
    assert differing == SWEPT | {"trial.state"}
    order = [h["name"] for h in experiment["hparamInfos"]]
    assert order[:3] == ["model", "optim.lr", "trial.state"]
    # The constants are still there, after them (shown unchecked beyond the first five).
    constants = {"data.batch_size", "data.n_classes", "trainer.max_epochs", "model.hidden"}
    assert constants <= set(order[3:]) and len(order) > 20

    assert infos["trial.state"]["domainDiscrete"] == ["complete", "pruned", "failed"]
    assert sorted(infos["model"]["domainDiscrete"]) == ["cnn", "mlp"]  # checkboxes too
    assert "domainDiscrete" not in infos["optim.lr"]  # a number: min / max fields

    tags = [m["name"]["tag"] for m in experiment["metricInfos"]]
    assert tags[:2] == ["val/acc", "trial/value"]  # the objective, then its per-trial value

    # Unticking "complete" and "failed" is a discrete filter on trial.state: the pruned trials.
    only_pruned = {"hparam": "trial.state", "filterDiscrete": ["pruned"], "includeInResult": True}
    groups = tb.poll(
        "/data/plugin/hparams/session_groups",
        _groups_request([only_pruned]),
        lambda g: len(g.get("sessionGroups", [])) == 2,
    )["sessionGroups"]
    assert {g["hparams"]["trial.state"] for g in groups} == {"pruned"}


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_a_screenshot_of_the_hparams_tab(sweep_dir, tb, tmp_path):
    """A PNG of what a user sees (kept under the test's tmp dir; the path is printed): the swept
    params and trial.state are the first columns."""
    _loaded_experiment(tb)
    png = tmp_path / "hparams.png"
    subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--window-size=1600,1000",
            "--virtual-time-budget=15000",
            f"--screenshot={png}",
            f"http://127.0.0.1:{tb.port}/#hparams",
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1600, 1000)
    print(f"HPARAMS screenshot: {png}")


def _optuna_dashboard() -> str | None:
    here = Path(sys.executable).parent / "optuna-dashboard"
    return str(here) if here.exists() else shutil.which("optuna-dashboard")


@pytest.mark.skipif(_optuna_dashboard() is None, reason="optuna-dashboard is not installed")
def test_optuna_dashboard_names_the_objective(sweep_dir):
    port = _free_port()
    proc = subprocess.Popen(
        [
            _optuna_dashboard(),
            str(sweep_dir / "study.journal"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def get(route: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{route}", timeout=30) as response:
            return response.read()

    try:
        deadline, studies = time.time() + 60, None
        while studies is None:  # the server starts, then reads the journal
            assert proc.poll() is None, "optuna-dashboard exited"
            assert time.time() < deadline, "optuna-dashboard did not answer"
            try:
                studies = json.loads(get("/api/studies"))["study_summaries"]
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        (study,) = studies
        assert study["study_name"] == "S"
        # What its pages label the objective with (else "Objective 0").
        detail = json.loads(get(f"/api/studies/{study['study_id']}"))
        assert detail["objective_names"] == ["val/acc"]
        header = get(f"/csv/{study['study_id']}").decode().splitlines()[0].split(",")
        assert header[:3] == ["Number", "State", "val/acc"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_study_names_each_objective_also_a_resumed_one(tmp_path):
    """With several objectives (search.metrics) each is named; a study made before the names
    were set gets them when the sweep resumes it."""
    import optuna

    from engine.search import storage as st
    from engine.search.driver import open_study
    from engine.search.spec import Spec

    storage = st.open_storage(str(tmp_path / "study.journal"))
    two = Spec(
        sweep_dir=str(tmp_path),
        config_dir="",
        config_name="train",
        metrics=["val/acc", "val/ece"],
        directions=["maximize", "minimize"],
    )
    study, resumed = open_study(storage, "two", two)
    assert not resumed and study.metric_names == ["val/acc", "val/ece"]
    optuna.create_study(study_name="old", storage=storage, directions=["maximize"])
    one = Spec(sweep_dir=str(tmp_path), config_dir="", config_name="train")
    study, resumed = open_study(storage, "old", one)
    assert resumed
    assert optuna.load_study(study_name="old", storage=storage).metric_names == ["val/acc"]

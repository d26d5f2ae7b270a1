"""`tensorboard --logdir <sweep dir>` shows every trial in HPARAMS with its params, final metrics
and state, and the study's best-so-far curve: checked through a real TensorBoard server's HTTP
data API on 127.0.0.1 (the routes the dashboard itself calls)."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

STATUS = {"complete": "STATUS_SUCCESS", "pruned": "STATUS_UNKNOWN", "failed": "STATUS_FAILURE"}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A grid run in order by one worker: four complete trials, then lr=1e-5 (pruned by the
    median rule at its second epoch), then lr=1e8 without clipping (NaN: failed)."""
    from conftest import run_cli

    s = tmp_path_factory.mktemp("tb") / "S"
    result = run_cli(
        "-m",
        "search=grid",
        "optim.lr=choice(3e-2,1e-2,3e-3,1e-3,1e-5,1e8)",
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


def test_every_trial_is_in_hparams_with_its_state_and_the_study_run_has_the_best_curve(
    sweep_dir,
):
    with (sweep_dir / "summary.csv").open() as f:
        table = {int(r["number"]): r for r in csv.DictReader(f)}
    assert [table[n]["state"] for n in range(6)] == ["complete"] * 4 + ["pruned", "failed"]

    with TensorBoard(sweep_dir) as tb:
        experiment = tb.poll(
            "/data/plugin/hparams/experiment",
            {"experimentName": "", "includeMetrics": True},
            lambda e: e.get("hparamInfos"),
        )
        hparams = {h["name"] for h in experiment["hparamInfos"]}
        assert {"trial.state", "trial.number", "optim.lr", "model.hidden"} <= hparams
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {"trial/value", "val/acc", "test/acc"} <= metrics

        request = {
            "experimentName": "",
            "allowedStatuses": list(STATUS.values()) + ["STATUS_RUNNING"],
            "colParams": [],
            "startIndex": 0,
            "sliceSize": 100,
            "includeMetrics": True,
        }
        groups = tb.poll(
            "/data/plugin/hparams/session_groups",
            request,
            lambda g: len(g.get("sessionGroups", [])) == 6,
        )["sessionGroups"]
        for group in groups:
            number = int(group["hparams"]["trial.number"])
            row = table[number]
            assert group["hparams"]["trial.state"] == row["state"]
            assert group["hparams"]["optim.lr"] == pytest.approx(float(row["params_optim.lr"]))
            assert [s["status"] for s in group["sessions"]] == [STATUS[row["state"]]]
            values = {m["name"]["tag"]: m["value"] for m in group.get("metricValues", [])}
            if row["state"] != "failed":  # the objective, or a pruned trial's last value
                assert values["trial/value"] == pytest.approx(float(row["value"]), rel=1e-6)
            if row["state"] == "complete":
                assert values["test/acc"] == pytest.approx(float(row["test/acc"]), rel=1e-5)

        curve = tb.poll(
            "/data/plugin/scalars/scalars?run=study&tag=study/best_value",
            None,
            lambda c: isinstance(c, list) and len(c) == 6,
        )
        best = [value for _, _, value in curve]
        assert best == sorted(best)  # maximize: never goes down
        top = max(float(r["value"]) for r in table.values() if r["state"] == "complete")
        assert best[-1] == pytest.approx(top, rel=1e-6)

"""Drift monitoring (engine/monitor): a feature shifted by one standard deviation alarms alone,
unshifted held-out rows raise nothing, the sliding window and the prediction log behave, and
`python -m engine.monitor` reports a CSV or a log end to end and refuses bad input by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, run_cli

from engine.data import split_table
from engine.model_source import ModelSource
from engine.monitor import PredictionLog, Reference, Window, compare, read_log

SHIFTED_PIXEL = "pixel_3_4"


def _monitor_cli(*args: str):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    return subprocess.run(
        [sys.executable, "-m", "engine.monitor", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _trained(tmp_path_factory, data: str, epochs: int) -> SimpleNamespace:
    run = tmp_path_factory.mktemp("monitor") / data
    r = run_cli(
        f"data={data}", f"trainer.max_epochs={epochs}", "trainer.progress=none",
        "trainer.num_threads=1", "data.batch_size=128", f"hydra.run.dir={run}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    loaded = ModelSource(str(run)).load()
    ref = Reference.build(loaded.reference, loaded.predictor)
    table = split_table(loaded.predictor.cfg.data)
    return SimpleNamespace(run=run, ref=ref, table=table, sd=loaded.reference["x"].std(axis=0))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return _trained(tmp_path_factory, "digits", 3)


@pytest.fixture(scope="module")
def wine(tmp_path_factory):
    return _trained(tmp_path_factory, "wine", 1)


def _report(fx, x, **kw):
    predicted, confidence = fx.ref.predict(x)
    return compare(fx.ref, x, predicted, confidence, **kw)


def _alarmed_features(report) -> list[str]:
    return [f.name for f in report.features if f.alarm]


def test_a_wine_feature_shifted_one_sd_alarms_by_ks_that_feature_and_no_other(wine):
    # val + test (54 rows): against 124 training rows, a 1-sd shift needs about 50 to be seen.
    held = wine.table.x[np.concatenate([wine.table.val, wine.table.test])]
    for j, name in enumerate(wine.ref.feature_names):
        shifted = held.copy()
        shifted[:, j] += wine.sd[j]
        report = _report(wine, shifted)
        assert report.features[j].test == "ks"
        assert _alarmed_features(report) == [name], name
        assert name in report.alarms


def test_a_digits_pixel_shifted_one_sd_alarms_by_chi_square_that_pixel_and_no_other(digits):
    j = digits.ref.feature_names.index(SHIFTED_PIXEL)
    shifted = digits.table.x[digits.table.test].copy()
    shifted[:, j] += digits.sd[j]
    report = _report(digits, shifted)
    assert report.features[j].kind == "categorical" and report.features[j].test == "chi2"
    assert _alarmed_features(report) == [SHIFTED_PIXEL]
    assert report.threshold == pytest.approx(0.05 / 64)


@pytest.mark.parametrize("name", ["digits", "wine"])
def test_the_unshifted_test_split_raises_no_alarm(name, request):
    fx = request.getfixturevalue(name)
    rows = fx.table.x[fx.table.test]  # digits 270 rows, wine 27
    report = _report(fx, rows, min_rows=20)
    assert report.enough and len(report.features) == len(fx.ref.feature_names)
    assert report.alarms == []


def test_a_constant_pixel_at_its_reference_value_is_not_drifting(digits):
    report = _report(digits, digits.table.x[digits.table.test])
    corner = report.features[digits.ref.feature_names.index("pixel_0_0")]  # always 0
    assert corner.p_value == 1.0 and corner.psi == 0.0 and not corner.alarm


def test_psi_is_small_unshifted_and_large_for_the_shifted_pixel(digits):
    rows = digits.table.x[digits.table.test]
    unshifted = _report(digits, rows)
    assert np.mean([f.psi for f in unshifted.features]) < 0.1
    assert max(f.psi for f in unshifted.features) < 0.25
    j = digits.ref.feature_names.index(SHIFTED_PIXEL)
    shifted = rows.copy()
    shifted[:, j] += digits.sd[j]
    assert _report(digits, shifted).features[j].psi > 0.25


def test_prediction_drift_alarms_when_the_window_holds_one_class_only(digits):
    t = digits.table
    held = np.concatenate([t.val, t.test])
    zeros = held[t.y[held] == 0]
    report = _report(digits, t.x[zeros])
    assert report.prediction.alarm and "prediction" in report.alarms
    assert report.prediction.test == "chi2"
    assert 0 < report.prediction.reference_mean_confidence <= 1
    balanced = _report(digits, t.x[t.test])
    assert not balanced.prediction.alarm


def test_fewer_rows_than_min_rows_runs_no_test_and_the_dict_is_plain_json(digits):
    rows = digits.table.x[digits.table.test[:10]]
    report = _report(digits, rows)
    assert not report.enough and report.alarms == [] and report.prediction is None
    body = report.to_dict()
    assert body["rows"] == 10 and body["enough"] is False
    json.dumps(body, allow_nan=False)
    full = _report(digits, digits.table.x[digits.table.test]).to_dict()
    json.dumps(full, allow_nan=False)
    assert {"name", "kind", "test", "statistic", "p_value", "psi", "alarm"} <= set(
        full["features"][0]
    )


def test_the_window_keeps_the_last_capacity_rows_oldest_first():
    win = Window(capacity=5, n_features=2)
    assert len(win) == 0
    for start in (0, 3, 6):  # 3 rows at a time: wraps around the ring
        ids = np.arange(start, start + 3)
        win.add(np.stack([ids, -ids], axis=1), ids, ids / 10)
    x, predicted, confidence = win.snapshot()
    assert len(win) == 5
    assert predicted.tolist() == [4, 5, 6, 7, 8] and predicted.dtype == np.int64
    assert x[:, 0].tolist() == [4, 5, 6, 7, 8] and x[:, 1].tolist() == [-4, -5, -6, -7, -8]
    assert confidence == pytest.approx([0.4, 0.5, 0.6, 0.7, 0.8])
    win.add(np.zeros((7, 2)), np.arange(100, 107), None)  # more rows than it holds
    assert win.snapshot()[1].tolist() == [102, 103, 104, 105, 106]


def test_the_window_loses_and_tears_no_row_when_threads_add_while_another_reads():
    threads, per_thread = 8, 500
    win = Window(capacity=threads * per_thread, n_features=3)
    stop = threading.Event()
    torn = []

    def reader():
        while not stop.is_set():
            x, predicted, _ = win.snapshot()
            if not (np.all(x[:, 0] == predicted) and np.all(x[:, 2] == predicted)):
                torn.append(True)

    def writer(k: int):
        for start in range(0, per_thread, 25):
            ids = k * per_thread + start + np.arange(25)
            win.add(np.stack([ids, ids * 0, ids], axis=1), ids, None)

    watcher = threading.Thread(target=reader)
    watcher.start()
    workers = [threading.Thread(target=writer, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    watcher.join()
    _, predicted, confidence = win.snapshot()
    assert not torn
    assert sorted(predicted.tolist()) == list(range(threads * per_thread))
    assert confidence is None


def _write_rows(log: PredictionLog, n: int = 4, start: int = 0) -> np.ndarray:
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2) + start
    log.write(
        "m", "1", "/predict", [f"r{start + i}" for i in range(n)], [str(i) for i in range(n)],
        list(range(n)), [0.5] * n, x,
    )  # fmt: skip
    return x


def test_the_prediction_log_writes_no_inputs_unless_asked_one_line_per_row(tmp_path):
    path = tmp_path / "logs" / "predictions.jsonl"
    log = PredictionLog(path, ["a", "b"], log_inputs=False)
    _write_rows(log)
    log.close()
    log.close()  # idempotent
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 4
    assert all("inputs" not in line for line in lines)
    assert lines[2]["request_id"] == "r2" and lines[2]["class_index"] == 2
    assert lines[2]["predicted"] == "2" and lines[2]["time"].endswith("Z")
    x, predicted, confidence = read_log(path)
    assert x is None and predicted.tolist() == [0, 1, 2, 3]
    assert confidence.tolist() == [0.5] * 4


def test_the_prediction_log_with_inputs_round_trips_through_read_log(tmp_path):
    path = tmp_path / "predictions.jsonl"
    with PredictionLog(path, ["a", "b"], log_inputs=True) as log:
        first = _write_rows(log, 3)
        second = _write_rows(log, 2, start=10)
    assert json.loads(path.read_text().splitlines()[0])["inputs"] == {"a": 0.0, "b": 1.0}
    x, predicted, _ = read_log(path, ["a", "b"])
    assert np.array_equal(x, np.concatenate([first, second]))
    assert predicted.tolist() == [0, 1, 2, 0, 1]


def test_the_prediction_log_reaches_the_file_within_a_second_or_two_before_close(tmp_path):
    path = tmp_path / "predictions.jsonl"
    log = PredictionLog(path, ["a", "b"], log_inputs=False)
    try:
        _write_rows(log)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and path.read_text().count("\n") < 4:
            time.sleep(0.05)
        assert path.read_text().count("\n") == 4
    finally:
        log.close()


@pytest.fixture(scope="module")
def digits_csvs(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("csv")
    t, names = digits.table, digits.ref.feature_names
    frame = pd.DataFrame(t.x[t.test], columns=names)
    frame["target"] = t.y[t.test]  # a column that is not a feature: ignored
    frame.to_csv(folder / "test.csv", index=False)
    j = names.index(SHIFTED_PIXEL)
    frame[SHIFTED_PIXEL] = frame[SHIFTED_PIXEL] + digits.sd[j]
    frame.to_csv(folder / "shifted.csv", index=False)
    frame.drop(columns=["pixel_0_0"]).to_csv(folder / "lacking.csv", index=False)
    return folder


def test_cli_reports_the_shifted_feature_in_a_table_and_exits_0(digits, digits_csvs):
    r = _monitor_cli(f"model={digits.run}", f"input={digits_csvs / 'shifted.csv'}")
    assert r.returncode == 0, r.stderr
    assert f"ALARM {SHIFTED_PIXEL}" in r.stdout
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("ALARM")] == [
        f"{SHIFTED_PIXEL}:"
    ]
    assert "p-value" in r.stdout and "PSI" in r.stdout


def test_cli_fail_on_drift_exits_3_and_writes_the_json_report(digits, digits_csvs, tmp_path):
    out = tmp_path / "reports" / "drift.json"
    r = _monitor_cli(
        f"model={digits.run}", f"input={digits_csvs / 'shifted.csv'}", "fail_on_drift=true",
        f"output={out}", "monitor.window=200",
    )  # fmt: skip
    assert r.returncode == 3, r.stderr
    body = json.loads(out.read_text())
    assert body["alarms"] == [SHIFTED_PIXEL] and body["rows"] == 200
    assert [p.name for p in out.parent.iterdir()] == ["drift.json"]  # no temporary left


def test_cli_on_unshifted_rows_of_a_registered_model_finds_no_drift(
    digits, digits_csvs, tmp_path, capsys
):
    from engine.registry.cli import main as registry

    db = tmp_path / "registry.db"
    assert (
        registry(["register", str(digits.run), "--name", "digits-mlp", "--storage", str(db)]) == 0
    )
    capsys.readouterr()
    r = _monitor_cli(
        "model=digits-mlp@1", f"registry.storage={db}", f"input={digits_csvs / 'test.csv'}",
        "fail_on_drift=true",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    assert "no drift alarm" in r.stdout and "digits-mlp@1" in r.stdout


def test_cli_on_a_log_without_inputs_reports_prediction_drift_only(digits, tmp_path):
    t = digits.table
    held = np.concatenate([t.val, t.test])
    predicted, confidence = digits.ref.predict(t.x[held[t.y[held] == 0]])
    path = tmp_path / "predictions.jsonl"
    with PredictionLog(path, digits.ref.feature_names, log_inputs=False) as log:
        log.write("digits", "1", "/predict", "req", [str(p) for p in predicted],
                  predicted.tolist(), confidence.tolist(), None)  # fmt: skip
    r = _monitor_cli(f"model={digits.run}", f"input={path}", "fail_on_drift=true")
    assert r.returncode == 3, r.stderr
    assert "prediction drift only" in r.stdout and "ALARM prediction" in r.stdout


def test_cli_names_a_missing_column(digits, digits_csvs):
    r = _monitor_cli(f"model={digits.run}", f"input={digits_csvs / 'lacking.csv'}")
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and "'pixel_0_0'" in r.stderr


def test_cli_names_an_unknown_key_and_the_one_meant():
    r = _monitor_cli("model=x", "input=y.csv", "monitor.pvalue=0.01")
    assert r.returncode == 2
    assert "error: unknown key 'monitor.pvalue'" in r.stderr and "monitor.p_value" in r.stderr


def test_cli_refuses_a_model_without_a_reference_sample_and_says_why(digits, tmp_path):
    stale = tmp_path / "stale_run"
    shutil.copytree(digits.run, stale, ignore=shutil.ignore_patterns("tb"))
    card = json.loads((stale / "data_card.json").read_text())
    card["fingerprint"] = "0" * 64  # as if the training data changed since the run
    (stale / "data_card.json").write_text(json.dumps(card))
    (tmp_path / "rows.csv").write_text("a\n1\n")
    r = _monitor_cli(f"model={stale}", f"input={tmp_path / 'rows.csv'}")
    assert r.returncode == 2
    assert r.stderr.startswith("error:")
    assert "no reference sample" in r.stderr and "changed since the run" in r.stderr


def test_a_regression_model_gets_ks_on_its_predicted_values_and_no_confidence(tmp_path_factory):
    diabetes = _trained(tmp_path_factory, "diabetes", 1)
    rows = diabetes.table.x[diabetes.table.test]
    report = _report(diabetes, rows)
    assert report.prediction.test == "ks" and report.prediction.mean_confidence is None
    assert _alarmed_features(report) == []
    j = 2  # bmi
    shifted = rows.copy()
    shifted[:, j] += diabetes.sd[j]
    assert _alarmed_features(_report(diabetes, shifted)) == [diabetes.ref.feature_names[j]]


def test_read_log_skips_a_last_line_cut_short_by_a_crash(tmp_path):
    path = tmp_path / "predictions.jsonl"
    with PredictionLog(path, ["a", "b"]) as log:
        _write_rows(log, 2)
    with path.open("a") as f:
        f.write('{"time": "2026-')  # the server died mid-write
    assert read_log(path)[1].tolist() == [0, 1]


def _record(i: int) -> str:
    return json.dumps({"model": "digits", "version": "1", "predicted": "3", "class_index": 3,
                       "confidence": 0.9, "request_id": f"r{i}"})  # fmt: skip


@pytest.mark.parametrize(
    "name, text, named",
    [
        ("garbage.jsonl", _record(0) + "\nnot json at all\n" + _record(1) + "\n", "line 2"),
        ("array.jsonl", _record(0) + "\n[1, 2, 3]\n", "line 2"),
        ("other_model.jsonl", _record(0).replace('"class_index": 3', '"class_index": 42') + "\n",
         "class_index"),
        ("empty.jsonl", "", "no records"),
        ("rows.txt", "a,b\n1,2\n", ".csv"),
    ],
)  # fmt: skip
def test_cli_names_what_is_wrong_with_a_bad_prediction_log_exit_2(
    digits, tmp_path, name, text, named
):
    path = tmp_path / name
    path.write_text(text)
    r = _monitor_cli(f"model={digits.run}", f"input={path}")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error:") and named in r.stderr, r.stderr
    assert "Traceback" not in r.stderr

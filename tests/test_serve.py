"""`python -m engine.serve`: the Open Inference Protocol (V2) and /predict over real HTTP on
127.0.0.1, bad input answered 4xx while the server keeps serving, /metrics read with
prometheus_client's own parser, the bearer token, and drift seen live.

The models are trained once for the module (digits, two versions in an SQLite registry; a wine
CSV with string labels served from its run dir). Each server is a real process
(tests/serving.py). The swap under load, overload and shutdown are in test_serve_load.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from prometheus_client.parser import text_string_to_metric_families
from serving import ServerProcess
from test_registry import train  # the same tiny training runs

from engine import predictor
from engine.data import split_table

WINE_NAMES = ["barolo", "grignolino", "barbera"]


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


def _registry(db: Path, *argv: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "engine.registry", *argv],
        cwd=REPO,
        env=_env(ENGINE_REGISTRY_STORAGE=str(db)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


class Models:
    def __init__(self, root: Path):
        self.root = root
        self.digits_a = root / "digits_a"
        self.digits_b = root / "digits_b"
        self.wine_csv = root / "wine.csv"
        self.wine = root / "wine"
        self.db = root / "registry.db"


def wine_csv(path: Path) -> None:
    from sklearn.datasets import load_wine

    data = load_wine(as_frame=True)
    frame = data.frame.drop(columns="target")
    frame["cultivar"] = [WINE_NAMES[i] for i in data.target]
    frame.to_csv(path, index=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    m = Models(tmp_path_factory.mktemp("serve"))
    wine_csv(m.wine_csv)
    procs = [
        train(m.digits_a, "trainer.max_epochs=2"),
        train(m.digits_b, "trainer.max_epochs=1", "optim.lr=0.01"),
        train(
            m.wine,
            "data=csv",
            f"data.path={m.wine_csv}",
            "data.target=cultivar",
            "trainer.max_epochs=3",
        ),
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    _registry(m.db, "register", str(m.digits_a), "--name", "digits-mlp")
    _registry(m.db, "register", str(m.digits_b), "--name", "digits-mlp")
    _registry(m.db, "promote", "digits-mlp@1", "--alias", "production")
    return m


@pytest.fixture(scope="module")
def digits(models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    server = ServerProcess(
        "model=digits-mlp@production",
        "serve.poll_s=0",
        "serve.drift_every_s=0.3",
        "serve.max_rows=100",
        "serve.max_body_bytes=200000",
        f"serve.log_dir={logs}",
        "monitor.window=270",
        env={"ENGINE_REGISTRY_STORAGE": str(models.db)},
    ).start()
    server.logs = logs
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(digits):
    with httpx.Client(base_url=digits.url, timeout=30) as c:
        yield c


def _test_rows(run: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The run's raw test rows as a frame with its feature columns, and their class indices."""
    p = predictor.load_run(run)
    table = split_table(p.cfg.data)
    frame = pd.DataFrame(table.x[table.test], columns=p.feature_names)
    return frame, table.y[table.test]


def _row_dicts(frame: pd.DataFrame) -> list[dict]:
    return [{k: float(v) for k, v in row.items()} for row in frame.to_dict("records")]


# --- the Open Inference Protocol, as its specification words it --------------------------------
# The shapes below are transcribed from the protocol's REST specification (KServe "Open
# Inference Protocol", HTTP/REST: $metadata_server_response, $metadata_model_response,
# $metadata_tensor, $inference_response, $response_output, $inference_error_response), not from
# our own code: a field is (JSON type, required).
SERVER_METADATA = {"name": (str, True), "version": (str, True), "extensions": (list, True)}
MODEL_METADATA = {
    "name": (str, True),
    "versions": (list, False),
    "platform": (str, True),
    "inputs": (list, True),
    "outputs": (list, True),
}
TENSOR_METADATA = {"name": (str, True), "datatype": (str, True), "shape": (list, True)}
INFERENCE_RESPONSE = {
    "model_name": (str, True),
    "model_version": (str, False),
    "id": (str, False),
    "parameters": (dict, False),
    "outputs": (list, True),
}
RESPONSE_OUTPUT = {
    "name": (str, True),
    "shape": (list, True),
    "datatype": (str, True),
    "parameters": (dict, False),
    "data": (list, True),
}
DATATYPES = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
DATATYPES |= {"FP16", "FP32", "FP64", "BYTES"}


def conforms(obj: dict, shape: dict) -> None:
    for key, (kind, required) in shape.items():
        if required:
            assert key in obj, f"{key} missing from {obj}"
        if key in obj:
            assert isinstance(obj[key], kind), f"{key}: {obj[key]!r} is not {kind.__name__}"


def test_health_endpoints_answer_200_and_the_server_metadata_has_the_protocols_shape(client):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    meta = client.get("/v2").json()
    conforms(meta, SERVER_METADATA)
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_lists_the_inputs_outputs_and_versions(client, digits):
    r = client.get("/v2/models/digits-mlp")
    assert r.status_code == 200
    meta = r.json()
    conforms(meta, MODEL_METADATA)
    for tensor in meta["inputs"] + meta["outputs"]:
        conforms(tensor, TENSOR_METADATA)
        assert tensor["datatype"] in DATATYPES
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert {t["name"] for t in meta["outputs"]} == {"label", "probabilities", "confidence"}
    assert client.get("/v2/models/digits-mlp/versions/1").json() == meta
    assert client.get("/v2/models/digits-mlp/ready").status_code == 200
    assert client.get("/v2/models/digits-mlp/versions/1/ready").status_code == 200
    missing = client.get("/v2/models/digits-mlp/versions/7")
    assert missing.status_code == 404 and "error" in missing.json()


def test_infer_answers_in_the_protocols_shape_what_the_run_dir_predicts(client, models):
    frame, _ = _test_rows(models.digits_a)
    rows = frame.iloc[:5]
    body = {
        "id": "req-1",
        "inputs": [
            {
                "name": "input",
                "shape": [5, 64],
                "datatype": "FP32",
                "data": rows.to_numpy().reshape(-1).tolist(),
            }
        ],
    }
    r = client.post("/v2/models/digits-mlp/infer", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    conforms(answer, INFERENCE_RESPONSE)
    for out in answer["outputs"]:
        conforms(out, RESPONSE_OUTPUT)
    assert answer["id"] == "req-1" and answer["model_version"] == "1"
    assert r.headers["engine-model-version"] == "1"
    outputs = {o["name"]: o for o in answer["outputs"]}
    expected = predictor.load_run(models.digits_a).predict(rows)
    assert outputs["label"]["data"] == expected.labels
    assert outputs["probabilities"]["shape"] == [5, 10]
    probs = np.array(outputs["probabilities"]["data"]).reshape(5, 10)
    np.testing.assert_allclose(probs, expected.probabilities, rtol=1e-5, atol=1e-6)


def test_one_tensor_per_feature_gives_the_same_answer_as_one_matrix(client, models):
    frame, _ = _test_rows(models.digits_a)
    rows = frame.iloc[:3]
    by_feature = {
        "inputs": [
            {"name": name, "shape": [3, 1], "datatype": "FP64", "data": rows[name].tolist()}
            for name in rows.columns
        ],
        "outputs": [{"name": "probabilities"}],
    }
    matrix = {
        "inputs": [
            {"name": "input", "shape": [3, 64], "datatype": "FP32", "data": rows.values.tolist()}
        ],
        "outputs": [{"name": "probabilities"}],
    }
    a = client.post("/v2/models/digits-mlp/infer", json=by_feature).json()["outputs"]
    b = client.post("/v2/models/digits-mlp/infer", json=matrix).json()["outputs"]
    assert [o["name"] for o in a] == ["probabilities"]
    np.testing.assert_allclose(a[0]["data"], b[0]["data"], rtol=1e-6)


def test_tritons_own_http_client_works_unchanged_binary_tensors_included(digits, models):
    import tritonclient.http as triton

    frame, _ = _test_rows(models.digits_a)
    x = frame.iloc[:4].to_numpy(np.float32)
    c = triton.InferenceServerClient(digits.url.removeprefix("http://"))
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("digits-mlp")
    assert c.get_model_metadata("digits-mlp")["versions"] == ["1"]
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # binary by default, and the outputs come back binary
    result = c.infer("digits-mlp", [tensor])
    expected = predictor.load_run(models.digits_a).predict(frame.iloc[:4])
    assert [v.decode() for v in result.as_numpy("label")] == expected.labels
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), expected.probabilities, rtol=1e-5, atol=1e-6
    )


def test_predict_round_trips_string_labels_from_raw_csv_rows(models):
    raw = pd.read_csv(models.wine_csv)
    rows = raw.drop(columns="cultivar").iloc[::20]
    with ServerProcess(f"model={models.wine}", "serve.poll_s=0") as server:
        with httpx.Client(base_url=server.url) as c:
            body = {"rows": [{k: v for k, v in r.items()} for r in rows.to_dict("records")]}
            # a CSV cell is text: numbers given as strings are read as numbers
            body["rows"][0] = {k: str(v) for k, v in body["rows"][0].items()}
            r = c.post("/predict", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model_name"] == server.name == "wine"
    expected = predictor.load_run(models.wine).predict(rows)
    got = [p["label"] for p in answer["predictions"]]
    assert got == expected.labels and set(got) <= set(WINE_NAMES)
    first = answer["predictions"][0]
    assert set(first["probabilities"]) == set(WINE_NAMES)
    assert first["confidence"] == pytest.approx(max(first["probabilities"].values()))
    assert first["probabilities"][first["label"]] == first["confidence"]


def test_regression_predict_answers_in_the_targets_units(tmp_path):
    run = tmp_path / "diabetes"
    p = train(run, "data=diabetes", "trainer.max_epochs=2")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    frame, _ = _test_rows(run)
    rows = frame.iloc[:6]
    with ServerProcess(f"model={run}", "serve.poll_s=0") as server:
        r = httpx.post(f"{server.url}/predict", json={"rows": _row_dicts(rows)})
        meta = httpx.get(f"{server.url}/v2/models/{server.name}").json()
    assert r.status_code == 200, r.text
    values = [p["value"] for p in r.json()["predictions"]]
    expected = predictor.load_run(run).predict(rows).outputs
    np.testing.assert_allclose(values, expected, rtol=1e-5)
    assert meta["outputs"] == [{"name": "value", "datatype": "FP32", "shape": [-1]}]


# --- bad input: a 4xx naming the field, and the server goes on serving -------------------------
def _good(features: list[str]) -> dict:
    return {"rows": [{f: 1.0 for f in features}]}


def _bad_requests(features: list[str]) -> dict[str, tuple[str, bytes, int, str]]:
    """name: (path, body, status, the field the answer must name)."""
    row = {f: 1.0 for f in features}
    first = features[0]
    missing = dict(row)
    del missing[first]
    infer = "/v2/models/digits-mlp/infer"

    def tensor(**kw) -> bytes:
        t = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 64}
        t.update(kw)
        return json.dumps({"inputs": [t]}).encode()

    def rows(*r) -> bytes:
        return json.dumps({"rows": list(r)}).encode()

    return {
        "missing feature": ("/predict", rows(missing), 422, f"rows.0.{first}"),
        "extra feature": ("/predict", rows(dict(row, colour=3)), 422, "rows.0.colour"),
        "non-numeric cell": (
            "/predict",
            rows(dict(row, **{first: "dark"})),
            422,
            f"rows.0.{first}",
        ),
        "null cell": ("/predict", rows(dict(row, **{first: None})), 422, f"rows.0.{first}"),
        "NaN": ("/predict", rows(row).replace(b"1.0", b"NaN", 1), 422, f"rows.0.{first}"),
        "infinity": ("/predict", rows(row).replace(b"1.0", b"Infinity", 1), 422, f"rows.0.{first}"),
        "empty batch": ("/predict", rows(), 422, "rows"),
        "not JSON": ("/predict", b'{"rows": [', 422, "body"),
        "misspelt key": ("/predict", json.dumps({"row": [row]}).encode(), 422, "row"),
        "too many rows": ("/predict", rows(*[row] * 101), 413, "rows"),
        "body too large": ("/predict", b" " * 200001, 413, "body"),
        "wrong shape": (infer, tensor(shape=[1, 63], data=[1.0] * 63), 422, "inputs.0.shape"),
        "shape and data disagree": (infer, tensor(shape=[2, 64]), 422, "inputs.0.shape"),
        "wrong datatype": (infer, tensor(datatype="BYTES"), 422, "inputs.0.datatype"),
        "unknown datatype": (infer, tensor(datatype="FLOAT"), 422, "inputs.0.datatype"),
        "text in a tensor": (infer, tensor(data=["a"] * 64), 422, "inputs.0.data"),
        "NaN in a tensor": (infer, tensor().replace(b"1.0", b"NaN", 1), 422, f"inputs.{first}"),
        "empty tensor": (infer, tensor(shape=[0, 64], data=[]), 422, "inputs"),
        "no inputs": (infer, json.dumps({"inputs": []}).encode(), 422, "inputs"),
        "unknown output": (
            infer,
            json.dumps(
                {"inputs": json.loads(tensor())["inputs"], "outputs": [{"name": "logits"}]}
            ).encode(),
            422,
            "outputs.0.name",
        ),
    }


BAD = list(_bad_requests([f"pixel_{r}_{c}" for r in range(8) for c in range(8)]))


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_a_4xx_naming_the_field_and_the_next_request_is_served(client, case):
    features = client.get("/model").json()["features"]
    path, body, status, field = _bad_requests(features)[case]
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    answer = r.json()
    assert answer["field"] == field, answer
    assert answer["error"]
    good = client.post("/predict", json=_good(features))
    assert good.status_code == 200


def test_a_model_not_served_here_is_a_404_and_an_unknown_path_too(client):
    assert client.post("/v2/models/other/infer", json={}).status_code == 404
    r = client.get("/v3/things")
    assert r.status_code == 404 and "error" in r.json()


# --- metrics, docs, logs -------------------------------------------------------------------------
def _metrics(client) -> dict[str, list]:
    text = client.get("/metrics").text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_metrics_parse_with_prometheus_clients_parser_and_count_what_happened(client):
    features = client.get("/model").json()["features"]
    for _ in range(3):
        assert client.post("/predict", json=_good(features)).status_code == 200
    client.post("/predict", content=b"{")
    m = _metrics(client)
    by_label = {(s.labels["endpoint"], s.labels["status"]): s.value for s in m["engine_requests"]}
    assert by_label[("/predict", "200")] >= 3
    assert by_label[("/predict", "422")] >= 1
    latency = [s for s in m["engine_request_seconds"] if s.name.endswith("_count")]
    assert any(s.labels["endpoint"] == "/predict" and s.value >= 3 for s in latency)
    assert any(s.name == "engine_batch_rows_count" and s.value >= 3 for s in m["engine_batch_rows"])
    assert [s.value for s in m["engine_queue_depth"]] == [0.0]
    assert sum(s.value for s in m["engine_predicted_class"]) >= 3
    assert {s.labels["version"] for s in m["engine_model_info"]} == {"1"}


def test_the_openapi_document_describes_the_request_bodies_and_docs_render(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert "rows" in body["schema"]["properties"]
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]
    assert "inputs" in infer["content"]["application/json"]["schema"]["properties"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_the_prediction_log_holds_predictions_but_no_inputs_by_default(client, digits):
    features = client.get("/model").json()["features"]
    r = client.post("/predict", json={"id": "logged-1", **_good(features)})
    assert r.status_code == 200
    log = digits.logs / "digits-mlp" / "predictions.jsonl"
    deadline = 50
    lines: list[dict] = []
    for _ in range(deadline):
        if log.is_file():
            lines = [json.loads(x) for x in log.read_text().splitlines()]
            if any(x["request_id"] == "logged-1" for x in lines):
                break
        import time

        time.sleep(0.1)
    mine = [x for x in lines if x["request_id"] == "logged-1"]
    assert len(mine) == 1
    assert mine[0]["predicted"] == r.json()["predictions"][0]["label"]
    assert mine[0]["version"] == "1"
    assert all("inputs" not in x for x in lines)


# --- drift, live -------------------------------------------------------------------------------
def test_shifting_one_feature_raises_its_drift_alarm_on_the_endpoint_metrics_and_log(
    client, digits, models
):
    frame, _ = _test_rows(models.digits_a)
    train = predictor.load_run(models.digits_a)
    shifted = frame.copy()
    feature = "pixel_3_4"  # a central pixel: varied in the training rows
    column = train.feature_names.index(feature)
    std = float(train.info.feature_std[column])
    shifted[feature] = shifted[feature] + std
    rows = _row_dicts(shifted)
    assert len(rows) == 270  # the whole test split fills the window (monitor.window=270)
    for start in range(0, len(rows), 50):
        assert client.post("/predict", json={"rows": rows[start : start + 50]}).status_code == 200
    drift = client.get("/v2/models/digits-mlp/drift").json()
    assert drift["available"] and drift["model_version"] == "1"
    assert drift["alarms"] == [feature] or set(drift["alarms"]) - {"prediction"} == {feature}
    digits.wait_for_line(rf"drift alarm: digits-mlp version 1, {feature}")
    m = _metrics(client)
    alarms = {s.labels["feature"]: s.value for s in m["engine_drift_alarm"]}
    assert alarms[feature] == 1
    assert sum(v for k, v in alarms.items() if k not in (feature, "prediction")) == 0


# --- the command line --------------------------------------------------------------------------
def _serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.serve", *args],
        cwd=REPO,
        env=_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_it_listens_on_127_0_0_1_unless_told_otherwise(digits):
    assert digits.url.startswith("http://127.0.0.1:")


@pytest.mark.parametrize(
    "args, named",
    [
        (["model=digits-mlp@staging"], "staging"),
        (["model=/no/such/run"], "/no/such/run"),
        (["model=digits-mlp@production", "serve.max_batchsize=8"], "serve.max_batch_size"),
        (["model=digits-mlp@production", "serve.token=hunter2"], "ENGINE_SERVE_TOKEN"),
        (["serve.port=8080"], "model"),
        (["model=digits-mlp@production", "device=cuda:x"], "device='cuda:x'"),
    ],
)
def test_a_bad_argument_is_an_error_naming_it_exit_2(models, args, named):
    done = _serve(*args, env={"ENGINE_REGISTRY_STORAGE": str(models.db)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and named in done.stderr
    assert "hunter2" not in done.stderr


def test_a_port_in_use_is_an_error_naming_it(digits, models):
    port = digits.url.rsplit(":", 1)[1]
    done = _serve(
        "model=digits-mlp@production",
        f"serve.port={port}",
        env={"ENGINE_REGISTRY_STORAGE": str(models.db)},
    )
    assert done.returncode == 2 and f"serve.port={port}" in done.stderr


# --- the token ----------------------------------------------------------------------------------
def test_a_token_guards_every_endpoint_but_health_and_admin_reload_needs_it(models):
    token = "s3cret-token-for-the-test"
    with ServerProcess(
        "model=digits-mlp@production",
        "serve.poll_s=0",
        env={"ENGINE_REGISTRY_STORAGE": str(models.db), "ENGINE_SERVE_TOKEN": token},
    ) as server:
        with httpx.Client(base_url=server.url) as c:
            assert c.get("/v2/health/live").status_code == 200
            assert c.get("/v2/health/ready").status_code == 200
            for method, path in [
                ("GET", "/v2/models/digits-mlp"),
                ("POST", "/predict"),
                ("GET", "/metrics"),
                ("GET", "/docs"),
                ("POST", "/admin/reload"),
            ]:
                r = c.request(method, path)
                assert r.status_code == 401, (path, r.text)
                assert r.headers["www-authenticate"].startswith("Bearer")
                wrong = c.request(method, path, headers={"authorization": "Bearer nope"})
                assert wrong.status_code == 401
            auth = {"authorization": f"Bearer {token}"}
            assert c.get("/v2/models/digits-mlp", headers=auth).status_code == 200
            reload = c.post("/admin/reload", headers=auth)
            assert reload.status_code == 200, reload.text
            assert reload.json()["model_version"] == "1"
        assert token not in server.log
    # Without a token the admin endpoints refuse outright.
    with ServerProcess(
        "model=digits-mlp@production",
        "serve.poll_s=0",
        env={"ENGINE_REGISTRY_STORAGE": str(models.db)},
    ) as server:
        assert httpx.post(f"{server.url}/admin/reload").status_code == 403


# --- under load: the live swap, overload, graceful shutdown --------------------------------------
def _registry_copy(models: Models, folder: Path) -> Path:
    """A registry of its own for a test that moves aliases (the versions' files are shared:
    each version records its store's absolute path)."""
    import shutil

    db = folder / "registry.db"
    shutil.copy(models.db, db)
    return db


class Load:
    """``clients`` threads posting the same rows to /predict until stopped; every answer (or
    exception) kept with its time."""

    def __init__(self, url: str, body: dict, clients: int, timeout: float = 30):
        import threading

        self.url, self.body, self.timeout = url, body, timeout
        self.answers: list[list[tuple[float, int, dict | None]]] = [[] for _ in range(clients)]
        self.errors: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)
        ]

    def _client(self, i: int) -> None:
        import time

        with httpx.Client(base_url=self.url, timeout=self.timeout) as c:
            while not self.stop.is_set():
                try:
                    r = c.post("/predict", json=self.body)
                except httpx.HTTPError as err:
                    self.errors.append((time.monotonic(), repr(err)))
                    if self.stop.wait(0.05):
                        return
                    continue
                body = r.json() if r.headers.get("content-type") == "application/json" else None
                self.answers[i].append((time.monotonic(), r.status_code, body))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def all(self) -> list[tuple[float, int, dict | None]]:
        return [a for client in self.answers for a in client]


def _wait_until(predicate, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_promote_and_rollback_swap_the_version_under_load_with_no_failed_request(models, tmp_path):
    db = _registry_copy(models, tmp_path)
    frame, _ = _test_rows(models.digits_a)
    rows = frame.iloc[:4]
    expected = {
        "1": predictor.load_run(models.digits_a).predict(rows).probabilities,
        "2": predictor.load_run(models.digits_b).predict(rows).probabilities,
    }
    assert not np.allclose(expected["1"], expected["2"])
    env = {"ENGINE_REGISTRY_STORAGE": str(db)}
    with ServerProcess("model=digits-mlp@production", "serve.poll_s=0.2", env=env) as server:
        with Load(server.url, {"rows": _row_dicts(rows)}, clients=6) as load:
            _wait_until(lambda: len(load.all()) > 50)
            _registry(db, "promote", "digits-mlp@2", "--alias", "production")
            server.wait_for_line(r"swapped digits-mlp version 1 -> 2")
            mark = len(load.all())
            _wait_until(lambda: len(load.all()) > mark + 50)
            _registry(db, "rollback", "digits-mlp", "--alias", "production")
            server.wait_for_line(r"swapped digits-mlp version 2 -> 1")
            mark = len(load.all())
            _wait_until(lambda: len(load.all()) > mark + 50)
    answers = load.all()
    assert load.errors == []
    assert {status for _, status, _ in answers} == {200}
    for _, _, body in answers:  # each answer is wholly the version it names
        version = body["model_version"]
        probs = np.array(
            [[p["probabilities"][str(c)] for c in range(10)] for p in body["predictions"]]
        )
        np.testing.assert_allclose(probs, expected[version], rtol=1e-5, atol=1e-6)
    for client in load.answers:  # each client sees 1, then 2, then 1 again: no flapping
        versions = [body["model_version"] for _, _, body in sorted(client, key=lambda a: a[0])]
        changes = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
        assert changes in (["1", "2", "1"], ["1", "2"], ["2", "1"], ["1"]), changes
    seen = [body["model_version"] for _, _, body in sorted(answers, key=lambda a: a[0])]
    assert "2" in seen and seen[-1] == "1"


def test_an_overloaded_server_answers_503_with_retry_after_and_recovers(models):
    import asyncio

    frame, _ = _test_rows(models.digits_a)
    body = {"rows": _row_dicts(frame.iloc[:200])}
    env = {"ENGINE_REGISTRY_STORAGE": str(models.db)}
    args = ["serve.max_queue=2", "serve.max_batch_size=1", "serve.max_wait_ms=0", "serve.poll_s=0"]

    async def burst(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
            return await asyncio.gather(*[c.post("/predict", json=body) for _ in range(300)])

    with ServerProcess("model=digits-mlp@production", *args, env=env) as server:
        answers = asyncio.run(burst(server.url))
        after = httpx.post(f"{server.url}/predict", json=body, timeout=30)
        metrics = httpx.get(f"{server.url}/metrics").text
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(503) > 0 and statuses.count(200) > 0
    refused = next(r for r in answers if r.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    assert "serve.max_queue" in refused.json()["error"]
    assert after.status_code == 200
    overloaded = next(
        f for f in text_string_to_metric_families(metrics) if f.name == "engine_overloaded"
    )
    assert overloaded.samples[0].value == statuses.count(503)


def test_sigterm_finishes_the_requests_in_flight_then_exits_0(models):
    import signal
    import time

    frame, _ = _test_rows(models.digits_a)
    body = {"rows": _row_dicts(pd.concat([frame] * 3).iloc[:800])}
    env = {"ENGINE_REGISTRY_STORAGE": str(models.db)}
    server = ServerProcess("model=digits-mlp@production", "serve.poll_s=0", env=env).start()
    try:
        with Load(server.url, body, clients=12) as load:
            _wait_until(lambda: len(load.all()) > 20)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(60) == 0
    finally:
        server.kill()
    answers = load.all()
    assert {status for _, status, _ in answers} <= {200, 503}
    finished_after = [a for a in answers if a[0] > signalled and a[1] == 200]
    assert finished_after, "no request in flight at SIGTERM was answered"
    assert "stopped" in server.log
    assert "Traceback" not in server.log


def test_engine_predict_writes_what_the_server_answers(client, models, tmp_path):
    frame, _ = _test_rows(models.digits_a)
    rows = frame.iloc[:40]
    csv = tmp_path / "rows.csv"
    rows.to_csv(csv, index=False)
    out = tmp_path / "preds.parquet"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.predict",
            "model=digits-mlp@production",
            f"input={csv}",
            f"output={out}",
            "chunk_rows=16",
        ],
        cwd=REPO,
        env=_env(ENGINE_REGISTRY_STORAGE=str(models.db)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    written = pd.read_parquet(out)
    served = client.post("/predict", json={"rows": _row_dicts(rows)}).json()["predictions"]
    assert written["label"].tolist() == [p["label"] for p in served]
    np.testing.assert_allclose(
        written["confidence"].to_numpy(), [p["confidence"] for p in served], rtol=1e-6
    )
    for c in range(10):
        np.testing.assert_allclose(
            written[f"prob_{c}"].to_numpy(),
            [p["probabilities"][str(c)] for p in served],
            rtol=1e-6,
            atol=1e-7,
        )

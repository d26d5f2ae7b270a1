"""The FastAPI application: the Open Inference Protocol routes, ``/predict``, ``/metrics``,
drift and admin, and the error bodies.

Every answer about the model says which version gave it (in the body, and in the
``engine-model-version`` header). Bad input is a 4xx with ``{"error": ..., "field": ...}`` naming
the part of the body at fault, never a 500, and never reaches the model. Bodies are read and
checked here (pydantic on the raw bytes) instead of through FastAPI's body parameters: it is
several times cheaper per request, and the request schemas still appear in ``/docs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.model_source import ModelSource
from engine.monitor import PredictionLog
from engine.serve import protocol, rows
from engine.serve.batcher import Batcher, Overloaded
from engine.serve.metrics import Metrics
from engine.serve.middleware import BearerToken, BodyLimit, BodyTooLarge, RequestMetrics, refusal
from engine.serve.options import ServeOptions
from engine.serve.protocol import BadInput
from engine.serve.slot import BatchResult, ModelSlot, Served

log = logging.getLogger("engine.serve")
# Request ids for the prediction log when the client sent none: unique per process start
# without a system call per request (uuid4 reads the OS's random source each time).
_ID_PREFIX = uuid.uuid4().hex[:12]
_ids = itertools.count(1)
SERVER_NAME = "engine"
JSON = "application/json"


@dataclass
class State:
    """What the routes share; one per application."""

    options: ServeOptions
    slot: ModelSlot
    batcher: Batcher
    metrics: Metrics
    log: PredictionLog
    draining: bool = False
    tasks: list[asyncio.Task] = field(default_factory=list)
    alarms: set[str] = field(default_factory=set)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body).encode(), status, headers, media_type=JSON)


def _error(err: BadInput) -> Response:
    return _json({"error": str(err), "field": err.field}, err.status)


def _overloaded(state: State, err: Overloaded) -> Response:
    state.metrics.rejected.inc()
    retry = str(state.options.serve.retry_after_s)
    return _json(
        {"error": f"the server is overloaded ({err}); retry after {retry} s."},
        503,
        {"retry-after": retry},
    )


def _version_headers(served: Served) -> dict[str, str]:
    return {"engine-model-name": served.name, "engine-model-version": served.version}


def _unknown_model(served: Served, name: str, version: str | None = None) -> Response:
    if name != served.name:
        message = f"model {name!r} is not served here; this server serves {served.name!r}."
    else:
        message = (
            f"version {version!r} of {name!r} is not served here; this server serves version "
            f"{served.version}."
        )
    return _json({"error": message}, 404)


def _body_schema(model: type) -> dict[str, Any]:
    """An OpenAPI request body for a pydantic model, for routes that read their body raw (its
    sub-schemas inlined, so the document needs no extra components)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"required": True, "content": {JSON: {"schema": inline(schema)}}}


def create_app(
    options: ServeOptions, source: ModelSource, first: Served, device: torch.device
) -> FastAPI:
    s = options.serve
    metrics = Metrics(s.max_batch_size)

    def on_swap(old: Served, new: Served) -> None:
        metrics.swaps.inc()
        metrics.serving(new.name, new.version, previous=old.version)

    slot = ModelSlot(source, device, options.name, options.monitor, first, on_swap)

    def run(x: np.ndarray) -> BatchResult:
        served = slot.current  # taken once: the whole batch runs on this version
        result = served.run(x)
        metrics.predicted(
            served.name, served.version, result.class_index, result.values, served.class_names
        )
        return result

    batcher = Batcher(
        run,
        max_batch_size=s.max_batch_size,
        max_wait_ms=s.max_wait_ms,
        max_queue=s.max_queue,
        on_batch=metrics.batch_rows.observe,
    )
    prediction_log = PredictionLog(
        _log_path(options, first), first.feature_names, log_inputs=s.log_inputs
    )
    state = State(options, slot, batcher, metrics, prediction_log)
    metrics.serving(first.name, first.version)
    metrics.queue_depth.set_function(lambda: batcher.depth)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # Everything loaded so far (torch, the model, the libraries) lives as long as the
        # process: moved out of the collector's sight, a full collection under load scans only
        # what requests allocate, instead of pausing every request for ~100 ms.
        gc.collect()
        gc.freeze()
        batcher.start()
        if s.poll_s > 0:
            state.tasks.append(asyncio.create_task(slot.watch(s.poll_s, _reload_failed(state))))
        if s.drift_every_s > 0:
            state.tasks.append(asyncio.create_task(_drift_loop(state)))
        try:
            yield
        finally:
            state.draining = True
            for task in state.tasks:
                task.cancel()
            await asyncio.gather(*state.tasks, return_exceptions=True)
            await batcher.close(s.shutdown_timeout_s)
            prediction_log.close()

    app = FastAPI(
        title="engine.serve",
        summary="A registered model over the Open Inference Protocol (V2), with /predict",
        version="1",
        lifespan=lifespan,
        **_no_telemetry(),
    )
    app.state.engine = state
    _routes(app, state)
    _error_handlers(app, state)
    # Outermost first at call time: metrics, then the token, then the body limit.
    app.add_middleware(BodyLimit, limit=s.max_body_bytes)
    app.add_middleware(BearerToken, token=s.token)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


def _no_telemetry() -> dict[str, Any]:
    """FastAPI's own OpenTelemetry instrumentation, off where FastAPI has it (0.16x): it costs
    tens of microseconds per request, and the server exports its metrics on /metrics."""
    import inspect

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    off = ("tracing", "metrics", "logs", "operation_spans")
    return {"telemetry": dict.fromkeys(off, False)}


def _log_path(options: ServeOptions, served: Served):
    from pathlib import Path

    return Path(options.serve.log_dir).expanduser() / served.name / "predictions.jsonl"


def _reload_failed(state: State):
    def failed(err: Exception) -> None:
        state.metrics.reload_failures.inc()
        log.error("reload failed, %s keeps serving: %s", state.slot.current.version, err)

    return failed


async def _drift_loop(state: State) -> None:
    while True:
        await asyncio.sleep(state.options.serve.drift_every_s)
        try:
            await _drift_now(state)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a statistics failure must not stop serving
            log.error("drift statistics failed: %s", err)


async def _drift_now(state: State):
    served = state.slot.current
    report = await asyncio.to_thread(served.drift, state.options.monitor)
    if report is None:
        return served, None
    state.metrics.drift(served.name, report)
    raised = set(report.alarms)
    for name in sorted(raised - state.alarms):
        log.warning(
            "drift alarm: %s version %s, %s (window of %d rows; threshold p < %.3g)",
            served.name,
            served.version,
            name,
            report.rows,
            report.threshold,
        )
    for name in sorted(state.alarms - raised):
        log.info("drift alarm cleared: %s, %s", served.name, name)
    state.alarms = raised
    return served, report


def _error_handlers(app: FastAPI, state: State) -> None:
    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, err: BodyTooLarge):
        return JSONResponse(refusal(f"over {err.limit}", err.limit), 413)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return JSONResponse(
            {"error": f"{where}: {first.get('msg', 'invalid')}", "field": where}, 422
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        message = err.detail
        if err.status_code == 404:
            message = f"no such endpoint {request.url.path}; the endpoints are listed at /docs."
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        return JSONResponse({"error": message}, err.status_code, headers=err.headers)


def _routes(app: FastAPI, state: State) -> None:
    _health_routes(app, state)
    _inference_routes(app, state)
    _monitoring_routes(app, state)
    _admin_routes(app, state)


def _health_routes(app: FastAPI, state: State) -> None:
    slot = state.slot

    # --- health and metadata (Open Inference Protocol) ---------------------------------------
    @app.get("/v2/health/live", tags=["health"])
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready", tags=["health"])
    async def ready():
        if state.draining:
            return _json({"ready": False}, 503)
        return {"ready": True}

    @app.get("/v2", tags=["v2"])
    async def server_metadata():
        return protocol.ServerMetadata(
            name=SERVER_NAME, version="1", extensions=["binary_tensor_data"]
        ).model_dump()

    def metadata(served: Served) -> dict[str, Any]:
        return protocol.ModelMetadata(
            name=served.name,
            versions=[served.version],
            platform="pytorch",
            inputs=[
                protocol.TensorMetadata(
                    name=protocol.SINGLE_INPUT,
                    datatype="FP32",
                    shape=[-1, len(served.feature_names)],
                )
            ],
            outputs=protocol.outputs_metadata(served.task, len(served.class_names)),
        ).model_dump()

    @app.get("/v2/models/{name}", tags=["v2"])
    async def model_metadata(name: str):
        served = slot.current
        if name != served.name:
            return _unknown_model(served, name)
        return _json(metadata(served), headers=_version_headers(served))

    @app.get("/v2/models/{name}/versions/{version}", tags=["v2"])
    async def version_metadata(name: str, version: str):
        served = slot.current
        if name != served.name or version != served.version:
            return _unknown_model(served, name, version)
        return _json(metadata(served), headers=_version_headers(served))

    @app.get("/v2/models/{name}/ready", tags=["v2"])
    async def model_ready(name: str):
        served = slot.current
        if name != served.name:
            return _unknown_model(served, name)
        return _json(
            {"name": name, "ready": not state.draining}, 200 if not state.draining else 503
        )

    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["v2"])
    async def version_ready(name: str, version: str):
        served = slot.current
        if name != served.name or version != served.version:
            return _unknown_model(served, name, version)
        return _json(
            {"name": name, "ready": not state.draining}, 200 if not state.draining else 503
        )


async def _take(state: State, request: Request, parse) -> tuple[Any, np.ndarray, Any] | Response:
    """Read and check a request's body (``parse(body, headers) -> (request, rows)``, a
    ``BadInput`` for a 4xx), then queue its rows for the model: (request, rows, (batch result,
    start, stop)), or the 4xx or 503 response."""
    batcher = state.batcher
    batcher.arriving += 1  # the batcher waits for a request on its way in (see batcher.py)
    try:
        req, x = parse(await request.body(), request.headers)
    except BadInput as err:
        return _error(err)
    finally:
        batcher.arriving -= 1
    try:
        return req, x, await batcher.submit(x)
    except Overloaded as err:
        return _overloaded(state, err)


async def _infer(state: State, request: Request, name: str, version: str | None) -> Response:
    s, slot = state.options.serve, state.slot
    served = slot.current
    if name != served.name or (version is not None and version != served.version):
        return _unknown_model(served, name, version)

    def parse(body: bytes, headers: Any) -> tuple[Any, np.ndarray]:
        req, tail = protocol.parse_request(body, headers.get("inference-header-content-length"))
        x = protocol.features_of(req, tail, served.feature_names, s.max_rows)
        names = protocol.output_tensors(served.task, len(served.class_names), req.outputs)
        return (req, names), x

    taken = await _take(state, request, parse)
    if isinstance(taken, Response):
        return taken
    (req, names), x, (result, lo, hi) = taken
    answered = result.served
    wanted = {o.name: o for o in req.outputs or []}
    tensors = {
        "label": (lambda: result.labels[lo:hi], "BYTES"),
        "probabilities": (lambda: result.probabilities[lo:hi], "FP32"),
        "confidence": (lambda: result.confidence[lo:hi], "FP32"),
        "value": (lambda: result.values[lo:hi], "FP32"),
    }
    outputs, binary = [], []
    for out_name in names:
        values, datatype = tensors[out_name]
        part, raw = protocol.encode_output(
            out_name, values(), datatype, protocol.wants_binary(req, wanted.get(out_name))
        )
        outputs.append(part)
        binary.append(raw)
    _log(state, answered, "infer", req.id, result, lo, hi, x)
    response: dict[str, Any] = {
        "model_name": answered.name,
        "model_version": answered.version,
        "outputs": outputs,
    }
    if req.id is not None:
        response["id"] = req.id
    head = json.dumps(response).encode()
    headers = _version_headers(answered)
    tail_bytes = b"".join(binary)
    if not tail_bytes:
        return Response(head, 200, headers, media_type=JSON)
    headers["inference-header-content-length"] = str(len(head))
    return Response(head + tail_bytes, 200, headers, media_type="application/octet-stream")


async def _predict(state: State, request: Request) -> Response:
    s, slot = state.options.serve, state.slot
    served = slot.current

    def parse(body: bytes, headers: Any) -> tuple[Any, np.ndarray]:
        req = rows.parse_request(body)
        return req, rows.features_of(req, served.feature_names, s.max_rows)

    taken = await _take(state, request, parse)
    if isinstance(taken, Response):
        return taken
    req, x, (result, lo, hi) = taken
    answered = result.served
    _log(state, answered, "predict", req.id, result, lo, hi, x)
    body = rows.answer(
        answered.name,
        answered.version,
        req.id,
        result.labels[lo:hi] if result.labels is not None else None,
        result.probabilities[lo:hi] if result.probabilities is not None else None,
        result.confidence[lo:hi] if result.confidence is not None else None,
        result.values[lo:hi] if result.values is not None else None,
        answered.class_names,
    )
    return _json(body, headers=_version_headers(answered))


def _inference_routes(app: FastAPI, state: State) -> None:
    slot = state.slot
    infer_doc = _body_schema(protocol.InferenceRequest)

    @app.post(
        "/v2/models/{name}/infer",
        tags=["v2"],
        openapi_extra={"requestBody": infer_doc},
    )
    async def model_infer(request: Request, name: str):
        return await _infer(state, request, name, None)

    @app.post(
        "/v2/models/{name}/versions/{version}/infer",
        tags=["v2"],
        openapi_extra={"requestBody": infer_doc},
    )
    async def version_infer(request: Request, name: str, version: str):
        return await _infer(state, request, name, version)

    predict_doc = _body_schema(rows.PredictRequest)

    @app.post(
        "/predict",
        tags=["predict"],
        summary="Rows as the training CSV had them in; labels, probabilities, confidence out",
        openapi_extra={"requestBody": predict_doc},
    )
    async def predict(request: Request):
        return await _predict(state, request)

    @app.get("/model", tags=["predict"], summary="The served model: features, classes, version")
    async def model_card():
        served = slot.current
        info = served.predictor.info
        return _json(
            {
                "model_name": served.name,
                "model_version": served.version,
                "source": slot.source.describe(),
                "task": served.task,
                "features": served.feature_names,
                "classes": served.class_names if served.task != "regression" else None,
                "device": str(served.predictor.device),
                "drift_reference_rows": (
                    int(len(served.loaded.reference["x"])) if served.loaded.reference else 0
                ),
                "num_features": info.num_features,
            },
            headers=_version_headers(served),
        )


def _monitoring_routes(app: FastAPI, state: State) -> None:
    slot = state.slot

    @app.get("/v2/models/{name}/drift", tags=["monitoring"])
    async def drift(name: str):
        served = slot.current
        if name != served.name:
            return _unknown_model(served, name)
        served, report = await _drift_now(state)
        body: dict[str, Any] = {"model_name": served.name, "model_version": served.version}
        if report is None:
            body.update(
                available=False,
                reason=f"no reference sample: {served.loaded.reference_reason}",
            )
        else:
            body.update(available=True, **report.to_dict())
        return _json(body, headers=_version_headers(served))

    @app.get("/metrics", tags=["monitoring"])
    async def prometheus_metrics():
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _admin_routes(app: FastAPI, state: State) -> None:
    s, slot = state.options.serve, state.slot

    @app.post("/admin/reload", tags=["admin"], summary="Load what model= names now and swap")
    async def reload():
        if s.token is None:
            return _json(
                {
                    "error": "admin endpoints need a token: start the server with the "
                    "environment variable ENGINE_SERVE_TOKEN set."
                },
                403,
            )
        started = time.perf_counter()
        try:
            swapped, previous = await slot.reload(force=True)
        except Exception as err:
            state.metrics.reload_failures.inc()
            log.error("reload failed, %s keeps serving: %s", slot.current.version, err)
            return _json(
                {"error": f"reload failed, the previous version keeps serving: {err}"}, 409
            )
        served = slot.current
        return _json(
            {
                "model_name": served.name,
                "model_version": served.version,
                "previous_version": previous,
                "seconds": round(time.perf_counter() - started, 3),
            },
            headers=_version_headers(served),
        )


def _log(
    state: State,
    served: Served,
    endpoint: str,
    request_id: str | None,
    result: BatchResult,
    lo: int,
    hi: int,
    x: np.ndarray,
) -> None:
    rid = request_id or f"{_ID_PREFIX}-{next(_ids)}"
    n = hi - lo
    if result.values is not None:
        predicted = result.values[lo:hi].tolist()
        index = confidence = None
    else:
        predicted = result.labels[lo:hi]
        index = result.class_index[lo:hi].tolist()
        confidence = result.confidence[lo:hi].tolist()
    state.log.write(
        served.name,
        served.version,
        endpoint,
        [rid] * n,
        predicted,
        index,
        confidence,
        x if state.options.serve.log_inputs else None,
    )

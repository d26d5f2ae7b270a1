"""Serving: a registered model (or a run dir) over HTTP.

    python -m engine.serve model=digits-mlp@production

options.py     the command line's typed schema (serve.*, monitor.*)
protocol.py    the Open Inference Protocol (KServe V2) request and response bodies, tensors
rows.py        the friendly /predict body: rows as the training CSV had them
batcher.py     dynamic batching: many requests, one model call, a bounded queue
slot.py        the model being served and its live swap to a new version
metrics.py     the Prometheus metrics, drift statistics included
middleware.py  what every request goes through: body size limit, bearer token, request metrics
app.py         the FastAPI application: routes and error bodies
__main__.py    load, then run uvicorn until SIGTERM (graceful)
"""

"""``python -m engine.serve model=<registered model | run dir> [serve.port=8080] [serve.*=...]``.

Loads the model (a bad argument or model is ``error: ...``, exit code 2, before anything
listens), binds 127.0.0.1:8080 unless told otherwise, and serves until SIGTERM or Ctrl-C: then it
stops accepting connections, reports not ready, and finishes the requests in flight (up to
``serve.shutdown_timeout_s``) before it exits.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys

import torch
import uvicorn

from engine.config import ConfigError
from engine.dataset import DataError
from engine.model_source import ModelSource
from engine.serve.app import create_app
from engine.serve.options import parse
from engine.serve.slot import build
from engine.train import USER_ERRORS
from engine.trainer import pick_device


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app it drains as soon as the signal comes (readiness
    turns 503 while the requests in flight finish)."""

    def handle_exit(self, sig, frame):  # noqa: ANN001 (uvicorn's signature)
        state = getattr(self.config.app, "state", None)
        engine_state = getattr(state, "engine", None) if state is not None else None
        if engine_state is not None:
            engine_state.draining = True
        super().handle_exit(sig, frame)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"serve.host={host} serve.port={port}: cannot listen there ({err.strerror}); pick "
            f"another port (serve.port=8081) or stop what holds it."
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        options = parse(sys.argv[1:] if argv is None else argv)
        if options.serve.threads > 0:
            torch.set_num_threads(options.serve.threads)
        device = pick_device(options.device, key="device")
        source = ModelSource(
            options.model, options.checkpoint, options.registry.storage, options.registry.store
        )
        first = build(source, device, options.name, options.monitor)
        sock = _bind(options.serve.host, options.serve.port)
    except (*USER_ERRORS, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    app = create_app(options, source, first, device)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {first.name} version {first.version} ({source.describe()}) on "
        f"http://{shown}:{port} ({device}; batches of up to {options.serve.max_batch_size} rows, "
        f"{'token required' if options.serve.token else 'no token'}); docs at /docs",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,  # per-request lines cost throughput; /metrics counts requests
        timeout_graceful_shutdown=options.serve.shutdown_timeout_s,
        lifespan="on",
    )
    # uvicorn handles SIGTERM and SIGINT while it serves (graceful shutdown), then raises the
    # signal again under the handler found before it started: with these, the process goes on
    # to say it stopped and exits 0 instead of dying of the signal it has already handled.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    _Server(config).run(sockets=[sock])
    print("stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

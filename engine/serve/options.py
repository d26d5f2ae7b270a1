"""``python -m engine.serve``'s command line: ``key=value`` arguments on a typed schema."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from omegaconf import MISSING

from engine.config import ConfigError, check_device
from engine.keyvalue import parse as parse_key_values
from engine.model_source import RegistrySettings
from engine.monitor.options import MonitorSettings

TOKEN_ENV = "ENGINE_SERVE_TOKEN"
_ENV_REFERENCE = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    """The address to listen on; 0.0.0.0 (every interface) only when told, e.g. in a pod."""
    port: int = 8080
    max_batch_size: int = 64
    """Rows per model call at most (a larger request runs alone)."""
    max_wait_ms: float = 2.0
    """How long the oldest queued request waits, at most, for its batch to fill."""
    max_queue: int = 256
    """Requests waiting for the model at most; beyond, 503 with Retry-After."""
    retry_after_s: int = 1
    max_body_bytes: int = 1_048_576
    """A larger request body is refused with 413 before it is read."""
    max_rows: int = 1024
    """Rows per request at most (413 beyond)."""
    token: str | None = None
    """Bearer token for every endpoint but health, and for the admin ones. Only from the
    environment: the variable ENGINE_SERVE_TOKEN, or another named as '${oc.env:VAR}'."""
    log_inputs: bool = False
    """Also write each row's inputs to the prediction log (rows may hold personal data)."""
    log_dir: str = "outputs/serve"
    """The prediction log is <log_dir>/<model name>/predictions.jsonl."""
    poll_s: float = 5.0
    """How often to look whether the alias moved (0: never; POST /admin/reload still works)."""
    drift_every_s: float = 10.0
    """How often the drift statistics on /metrics are recomputed (and alarms logged)."""
    shutdown_timeout_s: float = 30.0
    """On SIGTERM, how long requests in flight get to finish."""
    threads: int = 0
    """torch's CPU threads (0: torch's default)."""


@dataclass
class ServeOptions:
    model: str = MISSING
    """A registered model (digits-mlp@production, digits-mlp@3) or a run dir."""
    name: str | None = None
    """The name it is served under (default: the registered name, or the run dir's)."""
    checkpoint: str = "best"
    device: str = "auto"
    serve: ServeSettings = field(default_factory=ServeSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)


def _token(argv: list[str]) -> str | None:
    given = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("serve.token=")]
    if not given:
        return os.environ.get(TOKEN_ENV) or None
    match = _ENV_REFERENCE.fullmatch(given[-1].strip())
    if not match:
        raise ConfigError(
            "serve.token: a token is refused as an argument (every user of this machine can "
            f"read a process's arguments). Put it in the environment variable {TOKEN_ENV} "
            "(read by default), or name another variable: serve.token='${oc.env:MY_VAR}'."
        )
    value = os.environ.get(match.group(1))
    if not value:
        raise ConfigError(f"serve.token: the environment variable {match.group(1)} is not set.")
    return value


def parse(argv: list[str]) -> ServeOptions:
    token = _token(argv)
    rest = [a for a in argv if not a.lstrip("+").startswith("serve.token=")]
    options = parse_key_values(ServeOptions, rest, example="model=digits-mlp@production")
    options.serve.token = token.strip() if token else None
    options.monitor.check()
    s = options.serve
    check_device("device", options.device)
    for key, value, low in (
        ("serve.max_batch_size", s.max_batch_size, 1),
        ("serve.max_queue", s.max_queue, 1),
        ("serve.max_rows", s.max_rows, 1),
        ("serve.max_body_bytes", s.max_body_bytes, 64),
        ("serve.port", s.port, 0),
        ("serve.retry_after_s", s.retry_after_s, 0),
        ("serve.threads", s.threads, 0),
    ):
        if value < low:
            raise ConfigError(f"{key}={value}: must be at least {low}.")
    for key, value in (
        ("serve.max_wait_ms", s.max_wait_ms),
        ("serve.poll_s", s.poll_s),
        ("serve.drift_every_s", s.drift_every_s),
        ("serve.shutdown_timeout_s", s.shutdown_timeout_s),
    ):
        if value < 0:
            raise ConfigError(f"{key}={value}: must be >= 0.")
    if s.port > 65535:
        raise ConfigError(f"serve.port={s.port}: ports go up to 65535.")
    return options

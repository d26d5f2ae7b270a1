"""A real ``python -m engine.serve`` process for the tests: started on a free port of
127.0.0.1, its stderr collected, stopped with SIGTERM (or killed)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import REPO

LISTENING = re.compile(r"serving (\S+) version (\S+) .* on http://(\S+):(\d+) ")


class ServerProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.args = ["serve.port=0", *args]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
        self.cwd = cwd or REPO
        self.lines: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.name = ""
        self.version = ""

    def start(self, timeout: float = 90) -> ServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.serve", *self.args],
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stderr:
                self.lines.append(line)
                match = LISTENING.search(line)
                if match:
                    self.name, self.version, host, port = match.groups()
                    self.url = f"http://{host}:{port}"
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError("the server did not start:\n" + self.log)
        if not self.url:
            self.proc.wait(30)
            raise AssertionError(f"the server exited {self.proc.returncode}:\n{self.log}")
        return self

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in:\n{self.log}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Dynamic batching: requests that arrive close together share one model call.

Each request's rows wait in a bounded queue; one worker takes whole requests off it, up to
``max_batch_size`` rows, and runs the model once on them in its own thread (the event loop keeps
reading and answering requests meanwhile, and a GPU model gets its batch in one launch). The
worker waits at most ``max_wait_ms`` after the oldest queued request for a batch to fill, and
not at all when no other request is on its way in (``arriving``): one client alone is answered
at once, many share batches. A request is never split across batches: one larger than
``max_batch_size`` rows runs alone.

The queue is bounded by ``max_queue`` requests: beyond that a request is refused at once with
``Overloaded`` (the server answers 503 with Retry-After), so under overload the latency of the
requests taken stays bounded instead of growing with the backlog.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np


class Overloaded(Exception):
    """The queue is full (or the server is shutting down): try again later."""


@dataclass
class _Waiting:
    x: np.ndarray
    future: asyncio.Future
    since: float


class Batcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], Any],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        on_batch: Callable[[int], None] | None = None,
    ):
        """``run(x)`` takes the batch's raw rows [n, F] and returns what each request gets a
        ``(result, start, stop)`` slice of; it runs in the model thread."""
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: deque[_Waiting] = deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine-model")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self.arriving = 0  # requests being read or checked, not yet queued
        self.running = 0  # requests in the model now

    @property
    def depth(self) -> int:
        """Requests waiting for the model."""
        return len(self._queue)

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._work(), name="engine-batcher")

    async def submit(self, x: np.ndarray) -> tuple[Any, int, int]:
        if self._closing:
            raise Overloaded("the server is shutting down")
        if len(self._queue) >= self.max_queue:
            raise Overloaded(
                f"{len(self._queue)} requests are queued (serve.max_queue={self.max_queue})"
            )
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(x, future, time.perf_counter()))
        self._wake.set()
        return await future

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = await self._collect()
                await self._run_batch(batch)

    async def _collect(self) -> list[_Waiting]:
        batch: list[_Waiting] = []
        rows = 0
        deadline = self._queue[0].since + self.max_wait
        while True:
            while self._queue and (
                not batch or rows + len(self._queue[0].x) <= self.max_batch_size
            ):
                item = self._queue.popleft()
                batch.append(item)
                rows += len(item.x)
            full = rows >= self.max_batch_size or bool(self._queue)
            if full or self.arriving == 0 or time.perf_counter() >= deadline:
                return batch
            await asyncio.sleep(0)  # one turn of the loop: requests on their way get queued

    async def _run_batch(self, batch: list[_Waiting]) -> None:
        x = batch[0].x if len(batch) == 1 else np.concatenate([b.x for b in batch])
        self.running = len(batch)
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, x)
        except Exception as err:  # the model failed: every request of the batch is told
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        finally:
            self.running = 0
        if self._on_batch is not None:
            self._on_batch(len(x))
        start = 0
        for item in batch:
            stop = start + len(item.x)
            if not item.future.done():  # its client may have gone
                item.future.set_result((result, start, stop))
            start = stop

    async def close(self, timeout: float = 30.0) -> None:
        """Refuse new requests, answer the queued ones, stop the worker."""
        self._closing = True
        end = time.perf_counter() + timeout
        while (self._queue or self.running) and time.perf_counter() < end:
            await asyncio.sleep(0.005)
        if self._task is not None:
            self._task.cancel()
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(Overloaded("the server is shutting down"))
        self._executor.shutdown(wait=True)

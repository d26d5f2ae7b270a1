"""Several processes registering and promoting at once against one registry lose nothing:
every version number 1..N exists exactly once, the alias points at an existing version, and
its history is one unbroken chain of moves. Real processes (spawned), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from pathlib import Path

import pytest
from test_registry import fresh_database, runs  # noqa: F401  (the module's trained runs)

from engine.registry import api, db
from engine.registry.refs import Ref

PROCESSES, ROUNDS = 4, 3


def _worker(storage: str, store: str, run_dir: str, barrier, results) -> None:
    """Register a version and promote it to production, ROUNDS times, all processes at once."""
    import torch

    torch.set_num_threads(1)
    barrier.wait(timeout=120)
    done = []
    with api.open_registry(storage, store) as reg:
        for _ in range(ROUNDS):
            number = api.register(reg, Path(run_dir), "shared").version
            promoted, _ = db.promote(reg.engine, Ref("shared", version=number), "production")
            done.append((number, promoted))
    results.put(done)


def _hammer(storage: str, store: str, run_dir: Path) -> list[tuple[int, int]]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(storage, store, str(run_dir), barrier, results))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    done, deadline = [], time.monotonic() + 240
    while len(done) < PROCESSES * ROUNDS:
        try:
            done += results.get(timeout=1)
        except queue.Empty:  # a worker that died fails the test now, not at the deadline
            assert not [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert time.monotonic() < deadline, "the workers did not finish in 240 s"
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return done


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        yield str(tmp_path / "registry.db")
        return
    with fresh_database() as url:
        yield url


def test_four_processes_registering_and_promoting_lose_nothing(runs, storage, tmp_path):  # noqa: F811
    done = _hammer(storage, str(tmp_path / "store"), runs.a)
    n = PROCESSES * ROUNDS
    assert sorted(number for number, _ in done) == list(range(1, n + 1))
    assert all(number == promoted for number, promoted in done)

    with api.open_registry(storage, str(tmp_path / "store")) as reg:
        versions = db.model_versions(reg.engine, "shared")
        assert [v.version for v in versions] == list(range(1, n + 1))
        current = db.resolve(reg.engine, Ref("shared", alias="production")).version
        events = db.history(reg.engine, "shared", "production")
    assert [e.action for e in events] == ["promote"] * n
    assert sorted(e.version for e in events) == list(range(1, n + 1))
    # Each move left the version the one before it had set: no move was lost or interleaved.
    assert [e.previous for e in events] == [None] + [e.version for e in events[:-1]]
    assert events[-1].version == current

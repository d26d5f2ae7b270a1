"""Sweep trials as DDP groups: ``search.gpus_per_trial=k`` trains each trial as k ranks.

The worker stays one process: it claims the trial, draws its params and composes its config as
for any trial (engine.search.worker), then launches k ranks with torch's own launcher machinery,
``elastic_launch`` with a standalone c10d rendezvous on 127.0.0.1 (what ``torchrun --standalone``
does). Each rank runs ``engine.train.run`` on that config in the trial's run dir, exactly as
``torchrun --nproc-per-node=k -m engine.train <the trial's overrides>`` would: it joins the
process group from the environment the launcher sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, ...; engine.distributed), NCCL on the GPU of its local rank, gloo on the CPU.

Rank 0 is the trial's voice: it opens the study's storage itself (a URL with a password comes
in ``$ENGINE_SEARCH_STORAGE``, never in an argument), reports the objective after every epoch
and asks the pruner. The verdict is broadcast inside the epoch callback, so every rank stops
after the same epoch, together (:class:`PruneSync`). The ranks' answers come back through
``elastic_launch``'s return values (rank 0's: the results, or where it was pruned), and the
worker tells the study the trial's end as it does for an in-process trial. A rank that crashes
or is killed makes the launcher stop the others; the trial fails with a one-line reason
(:class:`RankFailed`) and its traceback in the trial's train.log.

GPUs: on a machine with G visible GPUs the sweep runs G // k workers by default, worker w on
GPUs [w*k, (w+1)*k) (``gpu_slots``); :func:`check_gpus` refuses a k or an ``n_workers`` that
the GPUs cannot hold, before any compute. Without a GPU, the k ranks are gloo processes on the
CPU, each with ``max(1, worker threads // k)`` torch threads.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import ConfigError

log = logging.getLogger("engine.search")

# The signals elastic's agent takes over while its ranks run (LaunchConfig.signals_to_handle):
# it turns them into an exception that stops the ranks, and never hands them back.
_AGENT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
_PEER_GRACE_S = 1.0  # how long a failing rank looks for a peer that died before it (see _rank)
_AGENT_LOGGERS = (
    "torch.distributed.elastic",
    "torch.distributed.launcher",
    "torch.multiprocessing",
)
# What the ranks' forkserver imports once per worker (see launch): the engine and what its runs
# import on first use (torch's optimizers import dynamo, seconds of CPU; the embedded datasets,
# metrics, TensorBoard's figures, the kernels). A module that fails to import is skipped;
# nothing here may touch a GPU at import.
_PRELOAD = (
    "torch._dynamo",
    "engine.train",
    "engine.search.ddp",
    "engine.search.pruners",
    "engine.search.storage",
    "engine.metrics",
    "engine.plots",
    "kernels",
    "sklearn.datasets",
)


# --------------------------------------------------------------------------------------------
# GPUs per worker


def visible_gpus() -> list[str]:
    """The GPU ids this process may hand out (``CUDA_VISIBLE_DEVICES`` order); empty on CPU."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return [g.strip() for g in gpus if g.strip()]


def check_gpus(per_trial: int, n_workers: int | None, gpus: list[str]) -> None:
    """Refuse DDP trials that this machine's GPUs cannot hold (nothing to check on CPU, or with
    one GPU per trial, where workers share GPUs round-robin)."""
    if per_trial <= 1 or not gpus:
        return
    if len(gpus) < per_trial:
        raise ConfigError(
            f"search.gpus_per_trial={per_trial} but only {len(gpus)} GPU(s) are visible "
            f"({','.join(gpus)}); lower search.gpus_per_trial, or run the workers where "
            f"{per_trial} GPUs are (e.g. hydra/launcher=slurm_gpu)."
        )
    if n_workers is not None and n_workers * per_trial > len(gpus):
        raise ConfigError(
            f"search.n_workers={n_workers} x search.gpus_per_trial={per_trial} needs "
            f"{n_workers * per_trial} GPUs but {len(gpus)} are visible; set "
            f"search.n_workers={len(gpus) // per_trial} or less (or leave it unset)."
        )


def gpu_slots(per_trial: int, n_workers: int | None, gpus: list[str]) -> tuple[int, list[str]]:
    """(workers to start, each worker slot's ``CUDA_VISIBLE_DEVICES``). One GPU per trial: a
    GPU per worker, round-robin when there are more workers; k GPUs per trial: worker w gets
    GPUs [w*k, (w+1)*k), G // k workers by default. Empty slots: no GPU (CPU ranks)."""
    if per_trial <= 1:
        return n_workers or max(1, len(gpus)), gpus
    groups = [
        ",".join(gpus[w * per_trial : (w + 1) * per_trial]) for w in range(len(gpus) // per_trial)
    ]
    # No group: trainer.device=cpu on a machine with too few GPUs (check_gpus passed it), or CPU.
    return n_workers or max(1, len(groups)), groups


# --------------------------------------------------------------------------------------------
# launching k ranks


class RankFailed(RuntimeError):
    """A rank of a DDP trial crashed or was killed; the message says which and why, on one
    line (the traceback is in the trial's train.log)."""


def launch(
    nprocs: int, entrypoint: Callable[..., Any], *args: Any, start_method: str = "forkserver"
) -> dict[int, Any]:
    """Run ``entrypoint(*args)`` in ``nprocs`` processes joined as one DDP group, the way
    ``torchrun --standalone --nproc-per-node=nprocs`` starts them; return each rank's return
    value by rank. A rank that fails stops them all and raises :class:`RankFailed`; a signal to
    this process stops them and raises ``KeyboardInterrupt`` (the worker's "stopped").

    ``forkserver``: every rank of every trial is forked from one server process that imported
    torch and the engine once, as a worker runs its trials back to back; fresh interpreters
    would pay those imports (seconds of CPU) on every rank of every trial. The server is a
    fresh interpreter itself: it has none of the worker's threads, storage connections or CUDA
    state to copy. ``spawn``: a fresh interpreter per rank (what ranks on GPUs use, see
    run_ranks)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if start_method == "forkserver":
        multiprocessing.get_context("forkserver").set_forkserver_preload(list(_PRELOAD))
    with contextlib.ExitStack() as restore:
        restore.enter_context(_keep_signal_handlers())
        restore.enter_context(_quiet_agent())
        restore.enter_context(_env("TORCHELASTIC_SIGNALS_TO_HANDLE", None))  # it sets its own
        # The error files the ranks leave for the agent (its default folder is never removed),
        # and the ranks' own notes of their failures.
        logs = restore.enter_context(tempfile.TemporaryDirectory(prefix="engine-ddp-"))
        notes = Path(logs) / "failures"
        notes.mkdir()
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nprocs,
            run_id=uuid.uuid4().hex,
            rdzv_backend="c10d",
            # Port 0: the rendezvous store binds a free port itself (torchrun --standalone's
            # localhost:0), so two workers on one machine never race for one.
            rdzv_endpoint="127.0.0.1:0",
            local_addr="127.0.0.1",  # MASTER_ADDR: no host-name lookup for a one-node group
            max_restarts=0,  # a failed trial is failed, not retried inside the worker
            start_method=start_method,
            logs_specs=DefaultLogsSpecs(log_dir=logs),
        )
        try:
            return elastic_launch(config, _rank)(str(notes), os.getpid(), entrypoint, *args)
        except ChildFailedError as err:
            raise RankFailed(_failure_reason(err, notes, nprocs)) from None
        except SignalException as err:  # the agent has stopped the ranks already
            raise KeyboardInterrupt(f"{err.sigval.name} while DDP ranks ran") from None


def _rank(notes: str, launcher: int, entrypoint: Callable[..., Any], *args: Any) -> Any:
    """A rank's process: the entrypoint, with the time and cause of its failure noted for the
    launcher, and which peers were already gone then. The agent reports the first failure it
    notices, which may be a peer that lost its connection to the rank that crashed or was
    killed (its error files keep the time to the second only)."""
    threading.Thread(target=_exit_without, args=(launcher,), daemon=True).start()
    rank = int(os.environ.get("RANK", "-1"))
    (Path(notes) / f"rank_{rank}.pid").write_text(str(os.getpid()))
    try:
        return entrypoint(*args)
    except BaseException as err:
        failed_at = time.time()
        peers = {
            int(path.stem.split("_")[1]): int(path.read_text())
            for path in Path(notes).glob("rank_*.pid")
            if path.stem != f"rank_{rank}"
        }
        # A peer killed by a signal has closed its sockets (the cause of this error, then) a
        # moment before it shows as dead; one that is fine stays alive, waiting for this rank.
        gone: list[int] = []
        while not gone and time.time() < failed_at + _PEER_GRACE_S:
            gone = sorted(peer for peer, pid in peers.items() if not _alive(pid))
            time.sleep(0.02)
        note = {"rank": rank, "time": failed_at, "error": _one_line(err), "gone": gone}
        (Path(notes) / f"rank_{rank}.json").write_text(json.dumps(note))
        raise


def _exit_without(launcher: int) -> None:
    """End this rank once the process that launched it is gone (a SIGKILL: its agent cannot stop
    the ranks then). Alone, a rank would wait in a collective for its peers until the backend's
    timeout (30 min for gloo), holding its GPU; a forkserver's child is not the launcher's, so
    the kernel's parent-death signal does not reach it."""
    while _alive(launcher):
        time.sleep(0.5)
    os._exit(1)


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: existence only
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return type(err).__name__ + (f": {lines[0]}" if lines else "")


def _failure_reason(err: Any, notes: Path, nprocs: int) -> str:
    """The root cause on one line. A rank that died without a Python exception (a signal, an
    exit code of its own) comes first: its peers' errors follow from it. Else the earliest
    exception, unless a peer was gone already when it was raised."""
    noted = {n["rank"]: n for n in map(json.loads, map(Path.read_text, notes.glob("*.json")))}

    def died(rank: int) -> str:
        failure = err.failures.get(rank)
        if failure is None:
            return f"rank {rank} of {nprocs} died without a Python error (killed by a signal?)"
        if failure.exitcode < 0:
            return f"rank {rank} of {nprocs} was killed by {failure.signal_name()}"
        return f"rank {rank} of {nprocs} exited with code {failure.exitcode}"

    silent = [rank for rank in sorted(err.failures) if rank not in noted]
    if silent:
        return died(silent[0])
    if not noted:
        return died(err.get_first_failure()[0])
    first = min(noted.values(), key=lambda n: n["time"])
    gone = [rank for rank in first["gone"] if rank not in noted]
    if gone:
        return died(gone[0])
    return f"rank {first['rank']} of {nprocs} failed: {first['error']}"


@contextlib.contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """Give the worker back its own signal handlers (engine.preempt's, Ctrl-C's) once the agent,
    which replaces them for the ranks' lifetime, is done."""
    if threading.current_thread() is not threading.main_thread():
        yield  # no handlers here; the agent then warns and installs none either
        return
    saved = {name: signal.getsignal(getattr(signal, name)) for name in _AGENT_SIGNALS}
    try:
        yield
    finally:
        for name, handler in saved.items():
            if handler is not None:
                signal.signal(getattr(signal, name), handler)


@contextlib.contextmanager
def _quiet_agent() -> Iterator[None]:
    """The agent logs each rank failure with its traceback to the console; a sweep prints one
    line per trial and keeps tracebacks in the trial's train.log (the ranks write them)."""
    loggers = [logging.getLogger(name) for name in _AGENT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name] = value`` (None: unset) while inside; the ranks, spawned meanwhile,
    inherit it."""
    before = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


# --------------------------------------------------------------------------------------------
# the prune decision, on every rank


class PeerStopped(Exception):
    """Raised on ranks other than 0 when rank 0's report failed: they leave quietly, and rank
    0's own error is the trial's reason."""


class PruneSync:
    """Every rank's ``epoch_callback``. Rank 0 (the one given a ``reporter``) reports the epoch's
    objective to the trial and asks the pruner; its verdict is broadcast, so all ranks raise
    ``Pruned`` after the same epoch (the metrics are already reduced across ranks, so the value
    is the group's). A rank that stopped alone would leave the others waiting in the next
    epoch's collectives."""

    def __init__(self, reporter: Callable[..., None] | None):
        self.reporter = reporter

    def __call__(self, epoch: int, metrics: dict[str, float], final: bool = False) -> None:
        from engine import distributed as dist
        from engine.search.pruners import Pruned

        verdict: tuple | None = None
        error: Exception | None = None
        if self.reporter is not None:
            try:
                self.reporter(epoch, metrics, final=final)
            except Pruned as pruned:
                verdict, error = ("pruned", pruned.epoch, pruned.value), pruned
            except Exception as err:  # e.g. a search.metric the run does not produce
                verdict, error = ("failed", f"{type(err).__name__}: {err}"), err
        verdict = dist.broadcast_object(verdict)
        if verdict is None:
            return
        if error is not None:
            raise error
        if verdict[0] == "pruned":
            raise Pruned(verdict[1], verdict[2])
        raise PeerStopped(f"rank 0 stopped the trial: {verdict[1]}")


# --------------------------------------------------------------------------------------------
# one trial


@dataclass
class RankTask:
    """What every rank of a trial gets (pickled to the rank processes, never on a command line;
    the storage URL has its password masked)."""

    cfg: Any  # the trial's composed config
    run_dir: str
    storage: str
    study_name: str
    number: int
    metrics: list[str]
    pruner: str
    max_epochs: int | None
    threads: int
    wilcoxon_p_threshold: float
    log_format: str


def storage_url(storage: Any) -> str:
    """The URL (or journal file path) of an opened Optuna storage, for rank 0 to open it again.
    Optuna keeps it on the storage: an RDB storage's ``url`` (behind Optuna's cache, its
    ``_backend``), a journal's file backend's path."""
    import optuna

    inner = getattr(storage, "_backend", None)
    for rdb in (storage, inner):
        if isinstance(rdb, optuna.storages.RDBStorage):
            return str(rdb.url)
    path = getattr(inner, "_file_path", None)
    if isinstance(storage, optuna.storages.JournalStorage) and path is not None:
        return str(path)
    raise ConfigError(
        f"search.gpus_per_trial>1 needs a storage every rank can open again; "
        f"{type(storage).__name__} is not one (use a journal file or an RDB URL)"
    )


def run_ranks(
    nprocs: int,
    cfg: Any,
    run_dir: Path,
    trial: Any,
    spec: Any,
    reporter: Any,
    log_format: str,
) -> dict[str, float]:
    """Train the trial ``cfg`` as ``nprocs`` DDP ranks and return rank 0's results (what
    ``engine.train.run`` returns); raise ``Pruned`` when rank 0's pruner stopped it, with
    ``reporter`` holding rank 0's last reported metrics, as an in-process trial's would."""
    import torch

    from engine import redact
    from engine.search import storage as st
    from engine.search.pruners import Pruned

    on_gpus = torch.cuda.is_available() and str(cfg.trainer.device) != "cpu"
    if on_gpus:
        count = torch.cuda.device_count()
        if count < nprocs:  # e.g. a launcher job given fewer GPUs than the sweep asks for
            raise ConfigError(
                f"search.gpus_per_trial={nprocs} but this worker sees {count} GPU(s) "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'all')})"
            )
    url = storage_url(trial.storage)
    threads = max(1, torch.get_num_threads() // nprocs)
    task = RankTask(
        cfg=cfg,
        run_dir=str(run_dir),
        storage=redact.mask(url),
        study_name=trial.study.study_name,
        number=trial.number,
        metrics=list(spec.metrics),
        pruner=spec.pruner,
        max_epochs=spec.max_epochs,
        threads=threads,
        wilcoxon_p_threshold=spec.wilcoxon_p_threshold,
        log_format=log_format,
    )
    log.info("trial %d: %d DDP ranks, %d torch threads each", trial.number, nprocs, threads)
    # A password reaches rank 0 the way it reaches workers: in its environment (a forkserver
    # keeps the one of its first launch; a worker's storage never changes).
    secret = url if redact.has_secret(url) else os.environ.get(st.STORAGE_ENV)
    # GPUs: a fresh interpreter per rank (spawn), torchrun's own way, as nothing proves yet
    # that the forkserver's imports leave CUDA uninitialised, which forked ranks need.
    method = "spawn" if on_gpus else "forkserver"
    with _env(st.STORAGE_ENV, secret):
        answers = launch(nprocs, rank_main, task, start_method=method)
    answer = answers.get(0)
    if not isinstance(answer, dict):
        raise RankFailed(f"rank 0 of {nprocs} returned no result ({answer!r})")
    reporter.last, reporter.epochs = answer["last"], answer["epochs"]
    if "pruned" in answer:
        raise Pruned(*answer["pruned"])
    return answer["results"]


def rank_main(task: RankTask) -> dict[str, Any] | None:
    """One rank of a trial (in a process of its own): run it as ``torchrun ... -m engine.train``
    would, with the prune verdict shared; rank 0 returns its results (or where it was pruned)."""
    rank = int(os.environ.get("RANK", "0"))
    trace = _rank_logging(task, rank)
    import torch

    torch.set_num_threads(task.threads)  # trainer.num_threads, when set, still wins
    from engine import distributed as dist
    from engine.search.pruners import Pruned
    from engine.train import run

    reporter, answer, peers_wait = None, None, True
    try:
        reporter = _open_reporter(task) if rank == 0 else None
        sync = PruneSync(reporter)
        results = run(task.cfg, Path(task.run_dir), epoch_callback=sync, hparams_session=False)
        if reporter is not None:
            answer = {"results": results, **_reported(reporter)}
    except Pruned as pruned:  # every rank, after the same epoch
        if reporter is not None:
            answer = {"pruned": (pruned.epoch, pruned.value), **_reported(reporter)}
    except PeerStopped:  # rank 0 is failing: it will not reach the barrier
        peers_wait = False
    except BaseException:
        trace.handle(
            logging.LogRecord(
                "engine.search",
                logging.ERROR,
                __file__,
                0,
                "rank %d failed:\n%s",
                (rank, traceback.format_exc()),
                None,
            )
        )
        # No shutdown: the connections close when this process exits, after launch's note of
        # this failure, so the peers' lost-connection errors come later than the cause.
        raise  # the process fails: the launcher stops the other ranks
    # The run's DDP reducer holds the process group. Freed by a later garbage collection, after
    # the group is destroyed, it would run the group's destructor on this thread, holding the
    # GIL, while joining a gloo thread that waits for the GIL (a deadlock, seen here). Freed now
    # (the except clauses above have dropped their tracebacks, which held the run's frames),
    # the destroy below is the group's last reference, after the barrier has let those threads
    # finish.
    gc.collect()
    dist.shutdown(wait_for_peers=peers_wait)
    return answer


def _reported(reporter: Any) -> dict[str, Any]:
    return {"last": dict(reporter.last), "epochs": reporter.epochs}


def _open_reporter(task: RankTask) -> Any:
    """Rank 0's Reporter on the trial, through a storage connection of its own."""
    import optuna
    from optuna.trial import TrialState

    from engine.search import storage as st
    from engine.search.pruners import Reporter, make_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = st.open_storage(st.resolve_storage(task.storage))
    study = optuna.load_study(
        study_name=task.study_name,
        storage=storage,
        pruner=make_pruner(task.pruner, task.max_epochs, task.wilcoxon_p_threshold),
    )
    study_id = storage.get_study_id_from_name(task.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, task.number)
    # As in the worker: Optuna's cache in front of an RDB storage knows only trials it has read.
    study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return Reporter(optuna.Trial(study, trial_id), task.metrics)


def _rank_logging(task: RankTask, rank: int) -> logging.Handler:
    """A rank's log as under torchrun with Hydra's logging: the trial's train.log (rank 0 at
    INFO, the others their warnings), warnings on the console; returns the file handler."""
    root = logging.getLogger()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(message)s"))
    file = logging.FileHandler(Path(task.run_dir) / "train.log")
    file.setFormatter(logging.Formatter(task.log_format))
    root.addHandler(console)
    root.addHandler(file)
    return file

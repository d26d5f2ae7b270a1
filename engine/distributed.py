"""Process-group set-up for ``torchrun`` (gloo on CPU, NCCL on CUDA) and the few collectives the
trainer needs. Without torchrun's environment everything here is a no-op for one process."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each process drives the GPU of its local rank."""
    if launched_by_torchrun() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def share_run_dir(argv: list[str]) -> list[str]:
    """Give every torchrun rank rank 0's run dir.

    Hydra's default run dir is a timestamp that each rank computes on its own, seconds apart, so
    ranks would write into different folders. Rank 0's timestamp is broadcast instead and passed
    as an explicit ``hydra.run.dir`` override (unless the user gave one).
    """
    explicit = any(a.startswith("hydra.run.dir=") for a in argv)
    if not launched_by_torchrun() or explicit or {"-m", "--multirun"} & set(argv):
        return argv
    _join()
    stamp = broadcast_object(time.strftime("%Y-%m-%d_%H-%M-%S"))
    return [*argv, f"hydra.run.dir=outputs/runs/{stamp}"]


def init(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes; return (rank, world_size)."""
    if not launched_by_torchrun():
        return 0, 1
    _join(device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size()


def _join(device_id: torch.device | None = None) -> None:
    """Join torchrun's process group once: gloo for CPU tensors, NCCL for CUDA ones."""
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, device_id=device_id)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shutdown(wait_for_peers: bool = True) -> None:
    """Leave the process group; with ``wait_for_peers``, only once every rank is leaving too.

    Why the barrier: a gloo worker thread drops its last reference to a finished collective (and
    to the Python tensors in it) a moment after ``wait`` returns, and needs the GIL to do so. A
    rank that reaches interpreter shutdown first has that thread killed inside the destructor,
    and the process aborts ("terminate called without an active exception"). A barrier's wait
    releases the GIL until every rank arrives, so those references are gone by then; the barrier
    itself holds earlier work only weakly, and no Python tensors. After an error the other ranks
    may never arrive, so the caller passes ``wait_for_peers=False``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait_for_peers:
        barrier()
    dist.destroy_process_group()

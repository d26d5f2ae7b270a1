"""Atomic save and checked load of the whole training state.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, renamed over
the old one (an atomic replace on POSIX), and the folder is fsynced so the rename itself survives a
crash. Until the rename, the previous checkpoint is untouched: a kill at any moment leaves a
loadable ``last.pt``. ``best.pt`` is a hard link to the ``last.pt`` file it was at the time (one
write instead of two); replacing ``last.pt`` later makes a new file and leaves the link's inode
alone.

The file holds a JSON text and one byte tensor (see ``pack``), so it loads with
``torch.load(weights_only=True)``: a checkpoint cannot run code. Read it with ``load``.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import queue
import random
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import faults


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not fit this run; the message says why."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening a directory; nothing to sync then
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pack(value: Any, tensors: list[torch.Tensor]) -> Any:
    """JSON-able skeleton of ``value``; tensors are replaced by their index in ``tensors``."""
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach())
        return {"t": len(tensors) - 1}
    if isinstance(value, dict):
        return {"d": [[k, _pack(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"u": [_pack(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_pack(v, tensors) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__}")


def _unpack(node: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if "t" in node:
            return tensors[node["t"]]
        if "d" in node:
            return {k: _unpack(v, tensors) for k, v in node["d"]}
        return tuple(_unpack(v, tensors) for v in node["u"])
    if isinstance(node, list):
        return [_unpack(v, tensors) for v in node]
    return node


def pack(state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint file holds: a snapshot that later training steps cannot change.

    The nested state becomes a JSON skeleton plus every tensor's bytes copied into one uint8
    buffer (8-byte aligned). One tensor instead of dozens, and no per-object pickling, make a
    small model's checkpoint several times cheaper to write; the file still loads with
    ``torch.load(weights_only=True)``. Packing is the only part done on the training thread.
    """
    tensors: list[torch.Tensor] = []
    skeleton = _pack(state, tensors)
    layout, pieces, offset = [], [], 0
    for t in tensors:
        raw = t.contiguous().reshape(-1).view(torch.uint8).cpu()
        pad = -offset % 8
        if pad:
            pieces.append(torch.zeros(pad, dtype=torch.uint8))
            offset += pad
        layout.append([str(t.dtype).removeprefix("torch."), list(t.shape), offset])
        pieces.append(raw)
        offset += raw.numel()
    data = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.uint8)
    header = json.dumps({"format": FORMAT, "skeleton": skeleton, "tensors": layout})
    return {"header": header, "data": data}


def unpack(saved: Any) -> dict[str, Any]:
    header = json.loads(saved["header"])
    data: torch.Tensor = saved["data"]
    tensors = []
    for dtype_name, shape, offset in header["tensors"]:
        dtype = getattr(torch, dtype_name)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        tensors.append(data[offset : offset + nbytes].view(dtype).reshape(shape).clone())
    state = _unpack(header["skeleton"], tensors)
    state["format"] = header["format"]
    return state


def save_atomic(state: dict[str, Any], path: Path, *, packed: bool = False) -> None:
    """Write ``state`` (or, with ``packed``, what ``pack`` made of it) to ``path`` so that
    ``path`` is always either the old or the new file."""
    path = Path(path)
    contents = state if packed else pack(state)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Serialized in memory first: torch.save straight into a file turns a full disk into an
        # opaque RuntimeError, where a plain write raises the OSError that names the cause.
        buffer = io.BytesIO()
        torch.save(contents, buffer)
        data = buffer.getbuffer()
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
            if faults.KILL_DURING_SAVE:
                f.flush()
                faults.during_save()
            f.write(data[len(data) // 2 :])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = {
            errno.ENOSPC: "the disk is full",
            errno.EACCES: "the folder is not writable",
            errno.EPERM: "the folder is not writable",
            errno.EFBIG: "the file exceeds the size limit of this process or filesystem",
            errno.EROFS: "the filesystem is read-only",
            errno.EDQUOT: "the disk quota is exceeded",
        }.get(err.errno, str(err))
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        raise CheckpointError(
            f"could not write checkpoint {path}: {reason}{kept}. Free space or make the run "
            f"folder writable (or move it with hydra.run.dir=...), then resume with "
            f"trainer.resume=auto."
        ) from err


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the half-written temporary files a killed writer left behind; return them."""
    stale = sorted(Path(folder).glob(".*.tmp.*")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def link_best(last: Path, best: Path) -> None:
    """Make ``best`` the same file as ``last`` (hard link, atomically; a copy where links fail)."""
    tmp = best.with_name(f".{best.name}.tmp.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(last, tmp)
    except OSError:
        shutil.copyfile(last, tmp)
    os.replace(tmp, best)
    _fsync_dir(best.parent)


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU; refuse a torn or foreign file with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"trainer.resume: no checkpoint at {path}.")
    try:
        state = unpack(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not one of ours ({type(err).__name__}: {err}). "
            f"Delete it or pass another with trainer.resume=<path>, or start over with "
            f"trainer.resume=never."
        ) from err
    if state.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} was written by another version of this engine (format "
            f"{state.get('format')!r}, expected {FORMAT!r}). Use trainer.resume=never to start over."
        )
    return state


FORMAT = "engine-checkpoint-v2"


class AsyncCheckpointer:
    """Writes checkpoints on a background thread, so training does not wait on the disk.

    ``save`` packs the state in the calling thread (the packed copy is the snapshot, so later
    steps cannot leak into it) and hands serialization, file I/O, fsync and rename to one
    long-lived writer thread. At most one write is in flight: the next
    ``save`` or ``wait`` waits for it and re-raises its error. Each write is the same atomic
    protocol as ``save_atomic``, so a kill during a background write still leaves the previous
    file whole.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def save(self, state: dict[str, Any], path: Path, best: Path | None = None) -> None:
        self.wait()
        contents = pack(state)
        if self._thread is None:
            # A daemon: a process that dies mid-write leaves a temporary file, never a torn one.
            self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
            self._thread.start()
        self._idle.clear()
        self._jobs.put((contents, path, best))

    def _run(self) -> None:
        while True:
            contents, path, best = self._jobs.get()
            try:
                save_atomic(contents, path, packed=True)
                if best is not None:
                    link_best(path, best)
            except BaseException as err:  # handed to the training thread by wait()
                self._error = err
            finally:
                self._idle.set()

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error if it failed."""
        self._idle.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


# --------------------------------------------------------------------------------------------
# RNG state: every generator a step can draw from, so a resumed run replays the same numbers.


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    version, words, gauss = random.getstate()
    state = {
        # 625 words as one tensor: pickled as a tuple they cost 625 persistent-id calls per save.
        "python": {
            "version": version,
            "words": torch.tensor(words, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""Atomic save and checked load of the whole training state.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, renamed over
the old one (an atomic replace on POSIX), and the folder is fsynced so the rename itself survives a
crash. Until the rename, the previous checkpoint is untouched: a kill at any moment leaves a
loadable ``last.pt``. ``best.pt`` is a hard link to the ``last.pt`` file it was at the time (one
write instead of two); replacing ``last.pt`` later makes a new file and leaves the link's inode
alone.

The saved state holds only tensors and plain Python containers, so it loads with
``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import errno
import io
import os
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


def serialize(state: dict[str, Any]) -> memoryview:
    """The bytes of ``torch.save(state)``: a snapshot that later training steps cannot change."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer()


def save_atomic(state: dict[str, Any] | memoryview, path: Path) -> None:
    """Write ``state`` (or its serialized bytes) to ``path`` so that ``path`` is always either
    the old or the new file."""
    path = Path(path)
    data = state if isinstance(state, memoryview) else serialize(state)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            if faults.KILL_DURING_SAVE:
                f.flush()
                faults.during_save()
            f.write(data[half:])
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
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not one of ours ({type(err).__name__}: {err}). "
            f"Delete it or pass another with trainer.resume=<path>, or start over with "
            f"trainer.resume=never."
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} was not written by this engine (format "
            f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}, "
            f"expected {FORMAT!r}). Use trainer.resume=never to start over."
        )
    return state


FORMAT = "engine-checkpoint-v1"


class AsyncCheckpointer:
    """Writes checkpoints on a background thread, so training does not wait on the disk.

    ``save`` serializes the state in the calling thread (those bytes are the snapshot, so later
    steps cannot leak into them; pickling holds the GIL anyway) and hands only the file I/O,
    fsync and rename to the thread. At most one write is in flight: the next ``save`` or ``wait`` joins it and
    re-raises its error. Each write is the same atomic protocol as ``save_atomic``, so a kill
    during a background write still leaves the previous file whole.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict[str, Any], path: Path, best: Path | None = None) -> None:
        self.wait()
        data = serialize(state)
        self._thread = threading.Thread(
            target=self._write, args=(data, path, best), name="checkpoint"
        )
        self._thread.start()

    def _write(self, data: memoryview, path: Path, best: Path | None) -> None:
        try:
            save_atomic(data, path)
            if best is not None:
                link_best(path, best)
        except BaseException as err:  # handed to the training thread by wait()
            self._error = err

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
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

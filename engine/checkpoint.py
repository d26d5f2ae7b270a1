"""Atomic save and checked load of the whole training state.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, renamed over
the old one (an atomic replace on POSIX), and the folder is fsynced so the rename itself survives a
crash. Until the rename, the previous checkpoint is untouched: a kill at any moment leaves a
loadable ``last.pt``. ``best.pt`` is a hard link to the ``last.pt`` file it was at the time (one
write instead of two); replacing ``last.pt`` later never writes into the file it links. A small
checkpoint (up to ``REUSE_MAX_BYTES``) keeps the file it replaces as ``.last.pt.spare``, and the
next save overwrites that spare in place before renaming it: no new blocks to allocate and no old
ones to free, which on a small model costs more than the bytes themselves.

File layout (the safetensors layout: nothing in it is executable, unlike a pickle)::

    8 bytes       N, the header length, unsigned little-endian
    N bytes       JSON header, padded with spaces so the data starts 8-byte aligned:
                  {"__metadata__": {"format": FORMAT, "skeleton": <JSON text>, "crc32": <text>},
                   "<i>": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}
    data          every tensor's bytes, back to back, widest dtypes first (so each is aligned)

The skeleton is the nested state (dicts, lists, numbers, strings) with each tensor replaced by its
name. The CRC-32 of the data catches a torn or bit-flipped file at load. Read it with ``load``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import random
import shutil
import threading
import zlib
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


# safetensors' dtype codes.
_DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def _pack(value: Any, tensors: list[torch.Tensor]) -> Any:
    """JSON-able skeleton of ``value``; tensors are replaced by their index in ``tensors``."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _DTYPE_CODES:
            raise TypeError(f"cannot checkpoint a {value.dtype} tensor")
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


def _unpack(node: Any, tensors: dict[int, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if "t" in node:
            return tensors[node["t"]]
        if "d" in node:
            return {k: _unpack(v, tensors) for k, v in node["d"]}
        return tuple(_unpack(v, tensors) for v in node["u"])
    if isinstance(node, list):
        return [_unpack(v, tensors) for v in node]
    return node


class _Layout:
    """Where each tensor of a state goes in the file: widest element first, so every tensor
    starts at a multiple of its own element size; cached while dtypes and shapes repeat."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.key = _layout_key(tensors)
        self.order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
        spans, offset = {}, 0
        for i in self.order:
            nbytes = tensors[i].numel() * tensors[i].element_size()
            spans[i] = (offset, offset + nbytes)
            offset += nbytes
        self.nbytes = offset
        self.spans = spans
        entries = {
            str(i): {
                "dtype": _DTYPE_CODES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": list(spans[i]),
            }
            for i, t in enumerate(tensors)
        }
        self.json_members = json.dumps(entries)[1:-1]  # spliced into the header object


def _layout_key(tensors: list[torch.Tensor]) -> tuple:
    return tuple((t.dtype, tuple(t.shape)) for t in tensors)


def _host_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor without a copy (a contiguous copy only for a strided view)."""
    # Attribute checks before ops: a few dozen tensors per save, each op costs microseconds.
    if t.requires_grad:
        t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: same bytes as int16
        t = t.view(torch.int16)
    return memoryview(t.numpy().reshape(-1)).cast("B")


class Serializer:
    """Turns a state into the buffers of a checkpoint file.

    CPU tensors are handed to ``write`` as they are (the bytes reach the page cache before
    ``write`` returns, so the training step after cannot change them); tensors on another device
    are first copied into one host buffer, reused from save to save.
    """

    def __init__(self) -> None:
        self._layout: _Layout | None = None
        self._staging: torch.Tensor | None = None
        self._staging_views: list[torch.Tensor] = []

    def buffers(self, state: dict[str, Any]) -> tuple[bytes, list[memoryview]]:
        """(header with its length prefix, data buffers in file order)."""
        tensors: list[torch.Tensor] = []
        skeleton = _pack(state, tensors)
        if self._layout is None or self._layout.key != _layout_key(tensors):
            self._layout, self._staging = _Layout(tensors), None
        layout = self._layout
        if all(t.device.type == "cpu" for t in tensors):
            data = [_host_bytes(tensors[i]) for i in layout.order]
        else:
            data = [self._staged(tensors)]
        crc = 0
        for chunk in data:
            crc = zlib.crc32(chunk, crc)
        return _header(skeleton, layout.json_members, crc), data

    def _staged(self, tensors: list[torch.Tensor]) -> memoryview:
        layout = self._layout
        if self._staging is None:
            self._staging = torch.empty(layout.nbytes, dtype=torch.uint8)
            self._staging_views = [
                self._staging[layout.spans[i][0] : layout.spans[i][1]].view(t.dtype).view(t.shape)
                for i, t in enumerate(tensors)
            ]
        for view, t in zip(self._staging_views, tensors, strict=True):
            view.copy_(t)  # device-to-host; waits for the device
        return memoryview(self._staging.numpy())


def _header(skeleton: Any, layout_members: str, crc: int) -> bytes:
    metadata = {"format": FORMAT, "skeleton": json.dumps(skeleton), "crc32": str(crc)}
    members = [f'"__metadata__": {json.dumps(metadata)}'] + [layout_members] * bool(layout_members)
    text = ("{" + ", ".join(members) + "}").encode()
    text += b" " * (-(8 + len(text)) % 8)  # the data then starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text


def _read(path: Path) -> dict[str, Any]:
    """Parse a checkpoint file; any inconsistency raises ValueError."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        start = f.read(8)
        if start.startswith(b"PK\x03\x04"):  # a torch.save zip: this engine's format before v3
            return {"format": "a torch.save file (engine-checkpoint-v2 or older)"}
        n = int.from_bytes(start, "little")
        if size < 8 or n > size - 8:
            raise ValueError("the header length exceeds the file")
        header = json.loads(f.read(n))
        metadata = header.pop("__metadata__")
        data = torch.empty(size - 8 - n, dtype=torch.uint8)
        if data.numel():
            f.readinto(memoryview(data.numpy()))
    if metadata.get("format") != FORMAT:
        return {"format": metadata.get("format")}
    spans = sorted(spec["data_offsets"] for spec in header.values())
    starts = [begin for begin, _ in spans]
    ends = [end for _, end in spans]
    if starts != [0, *ends[:-1]][: len(starts)] or (ends[-1] if ends else 0) != data.numel():
        raise ValueError("the file is truncated or its tensors overlap")
    if zlib.crc32(memoryview(data.numpy())) != int(metadata["crc32"]):
        raise ValueError("the data does not match its CRC-32")
    tensors = {}
    for name, spec in header.items():
        begin, end = spec["data_offsets"]
        dtype = _CODE_DTYPES[spec["dtype"]]
        # A copy of its own for each: some consumers (torch.set_rng_state) read a tensor's
        # storage from its start and would see the bytes of the tensors before it.
        tensors[int(name)] = data[begin:end].view(dtype).reshape(spec["shape"]).clone()
    state = _unpack(json.loads(metadata["skeleton"]), tensors)
    state["format"] = FORMAT
    return state


_IOV_MAX = 1024  # buffers per writev call (the POSIX minimum of IOV_MAX)


def _write_all(fd: int, buffers: list) -> None:
    """Write every buffer, in order, whatever the kernel accepts per call."""
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    while pending:
        n = os.writev(fd, pending[:_IOV_MAX])
        while pending and n >= len(pending[0]):
            n -= len(pending[0])
            pending.pop(0)
        if n:
            pending[0] = pending[0][n:]


def _disk_error(err: OSError, path: Path) -> CheckpointError:
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EACCES: "the folder is not writable",
        errno.EPERM: "the folder is not writable",
        errno.EFBIG: "the file exceeds the size limit of this process or filesystem",
        errno.EROFS: "the filesystem is read-only",
        errno.EDQUOT: "the disk quota is exceeded",
    }.get(err.errno, str(err))
    kept = f"; the previous {path.name} is intact" if path.exists() else ""
    return CheckpointError(
        f"could not write checkpoint {path}: {reason}{kept}. Free space or make the run "
        f"folder writable (or move it with hydra.run.dir=...), then resume with "
        f"trainer.resume=auto."
    )


# A checkpoint up to this size keeps the file it replaces as a spare, which the next save
# overwrites in place: allocating a new file's blocks and freeing the old one's costs a small
# model's save more than writing its bytes. Bigger ones are written fresh (no second copy).
REUSE_MAX_BYTES = 64 * 2**20


def spare_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.spare")


def _open_target(path: Path, size: int) -> tuple[int, Path]:
    """The file the next checkpoint is written into, never one a checkpoint name points at:
    the spare if no other name links it (``best.pt`` may), else a new temporary."""
    if size <= REUSE_MAX_BYTES:
        try:
            fd = os.open(spare_path(path), os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1
        if fd >= 0:
            if os.fstat(fd).st_nlink == 1:
                return fd, spare_path(path)
            os.close(fd)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644), tmp


def write_temporary(
    state: dict[str, Any], path: Path, serializer: Serializer | None = None
) -> tuple[int, Path]:
    """First half of a save: the whole file written next to ``path``, not yet in its place.

    Returns the open descriptor and the written file's path for ``commit``. Nothing is replaced
    yet, so ``path`` still holds the previous checkpoint.
    """
    path = Path(path)
    header, data = (serializer or Serializer()).buffers(state)
    size = len(header) + sum(len(b) for b in data)
    fd, written = -1, path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, written = _open_target(path, size)
        if faults.KILL_DURING_SAVE:  # the test hook: killed with half the file written
            whole = memoryview(b"".join([header, *data]))
            _write_all(fd, [whole[: len(whole) // 2]])
            faults.during_save()
            _write_all(fd, [whole[len(whole) // 2 :]])
        else:
            _write_all(fd, [header, *data])
        os.ftruncate(fd, size)  # a reused spare may have been longer
    except OSError as err:
        if fd >= 0:
            os.close(fd)
            with contextlib.suppress(OSError):
                written.unlink(missing_ok=True)
        raise _disk_error(err, path) from err
    return fd, written


def commit(fd: int, written: Path, path: Path, best: Path | None = None) -> None:
    """Second half of a save: fsync the written file, rename it over ``path`` (a small
    checkpoint's replaced file stays as the next spare), point ``best`` at it too if given, and
    fsync the folder once for all the renames. It waits on the disk: the background writer
    runs it."""
    path = Path(path)
    try:
        try:
            os.fsync(fd)
            keep = os.fstat(fd).st_size <= REUSE_MAX_BYTES and path.exists()
        finally:
            os.close(fd)
        held = path.with_name(f".{path.name}.spare.next")
        if keep:
            # The old file gets a second name before the rename, so last.pt is whole throughout.
            held.unlink(missing_ok=True)
            try:
                os.link(path, held)
            except OSError:  # a filesystem without hard links: no spare, a new file each save
                keep = False
        os.replace(written, path)
        if keep:
            os.replace(held, spare_path(path))
        if best is not None:
            link_best(path, best)
    except OSError as err:
        with contextlib.suppress(OSError):  # an unwritable folder refuses this too
            if not (path.exists() and os.path.samefile(written, path)):
                written.unlink(missing_ok=True)
        raise _disk_error(err, path) from err
    _fsync_dir(path.parent)


def save_atomic(state: dict[str, Any], path: Path, best: Path | None = None) -> None:
    """Write ``state`` to ``path`` so that ``path`` is always either the old or the new file;
    with ``best``, make that the same file."""
    commit(*write_temporary(state, path), path, best)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the half-written temporary files a killed writer left behind; return them."""
    stale = sorted(Path(folder).glob(".*.tmp.*")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def link_best(last: Path, best: Path) -> None:
    """Make ``best`` the same file as ``last`` (hard link, atomically; a copy where links fail).
    The caller fsyncs the folder."""
    tmp = best.with_name(f".{best.name}.tmp.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(last, tmp)
    except OSError:
        shutil.copyfile(last, tmp)
    os.replace(tmp, best)


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU; refuse a torn or foreign file with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"trainer.resume: no checkpoint at {path}.")
    try:
        state = _read(path)
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


FORMAT = "engine-checkpoint-v3"


class AsyncCheckpointer:
    """Saves checkpoints without making training wait on the disk.

    ``save`` writes the whole file (to a new temporary or the spare, see ``write_temporary``) on
    the calling thread: it goes to the page cache, so the steps after cannot leak into it, and a
    full disk is reported at once. The
    part that waits on the disk (fsync, rename, the folder fsync) runs on one writer thread. At
    most one save is in flight: the next ``save`` or ``wait`` waits for it and re-raises its
    error. A kill at any moment leaves the previous file whole. ``close`` ends the thread.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._serializer = Serializer()

    def save(self, state: dict[str, Any], path: Path, best: Path | None = None) -> None:
        self.wait()
        fd, tmp = write_temporary(state, path, self._serializer)
        if self._thread is None:
            # A daemon: a process that dies mid-commit leaves a temporary file, never a torn one.
            self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
            self._thread.start()
        self._idle.clear()
        self._jobs.put((fd, tmp, path, best))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                commit(*job)
            except BaseException as err:  # handed to the training thread by wait()
                self._error = err
            finally:
                self._idle.set()

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk; raise its error if it failed."""
        self._idle.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Wait for the save in flight, then stop the writer thread (a later save restarts it)."""
        try:
            self.wait()
        finally:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
                self._thread = None


# --------------------------------------------------------------------------------------------
# RNG state: every generator a step can draw from, so a resumed run replays the same numbers.


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    version, words, gauss = random.getstate()
    state = {
        # 625 words as one tensor: as a tuple they would be 625 numbers in the JSON header.
        "python": {
            "version": version,
            "words": torch.from_numpy(np.array(words, dtype=np.int64)),
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

"""Atomic save and checked load of the whole training state.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, renamed over
the old one (an atomic replace on POSIX), and the folder is fsynced so the rename itself survives a
crash. Until the rename, the previous checkpoint is untouched: a kill at any moment leaves a
loadable ``last.pt``. ``best.pt`` is a hard link to the ``last.pt`` file it was at the time (one
write instead of two); replacing ``last.pt`` later makes a new file and leaves the link's inode
alone.

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

import errno
import json
import os
import queue
import random
import shutil
import threading
import zlib
from dataclasses import dataclass
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


@dataclass
class Packed:
    """A snapshot of a state that later training steps cannot change: the skeleton, where each
    tensor lies in ``data``, and ``data``, every tensor's bytes copied into one uint8 buffer."""

    skeleton: Any
    layout_json: str  # the header entries of the tensors, as JSON object members
    data: torch.Tensor


class Packer:
    """Copies states into one buffer that is reused while the tensors keep their dtypes and
    shapes (every save of a run), so a save is one batched copy with no allocation.

    The buffer of the previous ``pack`` is overwritten: pack again only once that one is on
    disk. ``pack()`` (the function) uses a fresh buffer each time.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._data = torch.zeros(0, dtype=torch.uint8)
        self._views: list[torch.Tensor] = []
        self._layout_json = ""

    def pack(self, state: dict[str, Any]) -> Packed:
        tensors: list[torch.Tensor] = []
        skeleton = _pack(state, tensors)
        key = tuple((t.dtype, tuple(t.shape)) for t in tensors)
        if key != self._key:
            self._lay_out(tensors)
            self._key = key
        if tensors and all(t.device.type == "cpu" for t in tensors):
            torch._foreach_copy_(self._views, tensors)
        else:
            for view, t in zip(self._views, tensors, strict=True):
                view.copy_(t)  # device-to-host copies; .copy_ waits for them
        return Packed(skeleton, self._layout_json, self._data)

    def _lay_out(self, tensors: list[torch.Tensor]) -> None:
        # Widest element first: every tensor then starts at a multiple of its own element size.
        order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
        spans, offset = {}, 0
        for i in order:
            nbytes = tensors[i].numel() * tensors[i].element_size()
            spans[i] = (offset, offset + nbytes)
            offset += nbytes
        self._data = torch.empty(offset, dtype=torch.uint8)
        self._views = [
            self._data[spans[i][0] : spans[i][1]].view(t.dtype).view(t.shape)
            for i, t in enumerate(tensors)
        ]
        layout = {
            str(i): {
                "dtype": _DTYPE_CODES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": list(spans[i]),
            }
            for i, t in enumerate(tensors)
        }
        self._layout_json = json.dumps(layout)[1:-1]


def pack(state: dict[str, Any]) -> Packed:
    """Copy ``state`` into a new buffer: the snapshot a later write serializes."""
    return Packer().pack(state)


def _header(packed: Packed, crc: int) -> bytes:
    metadata = {"format": FORMAT, "skeleton": json.dumps(packed.skeleton), "crc32": str(crc)}
    members = [f'"__metadata__": {json.dumps(metadata)}'] + [packed.layout_json] * bool(
        packed.layout_json
    )
    text = ("{" + ", ".join(members) + "}").encode()
    text += b" " * (-(8 + len(text)) % 8)  # the data then starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text


def _read(path: Path) -> dict[str, Any]:
    """Parse a checkpoint file; any inconsistency raises ValueError."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), "little")
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


def save_atomic(state: dict[str, Any] | Packed, path: Path, best: Path | None = None) -> None:
    """Write ``state`` (or its ``pack``) to ``path`` so that ``path`` is always either the old
    or the new file; with ``best``, make that the same file. One folder fsync covers both."""
    path = Path(path)
    packed = state if isinstance(state, Packed) else pack(state)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = memoryview(packed.data.numpy())
        half = len(data) // 2
        with open(tmp, "wb") as f:
            f.write(_header(packed, zlib.crc32(data)))
            f.write(data[:half])
            if faults.KILL_DURING_SAVE:
                f.flush()
                faults.during_save()
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if best is not None:
            link_best(path, best)
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
    _fsync_dir(path.parent)


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
    """Writes checkpoints on a background thread, so training does not wait on the disk.

    ``save`` copies the state into a reused buffer in the calling thread (that copy is the
    snapshot, so later steps cannot leak into it) and hands the file I/O, fsync and rename to one
    writer thread. At most one write is in flight: the next ``save`` or ``wait`` waits for it and
    re-raises its error. Each write is the same atomic protocol as ``save_atomic``, so a kill
    during a background write still leaves the previous file whole. ``close`` ends the thread.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._packer = Packer()

    def save(self, state: dict[str, Any], path: Path, best: Path | None = None) -> None:
        self.wait()  # the buffer is free again
        contents = self._packer.pack(state)
        if self._thread is None:
            # A daemon: a process that dies mid-write leaves a temporary file, never a torn one.
            self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
            self._thread.start()
        self._idle.clear()
        self._jobs.put((contents, path, best))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            contents, path, best = job
            try:
                save_atomic(contents, path, best)
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

    def close(self) -> None:
        """Wait for the write in flight, then stop the writer thread (a later save restarts it)."""
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

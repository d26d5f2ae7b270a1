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
name. The CRC-32 of the data catches a torn or bit-flipped file at load. Read it with ``load``,
which checks the header against itself and the file's size before it allocates anything, so a
hostile file costs its header (capped at ``MAX_HEADER_BYTES``), not the size it claims.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import queue
import random
import secrets
import shutil
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.faults import Faults


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not fit this run; the message says why."""


def replace_file(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all, also with other writers of the same file at the same
    time (two sweep commands on one sweep dir): each writes its own temporary file in the same
    folder, then renames it over ``path``. Opened exclusively rather than with ``tempfile`` so
    that it gets the umask's permissions, as the file it replaces did."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("x", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(folder: Path) -> None:
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


def _unpack(node: Any, tensors: dict[int, Any]) -> Any:
    """The value a skeleton node stands for; a node ``_pack`` cannot have written raises
    ValueError. Run over the header's tensor specs first, it checks every tensor reference before
    any tensor memory exists."""
    if isinstance(node, dict):
        if len(node) != 1:
            raise ValueError(f"malformed skeleton node with keys {sorted(node)[:4]}")
        ((kind, body),) = node.items()
        if kind == "t":
            if type(body) is not int or body not in tensors:
                raise ValueError(f"the skeleton refers to tensor {body!r}, which the header lacks")
            return tensors[body]
        if kind == "d" and isinstance(body, list):
            if not all(isinstance(item, list) and len(item) == 2 for item in body):
                raise ValueError("malformed skeleton dict: its items are not [key, value] pairs")
            if not all(item[0] is None or isinstance(item[0], str | int | float) for item in body):
                raise ValueError("malformed skeleton dict: a key is not a string or a number")
            return {k: _unpack(v, tensors) for k, v in body}
        if kind == "u" and isinstance(body, list):
            return tuple(_unpack(v, tensors) for v in body)
        raise ValueError(f"malformed skeleton node {kind!r}")
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

    def __init__(self, faults: Faults | None = None) -> None:
        self._faults = faults
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


# The largest header a file may declare (safetensors' own limit). Ours take a few hundred bytes
# per tensor; without a cap a hostile length would be read, then decoded, at its full size.
MAX_HEADER_BYTES = 100_000_000
_CRC_BUFFER_BYTES = 2**20


def _read(path: Path) -> dict[str, Any]:
    """Parse a checkpoint file; any inconsistency raises ValueError.

    Nothing the file declares is allocated before it is checked against the file itself, so a
    torn or hostile file is refused at the cost of its header, never of its apparent size.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        start = f.read(8)
        if start.startswith(b"PK\x03\x04"):  # a torch.save zip: this engine's format before v3
            return {"format": "a torch.save file (engine-checkpoint-v2 or older)"}
        if len(start) < 8:
            raise ValueError("the file is shorter than the 8 bytes of its header length")
        n = int.from_bytes(start, "little")
        if n > MAX_HEADER_BYTES:
            raise ValueError(
                f"the header length ({n} bytes) exceeds the limit of {MAX_HEADER_BYTES} bytes"
            )
        if n > size - 8:
            raise ValueError("the header length exceeds the file")
        header = json.loads(f.read(n))
        metadata = header.pop("__metadata__", None) if isinstance(header, dict) else None
        if not isinstance(metadata, dict):
            raise ValueError("the header is not a JSON object with a __metadata__ entry")
        if metadata.get("format") != FORMAT:
            return {"format": metadata.get("format")}
        data_size = size - 8 - n
        specs = _checked_specs(header, data_size)
        skeleton = json.loads(str(metadata.get("skeleton")))
        # Every tensor reference, checked before any tensor memory exists.
        if not isinstance(_unpack(skeleton, specs), dict):
            raise ValueError("the skeleton is not a dict")
        # The CRC is computed in a small fixed buffer before the data gets its memory: a file
        # with a consistent header but bytes that are not ours (say a sparse file of zeros whose
        # header declares gigabytes) is then refused at the cost of the buffer, not of its size.
        # The price is a second read of the file, served from the page cache.
        if _streamed_crc(f, data_size) != int(str(metadata.get("crc32"))):
            raise ValueError("the data does not match its CRC-32")
        f.seek(8 + n)
        data = torch.empty(data_size, dtype=torch.uint8)
        if data_size and f.readinto(memoryview(data.numpy())) != data_size:
            raise ValueError("the file became shorter while it was read")
    tensors = {}
    for index, (dtype, shape, begin, end) in specs.items():
        # A copy of its own for each: some consumers (torch.set_rng_state) read a tensor's
        # storage from its start and would see the bytes of the tensors before it.
        tensors[index] = data[begin:end].view(dtype).reshape(shape).clone()
    state = _unpack(skeleton, tensors)
    state["format"] = FORMAT
    return state


def _checked_specs(header: dict[str, Any], data_size: int) -> dict[int, tuple]:
    """Each tensor's (dtype, shape, begin, end), once the header's claims agree with each other
    and with the ``data_size`` bytes the file holds; otherwise ValueError naming the tensor."""
    specs: dict[int, tuple] = {}
    for name, spec in header.items():
        if not (name.isdecimal() and str(int(name)) == name and isinstance(spec, dict)):
            raise ValueError(f"header entry {name[:40]!r} is not a tensor of ours")
        dtype = _CODE_DTYPES.get(spec.get("dtype"))
        shape, offsets = spec.get("shape"), spec.get("data_offsets")
        if dtype is None:
            raise ValueError(f"tensor {name} has an unknown dtype {str(spec.get('dtype'))[:20]!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"tensor {name}: its shape is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise ValueError(f"tensor {name}: its data_offsets are not a [begin, end] pair")
        begin, end = offsets
        if not (type(begin) is int and type(end) is int and 0 <= begin <= end):
            raise ValueError(f"tensor {name}: its data_offsets {offsets} are not a byte range")
        if end > data_size:
            raise ValueError(
                f"the file is truncated: tensor {name} ends at byte {end} of a data section of "
                f"{data_size} bytes"
            )
        if end - begin != math.prod(shape) * dtype.itemsize or begin % dtype.itemsize:
            raise ValueError(
                f"tensor {name}: bytes {begin}..{end} do not hold an aligned {spec['dtype']} "
                f"tensor of shape {shape}"
            )
        specs[int(name)] = (dtype, shape, begin, end)
    # Back to back from byte 0 to the end of the file: no gap, no overlap, nothing after.
    covered = 0
    for _, _, begin, end in sorted(specs.values(), key=lambda spec: (spec[2], spec[3])):
        if begin != covered:
            raise ValueError("the tensors' byte ranges leave a gap or overlap")
        covered = end
    if covered != data_size:
        raise ValueError(f"{data_size - covered} bytes after the last tensor belong to none")
    return specs


def _streamed_crc(f: Any, nbytes: int) -> int:
    """CRC-32 of the next ``nbytes`` of ``f``, read through one buffer of at most 1 MiB."""
    buffer = memoryview(bytearray(min(nbytes, _CRC_BUFFER_BYTES)))
    crc, left = 0, nbytes
    while left:
        got = f.readinto(buffer[: min(left, len(buffer))])
        if not got:
            raise ValueError("the file became shorter while it was read")
        crc = zlib.crc32(buffer[:got], crc)
        left -= got
    return crc


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
    state: dict[str, Any],
    path: Path,
    serializer: Serializer | None = None,
    faults: Faults | None = None,
) -> tuple[int, Path]:
    """First half of a save: the whole file written next to ``path``, not yet in its place.

    Returns the open descriptor and the written file's path for ``commit``. Nothing is replaced
    yet, so ``path`` still holds the previous checkpoint. ``faults``: the reliability tests'
    kill halfway through the write (None in a normal run).
    """
    path = Path(path)
    header, data = (serializer or Serializer()).buffers(state)
    size = len(header) + sum(len(b) for b in data)
    fd, written = -1, path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, written = _open_target(path, size)
        if faults is not None and faults.kill_during_save:  # killed with half the file written
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
    fsync_dir(path.parent)


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


_RESUME_FIX = (
    "Delete it or pass another with trainer.resume=<path>, or start over with trainer.resume=never."
)


def load(path: Path, *, setting: str = "trainer.resume") -> dict[str, Any]:
    """Load a checkpoint on the CPU; refuse a torn or foreign file with a clear message.

    ``setting`` is the config key that named the file: the messages say how to fix that key."""
    path = Path(path)
    resuming = setting == "trainer.resume"
    fix = _RESUME_FIX if resuming else f"Pass another with {setting}=<checkpoint or run dir>."
    if not path.is_file():
        raise CheckpointError(f"{setting}: no checkpoint at {path}.")
    try:
        state = _read(path)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not one of ours ({type(err).__name__}: {err}). {fix}"
        ) from err
    if state.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} was written by another version of this engine (format "
            f"{state.get('format')!r}, expected {FORMAT!r}). "
            + ("Use trainer.resume=never to start over." if resuming else fix)
        )
    return state


def init_source(setting: str) -> Path:
    """The checkpoint ``trainer.init_from`` names: a file as given; for a run dir, its
    ``checkpoints/best.pt`` (the weights its test metrics come from), else its ``last.pt``."""
    path = Path(setting).expanduser()
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise CheckpointError(
            f"trainer.init_from={setting}: the folder {path} has no checkpoints/best.pt or "
            f"checkpoints/last.pt; name the run dir of a run that saved checkpoints, or a "
            f"checkpoint file."
        )
    if not path.exists():
        raise CheckpointError(
            f"trainer.init_from={setting}: there is no checkpoint or run dir at {path}."
        )
    return path


def load_model_weights(setting: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the file ``trainer.init_from`` names, its model weights); the rest of its state is left."""
    path = init_source(setting)
    weights = load(path, setting="trainer.init_from").get("model")
    if not (
        isinstance(weights, dict)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items())
    ):
        raise CheckpointError(
            f"checkpoint {path} has no model weights (its 'model' entry is not a dict of "
            f"tensors). Pass another with trainer.init_from=<checkpoint or run dir>."
        )
    return path, weights


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

    def __init__(self, faults: Faults | None = None) -> None:
        self._faults = faults
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._serializer = Serializer()

    def save(self, state: dict[str, Any], path: Path, best: Path | None = None) -> None:
        self.wait()
        fd, tmp = write_temporary(state, path, self._serializer, self._faults)
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


def _python_rng(py: dict[str, Any]) -> tuple:
    if not (py["gauss"] is None or type(py["gauss"]) is float):  # setstate takes any object here
        raise TypeError(f"gauss is a {type(py['gauss']).__name__}, not a float or None")
    return (py["version"], tuple(py["words"].tolist()), py["gauss"])


def _numpy_rng(np_state: dict[str, Any]) -> tuple:
    return (
        np_state["kind"],
        np_state["keys"].numpy().astype(np.uint32),
        np_state["pos"],
        np_state["has_gauss"],
        np_state["cached_gaussian"],
    )


def rng_state_problem(state: Any) -> str | None:
    """Why ``set_rng_state`` could not restore ``state`` here (naming the entry), or None.

    Each generator's state is tried on a throwaway generator of the same kind, so the check is
    the generator's own (another Python's random state, another NumPy bit generator) and the
    global generators stay untouched when the answer is no."""
    if not isinstance(state, dict):
        return f"entry 'rng' is a {type(state).__name__}, not a dict"
    trials = {
        "python": lambda: random.Random().setstate(_python_rng(state["python"])),
        "numpy": lambda: np.random.RandomState().set_state(_numpy_rng(state["numpy"])),
        "torch": lambda: torch.Generator().set_state(state["torch"]),
    }
    for name, trial in trials.items():
        if name not in state:
            return f"entry 'rng.{name}' is missing"
        try:
            trial()
        except Exception as err:  # whatever the generator objects to, it is this entry
            return (
                f"entry 'rng.{name}' is not a {name} RNG state this process can restore "
                f"({type(err).__name__}: {_short(err)})"
            )
    cuda = state.get("cuda", [])
    if not (
        isinstance(cuda, list)
        and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)
    ):
        return "entry 'rng.cuda' is not a list of CUDA RNG states (uint8 tensors)"
    return None


def _short(err: Exception, limit: int = 160) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_python_rng(state["python"]))
    np.random.set_state(_numpy_rng(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

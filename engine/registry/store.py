"""The registry's content-addressed file store: every file a version needs, kept by its SHA-256.

A file lives at ``<store>/sha256/<first two hex digits>/<hash>``. The same bytes are stored once,
whichever versions share them, and a stored file is never changed: it is written to a temporary
file in its final folder, fsynced and renamed into place, so a reader sees the whole file or none
(and a crash leaves at most a temporary, never a torn blob). Reading checks the hash again, so a
file changed or damaged on disk since it was stored is refused instead of being loaded.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from engine.checkpoint import fsync_dir
from engine.datacard import file_sha256
from engine.registry.refs import RegistryError


class StoreError(RegistryError):
    """A stored file is missing or does not match its hash; the message says which and why."""


class Store:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()

    def path(self, digest: str) -> Path:
        return self.root / "sha256" / digest[:2] / digest

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; return its SHA-256 (its name in the store)."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if target.is_file() and target.stat().st_size == len(data):
            return digest  # the same bytes are there already (checked again on every read)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{digest}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o444)  # stored files are immutable
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)
        return digest

    def put_file(self, path: Path) -> str:
        return self.put_bytes(Path(path).read_bytes())

    def verified_path(self, digest: str, what: str) -> Path:
        """The stored file named ``digest`` after checking its bytes still hash to it."""
        path = self.path(digest)
        if not path.is_file():
            raise StoreError(
                f"the registry store {self.root} has no {what} ({digest[:12]}...): the store "
                f"was moved or emptied, or this is not the store the version was registered "
                f"into. Pass --store <folder> (or set ENGINE_REGISTRY_STORE) to the store that "
                f"holds it."
            )
        actual = file_sha256(path)
        if actual != digest:
            raise StoreError(
                f"the stored {what} {path} is damaged: its SHA-256 is {actual[:12]}..., not "
                f"{digest[:12]}... as registered. Register the run again from its run dir."
            )
        return path

    def read(self, digest: str, what: str) -> bytes:
        data = self.verified_path(digest, what).read_bytes()
        # Checked once more on the bytes actually read: the file could change between the two.
        if hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(f"the stored {what} {self.path(digest)} changed while being read.")
        return data

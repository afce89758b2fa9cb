"""Integrity tools of the draw store: checksums, sealed records, atomic writes, a writer lock.

- :func:`digest` / :func:`array_digest` / :func:`file_digest`: sha256 (hex, 32 digits = 128
  bits) of bytes, of an array's raw bytes (dtype and C order) and of a file's contents.
- :func:`seal` / :func:`unseal`: a JSON record that carries the digest of its own canonical
  text (``sha``), so any change to a record is detected when it is read.
- :func:`atomic_write`: write to a uniquely named temporary file (pid and a random suffix, so
  two processes never share one) beside the target, then ``os.replace``: readers see the old
  file or the new one, never a torn one, also when the writer is killed.
- :func:`confined`: a file name taken from a record, refused unless it names a plain file
  directly inside its folder (no separators, no ``..``, no link out of the folder).
- :class:`WriterLock`: an exclusive ``fcntl.flock`` on a lock file that records its holder
  (pid, host, start time). The kernel drops the lock when its holder's descriptor is closed or
  the process dies (also on SIGKILL), so a lock is never left stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import threading
import warnings
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from suscept.errors import ConfigError

try:
    import fcntl
except ImportError:  # not POSIX: no locking (documented)
    fcntl = None


class StoreError(ConfigError):
    """A draw store is damaged, incomplete or inconsistent (the message names what and where)."""


class StoreLockedError(StoreError):
    """Another writer holds the draw store (the message names its pid, host and start time)."""


def digest(data: bytes) -> str:
    """sha256 of ``data`` as 32 hex digits."""
    return hashlib.sha256(data).hexdigest()[:32]


def array_hasher(dtype: np.dtype, shape: tuple[int, ...]):
    """A sha256 object fed with an array's dtype and shape; feed it the raw C-order bytes
    (:func:`feed`, whole or row blocks in order) and take ``hexdigest()[:32]``."""
    return hashlib.sha256(f"{np.dtype(dtype).str}{tuple(shape)}".encode())


def feed(hasher, a: np.ndarray) -> None:
    """Add an array's raw C-order bytes to ``hasher`` (no copy when ``a`` is contiguous)."""
    hasher.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def array_digest(a: np.ndarray) -> str:
    """:func:`digest` of an array's dtype, shape and raw C-order bytes."""
    h = array_hasher(a.dtype, a.shape)
    feed(h, a)
    return h.hexdigest()[:32]


def file_digest(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """:func:`digest` of a file's contents, read ``block`` bytes at a time (any file size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()[:32]


def _canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def seal(record: dict) -> dict:
    """``record`` plus ``sha``: the digest of its canonical JSON (sorted keys, no spaces)."""
    body = {k: v for k, v in record.items() if k != "sha"}
    return {**body, "sha": digest(_canonical(body))}


def unseal(text: str | bytes, where: Path) -> dict:
    """The record a sealed JSON text holds, refused unless its ``sha`` matches its contents."""
    try:
        record = json.loads(text)
        sha = record.pop("sha")
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise StoreError(f"commit record {where} is corrupt ({e!r}); the store is damaged: "
                         "sample again into a new folder") from e
    if sha != digest(_canonical(record)):
        raise StoreError(f"commit record {where} fails its checksum (edited or damaged); the "
                         "store is damaged: sample again into a new folder")
    return record


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a uniquely named temporary file and ``os.replace``."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def deferred_interrupt():
    """Hold Ctrl-C (SIGINT) until the block has run, then deliver it: a commit is never cut
    in half. An interrupt that lands while the main thread waits on the store's own I/O
    thread would otherwise leave that write pending (and the interpreter waiting on it at
    exit). In the main thread only (signals are delivered there), and only over a handler
    Python can put back; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is None:  # a handler set outside Python: keep it
        yield
        return
    got: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got and callable(old):
            old(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
        elif got and old == signal.SIG_DFL:
            raise KeyboardInterrupt


def confined(folder: Path, name: object, what: str) -> Path:
    """``folder / name``, refused unless ``name`` is a plain file name that stays inside
    ``folder`` once links are resolved."""
    ok = isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name \
        and "\\" not in name
    path = folder / name if ok else None
    if not ok or path.resolve().parent != folder.resolve():
        raise StoreError(f"{what} names {name!r}, which is not a file inside {folder}; the "
                         "store is damaged or was edited: sample again into a new folder")
    return path


def confined_relative(root: Path, rel: object, what: str) -> Path:
    """``root / rel`` for a relative path ``rel`` (``a/b/c``) that stays inside ``root``."""
    if not isinstance(rel, str) or rel.startswith("/") or "\\" in rel \
            or any(p in ("", ".", "..") for p in rel.split("/")):
        raise StoreError(f"{what} names {rel!r}, which is not a path inside {root}; the store "
                         "is damaged or was edited: sample again into a new folder")
    path = root / rel
    if not path.resolve().is_relative_to(root.resolve()):
        raise StoreError(f"{what} names {rel!r}, which leads outside {root}; refused")
    return path


class WriterLock:
    """An exclusive lock on the file ``path`` for one writer (see the module docstring)."""

    def __init__(self, path: Path):
        self.path, self.fd, self.pid = path, None, None

    def __del__(self):  # a writer dropped without close() still frees its lock
        try:
            self.release()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self, what: str) -> None:
        """Take the lock or raise :class:`StoreLockedError` naming the holder of ``what``."""
        if self.fd is not None:
            return
        if fcntl is None:
            warnings.warn(f"no file locking on this platform: nothing stops a second writer "
                          f"of {what}", RuntimeWarning, stacklevel=3)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder_text(fd)
            os.close(fd)
            raise StoreLockedError(
                f"{what} is being written by another writer ({holder}); wait until it "
                "finishes or stop it, or use another folder (a killed writer releases the "
                "lock by itself)") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.now(UTC).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd, self.pid = fd, os.getpid()

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases it); no-op when not held."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                if self.pid == os.getpid():  # not a forked child's copy of the descriptor
                    os.ftruncate(fd, 0)
            finally:
                os.close(fd)

    def holder(self) -> str | None:
        """Who holds the lock now (``"pid P on HOST since T"``), or None when nobody does
        (this object included)."""
        if self.fd is not None or fcntl is None or not self.path.exists():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _holder_text(fd)
        finally:
            os.close(fd)  # also drops the shared lock just taken
        return None


def _holder_text(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "holder not yet recorded"


__all__ = ["StoreError", "StoreLockedError", "WriterLock", "array_digest", "array_hasher",
           "atomic_write", "feed",
           "confined", "confined_relative", "digest", "file_digest", "seal", "unseal"]

"""One process at a time per run folder and per sweep folder: an advisory ``flock`` on ``<folder>/.lock``.

The holder writes its pid into the file. The lock is non-blocking: a second process gets one
line naming the folder and the holder's pid. ``flock`` belongs to the open file, so the OS drops
it when the holder exits or is killed: a killed run's folder is free to resume. The file itself
stays (removing it would let two processes lock two different files of the same name).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import DeltakdError

LOCK_FILE = ".lock"


class FolderLock:
    """The lock of one folder; ``acquire`` or ``try_acquire``, then ``release`` (or use ``with``)."""

    def __init__(self, folder: str | os.PathLike, what: str = "run"):
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_FILE

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> int | None:
        """Take the lock: None when taken (or already held here), else the holder's pid (0 if unknown)."""
        if self._fd is not None:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            return pid
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return None

    def acquire(self) -> FolderLock:
        """Take the lock or raise one line naming the folder and the process that holds it."""
        pid = self.try_acquire()
        if pid is not None:
            raise DeltakdError(in_use(self.folder, pid, self.what))
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def in_use(folder: str | os.PathLike, pid: int, what: str = "run") -> str:
    """The one line for a folder locked by another process."""
    holder = f"pid {pid}" if pid else "pid unknown"
    return (f"{what} '{folder}' is in use by another process ({holder}); wait for it to finish or stop it "
            f"(a stopped {what} can be resumed)")


def lock_holder(folder: str | os.PathLike) -> int | None:
    """The pid of the live process holding ``folder``'s lock (0 if unknown), or None when it is free.

    Probes with a shared lock, so two probes do not disturb each other and the folder is not created.
    """
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError):
        return 0

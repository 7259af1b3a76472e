"""One training run per workdir: an exclusive `fcntl.flock` on `WORKDIR/train.lock`.

The lock file records who holds it (host, pid, start time), so a second run is refused with one
line naming the holder. The kernel drops a flock when its holder dies, so a lock file whose
holder was killed (kill -9, a crashed node) is not held: the next run takes it over and says
whose it was. Release unlinks the file while still holding the lock; an acquirer that opened
the old file before the unlink sees that the path no longer leads to it and starts again, so
two runs can never both hold it.

Readers (evaluate.py, `load_model`, exports) take no lock: Orbax renames a step into place only
when it is complete, so they never see a half-written one.

Multi-host: process 0 alone takes the lock; the others learn the outcome from it (a collective)
and stop with it. On NFS, Linux turns flock into an NFS byte-range lock, which holds across
hosts where the server supports locking (NFSv4, or NFSv3 with lockd); on a mount without it
(`nolock`) or a filesystem that ignores locks, runs on different hosts do not exclude each
other, and a second host's run takes the file over as if its holder had died (it says so).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = "train.lock"


class WorkdirLocked(ValueError):
    """The workdir is in use by another run (train.py exits 2 with this message)."""


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since "
            f"{holder.get('since', '?')}")


def _read(fd: int) -> dict:
    """The holder record in an open lock file ({} when empty or unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}


class WorkdirLock:
    """The exclusive lock of one workdir for one process; `acquire` creates the workdir if
    needed, `release` removes the lock file (and the workdir, if it created it and nothing
    else was written there)."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self._fd: int | None = None
        self._created_workdir = False

    def acquire(self) -> None:
        """Takes the lock or raises WorkdirLocked naming the holder; prints a one-line note when
        it takes over the file of a run that died holding it. A filesystem without locks gets a
        warning (nothing can keep a second run out there); an unwritable workdir a ValueError."""
        locks = True
        while True:
            try:
                if not self.workdir.exists():
                    self.workdir.mkdir(parents=True)
                    self._created_workdir = True
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ValueError(f"cannot create {self.path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    print(f"warning: cannot lock {self.path} ({e.strerror}): this filesystem "
                          "has no file locks, and nothing keeps a second run out of the "
                          "workdir", file=sys.stderr)
                    locks = False
                    break
                holder = _read(fd)
                os.close(fd)
                self._remove_created_workdir()
                raise WorkdirLocked(
                    f"{self.workdir} is in use by another run ({_describe(holder)}; "
                    f"{self.path}); wait for it to end, stop it, or use another --workdir"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # released and unlinked while we waited: try the new file
        previous = _read(fd)
        if previous and locks:
            print(f"note: {self.path} was left by a run that no longer holds it "
                  f"({_describe(previous)}); taking it over", file=sys.stderr)
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still holding it (see the module docstring)
        os.close(self._fd)
        self._fd = None
        self._remove_created_workdir()

    def _remove_created_workdir(self) -> None:
        if self._created_workdir:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
                self.workdir.rmdir()
            self._created_workdir = False


@contextlib.contextmanager
def workdir_lock(workdir):
    """Holds the workdir's lock for the body, on process 0; every process raises WorkdirLocked
    when process 0 could not take it. Released on every exit (a SIGKILL leaves the file, which
    the next run takes over)."""
    from zoo import parallel

    lock = WorkdirLock(workdir) if parallel.is_lead() else None
    refused = None
    if lock is not None:
        try:
            lock.acquire()
        except WorkdirLocked as e:
            refused = e
    if parallel.any_process(refused is not None):
        raise refused or WorkdirLocked(f"{workdir} is in use by another run (process 0 says "
                                       "who)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()

"""One process at a time in a run folder, with a lock that the operating system releases when its
holder dies.

Two `fit` processes in one folder mix their TensorBoard events, and whichever ends last overwrites
the other's summary.json and checkpoints; the check that a folder holds no run yet
(lm_opt.cli.check_fresh_run) cannot see a run that started a second earlier. So a `fit` takes the
folder's lock before it builds anything and holds it until it ends, and `sweep` takes each point's
lock before it touches the point's folder and hands it to the point's `fit` (below).

The lock is flock(2) on `<folder>/.run.lock`, taken without waiting. Liveness is the lock alone:
the kernel (or, on a shared filesystem, the server) drops it when the holder's last descriptor
closes, at exit, at `kill -9`, and, on NFS and Lustre, when the holder's node is lost. A pid file
would need guessing whether its process still lives, on another node too; a stale one would block.
`.run.holder` beside it names the holder (pid, host, role, start) for messages only. A holder file
found by the next holder means that its writer ended without releasing (killed, or its node lost):
the next holder says that it takes over, and replaces it.

Why flock and not a POSIX lock (fcntl.lockf): a POSIX lock belongs to a process, so a sweep could
not pass a point's lock to the `fit` it launches without a moment in which neither holds it, and a
POSIX lock is dropped when its process closes any descriptor of the file. A flock lock belongs to
the open file: `sweep` keeps its descriptor open in the child (its number in `FD_ENV`), and the
lock lives while either of them does. On a shared filesystem flock holds across nodes: Linux's NFS
client sends it to the server as a whole-file POSIX lock (NLM on NFSv3, NFSv4's own locks), and
Lustre mounted with `flock` keeps flock and fcntl locks coherent across its clients. The one caveat:
where locks are node-local (Lustre's `localflock`, NFS's `local_lock=flock` or `nolock`), two
nodes can hold one folder's lock at once; a filesystem without locks at all gets a warning and no lock.
"""

import errno
import fcntl
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from lm_opt.record import read_json, write_json_atomic

LOCK_FILE = ".run.lock"
HOLDER_FILE = ".run.holder"
LOCK_FILES = (LOCK_FILE, HOLDER_FILE)
"""The lock's files in a run folder: neither is part of the run's record."""
FD_ENV = "LM_OPT_RUN_LOCK_FD"
"""The descriptor of the lock that a process hands its child (`sweep` and a point's command.sh)."""

log = logging.getLogger("lm_opt")
_held: set[int] = set()
"""The descriptors of the locks this process holds: a forked child (a DataLoader worker) closes its
copies, so that the lock ends with its holder and not with the last of its workers."""


def _close_in_child() -> None:
    for fd in _held:
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


@dataclass
class RunLock:
    """This process's lock on a run folder; `fd` is None on a filesystem without locks. `handed_by`
    is the holder file of the process that handed the lock down (a sweep), which still holds it."""

    folder: Path
    fd: int | None
    handed_by: dict | None = None

    def release(self) -> None:
        """Drop the lock, and its holder file while the lock still holds: gone, or again the holder
        file of the process that handed the lock down and holds it until it lets go."""
        if self.fd is None:
            return
        if self.handed_by:
            write_json_atomic(self.folder / HOLDER_FILE, self.handed_by)
        else:
            (self.folder / HOLDER_FILE).unlink(missing_ok=True)
        _held.discard(self.fd)
        os.close(self.fd)
        self.fd = None


def try_lock(folder: Path, role: str) -> RunLock | None:
    """The lock on `folder` (created if need be) for this process, in `role` (`fit`, `sweep`); None
    while another live process holds it. A lock handed down in `FD_ENV` is taken as this process's."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = inherited(folder)
    handed_by = None if fd is None else read_json(folder / HOLDER_FILE)
    if fd is None:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            log.warning(f"{folder}: this filesystem has no locks ({err}); another process may run in this folder at once")
            return RunLock(folder, None)
        gone = read_json(folder / HOLDER_FILE)
        if gone:
            log.warning(f"{folder}: taking it over from {describe(gone)}, which ended without releasing it "
                        "(killed, or its node lost)")
    _held.add(fd)
    write_json_atomic(folder / HOLDER_FILE, {"pid": os.getpid(), "host": socket.gethostname(), "role": role,
                                             "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    return RunLock(folder, fd, handed_by)


def inherited(folder: Path) -> int | None:
    """The descriptor in `FD_ENV` where it is this folder's lock file, locked by the open file this
    process shares with its parent; taken out of the environment, so that no grandchild sees it."""
    value = os.environ.pop(FD_ENV, "")
    if not value.isdigit():
        return None
    fd = int(value)
    try:
        if not os.path.samestat(os.fstat(fd), os.stat(folder / LOCK_FILE)):
            return None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # succeeds at once where the open file holds it
    except OSError:
        return None
    os.set_inheritable(fd, False)
    return fd


def describe(holder: dict) -> str:
    """`pid N on host H (role since T)`, from a holder file's fields."""
    return (f"pid {holder.get('pid')} on host {holder.get('host')} "
            f"({holder.get('role', 'a process')} since {holder.get('since', '?')})")


def holder_of(folder: Path) -> str:
    """Who holds `folder`'s lock, as its holder file says (it may not have written it yet)."""
    holder = read_json(folder / HOLDER_FILE)
    return describe(holder) if holder else "another process"

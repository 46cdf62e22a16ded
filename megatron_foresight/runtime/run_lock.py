"""One process at a time per run directory.

Two `foresight train` on one run directory used to race: one died, and the other's
metrics.jsonl lost steps that its checkpoints had. A run directory is now held, while a command
trains in it, evaluates into it or converts from it, through a POSIX record lock
(`fcntl.lockf`) on `RUN_DIR/.foresight.lock`: the kernel releases it when the holder exits in
any way (SIGKILL included), and it works on NFS (v4, or v3 with lockd). The file also records
who holds it (host, PID, command, since when) so a refused command can say so, and a lock left
by a dead holder is reported as taken over. Only rank 0 of a job takes it.

POSIX locks belong to the process and are released when *any* descriptor of the file is
closed in it, so this module is the only place that opens the file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from megatron_foresight.errors import UsageError

log = logging.getLogger(__name__)

LOCK_NAME = ".foresight.lock"
_held: dict[Path, "RunLock"] = {}


class RunDirBusy(UsageError):
    """Another live process holds the run directory."""


class RunLock:
    """The lock on one run directory; `release()` (or process exit) gives it back."""

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir, self._fd = run_dir, fd

    def release(self) -> None:
        if self._fd < 0:
            return
        os.ftruncate(self._fd, 0)  # nobody holds it: no stale record for the next holder
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = -1
        _held.pop(self.run_dir, None)


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return (f"PID {holder.get('pid')} on {holder.get('host')} ({holder.get('command', '?')}, "
            f"since {since})")


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}


def _alive(holder: dict) -> bool | None:
    """Whether the recorded holder still runs; None when it ran on another host."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def acquire(run_dir: str | Path, command: str, reading: bool = False,
            flag: str = "--run-dir") -> RunLock | None:
    """Hold `run_dir` (created if needed) for this process, or raise RunDirBusy naming the
    holder. Re-entrant within a process (a pipeline's stages, eval after train). `reading`: the
    command only reads the run, so a run it cannot lock (a read-only model store) is read
    without the lock, with a warning. `flag`: the command's flag that names the directory
    (collect's is --out), which the errors tell the user to change."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return _held[run_dir]
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"run directory {run_dir} is a file, not a directory; choose another "
                         f"{flag} (or move the file away)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if not reading:
            raise
        log.warning("cannot lock %s (%s): reading it without the lock", run_dir, e.strerror)
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunDirBusy(f"run directory {run_dir} is in use by {_describe(holder)}; wait for "
                         f"it to finish (or stop it), or choose another {flag}") from None
    previous = _read_holder(fd)
    if previous:
        state = {False: "no longer running", None: "on another host, lock released"}.get(
            _alive(previous), "lock released")
        log.warning("run directory %s: took over the lock left by %s (%s)", run_dir,
                    _describe(previous), state)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
              "argv": sys.argv[1:], "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
    lock = _held[run_dir] = RunLock(run_dir, fd)
    return lock


def release_all() -> None:
    """Give back every run directory this process holds (at the end of a command)."""
    for lock in list(_held.values()):
        lock.release()


def run_dir_of(path: str | Path) -> Path | None:
    """The run directory that `path` (a run directory, its checkpoints/ or one step_N, or a
    file in one) belongs to; None if it is in none."""
    path = Path(path).resolve()
    for candidate in [path, *path.parents][:4]:
        if (candidate / "checkpoints").is_dir() or (candidate / LOCK_NAME).is_file():
            return candidate
    return None


def hold_run_of(path: str | Path | None, command: str, reading: bool = False) -> None:
    """Hold the run directory `path` is in, if any (until release_all or exit)."""
    run_dir = run_dir_of(path) if path else None
    if run_dir is not None:
        acquire(run_dir, command, reading)

"""Helper processes that die with the process that started them.

A trainer killed with SIGKILL (the OOM killer, `scancel --signal=KILL`, a node agent) cannot clean
up; whatever it started must notice on its own. Two kinds of helper did not:

* the Manager that Megatron's checkpoint writer reports through (spawned, see
  `training.checkpoint.start_writer_immune_to_stop_signals`);
* the writer processes Megatron forks for every save (`FileSystemWriterAsync.
  write_preloaded_data_multiproc`). The trainer waits for them in `JoinableQueue.join()`; a
  writer that finishes after the trainer died calls `task_done()`, whose `notify_all()` waits for
  the dead waiter to acknowledge, forever. The writer then kept the job's stdout open (a caller
  waiting for EOF hung with it) and a multiprocessing resource tracker alive.

On Linux both now ask the kernel for SIGKILL when their parent dies (`PR_SET_PDEATHSIG`);
elsewhere nothing changes. A forked child is only killed with its parent's *main* thread: the
signal follows the forking thread, and a child forked from a short-lived thread would otherwise
be killed when that thread ends. Processes started with `subprocess` or multiprocessing's
"spawn" are not forked through Python's hooks and are not affected (W&B's service, for one,
shuts itself down when it sees its parent gone, and must be left to flush)."""

from __future__ import annotations

import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_forking_pid = [0]  # the parent's pid, recorded just before each fork (the child reads its copy)
_installed = False


def die_with_parent(parent_pid: int) -> None:
    """In a child: be killed when the process that started it dies. Call it first thing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before the request took effect
        os._exit(1)


def forked_children_die_with_this_process() -> None:
    """From now on, every child this process forks from its main thread (Megatron's checkpoint
    writers, DataLoader workers) is killed when this process dies. Idempotent."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return
    main_thread = threading.main_thread().ident

    def before() -> None:
        _forking_pid[0] = os.getpid()

    def in_child() -> None:
        # pthread_self() survives fork: the child's one thread has the forking thread's ident
        if threading.get_ident() == main_thread:
            die_with_parent(_forking_pid[0])

    os.register_at_fork(before=before, after_in_child=in_child)
    _installed = True

"""A real single-node Slurm cluster for tests: Debian's slurmctld and slurmd with `auth/none`,
every state, spool, log and pid file under one temporary directory, talking over loopback.
The daemons are stopped by the PIDs in their pid files when the context exits, pass or fail."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")


def missing_programs() -> list[str]:
    return [p for p in DAEMONS if shutil.which(p) is None
            and not Path("/usr/sbin", p).exists()]


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user() -> str:
    return os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True,
                                                    text=True).stdout.strip()


def _config(root: Path, cpus: int) -> str:
    user = _user()
    return f"""\
ClusterName=foresight-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldAddr=127.0.0.1
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
# bind to the node's own address (127.0.0.1), not to every interface
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
AuthType=auth/none
CredType=cred/none
# a requeued job waits cred_expire seconds before it starts again (default 120)
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.cpus = cpus
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([_program(args[0]), *args[1:]], env=kw.pop("env", self.env),
                              capture_output=True, text=True, check=check, **kw)

    def start(self) -> None:
        for d in ("state", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(_config(self.root, self.cpus))
        self.run("slurmctld", "-c", "-f", str(self.conf))
        self.run("slurmd", "-N", "localhost", "-f", str(self.conf))
        deadline = time.time() + 60
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm node did not come up (state {state!r}); logs:\n"
                           f"{self.logs()}")

    def stop(self) -> None:
        """Cancel every job (so no training task outlives a failed test), then stop both daemons
        by their pid files' PIDs; SIGKILL what outlives 10 s."""
        if (self.root / "slurmctld.pid").exists():
            self.run("scancel", "--full", "--user", _user(), check=False, timeout=30)
            deadline = time.time() + 30
            while time.time() < deadline and self.run(
                    "squeue", "-h", check=False, timeout=30).stdout.strip():
                time.sleep(0.5)
        pids = []
        for name in ("slurmd", "slurmctld"):
            f = self.root / f"{name}.pid"
            if f.exists() and f.read_text().strip():
                pids.append(int(f.read_text().strip()))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 10
        for pid in pids:
            while time.time() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}"
                         for p in sorted(self.root.glob("*.log")))

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = ""
        for _ in range(5):  # a busy controller may time out one query
            proc = self.run("scontrol", "-o", "show", "job", job_id, check=False)
            if proc.returncode == 0:
                out = proc.stdout
                break
            time.sleep(1)
        fields = {}
        for word in out.split():
            key, _, value = word.partition("=")
            fields[key] = value
        return fields

    def wait(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                        "NODE_FAIL", "OUT_OF_MEMORY"), timeout: float = 600,
             settle: float = 0):
        """The job's record once its state is one of `states` and has stayed so for `settle`
        seconds (a job being requeued can show FAILED for a moment before it is pending again)."""
        deadline = time.time() + timeout
        since, last = None, None
        while time.time() < deadline:
            info = self.job(job_id)
            state = info.get("JobState")
            if state in states:
                if state != last:
                    since = time.time()
                if time.time() - since >= settle:
                    return info
            last = state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after "
                           f"{timeout} s")

    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill 0; it is gone for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")

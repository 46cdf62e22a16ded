"""Files a crash leaves half-written: a torn last line of metrics.jsonl, a full disk while a
resume rewrites it, and the temporary files of a `foresight data preprocess` killed mid-run."""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_foresight.data.preprocess import _host, preprocess
from megatron_foresight.data.tokenizer import TokenizerConfig
from megatron_foresight.errors import UsageError
from megatron_foresight.runtime.log import MetricsWriter
from helpers.run import REPO, foresight


@pytest.fixture
def logged(caplog):
    """caplog, also fed by the package's loggers (which stop propagating to the root logger
    once `setup_logging` ran in this process)."""
    logger = logging.getLogger("megatron_foresight")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def _metrics_file(run_dir: Path, steps: range, tail: str = "") -> Path:
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "lm_loss": 1.0 / s}) + "\n" for s in steps)
                    + tail)
    return path


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_drops_a_torn_last_metrics_line(tmp_path, logged):
    path = _metrics_file(tmp_path, range(1, 9), tail='{"step": 9, "lm_lo')
    writer = MetricsWriter(tmp_path, False, resume_step=6)
    writer.write(7, {"lm_loss": 0.5})
    writer.close()
    assert _steps(path) == [1, 2, 3, 4, 5, 6, 7]
    assert "dropped its torn last line 9" in logged.text


def test_resume_refuses_a_corrupt_line_before_the_last(tmp_path):
    path = _metrics_file(tmp_path, range(1, 3), tail='{"step": 3, "lm_lo\n{"step": 4}\n')
    with pytest.raises(UsageError) as info:
        MetricsWriter(tmp_path, False, resume_step=4)
    assert str(info.value) == (f"{path}:3: not a metrics record ('{{\"step\": 3, \"lm_lo'); "
                               "repair or delete that line, then resume")
    assert '"lm_lo\n' in path.read_text()  # the file is left as it was, to look at


def test_resume_on_a_full_disk_is_one_line_simulated_enospc(tmp_path, monkeypatch):
    path = _metrics_file(tmp_path, range(1, 9))
    before = path.read_text()

    def full(self, text, **kwargs):  # writes a little, then the disk is full
        with open(self, "w") as f:
            f.write(text[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UsageError) as info:
        MetricsWriter(tmp_path, False, resume_step=4)
    assert str(info.value) == (f"no space left on device writing {path}: free space and "
                               "resume")
    monkeypatch.undo()
    assert path.read_text() == before and sorted(tmp_path.iterdir()) == [path]


class _FullDisk:
    """A metrics file on a disk with `room` bytes left."""

    def __init__(self, room: int):
        self.room = room

    def write(self, data: bytes) -> int:
        if not self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written, self.room = min(self.room, len(data)), self.room - min(self.room, len(data))
        return written

    def close(self) -> None:
        """Nothing to release: this stand-in for a file on a full disk holds no descriptor."""


@pytest.mark.parametrize("room", [0, 5])
def test_a_metrics_write_on_a_full_disk_is_one_line_simulated_enospc(tmp_path, room):
    writer = MetricsWriter(tmp_path, False)
    writer._file = _FullDisk(room)
    with pytest.raises(UsageError, match="no space left on device writing .*metrics.jsonl"):
        writer.write(1, {"lm_loss": 1.0})


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


def test_preprocess_removes_temps_of_dead_runs_on_this_host_only(tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("one document\nanother document\n")
    out = tmp_path / "out"
    out.mkdir()
    dead, live, host = _dead_pid(), os.getpid(), _host()
    stale = [f"P.tmp{dead}-{host}.bin", f"P.tmp{dead}-{host}_segments.bin",
             f"P.tmp{dead}.bin"]  # the last one as versions before the host in the name wrote it
    kept = [f"P.tmp{live}-{host}.bin", f"P.tmp{dead}-other-host.bin", f"Q.tmp{dead}.bin"]
    for name in stale + kept:
        (out / name).write_bytes(b"\0" * 1000)
    proc = foresight(["data", "preprocess", "--input", str(corpus), "--output-prefix",
                      str(out / "P"), "--renderer", "text"])
    assert _temps(out) == sorted(kept)
    for name in stale:
        assert f"removed {out / name}: left by process {dead}" in proc.stderr
    assert (out / "P.idx").exists()


def _corpus(tmp_path: Path) -> Path:
    line = " ".join(["the quick brown fox jumps over the lazy dog"] * 5)
    corpus = tmp_path / "docs.txt"
    corpus.write_text("".join(f"{i} {line}\n" for i in range(30_000)))  # 6.8 MB: ~2 s
    return corpus


def _preprocess_killed(corpus: Path, out: Path, sig: signal.Signals) -> int:
    """Run `foresight data preprocess` and send it `sig` once it has created its temporary
    files; returns its PID."""
    proc = subprocess.Popen([sys.executable, "-m", "megatron_foresight", "data", "preprocess",
                             "--input", str(corpus), "--output-prefix", str(out / "P"),
                             "--renderer", "text"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out.is_dir() and _temps(out)) and proc.poll() is None:
        assert time.monotonic() < deadline, "preprocess wrote no temporary file"
        time.sleep(0.01)
    proc.send_signal(sig)
    assert proc.wait() in (-sig, 128 + sig), "preprocess ended before the signal"
    return proc.pid


def test_a_preprocess_killed_mid_run_leaves_temps_the_rerun_removes(tmp_path, logged):
    corpus, out = _corpus(tmp_path), tmp_path / "out"
    pid = _preprocess_killed(corpus, out, signal.SIGKILL)
    left = _temps(out)
    assert left and all(name.startswith(f"P.tmp{pid}-") for name in left)

    meta = preprocess([corpus], out / "P", "text", TokenizerConfig("byte"), progress=False)
    assert meta["documents"] == 30_000
    assert _temps(out) == []
    assert f"left by process {pid}" in logged.text


def test_a_preprocess_terminated_mid_run_removes_its_own_temps(tmp_path):
    out = tmp_path / "out"
    _preprocess_killed(_corpus(tmp_path), out, signal.SIGTERM)
    assert sorted(p.name for p in out.iterdir()) == []

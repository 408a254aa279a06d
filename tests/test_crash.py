"""A run whose failure handling fails too still ends: promptly, with a non-zero status, its record
written where its folder still exists, and no DataLoader worker left behind."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest

from cli_helpers import tiny_args

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent


def failed_at(trainer) -> None:
    """Note when the failure happened, beside the run's folder."""
    (Path(trainer.log_dir).parent / "failed_at").write_text(str(time.time()))


class RemoveRunFolder(L.Callback):
    """Deletes the run's log folder at the end of batch `batch`: the next event-file write fails, and
    so does the summary that Lightning's `on_exception` then writes (a full disk, a lost mount)."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch:
            failed_at(trainer)
            shutil.rmtree(trainer.log_dir)


class FailTwice(L.Callback):
    """Raises at the end of batch `batch`, and again in `on_exception`."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch:
            failed_at(trainer)
            raise RuntimeError("the step failed")

    def on_exception(self, trainer, pl_module, exception):
        raise RuntimeError("and so did its handler")


def session_processes(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # the session id; zombies have ended
            pids.append(int(stat.parent.name))
    return pids


def run_until_it_ends(tmp_path: Path, callback: str) -> subprocess.Popen:
    """The run, with 2 DataLoader workers and the failing callback, in its own session; fails the test
    (and kills the session) unless it ends within a minute of its failure."""
    args = tiny_args(tmp_path, "run", 40, "--data.num_workers", "2", "--trainer.callbacks+", f"test_crash.{callback}",
                     "--trainer.callbacks.batch", "3")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.Popen([sys.executable, "-m", "lm_opt", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        proc.wait(timeout=300)  # start-up takes seconds, more on a busy machine
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("the run had not ended 300 s after it started")
    ended_at = time.time()
    assert ended_at - float((tmp_path / "failed_at").read_text()) < 60
    time.sleep(0.5)
    assert session_processes(proc.pid) == [], "processes of the run outlived it"
    return proc


def test_a_run_whose_folder_is_removed_mid_run_exits_and_leaves_no_worker(tmp_path):
    proc = run_until_it_ends(tmp_path, "RemoveRunFolder")
    assert proc.returncode != 0
    assert "FileNotFoundError" in proc.stderr.read()
    assert not (tmp_path / "run").exists()


def test_a_run_whose_exception_handling_raises_exits_and_records_the_failure(tmp_path):
    proc = run_until_it_ends(tmp_path, "FailTwice")
    assert proc.returncode != 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "the step failed" in summary["error"]
    assert summary["steps"] == 4

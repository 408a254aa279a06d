"""A run killed with SIGKILL while it checkpoints every step leaves a loadable last.ckpt, and
rerunning with `--ckpt_path last` takes its folder over and finishes it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import summary, tiny_args

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent


def test_kill_during_checkpointing_keeps_a_loadable_last_checkpoint(tmp_path):
    args = tiny_args(tmp_path, "killed", 16, "--trainer.val_check_interval", "1")
    proc = subprocess.Popen([sys.executable, "-m", "lm_opt", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # several more checkpoints are written in this time, one every step
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    checkpoint = torch.load(last, weights_only=False)
    killed_at = checkpoint["global_step"]
    assert 0 < killed_at < 16
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "lm_opt", *args, "--ckpt_path", "last"], cwd=ROOT, check=True,
                             capture_output=True, text=True, timeout=600)
    assert f"{tmp_path / 'killed'}: taking it over from pid {proc.pid} " in resumed.stderr  # the lock died with it
    assert summary(tmp_path / "killed")["steps"] == 16

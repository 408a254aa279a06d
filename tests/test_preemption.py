"""A run stopped at any moment resumes where it was: `kill -9` before the first validation (the
schedule's last.ckpt), SIGTERM to the whole process group (a checkpoint of the step in progress),
with and without gradient accumulation, and `kill -9` of both processes of an FSDP2 run.

A resumed run is compared with an uninterrupted one made here, on this CPU with this process's
thread count: the same kernels on the same numbers, so the losses are equal to the bit on any CPU
kind, in bf16 (AVX-512 BF16, AMX) or float32 (AVX2, where `auto` resolves to 32-true)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from cli_helpers import fit, scalars, summary, tiny_args
from test_distributed import EVERY_SCHEME

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
STEPS = 8


class SignalAt(L.Callback):
    """Sends signal `name` at the end of micro-batch `batch` (0-based) to this process's group (every
    process of the run, DataLoader workers and other ranks included), from another process, or with
    `group: false` to this process alone; on rank `rank` only, where given."""

    def __init__(self, batch: int, name: str = "SIGTERM", group: bool = True, rank: int | None = None):
        self.batch, self.signum, self.group, self.rank = batch, signal.Signals[name], group, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx != self.batch or self.rank not in (None, trainer.global_rank):
            return
        if self.group:  # sent by another process, as a scheduler's is (workers obey their parent's quietly)
            subprocess.run(["kill", "-s", self.signum.name[3:], "--", f"-{os.getpgid(0)}"])
            time.sleep(0.5)  # time for a worker the signal killed to be noticed (torch's SIGCHLD handler)
        else:
            os.kill(os.getpid(), self.signum)


def signal_at(batch: int, name: str, **kwargs) -> tuple[str, ...]:
    extra = [f"--trainer.callbacks.{k}={v}" for k, v in kwargs.items()]
    return ("--trainer.callbacks+=test_preemption.SignalAt", f"--trainer.callbacks.batch={batch}",
            f"--trainer.callbacks.name={name}", *extra)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m lm_opt ...` in its own session (a signal to its group reaches nothing else), with
    this process's thread count, so that its arithmetic is the in-process runs'."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": str(torch.get_num_threads()),
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "lm_opt", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, start_new_session=True)


def run_args(tmp_path: Path, name: str, accumulate: int, *extra: str) -> list[str]:
    """STEPS optimizer steps with 2 DataLoader workers, validating once, at the end."""
    return tiny_args(tmp_path, name, STEPS, "--data.num_workers", "2", "--trainer.accumulate_grad_batches",
                     str(accumulate), "--trainer.val_check_interval", str(STEPS * accumulate), *extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Train losses of the uninterrupted runs, by gradient accumulation."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    losses = {}
    for accumulate in (1, 2):
        fit(*run_args(tmp, f"acc{accumulate}", accumulate))
        losses[accumulate] = scalars(tmp / f"acc{accumulate}", "train/loss")
        assert sorted(losses[accumulate]) == list(range(STEPS))
    return losses


def last_step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["global_step"]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_kill_9_before_the_first_validation_resumes_bit_for_bit(tmp_path, uninterrupted, accumulate):
    """last.ckpt every step from the first, though val/loss does not exist yet: killed at the end of
    a random step k, the run keeps step k - 1 and the resumed run ends with every loss equal."""
    k = random.randint(2, STEPS - 1)
    args = run_args(tmp_path, "run", accumulate, "--checkpoint.every_n_train_steps", "1")
    killed = run_cli(*args, *signal_at(k * accumulate - 1, "SIGKILL"))
    assert killed.returncode == -signal.SIGKILL, f"k={k}\n" + killed.stderr[-3000:]
    assert last_step(tmp_path / "run") == k - 1, f"k={k}"
    assert not (tmp_path / "run" / "summary.json").exists()
    fit(*args, "--ckpt_path", "last")
    assert summary(tmp_path / "run")["steps"] == STEPS
    resumed = scalars(tmp_path / "run", "train/loss")
    assert resumed == uninterrupted[accumulate], f"k={k}"


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sigterm_to_the_process_group_saves_the_step_in_progress_and_resumes(tmp_path, uninterrupted, accumulate):
    """SIGTERM reaches the main process and its DataLoader workers at the end of step 5, or after
    the first of its two micro-batches: the run finishes the step, saves it (no checkpoint before:
    none is scheduled) and ends as `interrupted`; resumed, every loss equals the uninterrupted run's."""
    args = run_args(tmp_path, "run", accumulate)
    stopped = run_cli(*args, *signal_at(4 * accumulate, "SIGTERM"))
    expected = 5  # the step in progress when the signal came
    record = summary(tmp_path / "run")
    assert record["status"] == "interrupted" and record["steps"] == expected, record
    assert record["error"] == f"Preempted: SIGTERM at step {expected}: saved checkpoints/last.ckpt"
    assert last_step(tmp_path / "run") == expected
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    fit(*args, "--ckpt_path", "last")
    assert summary(tmp_path / "run")["status"] == "finished"
    assert scalars(tmp_path / "run", "train/loss") == uninterrupted[accumulate]


# configs/fsdp.yaml on 2 CPU processes, as tests/test_distributed.py runs it.
FSDP2 = ("--config", "configs/fsdp.yaml", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
         "--data.batch_size", "4", "--trainer.val_check_interval", "6")


def test_fsdp2_killed_9_mid_run_resumes_every_sharding_scheme_to_the_uninterrupted_result(tmp_path):
    """One route per sharding scheme (tests/test_distributed.py's EVERY_SCHEME: owner, block and
    column statistics, elementwise), both ranks killed at the end of step 4 (their checkpoint of
    step 3 gathered into one file by Lightning), resumed from the command line as a user resumes:
    the weights and validation loss of the uninterrupted run, to rounding: measured equal to the
    bit on the three CPU kinds (`.ci/as-kind`), 1e-6 is float32's last bits. About 60 s: three
    2-process launches, since only separate processes can be killed mid-step."""
    config = tmp_path / "every_scheme.yaml"
    config.write_text(EVERY_SCHEME)
    every_scheme = (*FSDP2, "--config", str(config))
    whole = run_cli(*tiny_args(tmp_path, "whole", 6, *every_scheme))
    assert whole.returncode == 0, whole.stderr[-3000:]
    for scheme in ("route 'matrix': Muon on parameter shards: owner", "route 'last_layer': Adalayer on parameter "
                   "shards: block statistics", "route 'rest': Adafactor on parameter shards: column statistics",
                   "route 'norm': AdamW on parameter shards: elementwise"):
        assert scheme in whole.stdout + whole.stderr
    args = tiny_args(tmp_path, "run", 6, *every_scheme, "--checkpoint.every_n_train_steps", "1")
    killed = run_cli(*args, *signal_at(3, "SIGKILL", rank=0))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert last_step(tmp_path / "run") == 3
    resumed = run_cli(*args, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = summary(tmp_path / "whole"), summary(tmp_path / "run")
    assert a["status"] == b["status"] == "finished" and b["steps"] == 6
    assert b["final_val_loss"] == pytest.approx(a["final_val_loss"], rel=1e-6)
    load = lambda run: torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]  # noqa: E731
    w, r = load(tmp_path / "whole"), load(tmp_path / "run")
    assert w.keys() == r.keys()
    for name in w:
        torch.testing.assert_close(r[name], w[name], rtol=1e-6, atol=1e-7, msg=name)

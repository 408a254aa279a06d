"""The sweep's Slurm script, and a point run as Slurm runs it: two processes started by (a stand-in
for) srun with Slurm's environment, warned with SIGUSR1, requeued with (a stand-in for) scontrol,
then resumed by the requeued task."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm_opt.study import sweep, sweep_plan

ROOT = Path(__file__).parent.parent.parent
TINY_DDP = {"data.seq_len": 32, "data.batch_size": 4, "data.val_sequences": 8, "data.num_workers": 0,
            "trainer.max_steps": 6, "trainer.val_check_interval": 6, "trainer.log_every_n_steps": 1,
            "trainer.enable_progress_bar": False, "trainer.accelerator": "cpu", "trainer.devices": 2,
            "trainer.strategy": "ddp"}

# Fakes put first on PATH: srun starts one task per device with the variables Slurm gives each
# task; scontrol records what it was asked.
FAKE_SRUN = """#!{python}
import os, subprocess, sys
command = [a for a in sys.argv[1:] if not a.startswith("--")]
with open(os.path.join(os.path.dirname(__file__), "srun.log"), "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
tasks = [subprocess.Popen(command, env=dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NODEID="0"))
         for i in range(int(os.environ["SLURM_NTASKS_PER_NODE"]))]
sys.exit(max(abs(t.wait()) for t in tasks))
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$@" >> "$(dirname "$0")/scontrol.log"
"""


def write_spec(tmp_path: Path, **overrides) -> Path:
    spec = {"name": "slurm", "out_dir": str(tmp_path / "out"), "base": ["configs/quickstart.yaml"],
            "optimizers": {"adamw": {"config": "configs/optim/adamw.yaml", "grid": {"lr": [1e-3]}}},
            "overrides": {**TINY_DDP, **overrides}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def fake_slurm(tmp_path: Path) -> dict:
    """The environment of array task 0 of job 77 (job id 78) on one node with 2 tasks, the fakes first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN.format(python=sys.executable)), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(ROOT / "tests"),
                OMP_NUM_THREADS="1", SLURM_JOB_ID="78", SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="0",
                SLURM_JOB_NAME="slurm", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_NNODES="1",
                SLURM_NODELIST="localhost", MASTER_PORT=str(port))


def test_the_sbatch_script_asks_for_the_warning_signal_requeueing_and_one_task_per_device(tmp_path):
    spec = write_spec(tmp_path)
    sweep.main([str(spec), "--slurm"])
    script = (tmp_path / "out" / "sweep.sbatch").read_text()
    for line in ("#SBATCH --signal=USR1@300", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --nodes=1", "#SBATCH --open-mode=append"):
        assert line in script.splitlines(), line
    assert "--gres" not in script  # a CPU point asks for no GPU
    # The task runs the point's command.sh through srun, once per device.
    env = fake_slurm(tmp_path)
    point = sweep_plan.plan(sweep_plan.load_spec(spec))[0]
    (point.run_dir / "command.sh").write_text('echo "task $SLURM_PROCID" >> "$(dirname "$0")/ran"\n')
    subprocess.run(["bash", str(tmp_path / "out" / "sweep.sbatch")], env=env, check=True)
    assert sorted((point.run_dir / "ran").read_text().splitlines()) == ["task 0", "task 1"]
    assert (tmp_path / "bin" / "srun.log").read_text() == f"--kill-on-bad-exit=1 bash {point.run_dir}/command.sh\n"


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            out.update((e.step, e.value) for e in acc.Scalars("train/loss"))
    return out


@pytest.mark.slow
def test_slurm_warning_saves_the_step_requeues_the_task_and_the_requeued_task_resumes(tmp_path):
    """Rank 1 alone gets SIGUSR1 at the end of step 3: both ranks save step 3 and stop, rank 0 asks
    scontrol to requeue array task 77_0, and the sbatch script run again (the requeued task)
    resumes the point to its end, every step's loss recorded once."""
    spec = write_spec(tmp_path, **{"trainer.callbacks+": "test_preemption.SignalAt", "trainer.callbacks.batch": 2,
                                   "trainer.callbacks.name": "SIGUSR1", "trainer.callbacks.group": False,
                                   "trainer.callbacks.rank": 1})
    sweep.main([str(spec), "--slurm"])
    run = sweep_plan.plan(sweep_plan.load_spec(spec))[0].run_dir
    env = fake_slurm(tmp_path)
    first = subprocess.run(["bash", str(tmp_path / "out" / "sweep.sbatch")], env=env)
    log = (run / "fit.log").read_text()
    assert first.returncode == 128 + 10, log[-3000:]  # 128 + SIGUSR1
    record = yaml.safe_load((run / "summary.json").read_text())
    assert record["status"] == "interrupted" and record["steps"] == 3, record
    assert record["error"] == "Preempted: SIGUSR1 at step 3: saved checkpoints/last.ckpt; Slurm job requeued"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert (tmp_path / "bin" / "scontrol.log").read_text() == "requeue 77_0\n"
    assert sweep.point_state(run) == "resume"  # a rerun of the sweep resumes it too
    subprocess.run(["bash", str(tmp_path / "out" / "sweep.sbatch")], env=env, check=True)
    record = yaml.safe_load((run / "summary.json").read_text())
    assert record["status"] == "finished" and record["steps"] == 6, record
    assert sorted(losses(run)) == list(range(6))

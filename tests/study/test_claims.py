"""Sweeps sharing a folder (lm_opt/study/claims.py): a point that another live process holds is left
to it and its result taken, a dead holder's point runs here, a point's command.sh run alone holds
its folder, and two sweeps started at once on one spec run each point once."""

import csv
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lm_opt.run_lock import FD_ENV
from lm_opt.study import sweep, sweep_plan
from lock_helpers import hold, let_go
from test_sweep import TINY, write_spec

ROOT = Path(__file__).parents[2]
FINISHED = json.dumps({"status": "finished", "final_val_loss": 5.0})


def fake_points(tmp_path, count: int) -> list[sweep_plan.Point]:
    """Points whose command.sh notes that it ran and finishes the point at once."""
    points = sweep_plan.plan(sweep_plan.load_spec(write_spec(tmp_path)))[:count]
    for point in points:
        sweep.write_point(point, "micro")
        (point.run_dir / "command.sh").write_text(
            f"echo ran >> {point.run_dir}/ran\necho '{FINISHED}' > {point.run_dir}/summary.json\n")
    return points


def test_a_held_point_is_left_to_its_holder_and_a_dead_holders_point_runs_here(tmp_path, capsys, caplog):
    finishing, dying, free = fake_points(tmp_path, 3)
    holders = [hold(finishing.run_dir, summary=FINISHED), hold(dying.run_dir)]
    later = threading.Timer(0.5, lambda: (let_go(holders[0]), holders[1].kill()))
    later.start()
    results = sweep.execute([finishing, dying, free], jobs=1)
    later.join()
    holders[1].wait()
    assert results == {finishing.name: None, dying.name: None, free.name: None}
    assert not (finishing.run_dir / "ran").exists()
    assert [(p.run_dir / "ran").read_text() for p in (dying, free)] == ["ran\n", "ran\n"]
    out = capsys.readouterr().out
    assert f"[1/3] {finishing.name}: held by pid {holders[0].pid} on host {socket.gethostname()}" in out
    assert f"[1/3] {finishing.name}: finished, run by pid {holders[0].pid}" in out
    assert f"[2/3] {dying.name}: held by pid {holders[1].pid}" in out and f"[2/3] start {dying.name}" in out
    assert f"{dying.run_dir}: taking it over from pid {holders[1].pid}" in caplog.text


def test_a_point_command_run_alone_holds_its_folder_and_refuses_one_in_use(tmp_path):
    """As a Slurm task runs it: the script takes the lock itself, hands it to `fit`, and takes over
    from a killed holder."""
    point = sweep_plan.plan(sweep_plan.load_spec(write_spec(tmp_path)))[0]
    sweep.write_point(point, "micro")
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "fd=${FD_ENV}"\nflock -n {point.run_dir}/.run.lock true || echo held\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != FD_ENV} | {"PYTHON": str(fake)}
    holder = hold(point.run_dir)
    refused = subprocess.run(["bash", point.run_dir / "command.sh"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2
    (line,) = refused.stderr.splitlines()
    assert line.startswith(f"error: {point.run_dir} is in use by another process: ") and f'"pid": {holder.pid},' in line
    holder.kill()
    holder.wait()
    ran = subprocess.run(["bash", point.run_dir / "command.sh"], env=env, capture_output=True, text=True, check=True)
    took_over, *lines = ran.stdout.splitlines()
    assert took_over.startswith(f"{point.run_dir}: taking it over from {{ \"pid\": {holder.pid},")
    assert lines == ["fd=9", "held"]  # `fit` gets the lock, which holds while it runs


@pytest.mark.slow
def test_two_sweeps_started_at_once_run_each_point_once(tmp_path, embedded_corpus):
    """Two `python -m lm_opt sweep` processes on one spec, as two terminals: each point runs once, in
    one of them, and ends with one run's events and summary; both end with the whole report. About
    40 s of CPU, 60 s of wall clock on 2 cores that a background sweep shares: each sweep and each
    point is a fresh interpreter, as a user's are, and it takes two sweeps to share a folder."""
    spec = write_spec(tmp_path, optimizers={
        "adamw": {"config": "configs/optim/adamw.yaml", "grid": {"lr": [1e-2]}},
        "signum": {"config": "configs/optim/signum.yaml", "grid": {"lr": [1e-3]}}},
        overrides={**TINY, "trainer.max_steps": 2, "trainer.val_check_interval": 2})
    names = [p.name for p in sweep_plan.plan(sweep_plan.load_spec(spec))]
    procs = [subprocess.Popen([sys.executable, "-m", "lm_opt", "sweep", str(spec)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    out = tmp_path / "out"
    for name in names:
        assert sum(f"start {name}" in line for o in outs for line in o.splitlines()) == 1, outs
        assert len(list((out / name).glob("events.out.tfevents.*"))) == 1
        assert json.loads((out / name / "summary.json").read_text())["steps"] == 2
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(r["point"] for r in rows) == sorted(names)

"""`python -m lm_opt sweep`: points and their commands, checks before launch, a micro-sweep on
the tiny preset that is killed and resumed, crash reporting and the Slurm script."""

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from lm_opt.study import recheck, report, stats, sweep, sweep_plan
from lm_opt.study.rows import load_rows

SWEEPS = sorted(Path("configs/sweeps").glob("*.yaml"))
TINY = {"data.seq_len": 32, "data.batch_size": 4, "data.val_sequences": 8, "data.num_workers": 0,
        "trainer.max_steps": 6, "trainer.val_check_interval": 2, "trainer.log_every_n_steps": 1,
        "trainer.enable_progress_bar": False}


def write_spec(tmp_path: Path, **changes) -> Path:
    """A 2 x 2 micro-sweep (AdamW, Signum x two lrs) of a few tiny steps, with `changes` on top."""
    spec = {"name": "micro", "out_dir": str(tmp_path / "out"), "base": ["configs/quickstart.yaml"],
            "optimizers": {"adamw": {"config": "configs/optim/adamw.yaml", "grid": {"lr": [1e-3, 1e-2]}},
                           "signum": {"config": "configs/optim/signum.yaml", "grid": {"lr": [1e-4, 1e-3]}}},
            "overrides": dict(TINY)}
    spec.update(changes)
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def no_launch(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"launched {args}")

    monkeypatch.setattr(sweep.subprocess, "Popen", refuse)


def test_points_cross_each_optimizer_grid_with_the_shared_grid():
    points = sweep_plan.plan(sweep_plan.load_spec("configs/sweeps/lr_150m.yaml"))
    assert len(points) == 6 * 9 * 2
    p = next(p for p in points if p.name == "lion_lr3.16e-04_qk_norm-false_z_loss0")
    assert p.values == {"lr": 3.16e-4, "qk_norm+z_loss": {"model.qk_norm": False, "model.z_loss": 0.0}}
    assert p.optimizer_yaml["trainer"]["callbacks"][0]["init_args"]["optimizer"]["init_args"]["lr"] == 3.16e-4
    args = " ".join(p.fit_args())
    assert ("--config configs/150m.yaml "
            "--config logs/sweeps/lr_150m/lion_lr3.16e-04_qk_norm-false_z_loss0/optimizer.yaml") in args
    assert "--model.qk_norm false --model.z_loss 0.0" in args
    assert args.endswith("--trainer.logger.init_args.save_dir logs/sweeps/lr_150m "
                         "--trainer.logger.init_args.name lion_lr3.16e-04_qk_norm-false_z_loss0")


def test_beta1_sets_betas0_or_the_momentum():
    points = {p.name: p for p in sweep_plan.plan(sweep_plan.load_spec("configs/sweeps/beta1_150m.yaml"))}
    assert len(points) == 6 * 7 * 2

    def init_args(name):
        return points[name].optimizer_yaml["trainer"]["callbacks"][0]["init_args"]["optimizer"]["init_args"]

    assert init_args("adamw_beta1-0.8_qk_norm-true_z_loss1.00e-04")["betas"] == [0.8, 0.95]
    assert init_args("signum_beta1-0.5_qk_norm-true_z_loss1.00e-04")["momentum"] == 0.5
    assert init_args("sgd_beta1-0_qk_norm-true_z_loss1.00e-04")["momentum"] == 0.0


def test_a_route_key_sets_that_route_only(tmp_path):
    spec = write_spec(tmp_path, optimizers={"sgd_ada": {"config": "configs/optim/sgd_adalayer_last_norm.yaml",
                                                        "grid": {"routes.1.optimizer.init_args.lr": [0.1, 10.0]}}})
    points = sweep_plan.plan(sweep_plan.load_spec(spec))
    assert [p.name for p in points] == ["sgd_ada_lr0.1", "sgd_ada_lr10"]
    routes = points[1].optimizer_yaml["trainer"]["callbacks"][0]["init_args"]["routes"]
    assert (routes[0]["optimizer"]["init_args"]["lr"], routes[1]["optimizer"]["init_args"]["lr"]) == (3.16e-3, 10.0)


def test_a_paired_axis_with_one_value_for_its_keys_is_named_and_reported_by_it(tmp_path):
    both = [{"routes.0.optimizer.init_args.lr": lr, "routes.1.optimizer.init_args.lr": lr} for lr in (1e-3, 1e-2)]
    spec = write_spec(tmp_path, optimizers={"frozen": {"config": "configs/optim/frozen_adalayer.yaml",
                                                       "grid": {"lr": both}}})
    points = sweep_plan.plan(sweep_plan.load_spec(spec))
    assert [(p.name, p.values) for p in points] == [("frozen_lr1.00e-03", {"lr": 1e-3}), ("frozen_lr0.01", {"lr": 1e-2})]
    routes = points[1].optimizer_yaml["trainer"]["callbacks"][0]["init_args"]["routes"]
    assert [r["optimizer"]["init_args"]["lr"] for r in routes] == [1e-2, 1e-2]


def test_an_optimizers_own_overrides_set_its_yaml_and_stay_out_of_names_and_other_optimizers(tmp_path):
    spec = write_spec(tmp_path, optimizers={
        "soap": {"config": "configs/optim/soap.yaml", "grid": {"lr": [1e-3]},
                 "overrides": {"optimizer.init_args.max_precond_dim": 64, "trainer.max_steps": 3}},
        "adamw": {"config": "configs/optim/adamw.yaml", "grid": {"lr": [1e-3]}}})
    soap, adamw = sweep_plan.plan(sweep_plan.load_spec(spec))
    assert (soap.name, adamw.name) == ("soap_lr1.00e-03", "adamw_lr1.00e-03")
    assert sweep_plan.callback_init_args(soap.optimizer_yaml, "soap")["optimizer"]["init_args"]["max_precond_dim"] == 64
    assert soap.overrides[soap.overrides.index("--trainer.max_steps") + 1] == "3"
    assert "max_precond_dim" not in json.dumps(adamw.optimizer_yaml) + " ".join(adamw.overrides)
    assert adamw.overrides[adamw.overrides.index("--trainer.max_steps") + 1] == "6"


def test_grid_seeds_run_every_point_again_and_seeds_repeat_only_the_best(tmp_path, capsys, no_launch):
    spec = write_spec(tmp_path, grid_seeds=[7], seeds=[8])
    sweep.run_sweep(str(spec), dry_run=True)
    printed = capsys.readouterr().out
    assert "8 points" in printed
    assert "signum_lr1.00e-04_seed7" in printed and "--seed_everything 7" in printed
    assert "then each line's best point with seeds [8]" in printed
    with pytest.raises(sweep_plan.SpecError, match="share a seed"):
        sweep_plan.load_spec(write_spec(tmp_path, grid_seeds=[1, 2], seeds=[2]))


def test_a_spec_and_its_optimizer_yaml_read_numbers_as_fit_does(tmp_path):
    """`3e-3` is a float to `fit` (jsonargparse), so to a spec too, not YAML 1.1's string."""
    optimizer = tmp_path / "adamw.yaml"
    optimizer.write_text("trainer:\n  callbacks:\n    - class_path: lm_opt.callbacks.OptimizerCallback\n      init_args:\n"
                         "        optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 1e-3, eps: 1e-15}}\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: numbers\nout_dir: {tmp_path / 'out'}\nbase: [configs/quickstart.yaml]\n"
                    f"optimizers:\n  adamw: {{config: {optimizer}, grid: {{lr: [3e-3, 1e-2]}}}}\n"
                    "report: {margin: 1e-1}\n")
    loaded = sweep_plan.load_spec(spec)
    assert loaded["report"]["margin"] == 0.1
    points = sweep_plan.plan(loaded)
    assert [p.name for p in points] == ["adamw_lr3.00e-03", "adamw_lr0.01"]
    init_args = sweep_plan.callback_init_args(points[0].optimizer_yaml, "adamw")["optimizer"]["init_args"]
    assert (init_args["lr"], init_args["eps"]) == (3e-3, 1e-15)


@pytest.mark.parametrize("spec", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_a_shipped_spec_plans_the_points_committed_under_its_folder(spec):
    """The points of a spec with a committed folder are named as its records are (how a spec's YAML is
    read must not rename them: a rerun would run them all again). A sweep under way (adamw_ladder)
    holds some of its points: each committed grid point must be one the spec plans."""
    loaded = sweep_plan.load_spec(spec)
    if not loaded["out_dir"].is_dir():
        pytest.skip(f"no committed records of {spec.stem}")
    committed = {re.sub(r"_seed\d+$", "", p.name) for p in loaded["out_dir"].iterdir() if (p / "point.json").is_file()}
    assert committed and committed <= {p.name for p in sweep_plan.plan(loaded)}


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_commit_records_a_done_point_without_its_checkpoints_or_other_staged_work(tmp_path, monkeypatch):
    for variable in ("GIT_AUTHOR", "GIT_COMMITTER"):
        monkeypatch.setenv(f"{variable}_NAME", "lm_opt tests")
        monkeypatch.setenv(f"{variable}_EMAIL", "tests@lm-opt.invalid")
    git("init", "-q", cwd=tmp_path)
    (tmp_path / ".gitignore").write_text("logs/*\n")
    (tmp_path / "other.txt").write_text("work in progress")
    git("add", ".gitignore", "other.txt", cwd=tmp_path)
    run_dir = tmp_path / "logs" / "sweeps" / "study" / "adamw_lr1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (run_dir / "events.out.tfevents.1.host").write_bytes(b"curves")
    (run_dir / "fit.log").write_text("log")
    (run_dir / "summary.json").write_text(json.dumps({"status": "finished", "final_val_loss": 5.25}))
    monkeypatch.chdir(tmp_path)
    sweep.commit_record(sweep_plan.Point("adamw_lr1", "adamw", {}, [], Path("logs/sweeps/study/adamw_lr1"), {}, [], []))
    assert git("log", "-1", "--format=%s", cwd=tmp_path).strip() == "study: adamw_lr1 finished (final val loss 5.2500)"
    assert git("show", "--name-only", "--format=", "HEAD", cwd=tmp_path).split() == [
        "logs/sweeps/study/adamw_lr1/fit.log", "logs/sweeps/study/adamw_lr1/summary.json"]
    assert git("diff", "--cached", "--name-only", cwd=tmp_path).split() == [".gitignore", "other.txt"]


def test_a_done_record_whose_commit_failed_is_committed_when_the_sweep_starts_again(tmp_path, monkeypatch):
    for variable in ("GIT_AUTHOR", "GIT_COMMITTER"):
        monkeypatch.setenv(f"{variable}_NAME", "lm_opt tests")
        monkeypatch.setenv(f"{variable}_EMAIL", "tests@lm-opt.invalid")
    git("init", "-q", cwd=tmp_path)
    (tmp_path / ".gitignore").write_text("logs/*\n")
    points = []
    for name in ("adamw_lr1", "adamw_lr2"):
        run_dir = tmp_path / "logs" / "sweeps" / "study" / name
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps({"status": "finished", "final_val_loss": 5.25}))
        points.append(sweep_plan.Point(name, "adamw", {}, [], run_dir, {}, [], []))
    sweep.commit_record(points[0])
    sweep.commit_uncommitted(points)  # the second one's commit had failed
    assert git("log", "--format=%s", cwd=tmp_path).split("\n")[0] == "study: adamw_lr2 finished (final val loss 5.2500)"
    assert len(git("log", "--format=%s", cwd=tmp_path).strip().splitlines()) == 2
    sweep.commit_uncommitted(points)  # nothing left to commit
    assert len(git("log", "--format=%s", cwd=tmp_path).strip().splitlines()) == 2


@pytest.mark.parametrize("spec", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_shipped_sweeps_parse(spec):
    """The first point of every optimizer of every shipped sweep parses as a `fit` command."""
    points = sweep_plan.plan(sweep_plan.load_spec(spec))
    for label in dict.fromkeys(p.optimizer for p in points):
        sweep_plan.validate(next(p for p in points if p.optimizer == label))


def test_the_readme_study_results_are_those_of_the_shipped_spec():
    """`logs/sweeps/cpu_study/results.csv` (the README's figure and table) has one finished or
    diverged row per grid point of `configs/sweeps/cpu_study.yaml` and every seed repeat at each
    optimizer's best point, and that best point lies inside its grid (bracketed by a neighbour on each
side): a grid edited without rerunning the sweep fails here."""
    spec = sweep_plan.load_spec(Path("configs/sweeps/cpu_study.yaml"))
    rows = list(csv.DictReader(open("logs/sweeps/cpu_study/results.csv")))
    grid = {p.name for p in sweep_plan.plan(spec)}
    assert grid <= {r["point"] for r in rows}
    assert {r["status"] for r in rows} <= {"finished", "diverged"}
    for optimizer in spec["optimizers"]:
        line = [r for r in rows if r["optimizer"] == optimizer and r["point"] in grid and r["status"] == "finished"]
        best = min(line, key=lambda r: float(r["final_val_loss"]))
        axis = next(iter(spec["optimizers"][optimizer]["grid"]))
        grid_values = sorted(spec["optimizers"][optimizer]["grid"][axis])
        assert grid_values[0] < float(best[sweep_plan.short_name(axis)]) < grid_values[-1], (
            f"{optimizer}: best point {best['point']} is at the edge of its grid {grid_values}")
        best = best["point"]
        repeats = {r["point"] for r in rows if r["point"].startswith(best + "_seed")}
        assert repeats == {f"{best}_seed{s}" for s in spec["seeds"]}, optimizer


@pytest.mark.slow
def test_each_lines_best_point_runs_again_with_every_seed(tmp_path, monkeypatch):
    launched = []
    losses = {"adamw_lr1.00e-03": 5.0, "adamw_lr0.01": 4.0, "signum_lr1.00e-04": 4.5, "signum_lr1.00e-03": 4.6}

    def fake_launch(point, slot, env):
        launched.append(point.name)
        summary = {"status": "finished", "final_val_loss": losses.get(point.name, 6.0)}
        (point.run_dir / "summary.json").write_text(json.dumps(summary))
        return subprocess.Popen(["true"])

    monkeypatch.setattr(sweep, "launch", fake_launch)
    spec = write_spec(tmp_path, seeds=[1, 2])
    sweep.main([str(spec)])
    assert launched[4:] == ["adamw_lr0.01_seed1", "adamw_lr0.01_seed2",
                            "signum_lr1.00e-04_seed1", "signum_lr1.00e-04_seed2"]
    seeded = tmp_path / "out" / "adamw_lr0.01_seed2"
    assert "--seed_everything 2" in (seeded / "command.sh").read_text()
    assert json.loads((seeded / "point.json").read_text())["values"] == {"lr": 0.01, "seed": 2}
    launched.clear()
    sweep.main([str(spec)])
    assert launched == []


@pytest.mark.parametrize("change,message", [
    ({"optimisers": {}}, "unknown key(s) ['optimisers']"),
    ({"optimizers": {"adamw": {"config": "configs/optim/adamw.yaml", "grdi": {}}}},
     "optimizers.adamw: unknown key(s) ['grdi']"),
    ({"optimizers": {"adamw": {"config": "configs/optim/adamw.yaml", "grid": {"lr": []}}}}, "optimizers.adamw.grid.lr"),
    ({"grid": {"model.qk_norm": []}}, "grid.model.qk_norm: needs a non-empty list"),
    ({"base": ["configs/nope.yaml"]}, "base[0]: file 'configs/nope.yaml' does not exist"),
    ({"optimizers": {"x": {"config": "configs/optim/nope.yaml"}}}, "optimizers.x.config"),
    ({"grid": {"model.no_such_key": [1]}}, "point adamw_lr1.00e-03_no_such_key1"),
    ({"grid": {"optimizer.init_args.betas.2": [0.5]}}, "index 2 is out of range"),
    ({"optimizers": {"adamw": {"config": "configs/optim/adamw.yaml", "grid": {"lr": [-1.0]}}}},
     "point adamw_lr--1: its optimizer cannot be built"),
    ({"seeds": [1, 1]}, "seeds: needs a list of distinct integers"),
    ({"report": {"margin": -0.1}}, "report.margin: needs a positive number"),
    ({"report": {"panel": "width"}}, "report.panel: needs AXIS=REGEX"),
    ({"report": {"margn": 0.1}}, "report: unknown key(s) ['margn']"),
])
def test_spec_errors_are_reported_before_anything_runs(tmp_path, capsys, no_launch, change, message):
    with pytest.raises(SystemExit) as exit_:
        sweep.main([str(write_spec(tmp_path, **change))])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_crashed_points_are_reported_never_dropped(tmp_path):
    points = sweep_plan.plan(sweep_plan.load_spec(write_spec(tmp_path)))[:3]
    for p in points:
        sweep.write_point(p, "micro")
    summary = '{"status": "%s", "error": "RuntimeError: boom"}'
    (points[0].run_dir / "command.sh").write_text("kill -9 $$\n")
    (points[1].run_dir / "command.sh").write_text(
        f"echo '{summary % 'failed'}' > {points[1].run_dir}/summary.json; exit 1\n")
    (points[2].run_dir / "command.sh").write_text(f"echo '{summary % 'finished'}' > {points[2].run_dir}/summary.json\n")
    results = sweep.execute(points, jobs=2)
    assert results[points[0].name] == "exit code -9: no summary.json"
    assert results[points[1].name] == "exit code 1: RuntimeError: boom"
    assert results[points[2].name] is None
    md = report.write_report(tmp_path / "out").read_text()
    assert f"{points[0].name}: incomplete" in md and f"{points[1].name}: failed: RuntimeError: boom" in md


def points_holding_checkpoints(tmp_path, statuses):
    """Points whose command.sh ends the run with each of `statuses`, each holding a last.ckpt."""
    points = sweep_plan.plan(sweep_plan.load_spec(write_spec(tmp_path)))[:len(statuses)]
    for point, status in zip(points, statuses):
        sweep.write_point(point, "micro")
        (point.run_dir / "checkpoints").mkdir()
        (point.run_dir / "checkpoints" / "last.ckpt").write_bytes(b"a step")
        (point.run_dir / "command.sh").write_text(
            f"echo '{{\"status\": \"{status}\"}}' > {point.run_dir}/summary.json\n")
    return points


def test_drop_checkpoints_deletes_those_of_points_that_end_done_and_keeps_an_unfinished_ones(tmp_path):
    points = points_holding_checkpoints(tmp_path, ["finished", "diverged", "interrupted"])
    sweep.execute(points, jobs=2, when_done=sweep.WhenDone(drop_checkpoints=True))
    assert [(p.run_dir / "checkpoints").exists() for p in points] == [False, False, True]
    assert sweep.point_state(points[2].run_dir) == "resume"


def test_drop_checkpoints_at_a_sweeps_start_deletes_those_done_points_kept(tmp_path, capsys):
    points = points_holding_checkpoints(tmp_path, ["finished", "diverged", "interrupted"])
    sweep.execute(points, jobs=3)  # the default keeps every checkpoint
    assert all((p.run_dir / "checkpoints" / "last.ckpt").is_file() for p in points)
    todo = sweep.prepare(points, {"name": "micro"}, when_done=sweep.WhenDone(drop_checkpoints=True))
    assert todo == points[2:]
    assert [(p.run_dir / "checkpoints").exists() for p in points] == [False, False, True]
    assert "deleted the checkpoints of 2 done points (--drop-checkpoints)" in capsys.readouterr().out


def test_the_drop_checkpoints_flag_reaches_the_sweep(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "run_sweep", lambda *args: calls.append(args) or {})
    sweep.main([str(write_spec(tmp_path)), "--drop-checkpoints"])
    sweep.main([str(write_spec(tmp_path))])
    assert [args[-1] for args in calls] == [True, False]


def test_a_sweep_with_runs_from_another_cpu_kind_refuses_to_add_runs_here(tmp_path, capsys, no_launch, monkeypatch):
    spec = write_spec(tmp_path)
    done = sweep_plan.plan(sweep_plan.load_spec(spec))[0]
    done.run_dir.mkdir(parents=True)
    elsewhere = {"capability": "AVX2", "avx512_bf16": False, "amx": False, "bf16_native": False}
    monkeypatch.setattr(sweep, "cpu_arithmetic", lambda: elsewhere | {"capability": "AVX512", "bf16_native": True})
    (done.run_dir / "summary.json").write_text(json.dumps({"status": "finished", "final_val_loss": 5.0, "provenance": {
        "device": {"type": "cpu", "arithmetic": elsewhere}}}))
    with pytest.raises(SystemExit) as exit_:
        sweep.main([str(spec)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"holds runs made on AVX2 (bf16 emulated) ({done.name}); this CPU is AVX512 (native bf16)" in err
    assert "--any-cpu" in err and not (done.run_dir.parent / "adamw_lr0.01").exists()


@pytest.mark.slow
def test_a_float32_sweep_adds_runs_on_any_cpu_kind(tmp_path, capsys, monkeypatch):
    """Float32 losses agree across kinds to a few millionths of a nat, so a float32 sweep resumes anywhere."""
    spec = write_spec(tmp_path, overrides={**TINY, "trainer.precision": "32-true"})
    done, *todo = sweep_plan.plan(sweep_plan.load_spec(spec))
    done.run_dir.mkdir(parents=True)
    elsewhere = {"capability": "AVX2", "avx512_bf16": False, "amx": False, "bf16_native": False}
    monkeypatch.setattr(sweep, "cpu_arithmetic", lambda: elsewhere | {"capability": "AVX512", "bf16_native": True})
    (done.run_dir / "summary.json").write_text(json.dumps({"status": "finished", "final_val_loss": 5.0, "provenance": {
        "device": {"type": "cpu", "arithmetic": elsewhere, "precision": "32-true"}}}))
    launched = []
    monkeypatch.setattr(sweep, "execute", lambda points, *args: launched.extend(points) or {})
    monkeypatch.setattr(sweep, "write_report", lambda *args, **kwargs: None)
    sweep.main([str(spec), "--no-reuse"])
    assert [p.name for p in launched] == [p.name for p in todo]


def test_a_point_command_runs_from_any_clone_with_the_python_it_is_given(tmp_path):
    spec = write_spec(tmp_path, out_dir="logs/sweeps/micro_portable")
    point = sweep_plan.plan(sweep_plan.load_spec(spec))[0]
    try:
        sweep.write_point(point, "micro")
        script = (point.run_dir / "command.sh").read_text()
        assert json.loads((point.run_dir / "point.json").read_text())["command"][:3] == ["python", "-m", "lm_opt"]
    finally:
        shutil.rmtree("logs/sweeps/micro_portable")
    assert str(Path.cwd()) not in script and sys.executable not in script
    clone = tmp_path / "clone"
    (clone / point.run_dir).mkdir(parents=True)
    (clone / point.run_dir / "command.sh").write_text(script)
    (clone / "bin").mkdir()
    (clone / "bin" / "fake-python").write_text('#!/usr/bin/env bash\necho "$PWD $*"\n')
    (clone / "bin" / "fake-python").chmod(0o755)
    ran = subprocess.run(["bash", str(clone / point.run_dir / "command.sh")], capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=str(clone / "bin" / "fake-python")), cwd=tmp_path, check=True)
    assert ran.stdout.startswith(f"{clone} -m lm_opt fit --config configs/quickstart.yaml")


def test_no_committed_record_names_an_absolute_path():
    """A committed point's command.sh and point.json run from any clone (its header says so)."""
    records = sorted(Path("logs").glob("**/command.sh")) + sorted(Path("logs").glob("**/point.json"))
    assert records
    for path in records:
        assert not re.search(r"(^|[\s\"'=])/(work|home|tmp|root|Users)/", path.read_text()), path


def test_every_committed_command_starts_its_run_from_the_repository_root(tmp_path):
    """Each committed command.sh, with a stand-in interpreter, runs `fit` from the checkout's root,
    where its configs are, or says its point is done."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "$PWD"\n')
    fake.chmod(0o755)
    scripts = sorted(Path("logs/sweeps").glob("*/*/command.sh"))
    assert scripts
    for script in scripts:
        text = script.read_text().replace('grep -Eq \'"status": "(finished|diverged)"\'', "false")  # run it even if done
        copy = tmp_path / script
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(text)
        ran = subprocess.run(["bash", str(copy)], capture_output=True, text=True, env=dict(os.environ, PYTHON=str(fake)),
                             cwd="/", check=True)
        assert ran.stdout.strip() == str(tmp_path), script


def test_slurm_tasks_run_the_same_commands_as_local_execution(tmp_path, no_launch, monkeypatch):
    spec = write_spec(tmp_path)
    sweep.main([str(spec), "--slurm"])
    out = tmp_path / "out"
    script = (out / "sweep.sbatch").read_text()
    points = sweep_plan.plan(sweep_plan.load_spec(spec))
    assert "#SBATCH --array=0-3" in script and 'bash "$RUN/command.sh"' in script
    for p in points:
        assert str(p.run_dir.resolve()) in script
        command = (p.run_dir / "command.sh").read_text()
        assert f"--trainer.logger.init_args.name {p.name}" in command and "-m lm_opt fit" in command
        assert json.loads((p.run_dir / "point.json").read_text())["values"] == p.values
    # Task 2 runs the third point's command.sh.
    monkeypatch.undo()
    (points[2].run_dir / "command.sh").write_text("echo task ran > \"$(dirname \"$0\")/ran\"\n")
    subprocess.run(["bash", str(out / "sweep.sbatch")], env=dict(os.environ, SLURM_ARRAY_TASK_ID="2"), check=True)
    assert (points[2].run_dir / "ran").read_text() == "task ran\n"


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, "the sweep ended before the second point started"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The micro-sweep with one point per optimizer (2 runs), its process group killed (-9) during
    the second point (after its first checkpoint), then rerun. About 40 s: the sweep launches each
    point as its own `fit` process, as a user's sweep does, and a kill needs a real process."""
    tmp = tmp_path_factory.mktemp("micro")
    spec = write_spec(tmp, optimizers={
        "adamw": {"config": "configs/optim/adamw.yaml", "grid": {"lr": [1e-2]}},
        "signum": {"config": "configs/optim/signum.yaml", "grid": {"lr": [1e-3]}}})
    names = [p.name for p in sweep_plan.plan(sweep_plan.load_spec(spec))]
    out = tmp / "out"
    with open(tmp / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lm_opt", "sweep", str(spec)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(out / names[1] / "checkpoints" / "last.ckpt", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first_summary = (out / names[0] / "summary.json").read_bytes()
    assert not (out / names[1] / "summary.json").exists()
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        sweep.main([str(spec)])
    return {"spec": spec, "out": out, "names": names, "first_summary": first_summary, "stdout": stdout.getvalue()}


def test_recheck_reruns_a_point_with_the_cpu_threads_it_recorded(tmp_path, monkeypatch):
    point = tmp_path / "sweep" / "adamw_lr1"
    point.mkdir(parents=True)
    (point / "point.json").write_text(json.dumps({"command": ["/elsewhere/python", "-m", "lm_opt", "fit"]}))
    (point / "summary.json").write_text(json.dumps({"status": "finished", "final_val_loss": 5.0,
                                                    "provenance": {"device": {"threads": 3}}}))
    calls = []

    def run(command, env, **kwargs):
        calls.append((command, env["OMP_NUM_THREADS"]))
        out = Path(command[command.index("--trainer.logger.init_args.save_dir") + 1]) / "adamw_lr1"
        out.mkdir()
        (out / "summary.json").write_text(json.dumps({"status": "finished", "final_val_loss": 5.01}))

    monkeypatch.setattr(recheck.subprocess, "run", run)
    (row,) = recheck.recheck(tmp_path / "sweep", points=2, seed=0, tolerance=0.02)
    assert calls[0][0][:4] == [sys.executable, "-m", "lm_opt", "fit"] and calls[0][1] == "3"
    assert row["ok"] and row["delta"] == pytest.approx(0.01)


def test_recheck_says_when_a_record_was_made_on_another_cpu_kind_and_keeps_its_precision(tmp_path, monkeypatch,
                                                                                        capsys):
    point = tmp_path / "sweep" / "adamw_lr1"
    point.mkdir(parents=True)
    (point / "point.json").write_text(json.dumps({"command": ["python", "-m", "lm_opt", "fit"]}))
    made_on = {"capability": "AVX512", "avx512_bf16": True, "amx": False, "bf16_native": True}
    (point / "summary.json").write_text(json.dumps({"status": "finished", "final_val_loss": 5.0, "provenance": {
        "device": {"type": "cpu", "name": "AMD EPYC", "threads": 1, "precision": "bf16-mixed", "arithmetic": made_on}}}))
    monkeypatch.setattr(recheck, "cpu_arithmetic", lambda: made_on | {"capability": "AVX2", "avx512_bf16": False,
                                                                      "bf16_native": False})
    commands = []

    def run(command, env, **kwargs):
        commands.append(command)
        out = Path(command[command.index("--trainer.logger.init_args.save_dir") + 1]) / "adamw_lr1"
        out.mkdir()
        (out / "summary.json").write_text(json.dumps({"status": "finished", "final_val_loss": 5.0}))

    monkeypatch.setattr(recheck.subprocess, "run", run)
    recheck.main([str(tmp_path / "sweep")])
    printed = capsys.readouterr().out
    assert "note: adamw_lr1 was recorded on another CPU (AMD EPYC, AVX512 + AVX512-BF16 (native bf16))" in printed
    assert "AVX2 (bf16 emulated)" in printed and "which this CPU emulates" in printed
    assert commands[0][commands[0].index("--trainer.precision") + 1] == "bf16-mixed"
    monkeypatch.setattr(recheck, "cpu_arithmetic", lambda: made_on)
    monkeypatch.setattr(recheck, "cpu_name", lambda: "AMD EPYC")
    shutil.rmtree(Path(commands[0][commands[0].index("--trainer.logger.init_args.save_dir") + 1]), ignore_errors=True)
    recheck.main([str(tmp_path / "sweep")])
    assert "note:" not in capsys.readouterr().out


def test_recheck_needs_threads_for_a_cpu_record_without_them_before_anything_runs(tmp_path, monkeypatch, capsys):
    point = tmp_path / "sweep" / "sgd_lr1"
    point.mkdir(parents=True)
    (point / "point.json").write_text(json.dumps({"command": ["python", "-m", "lm_opt", "fit"]}))
    (point / "summary.json").write_text(json.dumps({"status": "finished", "final_val_loss": 6.0,
                                                    "provenance": {"device": {"type": "cpu"}}}))
    calls = []

    def run(command, env, **kwargs):
        calls.append(env["OMP_NUM_THREADS"])
        out = Path(command[command.index("--trainer.logger.init_args.save_dir") + 1]) / "sgd_lr1"
        out.mkdir()
        (out / "summary.json").write_text(json.dumps({"status": "finished", "final_val_loss": 6.0}))

    monkeypatch.setattr(recheck.subprocess, "run", run)
    with pytest.raises(SystemExit) as exit_:
        recheck.main([str(tmp_path / "sweep")])
    assert exit_.value.code == 2 and not calls
    assert "sgd_lr1/summary.json does not record the CPU threads" in capsys.readouterr().err
    recheck.main([str(tmp_path / "sweep"), "--threads", "1"])
    assert calls == ["1"]


@pytest.mark.slow
def test_recheck_reruns_recorded_points_and_flags_one_that_does_not_match(micro, tmp_path, capsys, monkeypatch):
    """A point micro recorded here reruns to +0.0000 on any CPU kind (same kernels, same threads);
    a record 0.05 off is flagged beyond recheck's 0.02."""
    out = tmp_path / "copy"
    shutil.copytree(micro["out"], out)
    rerun = recheck.rerun
    reruns = []
    monkeypatch.setattr(recheck, "rerun", lambda *args: reruns.append(rerun(*args)) or reruns[-1])
    recheck.main([str(out), "--points", "1", "--seed", "3"])
    printed = capsys.readouterr().out
    assert "(+0.0000)" in printed and "BEYOND" not in printed
    (point,) = [d for d in out.iterdir() if d.name in printed]
    summary = json.loads((point / "summary.json").read_text())
    summary["final_val_loss"] += 0.05
    (point / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(recheck, "rerun", lambda *args: reruns[0])  # the same rerun, against the changed record
    with pytest.raises(SystemExit) as exit_:
        recheck.main([str(out), "--points", "1", "--seed", "3"])
    assert exit_.value.code == 1 and "BEYOND 0.02" in capsys.readouterr().out


@pytest.mark.slow
def test_rerun_after_a_kill_finishes_only_the_missing_points(micro):
    assert "1 points already done, 1 to run" in micro["stdout"]
    assert f"start {micro['names'][1]} (resuming from last.ckpt)" in micro["stdout"]
    assert (micro["out"] / micro["names"][0] / "summary.json").read_bytes() == micro["first_summary"]
    for name in micro["names"]:
        assert json.loads((micro["out"] / name / "summary.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_micro_sweep_writes_results_and_plot(micro):
    rows = list(csv.DictReader(open(micro["out"] / "results.csv")))
    assert sorted(r["point"] for r in rows) == sorted(micro["names"])
    assert {r["optimizer"] for r in rows} == {"adamw", "signum"}
    assert all(r["status"] == "finished" and float(r["final_val_loss"]) > 0 and r["steps"] == "6" for r in rows)
    assert (micro["out"] / "plot_lr.png").stat().st_size > 0


@pytest.mark.slow
def test_rerun_of_a_finished_sweep_launches_nothing(micro, no_launch, capsys):
    sweep.main([str(micro["spec"])])
    assert "2 points already done, 0 to run" in capsys.readouterr().out


@pytest.mark.slow
def test_a_point_another_sweep_ran_is_copied_and_reruns_to_its_record(micro, tmp_path, monkeypatch, capsys):
    """micro ran adamw at lr 1e-2 in `out`; a sibling sweep with lrs 1e-2 and
    3e-3 copies the first, runs only the second, and the copy reruns (its own command) to the record:
    to the bit on any CPU kind, the record having been made here, with the threads the rerun takes."""
    spec = yaml.safe_load(micro["spec"].read_text())
    spec.update(name="sibling", out_dir=str(micro["out"].parent / "sibling"),
                optimizers={"adamw": {"config": "configs/optim/adamw.yaml", "grid": {"lr": [1e-2, 3e-3]}}})
    sibling = Path(write_spec(tmp_path, **spec))
    launched = []

    def fake_launch(point, slot, env):
        launched.append(point.name)
        (point.run_dir / "summary.json").write_text(json.dumps({"status": "finished", "final_val_loss": 6.0}))
        return sweep.subprocess.Popen(["true"])

    monkeypatch.setattr(sweep, "launch", fake_launch)
    sweep.main([str(sibling)])
    assert launched == ["adamw_lr3.00e-03"]
    assert "adamw_lr0.01: done already as" in capsys.readouterr().out
    copied, source = Path(spec["out_dir"]) / "adamw_lr0.01", micro["out"] / "adamw_lr0.01"
    assert (copied / "summary.json").read_bytes() == (source / "summary.json").read_bytes()
    point = json.loads((copied / "point.json").read_text())
    assert point["copied_from"] == str(source) and point["sweep"] == "sibling"
    assert f"{copied}/{sweep_plan.OPTIMIZER_YAML}" in point["command"] and not (copied / "checkpoints").exists()
    again = recheck.rerun(copied, tmp_path, recheck.recorded_threads(copied, None))
    assert again.final_val_loss == json.loads((source / "summary.json").read_text())["final_val_loss"]

    launched.clear()
    spec.update(name="forced", out_dir=str(micro["out"].parent / "forced"))
    sweep.main([str(write_spec(tmp_path, **spec)), "--no-reuse"])
    assert launched == ["adamw_lr0.01", "adamw_lr3.00e-03"]


@pytest.mark.slow
def test_report_rebuilds_from_the_run_folders_alone(micro, tmp_path):
    copy = tmp_path / "copy"
    for name in micro["names"]:
        shutil.copytree(micro["out"] / name, copy / name, ignore=shutil.ignore_patterns("checkpoints", "events.*"))
    report.main([str(copy)])
    assert (copy / "results.csv").read_text() == (micro["out"] / "results.csv").read_text()
    assert (copy / "plot_lr.png").is_file() and "## Stability" in (copy / "results.md").read_text()


def test_concurrent_points_get_one_gpu_each(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "gpu_slots", lambda: ["3", "5"])
    points = sweep_plan.plan(sweep_plan.load_spec(write_spec(tmp_path)))
    for p in points:
        sweep.write_point(p, "micro")
        (p.run_dir / "command.sh").write_text(
            f"echo $CUDA_VISIBLE_DEVICES > {p.run_dir}/gpu; sleep 0.5\n"
            f"echo '{{\"status\": \"finished\"}}' > {p.run_dir}/summary.json\n")
    assert not any(sweep.execute(points, jobs=4).values())
    gpus = [(p.run_dir / "gpu").read_text().strip() for p in points]
    assert set(gpus) == {"3", "5"} and gpus[0] != gpus[1]


def test_output_into_a_closed_pipe_ends_without_a_traceback(tmp_path):
    """`python -m lm_opt sweep ... --dry-run | head -1`: the reader is gone before the writer."""
    proc = subprocess.Popen([sys.executable, "-m", "lm_opt", "sweep", str(write_spec(tmp_path)), "--dry-run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.communicate()[1].decode()
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr


def test_dry_run_checks_and_lists_but_writes_and_runs_nothing(tmp_path, capsys, no_launch):
    sweep.main([str(write_spec(tmp_path)), "--dry-run"])
    out = capsys.readouterr().out
    assert "start  signum_lr1.00e-03" in out and "python -m lm_opt fit --config configs/quickstart.yaml" in out
    assert not (tmp_path / "out").exists()


def test_a_malformed_spec_is_named_with_its_line(tmp_path, capsys, no_launch):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: micro\nout_dir: [\n")
    with pytest.raises(SystemExit) as exit_:
        sweep.main([str(spec)])
    assert exit_.value.code == 2
    assert f"sweep spec {spec}, line 3, column 1: invalid YAML" in capsys.readouterr().err


LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
LOSS = {None: [6.0, 5.5, 5.0, 5.05, 5.6, 6.5],  # the grid: within 0.1 at 1e-3 and 3e-3
        1: [6.0, 5.5, 5.05, 5.0, 5.08, 6.4]}  # seed 1: 1e-2 is within too, so 3e-2 must run


def micro_spec(tmp_path, **changes):
    return write_spec(tmp_path, **{"optimizers": {"adamw": {"config": "configs/optim/adamw.yaml", "grid": {"lr": LRS}}},
                                   "grid_seeds": [1], "seeds": [2], "grid_seeds_cover": "stable",
                                   "report": {"margin": 0.1}, **changes})


@pytest.mark.slow
def test_grid_seeds_run_the_stable_range_and_grow_it_until_both_ends_are_bracketed(tmp_path, monkeypatch):
    launched = []

    def fake_launch(point, slot, env):
        seed, lr = point.values.get("seed"), point.values["lr"]
        launched.append((seed, lr))
        loss = LOSS[seed][LRS.index(lr)] if seed in LOSS else 5.02
        (point.run_dir / "summary.json").write_text(json.dumps({"status": "finished", "final_val_loss": loss}))
        return subprocess.Popen(["true"])

    monkeypatch.setattr(sweep, "launch", fake_launch)
    monkeypatch.setattr(sweep, "validate", lambda point: None)  # parsing configs is another test's question
    spec = micro_spec(tmp_path)
    sweep.main([str(spec)])
    assert launched[:6] == [(None, lr) for lr in LRS]
    assert launched[6] == (2, 1e-3)  # the best point's seeds come before the repeats
    assert launched[7:] == [(1, 1e-3), (1, 3e-4), (1, 3e-3), (1, 1e-2), (1, 3e-2)]  # nearest the best first
    rows = load_rows(tmp_path / "out")
    (line,) = stats.stability_per_seed(rows, 0.1)
    assert line["widths"] == [pytest.approx(0.477, abs=1e-3), pytest.approx(1.0)]
    launched.clear()
    sweep.main([str(spec)])
    assert launched == []


def test_a_repeat_without_a_point_beyond_its_range_has_no_width(tmp_path):
    line = {"values": LRS}
    done = {"done": 4, "points": 4, "decades": 1.0, "low": 1e-3, "high": 1e-2}
    assert stats.bracketed_width(done, line, [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]) == 1.0
    assert stats.bracketed_width(done, line, [3e-4, 1e-3, 3e-3, 1e-2]) is None  # 3e-2 never ran
    assert stats.bracketed_width({**done, "high": 3e-2}, line, [1e-3, 3e-3, 1e-2, 3e-2]) is None  # nor 3e-4
    assert stats.bracketed_width({**done, "low": 1e-4, "high": 3e-2}, line, LRS) == 1.0  # the grid's ends
    assert stats.bracketed_width({**done, "done": 3}, line, LRS) is None


def test_cover_is_checked_and_refused_with_slurm(tmp_path, capsys, no_launch):
    with pytest.raises(sweep_plan.SpecError, match="grid_seeds_cover: needs one of grid, stable, got 'some'"):
        sweep_plan.load_spec(micro_spec(tmp_path, grid_seeds_cover="some"))
    with pytest.raises(SystemExit) as exit_:
        sweep.main([str(micro_spec(tmp_path)), "--slurm"])
    assert exit_.value.code == 2
    assert "grid_seeds_cover: stable grows each line's repeats" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

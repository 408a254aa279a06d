"""`python -m lm_opt fit` end to end on the embedded data: outputs, exact resume, bad input."""

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from cli_helpers import fit, fit_fails, optim_config, scalars, stop_at, summary, tiny_args
from lm_opt.precision import cpu_arithmetic, resolve
from lm_opt.provenance import code_version


def test_fit_writes_tensorboard_events_checkpoint_and_summary(tmp_path):
    fit(*tiny_args(tmp_path, "run", 4))
    run = tmp_path / "run"
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    s = summary(run)
    assert s["status"] == "finished" and s["steps"] == 4
    assert s["tokens"] == 4 * 4 * 32
    assert s["final_val_loss"] is not None and s["best_val_loss"] <= s["final_val_loss"]
    assert s["val_curve"] == [[4, s["final_val_loss"]]]
    assert 0 < s["step_time_s"] < s["wall_time_s"] / 4
    assert 8 * s["parameters"] <= s["optimizer_state_bytes"] <= 8 * s["parameters"] + 4096  # AdamW: m, v, step
    assert s["config"]["model"]["preset"] == "tiny"
    losses = scalars(run, "train/loss")
    assert sorted(losses) == [0, 1, 2, 3]
    assert "val/loss" in {t for t in ("val/loss",) if scalars(run, t)}
    made_by = s["provenance"]
    assert made_by["packages"]["torch"] == torch.__version__ and made_by["packages"]["lightning"] == L.__version__
    packages = {"python", "transformers", "datasets", "tokenizers", "sentencepiece", "jsonargparse"}
    assert packages <= set(made_by["packages"]) and None not in made_by["packages"].values()
    assert made_by["device"]["type"] == "cpu" and made_by["device"]["count"] == 1 and made_by["device"]["name"]
    assert made_by["device"]["precision"] == resolve("auto", "cpu").precision  # the quickstart's auto
    assert made_by["device"]["precision_reason"].startswith("auto: cpu")
    assert made_by["device"]["arithmetic"] == cpu_arithmetic()
    assert made_by["device"]["threads"] == torch.get_num_threads() and made_by["device"]["name"] != "x86_64"
    assert made_by["data"]["path"] == "embedded" and made_by["data"]["tokenizer"] == "embedded"
    assert made_by["code"] == code_version()


def test_a_second_fresh_run_with_the_same_name_is_refused_and_leaves_the_first_intact(tmp_path, capsys):
    fit(*tiny_args(tmp_path, "run", 2))
    run = tmp_path / "run"
    files = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert {"summary.json", "config.yaml", "last.ckpt"} <= {p.name for p in files}
    assert any(p.name.startswith("events.out.tfevents.") for p in files)
    line = fit_fails(capsys, *tiny_args(tmp_path, "run", 2, "--trainer.max_steps", "3"))
    assert f"{run} already holds a run" in line
    assert "--ckpt_path last" in line and "--trainer.logger.init_args.name" in line
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()} == files


def test_an_attempt_that_failed_before_training_does_not_block_its_name(tmp_path, capsys):
    fit_fails(capsys, *tiny_args(tmp_path, "run", 2, "--data.path", str(tmp_path / "missing")))
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))  # Lightning opens one before setup
    fit(*tiny_args(tmp_path, "run", 2))
    assert summary(tmp_path / "run")["status"] == "finished"


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "sgd_adalayer_last_norm", "soap", "schedule_free"])
def test_resumed_run_gives_identical_losses_at_every_step(tmp_path, optimizer):
    """8 steps straight, against 4 steps (interrupted) resumed from last.ckpt to 8: the data
    position, the optimizer state (routed, eigenbases, Schedule-Free's x and y) and the schedule
    all carry over. Equal to the bit on any CPU kind: both runs compute in this process, with the
    same kernels and threads."""
    config = optim_config(Path(f"configs/optim/{optimizer}.yaml"), tmp_path)
    common = ("--data.num_workers", "2", "--trainer.val_check_interval", "2", "--config", str(config))
    fit(*tiny_args(tmp_path, "full", 8, *common))
    fit(*tiny_args(tmp_path, "half", 8, *common, *stop_at(4)))
    assert summary(tmp_path / "half")["steps"] == 4
    fit(*tiny_args(tmp_path, "half", 8, *common, "--ckpt_path", "last"))
    full, resumed = scalars(tmp_path / "full", "train/loss"), scalars(tmp_path / "half", "train/loss")
    assert sorted(full) == sorted(resumed) == list(range(8))
    assert [full[s] for s in range(8)] == [resumed[s] for s in range(8)]
    assert summary(tmp_path / "half")["steps"] == 8
    # the validation curve carries over the checkpoint too
    assert summary(tmp_path / "half")["val_curve"] == summary(tmp_path / "full")["val_curve"]
    assert [step for step, _ in summary(tmp_path / "full")["val_curve"]] == [2, 4, 6, 8]


ROUTE_MATCHING_NOTHING = """
trainer:
  callbacks:
    - class_path: lm_opt.callbacks.OptimizerCallback
      init_args:
        optimizer: null
        routes:
          - roles: [norm]
            pattern: 'blocks\\.9\\.'
            optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 1.0e-3}}
          - optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 1.0e-3}}
"""


@pytest.mark.parametrize(
    "override,message",
    [
        (("--model.preset", "huge"), "unknown model preset 'huge'"),
        (("--model.no_such_key", "1"), "no_such_key"),
        (("--data.batch_size", "0"), "data.batch_size"),
        (("--data.seq_len", "256"), "data.seq_len=256"),
        (("--data.path", "/nonexistent/c4"), "/nonexistent/c4"),
        (("--data.path", "allenai/c4"), "allenai/c4"),
        (("--data.tokenizer", "/nonexistent/tokenizer"), "data.tokenizer='/nonexistent/tokenizer'"),
        (("--model.max_tokens", "100", "--model.tokens_per_param", "20"), "at most one of model.max_tokens"),
        (("--divergence.max_ratio", "0.5"), "divergence.max_ratio must be > 1"),
        (("--ckpt_path", "/nonexistent/last.ckpt"), "ckpt_path='/nonexistent/last.ckpt' does not exist"),
        (("--trainer.callbacks", "[]"), "exactly one lm_opt.callbacks.OptimizerCallback"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_status_2_before_training(tmp_path, capsys, override, message):
    line = fit_fails(capsys, *tiny_args(tmp_path, "bad", 2, *override))
    assert message in line
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_non_positive_lr_is_rejected_naming_the_route(tmp_path, capsys):
    bad = tmp_path / "bad_lr.yaml"
    bad.write_text(Path("configs/optim/adamw.yaml").read_text().replace("lr: 3.16e-3", "lr: -0.1"))
    line = fit_fails(capsys, *tiny_args(tmp_path, "bad", 2, "--config", str(bad)))
    assert re.search(r"route 'all': AdamW rejects init_args \{.lr.: -0.1", line)


def test_malformed_yaml_is_named_with_its_line(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  preset: tiny\n  qk_norm: [true\n")
    line = fit_fails(capsys, *tiny_args(tmp_path, "bad", 2, "--config", str(bad)))
    assert f"--config {bad}, line 4, column 1: invalid YAML" in line


def test_a_route_that_matches_nothing_is_named_by_roles_and_pattern(tmp_path, capsys):
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTE_MATCHING_NOTHING)
    line = fit_fails(capsys, *tiny_args(tmp_path, "bad", 2, "--config", str(routes)))
    assert r"(roles ['norm'], pattern 'blocks\\.9\\.') takes no parameter" in line


@pytest.mark.slow
def test_user_errors_show_no_traceback_from_the_command_line_unless_debugging(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: [\n")
    command = [sys.executable, "-m", "lm_opt", "fit", "--config", str(bad)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = Path(__file__).parent.parent
    quiet = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines() == [f"error: --config {bad}, line 2, column 1: invalid YAML: "
                                                 "expected the node content, but found '<stream end>'"]
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, env=env, cwd=root)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UserError" in debug.stderr


def test_corrupt_or_mismatched_checkpoint_is_named(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    assert "corrupt.ckpt" in fit_fails(capsys, *tiny_args(tmp_path, "c", 2, "--ckpt_path", str(corrupt)))
    fit(*tiny_args(tmp_path, "small", 2))
    assert "qk_norm" in fit_fails(capsys, *tiny_args(tmp_path, "other", 2, "--model.qk_norm", "false", "--ckpt_path",
                                                  str(tmp_path / "small" / "checkpoints" / "last.ckpt")))

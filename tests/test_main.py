"""`python -m lm_opt`: one front door that names the program and lists every command, Lightning's
and the study's, each of which keeps its own `--help`."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch import LightningModule

from lm_opt.__main__ import LIGHTNING, TOOLS, main
from lm_opt.module import LMModule

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["fit", "validate", "sweep", "report", "recheck", "card", "plot-eff-lr"]


def listed(text: str) -> list[str]:
    """The command names of the help's `commands:` block."""
    block = text.split("commands:\n", 1)[1].split("\n\n", 1)[0]
    return [re.match(r"  (\S+)  ", line).group(1) for line in block.splitlines()]


def test_help_names_the_program_and_lists_every_command():
    """The front door as a user meets it, in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-m", "lm_opt", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m lm_opt COMMAND")
    assert listed(result.stdout) == COMMANDS


def test_short_help_and_no_command_give_the_same_list(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["-h"])
    assert exit_.value.code == 0 and listed(capsys.readouterr().out) == COMMANDS
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and listed(capsys.readouterr().err) == COMMANDS  # a command is missing


def test_the_lightning_commands_listed_are_those_lmmodule_has_a_step_for():
    """`test` and `predict` would only end in Lightning's error that the step is missing."""
    steps = {"fit": "training_step", "validate": "validation_step", "test": "test_step", "predict": "predict_step"}
    implemented = [c for c, step in steps.items() if getattr(LMModule, step) is not getattr(LightningModule, step)]
    assert list(LIGHTNING) == implemented


def test_an_unknown_command_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["crad", "my_optim.yaml"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "unknown command 'crad'" in err and ", card, " in err


def test_each_tool_keeps_its_own_help(capsys):
    for tool in TOOLS:
        with pytest.raises(SystemExit) as exit_:
            main([tool, "--help"])
        assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: python -m lm_opt {tool} ")


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_fit_help_is_lightnings_whole_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: python -m lm_opt [options] fit")
    assert all(option in out for option in ("--config", "--trainer.max_steps", "--model.preset", "--data.batch_size",
                                            "--ckpt_path"))

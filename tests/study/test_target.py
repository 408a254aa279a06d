"""Steps to a target loss, read off validation curves (`report --target`)."""

import json
from pathlib import Path

import pytest

from lm_opt.study.report import main
from lm_opt.study.target import steps_to_target

CURVE = [[20, 7.0], [40, 6.0], [60, 5.5], [80, 5.0]]


@pytest.mark.parametrize("target,expected", [(6.0, 40.0), (5.75, 50.0), (5.1, 76.0), (5.0, 80.0), (7.5, 20.0),
                                             (4.9, None)])
def test_steps_are_interpolated_between_the_validations_around_the_first_crossing(target, expected):
    assert steps_to_target(CURVE, target) == (None if expected is None else pytest.approx(expected))


def test_a_curve_that_dips_counts_its_first_crossing_not_its_last():
    assert steps_to_target([[10, 6.0], [20, 5.0], [30, 6.0], [40, 4.0]], 5.5) == pytest.approx(15.0)


def run(sweep_dir: Path, name: str, optimizer: str, lr: float, curve: list, seed: int | None = None,
        step_time: float = 0.1, state_bytes: int = 800) -> None:
    folder = sweep_dir / name
    folder.mkdir(parents=True)
    values = {"lr": lr, **({} if seed is None else {"seed": seed})}
    (folder / "point.json").write_text(json.dumps({"sweep": "s", "name": name, "optimizer": optimizer,
                                                   "values": values, "shared": []}))
    (folder / "summary.json").write_text(json.dumps({
        "status": "finished", "final_val_loss": curve[-1][1], "best_val_loss": min(l for _, l in curve), "steps": 80,
        "max_steps": 80, "tokens": 1, "wall_time_s": 9.0, "step_time_s": step_time, "val_curve": curve,
        "optimizer_state_bytes": state_bytes, "parameters": 100, "config": {}}))


@pytest.fixture
def sweep_dir(tmp_path):
    """adamw's best point ends at 5.0, 5.25 and 4.75 over 3 seeds (mean 5.0); soap gets there sooner."""
    run(tmp_path, "adamw_lr1", "adamw", 1.0, [[40, 6.0], [80, 5.0]])
    run(tmp_path, "adamw_lr1_seed1", "adamw", 1.0, [[40, 6.25], [80, 5.25]], seed=1)
    run(tmp_path, "adamw_lr1_seed2", "adamw", 1.0, [[40, 5.75], [80, 4.75]], seed=2)
    run(tmp_path, "adamw_lr10", "adamw", 10.0, [[40, 6.5], [80, 6.0]])
    run(tmp_path, "soap_lr1", "soap", 1.0, [[40, 5.5], [80, 4.5]], step_time=0.15, state_bytes=2400)
    run(tmp_path, "soap_lr1_seed1", "soap", 1.0, [[40, 5.0], [80, 4.4]], seed=1, step_time=0.15, state_bytes=2400)
    run(tmp_path, "sgd_lr1", "sgd", 1.0, [[40, 6.5], [80, 6.2]], step_time=0.05, state_bytes=400)
    return tmp_path


def table(markdown: str, heading: str) -> dict[str, list[str]]:
    section = markdown.split(f"## {heading}")[1].split("\n## ")[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")][1:]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows}


def test_report_gives_steps_to_the_reference_mean_final_loss_with_cost_ratios(sweep_dir):
    main([str(sweep_dir)])
    markdown = (sweep_dir / "results.md").read_text()
    assert "adamw's mean final loss over 3 seeds, 5.0000 nats" in markdown
    assert "every 40 steps" in markdown
    rows = table(markdown, "Steps to target")
    # adamw: seeds 0 and 2 reach 5.0 (at 80, and at 40 + 40 * 0.75/1.0 = 70), seed 1 never
    assert rows["adamw"][3:7] == ["2 / 3", "75", "70 .. 80", "0.94"]
    # soap: 40 + 40 * 0.5/1.0 = 60 and 40 (at its first validation): mean 50
    # time to target: 50 steps x 1.5 of adamw's step time, over adamw's 80 steps
    assert rows["soap"][3:11] == ["2 / 2", "50", "40 .. 60", "0.62", "150", "1.50", "0.94", "24.0"]
    assert rows["sgd"][3:5] == ["0 / 1", "not reached"]
    assert (sweep_dir / "plot_curves.png").stat().st_size > 10_000


def test_numbers_and_other_setups_can_be_targets_each_with_its_section(sweep_dir, capsys):
    main([str(sweep_dir), "--target", "5.5", "soap"])
    markdown = (sweep_dir / "results.md").read_text()
    rows = table(markdown, "Steps to target: 5.5000 nats (given)")
    assert rows["sgd"][3] == "0 / 1" and rows["soap"][4] == "40"
    rows = table(markdown, "Steps to target: soap's mean final loss over 2 seeds")
    assert "soap's mean final loss over 2 seeds, 4.4500 nats" in markdown
    assert rows["adamw"][3:5] == ["0 / 3", "not reached"]
    with pytest.raises(SystemExit) as exit_:
        main([str(sweep_dir), "--target", "lamb"])
    assert exit_.value.code == 2
    assert "--target 'lamb': not a number and not a setup of this sweep" in capsys.readouterr().err

"""`python -m lm_opt card OPTIMIZER_YAML --dry-run`: the YAML checked, the plan, the baselines it
would read or rerun, the points already held and the wall clock from a step time read or timed here,
with nothing trained and nothing written."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from lm_opt.study import card, step_time, sweep
from lm_opt.study.card_dry_run import dry_run
from lm_opt.study.card_plan import Protocol

XEON = {"capability": "AVX512", "avx512_bf16": True, "amx": True, "bf16_native": True}
RESOLVED = {"seed_everything": 0, "model": {"preset": "cpu"}, "data": {"batch_size": 16, "seq_len": 128},
            "trainer": {"max_steps": 200, "val_check_interval": 50}}
"""What a card's point resolves to, as far as the dry run reads it."""


def optimizer_yaml(path: Path, lr: str = "3e-3") -> Path:
    path.write_text("trainer:\n  callbacks:\n    - class_path: lm_opt.callbacks.OptimizerCallback\n      init_args:\n"
                    f"        optimizer: {{class_path: torch.optim.AdamW, init_args: {{lr: {lr}, betas: [0.9, 0.95]}}}}\n")
    return path


@pytest.fixture
def no_runs(monkeypatch):
    """Configs not parsed (their resolution is RESOLVED), nothing launched, committed records of
    another CPU kind than this one (EPYC's against a Xeon's)."""
    monkeypatch.setattr(card, "validate", lambda point: json.loads(json.dumps(RESOLVED)))
    monkeypatch.setattr(sweep, "launch", lambda *args: pytest.fail(f"launched {args}"))
    monkeypatch.setattr(card, "cpu_arithmetic", lambda: XEON)


def test_the_plan_the_baselines_and_the_estimate_from_a_timed_step(tmp_path, no_runs, monkeypatch, capsys):
    monkeypatch.setattr(step_time, "train_steps", lambda *args: SimpleNamespace(seconds_per_step=0.5))
    card.main([str(optimizer_yaml(tmp_path / "mine.yaml")), "--out", str(tmp_path / "cards"), "--dry-run"])
    out = capsys.readouterr().out
    # lr: 3e-3 is the float fit reads, and the grid is quarter decades around it.
    assert "- lr grid, seed 0: 5.33e-04, 9.49e-04, 1.69e-03, 3.00e-03, 5.33e-03, 9.49e-03, 0.0169 (7 points" in out
    assert "at most 6 more on each side (1.69e-05 .. 0.533)" in out
    assert "200 steps, validation every 50 steps" in out and "beta1 over [0.0, 0.5" in out
    assert "- logs/sweeps/cpu_lr: not read, made on another CPU kind" in out
    assert f"- so AdamW reruns here into {tmp_path / 'cards' / 'mine' / 'baselines'}: 3 runs" in out
    assert "already held: 0 of the first grid's 14 runs" in out
    assert "step time: 0.500 s, timed now: 5 steps of the card's optimizer at lr 3.00e-03" in out
    # 7 lrs x 2 seeds + 1 seed at the best + 7 beta1 + 2 seeds at the best beta1 + 3 baselines = 27;
    # the grid grown by 6 quarter decades on each side: 19 x 2 + 1 + 9 + 3 = 51.
    assert "estimated wall clock: 0.8 h to 1.4 h at --jobs 1" in out and "27 to 51 runs to make x 200 steps" in out
    assert not (tmp_path / "cards").exists()


def test_records_of_the_cards_grid_give_the_step_time_and_are_not_counted(tmp_path, no_runs, monkeypatch, capsys):
    monkeypatch.setattr(step_time, "train_steps", lambda *args: pytest.fail("timed steps a record holds"))
    folder = tmp_path / "cards" / "mine"
    for name, seconds in (("mine_lr3.00e-03", 0.4), ("mine_lr3.00e-03_seed1", 0.6), ("mine_lr0.0169", 0.45)):
        (folder / name).mkdir(parents=True)
        (folder / name / "summary.json").write_text(json.dumps({"status": "finished", "step_time_s": seconds}))
    path = optimizer_yaml(tmp_path / "mine.yaml")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    card.main([str(path), "--out", str(tmp_path / "cards"), "--dry-run", "--jobs", "2"])
    out = capsys.readouterr().out
    assert "already held: 3 of the first grid's 14 runs" in out
    assert f"- done in {folder}: mine_lr3.00e-03, mine_lr0.0169, mine_lr3.00e-03_seed1" in out
    assert "step time: 0.450 s, the median of 3 records of this card's grid held here" in out
    assert "24 to 48 runs" in out and "at --jobs 2" in out
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_yaml_without_an_lr_fails_with_one_error_line(tmp_path, no_runs, capsys):
    path = optimizer_yaml(tmp_path / "mine.yaml", lr="fast")
    with pytest.raises(SystemExit) as exit_:
        card.main([str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err == f"lm_opt card: error: {path}: the optimizer's lr must be a positive " \
                                            "number, got 'fast'\n"


@pytest.mark.slow
def test_a_real_dry_run_parses_times_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Every point's config parsed and steps timed for real, on the tiny preset; run in an empty
    folder (the configs linked in), which holds nothing new afterwards."""
    (tmp_path / "configs").symlink_to(Path("configs").resolve())
    path = optimizer_yaml(tmp_path / "mine.yaml")
    monkeypatch.chdir(tmp_path)
    protocol = Protocol(overrides={"model.preset": "tiny", "data.seq_len": 32, "data.batch_size": 4,
                                   "data.num_workers": 0, "trainer.max_steps": 4}, half_width=1)
    dry_run(card.new_card(str(path), None, "logs/cards", 1, protocol))
    out = capsys.readouterr().out
    assert "- lr grid, seed 0: 1.69e-03, 3.00e-03, 5.33e-03 (3 points" in out and ", 4 steps," in out
    assert "- logs/sweeps/cpu_lr: not read, no done records" in out
    assert "timed now: 5 steps of the card's optimizer at lr 3.00e-03" in out and "(tiny preset, batch 4 x 32" in out
    assert sorted(os.listdir(tmp_path)) == ["configs", "mine.yaml"]

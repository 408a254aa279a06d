"""`card --horizons`: the optimizer retuned at each length at the AdamW ladder's model, its grid
centred on the best of the length before, 3 seeds at each best, and the card's section along the
horizon read against a made-up ladder."""

import json
import math
import subprocess

import pytest

from lm_opt.study import card, sweep
from lm_opt.study.card_horizons import horizon_list
from lm_opt.study.card_plan import Protocol

SHAPE = {"model": {"preset": "cpu", "arch": {"n_embd": 128, "n_head": 2}}, "data": {"path": "embedded", "seq_len": 128}}


def loss_of(steps: int, lr: float, seed: int, adamw: bool) -> float:
    """Longer runs reach lower losses, their best lr a quarter-decade lower per 4x; the card's
    optimizer is behind AdamW by 0.2 nats at 200 steps and by 0.05 at 3200 (0.055 off its grid)."""
    best_lr = 1e-2 * (200 / steps) ** (1 / 8)
    gap = 0.0 if adamw else 0.2 - 0.15 * math.log(steps / 200) / math.log(16)
    return 6.0 - 0.3 * math.log(steps / 200) + 0.5 * math.log10(lr / best_lr) ** 2 + gap + 0.005 * seed


def summary(steps: int, lr: float, seed: int, adamw: bool) -> dict:
    loss = loss_of(steps, lr, seed, adamw)
    return {"status": "finished", "final_val_loss": loss, "max_steps": steps, "steps": steps, "tokens": steps * 2048,
            "parameters": 2_885_760, "epochs": None if steps < 1170 else steps / 1170, "wall_time_s": 1.0,
            "val_curve": [[steps, loss]], "config": SHAPE}


def write_ladder(root):
    for steps in (200, 800, 3200):
        for lr, seed in ((1e-2 * (200 / steps) ** (1 / 8), 0), (3e-2, 0)) + tuple(
                (1e-2 * (200 / steps) ** (1 / 8), s) for s in (1, 2)):
            name = f"adamw_steps{steps}_lr{lr:.3g}" + (f"_seed{seed}" if seed else "")
            run = root / "adamw_ladder" / name
            run.mkdir(parents=True)
            values = {"lr": lr, **({"seed": seed} if seed else {})}
            (run / "point.json").write_text(json.dumps({"sweep": "adamw_ladder", "name": name,
                                                        "optimizer": f"adamw_steps{steps}", "values": values}))
            (run / "summary.json").write_text(json.dumps(summary(steps, lr, seed, True)))


@pytest.fixture
def horizon_runs(monkeypatch):
    """Every point 'runs' by writing the summary of `loss_of`; the card's own 200-step protocol alike."""
    launched = []

    def launch(point, slot, env):
        launched.append(point.name)
        steps = int(point.name.split("_steps")[1].split("_")[0]) if "_steps" in point.name else 200
        result = summary(steps, point.values.get("lr", 1e-2), point.values.get("seed", 0), point.name.startswith("adamw"))
        (point.run_dir / "summary.json").write_text(json.dumps(result))
        return subprocess.Popen(["true"])

    monkeypatch.setattr(sweep, "launch", launch)
    monkeypatch.setattr(card, "validate", lambda point: {})
    monkeypatch.setattr(sweep, "validate", lambda point: {})
    monkeypatch.setattr(card.Card, "reusable", lambda self: {})  # no scan of the committed sweeps
    monkeypatch.setattr(card, "time_steps", lambda *args: {
        "step_s": {"adamw": 0.1, "card": 0.1}, "rounds_s": {"adamw": [0.1], "card": [0.1]}, "ratio": 1.0,
        "threads": 1, "preset": "cpu", "batch_size": 16, "seq_len": 128})
    return launched


@pytest.mark.slow
def test_horizons_retune_each_length_around_the_last_best_and_read_against_the_ladder(tmp_path, horizon_runs):
    write_ladder(tmp_path / "logs" / "sweeps")
    result = card.run_card("configs/optim/adamw.yaml", "mine", tmp_path / "logs" / "cards", horizons=[3200, 200, 800],
                           protocol=Protocol(half_width=1, beta1=[], grid_seeds=[1], best_seeds=[2]))
    ran = [n for n in horizon_runs if "_steps" in n]
    assert [n for n in ran if n.startswith("mine_steps200") and "seed" not in n][:3] == [
        "mine_steps200_lr1.78e-03", "mine_steps200_lr3.16e-03", "mine_steps200_lr5.62e-03"]
    assert {n for n in ran if "seed" in n} == {f"mine_steps{s}_lr{lr}_seed{seed}" for s, lr in (
        (200, "0.01"), (800, "0.01"), (3200, "5.62e-03")) for seed in (1, 2)}
    # each later length's first grid is the best of the one before, one quarter-decade each side
    assert [n for n in ran if n.startswith("mine_steps800")][:3] == [
        "mine_steps800_lr5.62e-03", "mine_steps800_lr0.01", "mine_steps800_lr0.0178"]
    text = (result.dir / "card.md").read_text()
    section = text[text.index("## Along the horizon"):]
    rows = [line for line in section.splitlines() if line.startswith("| 200 |") or line.startswith("| 3200 |")]
    assert "| 200 | 409,600 | < 1 |" in rows[0] and "+0.2000" in rows[0]
    assert "| 3200 | 6,553,600 | 2.74 |" in rows[1] and "+0.0550" in rows[1] and "| 0.83x (0.81 .. 0.86) |" in rows[1]
    assert "The gap to AdamW shrinks beyond noise: from +0.2000 nats at 200 steps to +0.0550 at 3200." in section
    assert "2.3 per parameter of this model" in section


@pytest.mark.parametrize("text", ["200,x", "0,800", "800,800"])
def test_horizons_must_be_distinct_positive_steps(text):
    with pytest.raises(Exception, match="steps"):
        horizon_list(text)


def test_length_keys_take_each_lengths_steps(tmp_path):
    """AdEMAMix warms alpha and beta3 over `t_alpha_beta3` steps: at each length, over its own."""
    mine = card.new_card("configs/cards/ademamix.yaml", "ademamix", tmp_path, 1, horizons=[800],
                         length_keys=["t_alpha_beta3"])
    from lm_opt.study.card_horizons import horizon_points, ladder_overrides

    point = horizon_points(mine, 800, 3.16e-3, [0], ladder_overrides(mine.protocol.ladder_spec))[0]
    args = point.optimizer_yaml["trainer"]["callbacks"][0]["init_args"]["optimizer"]["init_args"]
    assert (args["t_alpha_beta3"], args["lr"], point.name) == (800, 3.16e-3, "ademamix_steps800_lr3.16e-03")


def test_length_keys_without_horizons_are_refused(tmp_path):
    with pytest.raises(card.SpecError, match="give --horizons"):
        card.new_card("configs/cards/ademamix.yaml", "ademamix", tmp_path, 1, length_keys=["t_alpha_beta3"])

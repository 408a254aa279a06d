"""Speedup over a tuned AdamW on made-up ladders: the interpolation the data picks, its
leave-one-out error, bounds off the ladder, and the range from both seed ranges."""

import json
import math

import pytest

from lm_opt.errors import UserError
from lm_opt.study import card_write, report
from lm_opt.study.rows import load_rows
from lm_opt.study.speedup_report import card_speedup_lines
from lm_opt.study.speedup import INTERPOLATIONS, Rung, choose_interpolation, leave_one_out_error, speedup

TOKENS = [100e3, 200e3, 400e3, 800e3, 1.6e6, 3.2e6]


def ladder(loss_at, spread=0.0):
    return [Rung(t, loss_at(t), loss_at(t) - spread, loss_at(t) + spread) for t in TOKENS]


def log_linear(t):
    return 9.0 - 0.5 * math.log(t)


def power_law(t):
    return 40.0 * t ** -0.15


@pytest.mark.parametrize("loss_at,exact", [(log_linear, "linear in log tokens"),
                                           (power_law, "power law (linear in log-log)")])
def test_the_interpolation_that_fits_the_ladder_is_chosen_and_its_error_is_measured(loss_at, exact):
    chosen, errors = choose_interpolation(ladder(loss_at))
    assert chosen == exact and errors[exact] == pytest.approx(0, abs=1e-9)
    other = next(name for name in INTERPOLATIONS if name != exact)
    assert errors[other] > 1e-3  # the other way misreads a rung left out


def test_a_setup_reaching_adamws_loss_of_twice_its_tokens_has_speedup_2():
    rungs = ladder(power_law)
    assert speedup(power_law(800e3), power_law(800e3), power_law(800e3), 400e3, rungs).value == pytest.approx(2.0)
    # between rungs: 3x the tokens, read off a power law exactly
    assert speedup(power_law(1.2e6), power_law(1.2e6), power_law(1.2e6), 400e3, rungs).value == pytest.approx(3.0)


def test_a_setup_worse_than_adamw_has_a_speedup_below_1():
    rungs = ladder(log_linear)
    result = speedup(log_linear(200e3), log_linear(200e3), log_linear(200e3), 400e3, rungs)
    assert result.value == pytest.approx(0.5) and not result.bound


def test_losses_off_the_ladder_give_bounds_at_its_ends():
    rungs = ladder(log_linear)
    beyond = speedup(log_linear(3.2e6) - 0.1, 0, 0, 200e3, rungs)
    assert (beyond.bound, beyond.value, str(beyond)) == (">", 16.0, "> 16.00x")
    short = speedup(log_linear(100e3) + 0.1, 0, 0, 400e3, rungs)
    assert (short.bound, short.value, str(short)) == ("<", 0.25, "< 0.25x")


def test_the_range_pairs_the_setups_worst_seed_with_adamws_best_and_the_reverse():
    rungs = ladder(log_linear, spread=0.1)
    b = 0.5  # nats per e-fold of tokens: a loss 0.1 higher costs a factor exp(0.2) of tokens
    result = speedup(log_linear(800e3), log_linear(800e3) - 0.05, log_linear(800e3) + 0.05, 400e3, rungs)
    assert result.value == pytest.approx(2.0)
    assert result.low == pytest.approx(2.0 * math.exp(-(0.05 + 0.1) / b))
    assert result.high == pytest.approx(2.0 * math.exp((0.05 + 0.1) / b))
    assert str(result) == f"2.00x ({result.low:.2f} .. {result.high:.2f})"


def test_a_range_end_off_the_ladder_is_shown_as_unknown():
    rungs = ladder(log_linear, spread=0.3)
    result = speedup(log_linear(3.2e6) + 0.01, log_linear(3.2e6) - 0.4, log_linear(3.2e6) + 0.02, 800e3, rungs)
    assert result.high is None and str(result).endswith(" .. ?)")


def test_a_ladder_whose_loss_does_not_fall_is_refused_naming_its_rungs():
    rungs = ladder(log_linear)
    rungs[3] = Rung(rungs[3].tokens, rungs[2].loss + 0.01, 0, 0)
    with pytest.raises(UserError, match="does not fall from 400000 tokens"):
        speedup(5.0, 5.0, 5.0, 1e5, rungs)


def test_a_two_rung_ladder_has_no_rung_to_leave_out():
    assert math.isnan(leave_one_out_error(ladder(log_linear)[:2], INTERPOLATIONS["linear in log tokens"]))


def run_folder(sweep_dir, name, optimizer, lr, loss, tokens, seed=None, arch=128):
    """A finished point as `sweep` and its run leave it, with the model and data a shape compares."""
    run = sweep_dir / name
    run.mkdir(parents=True)
    values = {"lr": lr, **({"seed": seed} if seed is not None else {})}
    (run / "point.json").write_text(json.dumps({"sweep": sweep_dir.name, "name": name, "optimizer": optimizer,
                                                "values": values, "shared": []}))
    config = {"model": {"preset": "cpu", "arch": {"n_embd": arch}}, "data": {"path": "embedded", "seq_len": 128}}
    (run / "summary.json").write_text(json.dumps({"status": "finished", "final_val_loss": loss, "steps": 1,
                                                  "max_steps": 1, "tokens": tokens, "config": config}))


def made_up_ladder(root):
    """A ladder linear in log tokens at width 128: three rungs, three seeds at each best lr."""
    ladder = root / "adamw_ladder"
    for tokens in (200_000, 400_000, 800_000):
        loss = log_linear(tokens)
        label = f"adamw_steps{tokens // 2048}"
        run_folder(ladder, f"{label}_lr0.01", label, 0.01, loss, tokens)
        run_folder(ladder, f"{label}_lr0.03", label, 0.03, loss + 0.5, tokens)
        for seed, delta in ((1, -0.02), (2, 0.02)):
            run_folder(ladder, f"{label}_lr0.01_seed{seed}", label, 0.01, loss + delta, tokens, seed)
    return ladder


def setup_line(sweep_dir, label, arch):
    """A line at 400k tokens whose mean best loss is the ladder's at 800k: speedup 2 at width 128."""
    for seed, delta in ((None, 0.0), (1, -0.01), (2, 0.01)):
        run_folder(sweep_dir, f"{label}_lr0.001" + (f"_seed{seed}" if seed else ""), label, 0.001,
                   log_linear(800_000) + delta, 400_000, seed, arch)


def test_report_reads_each_line_against_the_ladder_of_its_model(tmp_path):
    """A line of the ladder's width reads 2x; a line of another width gets no speedup."""
    made_up_ladder(tmp_path)
    sweep_dir = tmp_path / "mine"
    setup_line(sweep_dir, "lion", 128)
    setup_line(sweep_dir, "lion_w256", 256)
    text = report.write_report(sweep_dir, margin=0.1).read_text()
    section = text[text.index("## Speedup over a tuned AdamW"):].splitlines()
    rows = [line for line in section if line.startswith("| lion")]
    assert len(rows) == 1 and "| lion |" in rows[0]
    assert "| 2.00x (" in rows[0] and "linear in log tokens | 0.0% |" in rows[0]


@pytest.mark.parametrize("arch,expected", [(128, "a speedup of **2.00x ("),
                                           (256, "No AdamW ladder of this card's model (the cpu preset at "
                                                 "{'n_embd': 256}")])
def test_a_card_states_its_speedup_or_the_ladder_it_lacks(tmp_path, arch, expected):
    ladder = made_up_ladder(tmp_path)
    setup_line(tmp_path / "card", "mine", arch)
    line = card_write.line_stats(load_rows(tmp_path / "card"), "mine", 0.1, "mine")
    text = "\n".join(card_speedup_lines(line, ladder, 0.1))
    assert expected in text

"""`python -m lm_opt card`: the protocol's lr grid and its growth until bracketed, the beta1 line only
where the optimizer has one, the choice of baselines by CPU kind, the verdicts, the card on fake
records, and one micro card end to end that resumes without rerunning its points."""

import csv
import importlib.metadata
import json
import math
import subprocess
from pathlib import Path

import pytest

from lm_opt.precision import Choice
from lm_opt.study import card, card_plan, card_write, sweep
from lm_opt.study.card_plan import Protocol, extension, lr_value

TINY = {"model.preset": "tiny", "data.seq_len": 32, "data.batch_size": 4, "data.val_sequences": 8,
        "data.num_workers": 0, "trainer.max_steps": 4, "trainer.val_check_interval": 2,
        "trainer.log_every_n_steps": 1, "trainer.enable_progress_bar": False, "eff_lr.every_n_steps": 2}
EPYC = {"capability": "AVX512", "avx512_bf16": True, "amx": False, "bf16_native": True}
XEON = {**EPYC, "amx": True}


def test_the_grid_is_quarter_decades_around_the_yamls_lr_rounded_as_cpu_lrs():
    assert [lr_value(5.62e-3, k) for k in range(-3, 4)] == [1e-3, 1.78e-3, 3.16e-3, 5.62e-3, 1e-2, 1.78e-2, 3.16e-2]
    assert [lr_value(0.316, k) for k in (-2, 2)] == [0.1, 1.0]
    assert [lr_value(3e-3, k) for k in (-1, 0, 1)] == [1.69e-3, 3e-3, 5.33e-3]  # off the grid: scaled from it


def test_the_yamls_lr_reads_as_fit_reads_it(tmp_path):
    """`lr: 3e-3` is a float to `fit` (jsonargparse's YAML loader), so to `card` too."""
    path = tmp_path / "mine.yaml"
    path.write_text("trainer:\n  callbacks:\n    - class_path: lm_opt.callbacks.OptimizerCallback\n      init_args:\n"
                    "        optimizer: {class_path: torch.optim.SGD, init_args: {lr: 3e-3, momentum: 0.9}}\n")
    assert card.optimizer_lr(str(path)) == (3e-3, True)


def finished(loss):
    return {"status": "finished", "final_val_loss": loss}


@pytest.mark.parametrize("losses,step,why", [
    ({-1: 5.0, 0: 4.9, 1: 4.8}, 2, "highest"),
    ({-1: 4.7, 0: 4.9, 1: 5.0}, -2, "lowest"),
    ({-1: 5.0, 0: 4.8, 1: 4.95}, None, "bracketed: a finished neighbour on both sides"),
    ({-1: 5.0, 0: 4.8, 1: "diverged"}, None, "the high side diverges"),
    ({-1: "diverged", 0: "diverged"}, -2, "every point diverged"),
    ({-1: 5.0, 0: 4.8, 1: "failed"}, None, "not done"),
    # F2's range within 0.1 nats of the best must end inside the grid, or its width is a lower bound.
    ({-1: 5.0, 0: 4.8, 1: 4.85}, 2, "reaches the grid's highest lr"),
    ({-2: 4.88, -1: 4.85, 0: 4.8, 1: 5.0}, -3, "reaches the grid's lowest lr"),
    ({-1: 4.85, 0: 4.8, 1: "diverged"}, -2, "reaches the grid's lowest lr"),
])
def test_the_grid_grows_until_its_best_is_bracketed_and_its_stable_range_ends(losses, step, why):
    results = {k: finished(v) if isinstance(v, float) else {"status": v} for k, v in losses.items()}
    k, reason = extension(results, margin=0.1)
    assert k == step and why in reason


def test_the_verdicts_are_the_studys_words():
    adam = {"mean": 5.70, "min": 5.68, "max": 5.73}
    assert card_plan.loss_verdict({"mean": 5.74, "min": 5.72, "max": 5.76}, adam) == "comparable to Adam"
    assert card_plan.loss_verdict({"mean": 5.80, "min": 5.75, "max": 5.85}, adam) == "worse beyond noise"
    assert card_plan.loss_verdict({"mean": 5.60, "min": 5.58, "max": 5.62}, adam) == "better beyond noise"
    # F2: AdamW 1.00 and 0.75 decades (spread 0.25); tolerance 0.25 + one grid step 0.25 = 0.5.
    assert card_plan.stability_verdict([0.5, 0.5], [1.0, 0.75], 0.25)[0] == "as stable as Adam"
    assert card_plan.stability_verdict([0.25, 0.25], [1.0, 0.75], 0.25)[0] == "less stable"
    assert card_plan.stability_verdict([1.5, 1.5], [1.0, 0.75], 0.25)[0] == "more stable"
    # At the tolerance's edge, as SGD's card on the Xeon: the lrs' 3-digit rounding does not decide.
    sgd = [math.log10(0.316 / 0.178), math.log10(0.316 / 0.1)]  # 0.2493, 0.4997
    adamw = [math.log10(0.0178 / 0.00178), math.log10(0.0178 / 0.00316)]  # 1.0, 0.7507
    assert card_plan.stability_verdict(sgd, adamw, 0.25)[0] == "as stable as Adam"
    assert card_plan.stability_verdict([0.5, None], [1.0, 0.75], 0.25)[0] == "not measured"
    assert card_plan.loss_at([[50, 6.0], [100, 5.0], [150, 4.8]], 75) == 5.5


def record(arithmetic, precision="bf16-mixed", status="finished"):
    return {"status": status, "provenance": {"device": {"type": "cpu", "arithmetic": arithmetic,
                                                        "precision": precision}}}


def test_committed_baselines_are_used_only_from_the_same_cpu_kind_and_precision():
    usable, why = card_plan.baseline_usable([record(EPYC)] * 3, EPYC, "bf16-mixed")
    assert usable and "this CPU kind" in why
    usable, why = card_plan.baseline_usable([record(EPYC)] * 3, XEON, "bf16-mixed")
    assert not usable and "another CPU kind" in why and "AMX" in why
    assert not card_plan.baseline_usable([record(EPYC)], EPYC, "32-true")[0]
    assert not card_plan.baseline_usable([record(EPYC), record(XEON)], EPYC, "bf16-mixed")[0]
    assert not card_plan.baseline_usable([record(None)], EPYC, "bf16-mixed")[0]  # a record that does not say


def fake_summary(point_name: str, values: dict) -> dict:
    """A run's summary whose loss is a bowl in log lr around 1e-2 (card) or 5.62e-3 (AdamW), with a
    little seed noise; lr 5.62e-2 and above diverge."""
    lr, seed = values.get("lr", 1e-2), values.get("seed", 0)
    if values.get("beta1") == 0.0:  # as AdEMAMix's beta3 schedule, which takes log(beta1)
        return {"status": "failed", "final_val_loss": None}
    if lr >= 5.6e-2:
        return {"status": "diverged", "final_val_loss": None}
    centre = 5.62e-3 if point_name.startswith("adamw") else 1e-2
    loss = 5.0 + 0.5 * math.log10(lr / centre) ** 2 + 0.01 * seed + 0.02 * abs(values.get("beta1", 0.9) - 0.9)
    return {"status": "finished", "final_val_loss": loss, "max_steps": 200, "steps": 200, "wall_time_s": 1.0,
            "val_curve": [[50, loss + 1.0], [100, loss + 0.4], [150, loss + 0.1], [200, loss]],
            "optimizer_state_bytes": 800, "parameters": 100}


@pytest.fixture
def fake_runs(monkeypatch):
    """Points 'run' by writing fake summaries; configs not parsed; no timing run."""
    launched = []

    def launch(point, slot, env):
        launched.append(point.name)
        summary = fake_summary(point.name, point.values)
        (point.run_dir / "summary.json").write_text(json.dumps(summary))
        return subprocess.Popen(["false" if summary["status"] == "failed" else "true"])

    monkeypatch.setattr(sweep, "launch", launch)
    monkeypatch.setattr(card, "validate", lambda point: {})
    monkeypatch.setattr(sweep, "validate", lambda point: {})
    monkeypatch.setattr(card, "time_steps", lambda *args: {
        "step_s": {"adamw": 0.1, "card": 0.15}, "rounds_s": {"adamw": [0.1, 0.1], "card": [0.14, 0.16]}, "ratio": 1.5,
        "threads": 1, "preset": "cpu", "batch_size": 16, "seq_len": 128})
    monkeypatch.setattr(card, "cpu_arithmetic", lambda: XEON)
    return launched


def test_a_card_grows_its_grid_then_runs_seeds_beta1_and_the_baselines_it_cannot_reuse(tmp_path, fake_runs):
    result = card.run_card("configs/optim/adamw.yaml", "mine", tmp_path,
                           protocol=Protocol(half_width=2, beta1=[0.0, 0.5, 0.9]))
    grid = [n for n in fake_runs if n.startswith("mine_lr") and "seed" not in n]
    # 3.16e-3 +- 2 quarter-decades: the best (1e-2) is the highest, so 1.78e-2 comes, and brackets it;
    # it is within 0.1 nats of the best, so 3.16e-2 comes too, and ends the stable range.
    assert grid == ["mine_lr1.00e-03", "mine_lr1.78e-03", "mine_lr3.16e-03", "mine_lr5.62e-03", "mine_lr0.01",
                    "mine_lr0.0178", "mine_lr0.0316"]
    assert "reaches the grid's highest lr" in result.log[-2]
    assert "the stable range ends inside the grid" in result.log[-1]
    assert {n for n in fake_runs if n.endswith(("_seed1", "_seed2")) and n.startswith("mine_lr")} == {
        *(f"{n}_seed1" for n in grid), "mine_lr0.01_seed2"}
    # beta1 = 0 crashes: reported, and the seeds go to the best value that ran.
    assert {n for n in fake_runs if n.startswith("mine_beta1")} == {"mine_beta1_beta1-0", "mine_beta1_beta1-0.5",
                                                                   "mine_beta1_beta1-0.9", "mine_beta1_beta1-0.9_seed1",
                                                                   "mine_beta1_beta1-0.9_seed2"}
    assert list(result.problems) == ["mine_beta1_beta1-0"]
    # Committed records are of another kind here (EPYC, no AMX): AdamW's best of cpu_lr is rerun, 3 seeds.
    assert [n for n in fake_runs if n.startswith("adamw")] == [
        "adamw_lr5.62e-03", "adamw_lr5.62e-03_seed1", "adamw_lr5.62e-03_seed2"]
    assert (tmp_path / "mine" / "baselines" / "adamw_lr5.62e-03" / "command.sh").is_file()
    text = (tmp_path / "mine" / "card.md").read_text()
    assert "- optimizer: `torch.optim.AdamW`." in text
    assert "- CRASHED mine_beta1_beta1-0: exit code 1" in text
    assert "`logs/sweeps/cpu_lr`: not used, made on another CPU kind" in text
    assert "So the card reran AdamW" in text and "cpu_lr" in text
    assert "| best lr: final val loss, mean (range) over seeds | 0.01: 5.0100 (5.0000 .. 5.0200, 3 seeds)" in text
    assert "**comparable to Adam** (+0.0000 nats against AdamW's mean)" in text
    assert "not compared: cpu_beta1 made on another CPU kind" in text
    assert "| 1.50 x AdamW's (rounds 1.40 .. 1.60) |" in text and "| 8.00 | 8.00 | rerun here | 1.00 x AdamW's |" in text
    assert "to AdamW's mean final loss (rerun here): 5.0100" in text
    assert "![plot_lr](plot_lr.png)" in text and (tmp_path / "mine" / "plot_lr.png").stat().st_size > 0
    rows = list(csv.DictReader(open(tmp_path / "mine" / "results.csv")))
    assert len(rows) == len([n for n in fake_runs if not n.startswith("adamw")])
    fake_runs.clear()
    card.run_card("configs/optim/adamw.yaml", "mine", tmp_path, protocol=Protocol(half_width=2, beta1=[0.0, 0.5, 0.9]))
    assert fake_runs == ["mine_beta1_beta1-0"]  # a rerun resumes: every point is done but the crashed one


def test_commit_records_each_point_as_it_is_done_then_the_card(tmp_path, fake_runs, monkeypatch):
    """`card --commit`, as `sweep --commit`: a card longer than a sitting keeps what it finished."""
    for variable in ("GIT_AUTHOR", "GIT_COMMITTER"):
        monkeypatch.setenv(f"{variable}_NAME", "lm_opt tests")
        monkeypatch.setenv(f"{variable}_EMAIL", "tests@lm-opt.invalid")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("logs/*\n")
    card.run_card("configs/optim/adamw.yaml", "mine", tmp_path / "logs" / "cards", protocol=Protocol(
        half_width=1, grid_seeds=[], best_seeds=[], beta1=[]), commit=True)
    log = subprocess.run(["git", "-C", str(tmp_path), "log", "--format=%s"], check=True, capture_output=True,
                         text=True).stdout.splitlines()
    assert log[0] == "card mine: card.md, results.csv and figures"
    points = [n for n in fake_runs if n.startswith("mine_")]
    assert sorted(line.split(" ")[1] for line in log[1:] if line.startswith("mine:")) == sorted(points)
    files = subprocess.run(["git", "-C", str(tmp_path), "ls-files"], check=True, capture_output=True, text=True).stdout
    assert "logs/cards/mine/card.md" in files and "logs/cards/mine/results.csv" in files
    assert f"logs/cards/mine/{points[0]}/summary.json" in files and "checkpoints" not in files


def test_the_grid_grows_down_from_a_diverged_high_side_and_no_beta1_without_one(tmp_path, fake_runs):
    (tmp_path / "adagrad.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: lm_opt.callbacks.OptimizerCallback\n      init_args:\n"
        "        optimizer: {class_path: torch.optim.Adagrad, init_args: {lr: 3.16e-2}}\n")
    result = card.run_card(str(tmp_path / "adagrad.yaml"), "ada", tmp_path / "cards",
                           protocol=Protocol(half_width=1, best_seeds=[], grid_seeds=[]))
    assert [n for n in fake_runs if n.startswith("ada_")] == ["ada_lr0.0178", "ada_lr0.0316", "ada_lr0.0562",
                                                             "ada_lr0.01", "ada_lr5.62e-03", "ada_lr3.16e-03"]
    assert result.log == ["the best lr is the grid's lowest: one quarter-decade lower: added lr 0.01",
                          "the best lr is the grid's lowest: one quarter-decade lower: added lr 0.00562",
                          "the range within 0.1 nats of the best reaches the grid's lowest lr: one lower: added lr "
                          "0.00316",
                          "bracketed: a finished neighbour on both sides, and the stable range ends inside the grid"]
    assert not result.has_beta1
    assert "no beta1 line" in (tmp_path / "cards" / "ada" / "card.md").read_text()


def test_same_kind_committed_records_are_read_instead_of_rerun(tmp_path, fake_runs, monkeypatch):
    committed = tmp_path / "sweeps"
    for sweep_name in card.BASELINE_SWEEPS:
        run = committed / sweep_name / "adamw_lr5.62e-03"
        run.mkdir(parents=True)
        summary = {**fake_summary("adamw", {"lr": 5.62e-3}), **record(EPYC)}
        (run / "summary.json").write_text(json.dumps(summary))
        (run / "point.json").write_text(json.dumps({"sweep": sweep_name, "name": run.name, "optimizer": "adamw",
                                                    "values": {"lr": 5.62e-3}, "command": []}))
    monkeypatch.setattr(card, "COMMITTED", committed)
    monkeypatch.setattr(card, "cpu_arithmetic", lambda: EPYC)
    # `auto` as the EPYC resolves it, whatever this machine's bf16 (32-true on an AVX2-only CPU)
    monkeypatch.setattr(card, "resolve", lambda requested, accelerator: Choice("bf16-mixed", "auto: native bf16"))
    card.run_card("configs/optim/adamw.yaml", "mine", tmp_path / "cards", protocol=Protocol(half_width=1, beta1=[0.9]))
    assert not [n for n in fake_runs if n.startswith("adamw")]
    text = (tmp_path / "cards" / "mine" / "card.md").read_text()
    assert "`logs/sweeps/cpu_lr`: used, made on this CPU kind and precision" in text
    assert "So the card reran" not in text


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ("model: {preset: tiny}\n", "needs exactly one OptimizerCallback"),
    ("trainer:\n  callbacks:\n    - class_path: lm_opt.callbacks.OptimizerCallback\n      init_args:\n"
     "        optimizer: {class_path: torch.optim.NoSuchThing, init_args: {lr: 1.0e-3}}\n", "NoSuchThing"),
])
def test_bad_input_fails_before_any_compute_with_one_error_line(tmp_path, content, message, capsys, monkeypatch):
    path = tmp_path / "opt.yaml"
    if content is not None:
        path.write_text(content)
    monkeypatch.setattr(sweep, "launch", lambda *args: pytest.fail(f"launched {args}"))
    with pytest.raises(SystemExit) as exit_:
        card.main([str(path), "--out", str(tmp_path / "cards")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("lm_opt card: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "cards").exists()


@pytest.mark.slow
def test_a_micro_card_runs_end_to_end_and_resumes_without_rerunning(tmp_path, embedded_corpus, monkeypatch, capsys):
    # The fewest runs that exercise every part for real (the grid's growth, grid seeds, beta1's seeds
    # and the baselines' rerun are tested on fake records above): one grid point, a seed, one beta1,
    # against the committed baselines read as if this CPU had made them.
    protocol = Protocol(overrides=dict(TINY), half_width=0, max_extend=0, grid_seeds=[], beta1=[0.5], beta1_seeds=[],
                        timing_steps=2, timing_warmup=1, timing_rounds=1)
    monkeypatch.setattr(card.Card, "baselines", lambda self: {s: (True, "read in a test") for s in card.BASELINE_SWEEPS})
    result = card.run_card("configs/optim/adamw.yaml", "micro", tmp_path, protocol=protocol)
    folder = tmp_path / "micro"
    assert not result.problems
    text = (folder / "card.md").read_text()
    assert "## Verdicts" in text and "best lr: final val loss" in text and "x AdamW's" in text
    rows = list(csv.DictReader(open(folder / "results.csv")))
    assert rows and all(r["status"] == "finished" for r in rows)
    assert (folder / "eff_lr.png").is_file() and (folder / "update_size.png").is_file()
    point = json.loads((folder / rows[0]["point"] / "point.json").read_text())
    assert point["command"][:4] == ["python", "-m", "lm_opt", "fit"]
    summaries = {p: p.read_bytes() for p in folder.glob("*/summary.json")}

    def refuse(*args, **kwargs):
        raise AssertionError(f"launched {args}")

    monkeypatch.setattr(sweep, "launch", refuse)
    monkeypatch.setattr(card, "time_steps", refuse)  # timing.json is reused too
    card.run_card("configs/optim/adamw.yaml", "micro", tmp_path, protocol=protocol)
    assert {p: p.read_bytes() for p in folder.glob("*/summary.json")} == summaries
    assert "0 to run" in capsys.readouterr().out


def test_baseline_grid_reruns_adamws_whole_grid_under_the_grid_seeds_and_compares_the_stable_width(tmp_path,
                                                                                                   fake_runs):
    card.run_card("configs/optim/adamw.yaml", "mine", tmp_path,
                  protocol=Protocol(half_width=2, beta1=[0.9], beta1_seeds=[]), baseline_grid=True)
    grid = ["adamw_lr1.00e-03", "adamw_lr1.78e-03", "adamw_lr3.16e-03", "adamw_lr5.62e-03", "adamw_lr0.01",
            "adamw_lr0.0178", "adamw_lr0.0316"]  # cpu_lr's AdamW grid: 5.62e-3 +- 3 quarter-decades
    assert sorted(n for n in fake_runs if n.startswith("adamw")) == sorted(
        [*grid, *(f"{n}_seed1" for n in grid), "adamw_lr5.62e-03_seed2"])  # 3 seeds at its best
    text = (tmp_path / "mine" / "card.md").read_text()
    assert "only AdamW's best lr was rerun here" not in text
    f2 = next(line for line in text.splitlines() if line.startswith("| lr range within 0.1 nats of the best (F2)"))
    assert "per grid seed" in f2.split(" | ")[2] and "| rerun here | **" in f2


@pytest.mark.parametrize("config", sorted(Path("configs/cards").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_shipped_card_setups_resolve_to_a_run_of_their_package_optimizer(config, tmp_path):
    setup = card.Card(str(config), config.stem, tmp_path, Protocol(), jobs=2)
    (centre,) = [p for p in setup.grid() if p.values["lr"] == setup.center]
    resolved = card.validate(centre)
    optimizer = resolved["trainer"]["callbacks"][0]["init_args"]["optimizer"]
    assert optimizer["class_path"].startswith("pytorch_optimizer.") and setup.has_beta1
    version = importlib.metadata.version("pytorch_optimizer")
    assert card_write.class_paths_line(config) == f"`{optimizer['class_path']}` (pytorch_optimizer {version})"

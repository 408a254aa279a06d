"""`python -m lm_opt report`: table, plots and stability, rebuilt from point folders alone."""

import csv
import json
import math
import re
from pathlib import Path

import pytest

from lm_opt.study.report import main, spec_report_options
from lm_opt.study.rows import load_rows
from lm_opt.study.stats import stability, stability_per_seed

PAIRED_ON = {"model.qk_norm": True, "model.z_loss": 1e-4}


def point(sweep_dir: Path, name: str, optimizer: str, values: dict, status: str | None,
          loss: float | None = None, shared: tuple = ()) -> Path:
    """A point folder as `sweep` and a run leave it; no summary where `status` is None."""
    run = sweep_dir / name
    run.mkdir(parents=True)
    (run / "point.json").write_text(json.dumps({"sweep": "synthetic", "name": name, "optimizer": optimizer,
                                                "values": values, "shared": list(shared)}))
    (run / "fit.log").write_text("")
    if status is not None:
        summary = {"status": status, "final_val_loss": loss, "best_val_loss": loss, "steps": 10, "max_steps": 10,
                   "tokens": 640, "wall_time_s": 1.5, "config": {}}
        if status == "failed":
            summary["error"] = "RuntimeError: boom"
        (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def sweep_dir(tmp_path):
    """adamw: flat within 0.05 over 1e-3..1e-2, diverged at 1; sgd: one failed, one never summarised."""
    for lr, loss, status in [(1e-4, 5.0, "finished"), (1e-3, 4.04, "finished"), (3.16e-3, 4.0, "finished"),
                             (1e-2, 4.03, "finished"), (1e-1, 4.5, "finished"), (1.0, 9.0, "diverged")]:
        point(tmp_path, f"adamw_lr{lr:.2e}", "adamw", {"lr": lr}, status, loss)
    point(tmp_path, "sgd_lr1", "sgd", {"lr": 1.0}, "finished", 6.0)
    point(tmp_path, "sgd_lr10", "sgd", {"lr": 10.0}, "failed")
    point(tmp_path, "sgd_lr100", "sgd", {"lr": 100.0}, None)
    return tmp_path


def test_stability_is_the_lr_range_within_the_margin_of_the_best(sweep_dir):
    rows = load_rows(sweep_dir)
    by_optimizer = {s["optimizer"]: s for s in stability(rows, margin=0.05)}
    adamw = by_optimizer["adamw"]
    assert adamw["best_x"] == 3.16e-3 and adamw["best_loss"] == 4.0
    assert (adamw["low"], adamw["high"]) == (1e-3, 1e-2)
    assert adamw["decades"] == pytest.approx(1.0)
    assert (adamw["within"], adamw["finished"], adamw["points"]) == (3, 5, 6)
    wide = {s["optimizer"]: s for s in stability(rows, margin=0.6)}["adamw"]
    assert (wide["low"], wide["high"]) == (1e-3, 1e-1)  # the diverged lr never counts as stable
    assert by_optimizer["sgd"]["decades"] == 0.0


def test_a_momentum_grid_has_a_stable_range_but_no_width_in_decades(tmp_path):
    for beta1, loss in [(0.0, 4.3), (0.5, 4.0), (0.8, 4.04), (0.9, 4.1), (0.99, 4.5)]:
        point(tmp_path, f"adamw_beta1-{beta1}", "adamw", {"beta1": beta1}, "finished", loss)
    (line,) = stability(load_rows(tmp_path), margin=0.05)
    assert (line["low"], line["high"]) == (0.5, 0.8)
    assert line["decades"] is None  # log10(0.8 / 0.5) would measure nothing about momentum
    main([str(tmp_path)])
    assert (tmp_path / "plot_beta1.png").stat().st_size > 10_000


def test_the_compute_line_counts_the_runs_a_rerun_would_run_and_not_copied_records(sweep_dir):
    record = sweep_dir / "adamw_lr1.00e-04" / "point.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "copied_from": "logs/sweeps/other/adamw"}))
    for summary in sweep_dir.glob("*/summary.json"):
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "wall_time_s": 1800}))
    main([str(sweep_dir)])
    md = (sweep_dir / "results.md").read_text()
    # 8 summaries of half an hour, one of them copied: 7 ran; the never-summarised point has no time
    assert "Compute: 7 runs ran here, 3.50 h of wall time" in md
    assert "; 1 copied from another sweep's records." in md


def test_report_writes_csv_markdown_and_plot(sweep_dir):
    main([str(sweep_dir), "--margin", "0.05"])
    rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
    assert len(rows) == 9
    status = {r["point"]: r["status"] for r in rows}
    assert status["adamw_lr1.00e+00"] == "diverged"
    assert status["sgd_lr10"] == "failed" and status["sgd_lr100"] == "incomplete"
    assert {"optimizer", "lr", "final_val_loss", "best_val_loss", "steps", "tokens", "wall_time_s"} <= set(rows[0])
    md = (sweep_dir / "results.md").read_text()
    assert "| adamw |  | lr | 3.16e-03 | 4.0000 | 1.00e-03 .. 0.01 | 1.00 | 3 / 5 / 6 |" in md
    assert "**4.0000**" in md  # the best point of its line
    assert "sgd_lr10: failed: RuntimeError: boom" in md and "sgd_lr100: incomplete" in md
    png = sweep_dir / "plot_lr.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![plot_lr](plot_lr.png)" in md


def test_one_line_per_value_of_the_shared_axis(tmp_path):
    paired_off = {"model.qk_norm": False, "model.z_loss": 0.0}
    for lr in (1e-3, 1e-2):
        for on, paired in ((1, PAIRED_ON), (0, paired_off)):
            point(tmp_path, f"lion_lr{lr}_{on}", "lion", {"lr": lr, "qkz": paired}, "finished",
                  3.0 + on + lr, shared=("qkz",))
    stable = stability(load_rows(tmp_path), margin=0.05)
    assert sorted(s["condition"] for s in stable) == ["qk_norm=false, z_loss=0", "qk_norm=true, z_loss=1.00e-04"]
    assert all(s["best_x"] == 1e-3 for s in stable)
    main([str(tmp_path)])
    assert (tmp_path / "plot_lr.png").is_file()


def test_a_run_folder_without_point_json_reports_its_optimizer_and_lr(tmp_path):
    run = tmp_path / "by_hand"
    run.mkdir()
    lion = {"class_path": "lm_opt.optim.Lion", "init_args": {"lr": 3e-4}}
    config = {"trainer": {"callbacks": [{"class_path": "lm_opt.callbacks.OptimizerCallback",
                                         "init_args": {"optimizer": None, "routes": [{"optimizer": lion}]}}]}}
    (run / "summary.json").write_text(json.dumps({"status": "finished", "final_val_loss": 4.2, "config": config}))
    (row,) = load_rows(tmp_path)
    assert (row.optimizer, row.values, row.status) == ("Lion", {"lr": 3e-4}, "finished")
    assert math.isclose(row.final_val_loss, 4.2)


def test_an_empty_folder_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no point folders" in capsys.readouterr().err


def test_the_margin_of_the_spec_a_sweep_ran_reads_as_fit_reads_a_number(tmp_path):
    (tmp_path / "sweep.yaml").write_text("name: synthetic\nreport: {margin: 1e-1}\n")
    assert spec_report_options(tmp_path) == {"margin": 0.1}


def test_seed_repeats_give_the_noise_a_difference_must_exceed(tmp_path):
    """A difference from AdamW counts only where the seed ranges of the two best points do not overlap."""
    runs = {"adamw": (1e-3, [4.00, 4.02, 3.99], 4.3), "signum": (1e-4, [4.20, 4.25, 4.22], 4.5),
            "lion": (1e-4, [4.01, 4.00, 3.98], 4.4)}
    for optimizer, (lr, seeds, other) in runs.items():
        point(tmp_path, f"{optimizer}_best", optimizer, {"lr": lr}, "finished", seeds[0])
        point(tmp_path, f"{optimizer}_other", optimizer, {"lr": lr * 10}, "finished", other)
        for seed, loss in enumerate(seeds[1:], 1):
            point(tmp_path, f"{optimizer}_best_seed{seed}", optimizer, {"lr": lr, "seed": seed}, "finished", loss)
    (tmp_path / "baseline.json").write_text(json.dumps(
        {"unigram_val_loss": 5.0, "train_tokens": 100, "val_targets": 10, "smoothing": 0.5}))
    main([str(tmp_path)])
    md = (tmp_path / "results.md").read_text()
    section = md.split("## Best point per optimizer")[1].split("## Every run")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in section.splitlines() if line.startswith("| ")}
    assert rows["signum"].endswith("| +0.2200 | yes |")
    assert rows["lion"].endswith("| -0.0067 | no |")
    assert "| 3 | 4.0033 | 0.0153 | 3.9900 .. 4.0200 | -0.9967 |" in rows["adamw"]
    assert "unigram cross-entropy of the validation set is **5.0000**" in md
    # the stability and best point come from the grid, not from the seed repeats
    assert {s["optimizer"]: s["points"] for s in stability(load_rows(tmp_path), 0.05)} == {
        "adamw": 2, "lion": 2, "signum": 2}
    csv_rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert sorted(r["seed"] for r in csv_rows if r["optimizer"] == "adamw") == ["", "", "1", "2"]


def test_a_grid_run_again_under_another_seed_gives_the_stable_width_under_each_seed(tmp_path):
    for lr, grid_loss, seed1_loss in [(1e-3, 4.5, 4.05), (3.16e-3, 4.0, 4.0), (1e-2, 4.05, 4.6), (3.16e-2, 4.3, 4.7)]:
        point(tmp_path, f"adamw_lr{lr:.2e}", "adamw", {"lr": lr}, "finished", grid_loss)
        point(tmp_path, f"adamw_lr{lr:.2e}_seed1", "adamw", {"lr": lr, "seed": 1}, "finished", seed1_loss)
    point(tmp_path, "sgd_lr1", "sgd", {"lr": 1.0}, "finished", 6.0)
    point(tmp_path, "sgd_lr1_seed1", "sgd", {"lr": 1.0, "seed": 1}, "finished", 6.1)  # a best-point repeat
    point(tmp_path, "sgd_lr10", "sgd", {"lr": 10.0}, "finished", 7.0)
    lines = stability_per_seed(load_rows(tmp_path), margin=0.1)
    assert [(line["optimizer"], line["widths"]) for line in lines] == [("adamw", [pytest.approx(0.5, abs=1e-3)] * 2)]
    wide = stability_per_seed(load_rows(tmp_path), margin=0.35)
    assert wide[0]["widths"] == [pytest.approx(1.0, abs=1e-3), pytest.approx(0.5, abs=1e-3)]
    main([str(tmp_path), "--margin", "0.35"])
    table = (tmp_path / "results.md").read_text().split("## Stability under each seed")[1]
    assert "| adamw |  | 1.00, 0.50 | 0.75 | 0.50 .. 1.00 |" in table and "| sgd |" not in table


def test_a_seeds_width_waits_for_its_whole_grid(tmp_path):
    """A grid still running under a seed has no width yet: its one finished point would read as 0 decades."""
    for lr, loss in [(1e-3, 4.5), (3.16e-3, 4.0), (1e-2, 4.05)]:
        point(tmp_path, f"adamw_lr{lr:.2e}", "adamw", {"lr": lr}, "finished", loss)
    point(tmp_path, "adamw_lr1.00e-03_seed1", "adamw", {"lr": 1e-3, "seed": 1}, "finished", 4.0)
    point(tmp_path, "adamw_lr3.16e-03_seed1", "adamw", {"lr": 3.16e-3, "seed": 1}, "interrupted")
    point(tmp_path, "adamw_lr1.00e-02_seed1", "adamw", {"lr": 1e-2, "seed": 1}, None)
    (line,) = stability_per_seed(load_rows(tmp_path), margin=0.1)
    assert line["widths"] == [pytest.approx(0.5, abs=1e-3), None]
    point(tmp_path, "adamw_lr1.00e-02_seed2", "adamw", {"lr": 1e-2, "seed": 2}, "diverged")
    point(tmp_path, "adamw_lr3.16e-03_seed2", "adamw", {"lr": 3.16e-3, "seed": 2}, "finished", 4.2)
    point(tmp_path, "adamw_lr1.00e-03_seed2", "adamw", {"lr": 1e-3, "seed": 2}, "finished", 4.25)
    (line,) = stability_per_seed(load_rows(tmp_path), margin=0.1)
    assert line["widths"] == [pytest.approx(0.5, abs=1e-3), None, pytest.approx(0.5, abs=1e-3)]


def test_compare_adds_the_other_sweeps_lines_and_a_table_of_best_points(tmp_path):
    ablation, base = tmp_path / "no_qk_norm", tmp_path / "base"
    for lr, loss in [(1e-3, 4.19), (3.16e-3, 4.1), (1e-2, 4.6)]:
        point(ablation, f"adamw_lr{lr:.2e}", "adamw", {"lr": lr}, "finished", loss)
    for lr, loss in [(1e-3, 4.09), (3.16e-3, 4.0), (1e-2, 4.05)]:
        point(base, f"adamw_lr{lr:.2e}", "adamw", {"lr": lr}, "finished", loss)
    for seed, loss in [(1, 3.9), (2, 4.2)]:
        point(base, f"adamw_lr3.16e-03_seed{seed}", "adamw", {"lr": 3.16e-3, "seed": seed}, "finished", loss)
    main([str(ablation), "--margin", "0.1", "--compare", str(base)])
    text = (ablation / "results.md").read_text()
    assert "| adamw |  | 3.16e-03: 4.1000 | 1.00e-03 .. 3.16e-03 | 3.16e-03: 4.0333 (3.9000 .. 4.2000, 3 seeds) " \
           "| 1.00e-03 .. 0.01 | +0.0667 |  |" in text  # one seed here: no verdict on the noise
    for seed, loss in [(1, 4.25), (2, 4.4)]:
        point(ablation, f"adamw_lr3.16e-03_seed{seed}", "adamw", {"lr": 3.16e-3, "seed": seed}, "finished", loss)
    for sweep, losses in [(ablation, (6.0, 6.1, 6.05)), (base, (5.0, 5.1, 4.9))]:
        point(sweep, "sgd_lr0.1", "sgd", {"lr": 0.1}, "finished", losses[0])
        for seed in (1, 2):
            point(sweep, f"sgd_lr0.1_seed{seed}", "sgd", {"lr": 0.1, "seed": seed}, "finished", losses[seed])
    main([str(ablation), "--margin", "0.1", "--compare", str(base)])
    text = (ablation / "results.md").read_text()
    assert "| adamw |  | 3.16e-03: 4.2500 (4.1000 .. 4.4000, 3 seeds) | 1.00e-03 .. 3.16e-03 " \
           "| 3.16e-03: 4.0333 (3.9000 .. 4.2000, 3 seeds) | 1.00e-03 .. 0.01 | +0.2167 | no |" in text
    assert "| sgd |  | 0.1: 6.0500 (6.0000 .. 6.1000, 3 seeds) |" in text and "| +1.0500 | yes |" in text
    assert (ablation / "plot_lr.png").is_file() and not (base / "results.md").exists()
    with pytest.raises(SystemExit):
        main([str(ablation), "--compare", str(tmp_path / "empty")])


def test_a_panel_tag_in_the_labels_compares_each_size_within_itself_and_draws_a_panel_each(tmp_path):
    """adamw_w128 / signum_w128 and adamw_w256 / signum_w256: signum is beyond noise of AdamW at
    width 128 only, and each width's AdamW is its own reference (not the other width's)."""
    runs = {"adamw_w128": [4.00, 4.02, 3.99], "signum_w128": [4.20, 4.25, 4.22],
            "adamw_w256": [3.50, 3.52, 3.49], "signum_w256": [3.51, 3.53, 3.50]}
    for label, seeds in runs.items():
        point(tmp_path, f"{label}_lr1", label, {"lr": 1e-3}, "finished", seeds[0])
        point(tmp_path, f"{label}_lr2", label, {"lr": 1e-2}, "finished", seeds[0] + 0.3)
        for seed, loss in enumerate(seeds[1:], 1):
            point(tmp_path, f"{label}_lr1_seed{seed}", label, {"lr": 1e-3, "seed": seed}, "finished", loss)
        point(tmp_path, f"{label}_lr2_seed1", label, {"lr": 1e-2, "seed": 1}, "finished", seeds[0] + 0.05)
    (tmp_path / "sweep.yaml").write_text("name: synthetic\nreport: {margin: 0.05, panel: 'width=_w(\\d+)$'}\n")
    main([str(tmp_path)])  # the options of the spec the sweep ran: its copy in the folder
    md = (tmp_path / "results.md").read_text()
    section = md.split("## Best point per optimizer")[1].split("## Every run")[0]
    rows = {tuple(line.split(" | ")[:2]): line for line in section.splitlines() if line.startswith("| signum")}
    assert rows[("| signum", "width=128")].endswith("| +0.2200 | yes |")
    assert rows[("| signum", "width=256")].endswith("| +0.0100 | no |")
    across = md.split("## Across width")[1].split("##")[0]
    assert "| signum | +0.2200 (beyond noise) | +0.0100 (within noise) | no |" in across
    assert "| adamw | 0.00, 1.00 | 0.00, 1.00 |" in across  # within 0.05 nats: one lr under seed 0, both under 1
    assert {r["width"] for r in csv.DictReader(open(tmp_path / "results.csv"))} == {"128", "256"}
    assert (tmp_path / "plot_lr.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--panel", "width"])


def test_each_panel_is_timed_to_its_own_reference_loss(tmp_path):
    """signum_w256 reaches width 128's AdamW loss (4.0) but not width 256's (3.5): a panel's steps
    to target are counted to its own AdamW, and its step time is divided by that AdamW's."""
    curves = {"adamw_w128": [[5, 4.5], [10, 4.0]], "signum_w128": [[5, 4.5], [10, 3.9]],
              "adamw_w256": [[5, 4.0], [10, 3.5]], "signum_w256": [[5, 4.0], [10, 3.6]]}
    for label, curve in curves.items():
        run = point(tmp_path, f"{label}_lr1", label, {"lr": 1e-3}, "finished", curve[-1][1])
        summary = json.loads((run / "summary.json").read_text())
        step_time = 0.2 if label.endswith("w128") else 0.4 * (2 if label.startswith("signum") else 1)
        (run / "summary.json").write_text(json.dumps({**summary, "val_curve": curve, "step_time_s": step_time}))
    main([str(tmp_path), "--panel", "width=_w(\\d+)$"])
    md = (tmp_path / "results.md").read_text()
    narrow = md.split("## Steps to target: width=128: adamw")[1].split("##")[0]
    wide = md.split("## Steps to target: width=256: adamw")[1].split("##")[0]
    assert "4.0000 nats" in narrow and "3.5000 nats" in wide
    assert "| signum | width=128 | 1.00e-03 | 1 / 1 | 9 | 9 .. 9 |" in narrow  # 5 + 5 x 0.5 / 0.6
    assert "| signum | width=256 | 1.00e-03 | 0 / 1 | not reached |" in wide
    assert re.search(r"\| signum \| width=256 .*\| 800 \| 2\.00 \|", wide)


def test_panels_tagged_by_numbers_go_in_numeric_order():
    from lm_opt.study.plots import in_order

    assert sorted([3200, 50, 400], key=in_order) == [50, 400, 3200]  # a length ladder's panels
    assert sorted(["w512", "w128"], key=in_order) == ["w128", "w512"]

"""A run's and a sweep point's records on disk, read and written in one place (lm_opt.record)."""

import json

from lm_opt.record import PointRecord, RunSummary, read_point, read_summary, write_point, write_summary


def test_a_summary_reads_back_as_written_with_how_the_run_ended_first(tmp_path):
    ending = {"status": "diverged", "diverged_at_step": 7, "loss": 12.5, "initial_loss": 9.0}
    summary = RunSummary.from_json({**ending, "final_val_loss": 4.5, "val_curve": [[2, 5.0]], "config": {"a": 1}})
    assert summary.ending == {"diverged_at_step": 7, "loss": 12.5, "initial_loss": 9.0}
    write_summary(tmp_path, summary)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert list(written)[:5] == ["status", "diverged_at_step", "loss", "initial_loss", "final_val_loss"]
    assert "error" not in written and read_summary(tmp_path) == summary
    failed = RunSummary(status="failed", error="RuntimeError: boom", provenance={"device": {"type": "cpu"}})
    assert list(failed.to_json())[:3] == ["status", "error", "final_val_loss"] and failed.device == {"type": "cpu"}


def test_a_folder_without_a_record_reads_as_none_or_an_empty_summary(tmp_path):
    assert read_summary(tmp_path) == RunSummary() and read_point(tmp_path) is None
    (tmp_path / "summary.json").write_text('{"status": "fini')  # a run writing it
    assert read_summary(tmp_path).status is None


def test_a_point_record_names_its_source_only_where_it_was_copied(tmp_path):
    point = PointRecord("micro", "adamw_lr1", "adamw", {"lr": 1.0}, [], ["python", "-m", "lm_opt", "fit"])
    write_point(tmp_path, point)
    assert list(json.loads((tmp_path / "point.json").read_text())) == [
        "sweep", "name", "optimizer", "values", "shared", "command"]
    assert read_point(tmp_path) == point
    (tmp_path / "point.json").write_text(json.dumps({"command": ["python"], "copied_from": "logs/sweeps/a/b"}))
    assert read_point(tmp_path) == PointRecord(command=["python"], copied_from="logs/sweeps/a/b")

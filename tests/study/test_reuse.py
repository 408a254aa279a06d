"""A sweep point that a sibling sweep already ran on this CPU takes that run's record
(`lm_opt.study.reuse`): matched on the whole resolved config, the CPU, its threads and the packages."""

import json
from pathlib import Path

from lm_opt import precision
from lm_opt.precision import cpu_arithmetic
from lm_opt.provenance import cpu_name, installed_version, package_versions
from lm_opt.study import reuse

CONFIG = {"seed_everything": 0, "trainer": {"precision": "bf16-mixed", "logger": {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "logs/sweeps/a", "name": "adamw_lr1", "version": "", "flush_secs": 120}}},
    "model": {"lr": 1.0}}


def write_run(root: Path, sweep_name: str, point: str, config: dict = CONFIG, status: str = "finished",
              **device) -> Path:
    run = root / sweep_name / point
    run.mkdir(parents=True)
    device = {"type": "cpu", "name": cpu_name(), "threads": 1, "precision": "bf16-mixed",
              "arithmetic": cpu_arithmetic()} | device
    (run / "summary.json").write_text(json.dumps({
        "status": status, "final_val_loss": 5.0, "config": config,
        "provenance": {"packages": package_versions(), "device": device}}))
    return run


def test_the_key_ignores_the_logger_the_diagnostics_and_the_resumed_checkpoint_and_nothing_else():
    moved = json.loads(json.dumps(CONFIG))
    moved["trainer"]["logger"]["init_args"] = {"save_dir": "logs/sweeps/b", "name": "other"}
    moved["ckpt_path"] = "last"
    moved["eff_lr"], moved["update_size"] = {"every_n_steps": 10}, {"every_n_steps": None}  # diagnostics
    assert reuse.run_key(moved) == reuse.run_key(CONFIG)
    for path, value in [(("model", "lr"), 1.01), (("seed_everything",), 1), (("trainer", "precision"), "32-true")]:
        changed = json.loads(json.dumps(CONFIG))
        target = changed
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert reuse.run_key(changed) != reuse.run_key(CONFIG), path


def test_only_done_runs_of_this_cpu_threads_and_packages_are_offered(tmp_path, monkeypatch):
    def config(lr):
        return CONFIG | {"model": {"lr": lr}}

    good = write_run(tmp_path, "a", "p1", config(1.0))
    diverged = write_run(tmp_path, "a", "p2", config(2.0), status="diverged")
    write_run(tmp_path, "a", "p3", config(3.0), status="interrupted")
    write_run(tmp_path, "b", "p4", config(4.0), threads=2)
    write_run(tmp_path, "b", "p5", config(5.0), name="another CPU")
    write_run(tmp_path, "b", "p6", config(6.0), type="cuda")
    old = write_run(tmp_path, "b", "p7", config(7.0))
    summary = json.loads((old / "summary.json").read_text())
    summary["provenance"]["packages"]["torch"] = "2.0.0"
    (old / "summary.json").write_text(json.dumps(summary))
    for point, version in [("p8", "0.0.1"), ("p9", installed_version("pytorch_optimizer"))]:
        run = write_run(tmp_path, "c", point, config(float(point[1:])))
        summary = json.loads((run / "summary.json").read_text())
        summary["provenance"]["optimizer_packages"] = {"pytorch_optimizer": version}  # a third-party optimizer's
        (run / "summary.json").write_text(json.dumps(summary))
    runs = reuse.done_runs(tmp_path, threads=1)
    assert sorted(runs.values()) == [good, diverged, tmp_path / "c" / "p9"]
    assert runs[reuse.run_key(config(1.0))] == good


def test_a_record_made_on_another_cpu_kind_is_refused(tmp_path):
    here = cpu_arithmetic()
    write_run(tmp_path, "a", "other_capability", arithmetic=here | {"capability": "AVX2" if here["capability"] !=
                                                                    "AVX2" else "AVX512"})
    write_run(tmp_path, "a", "other_bf16", arithmetic=here | {"bf16_native": not here["bf16_native"]})
    write_run(tmp_path, "a", "unknown_kind", arithmetic=None)
    assert reuse.done_runs(tmp_path, threads=1) == {}
    same = write_run(tmp_path, "b", "same_kind", arithmetic=here | {"source": "stated after the run"})
    assert list(reuse.done_runs(tmp_path, threads=1).values()) == [same]


def test_auto_precision_matches_the_precision_this_machine_resolves_it_to(monkeypatch):
    auto = json.loads(json.dumps(CONFIG))
    auto["trainer"]["precision"] = "auto"
    for native, used in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(precision, "native_bf16", lambda device, native=native: native)
        assert reuse.run_key(auto) == reuse.run_key(CONFIG, used) == reuse.run_key(auto, used)
        assert reuse.run_key(auto) != reuse.run_key(CONFIG, "32-true" if native else "bf16-mixed")


def test_a_sweep_reuses_the_cards_runs_and_their_baselines_and_a_card_the_sweeps(tmp_path):
    """logs/sweeps and logs/cards are one pool of runs: a card's grid seed is a scale sweep's point."""
    def config(lr):
        return CONFIG | {"model": {"lr": lr}}

    sweeps, cards = tmp_path / "logs" / "sweeps", tmp_path / "logs" / "cards"
    in_sweep = write_run(sweeps, "cpu_lr", "adamw_lr1", config(1.0))
    write_run(cards, "adamw", "adamw_lr1", config(1.0))  # the same run again: the sweep's comes first
    in_card = write_run(cards, "mine", "mine_lr2", config(2.0))
    in_baselines = write_run(cards / "mine", "baselines", "adamw_lr3", config(3.0))
    runs = reuse.known_runs(sweeps, threads=1)
    assert runs == {reuse.run_key(config(1.0)): in_sweep, reuse.run_key(config(2.0)): in_card,
                    reuse.run_key(config(3.0)): in_baselines}

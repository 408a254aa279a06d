"""Every shipped config parses, so none can rot."""

from pathlib import Path

import pytest
import yaml

from lm_opt.cli import main

CONFIGS = Path(__file__).parent.parent / "configs"
RUN_CONFIGS = sorted(CONFIGS.glob("*.yaml"))
OPTIM_CONFIGS = sorted((CONFIGS / "optim").glob("*.yaml"))
STRATEGY_CONFIGS = [c for c in RUN_CONFIGS if c.stem in ("ddp", "fsdp")]


def print_config(capsys, *configs: Path) -> dict:
    args = ["fit"] + [a for c in configs for a in ("--config", str(c))] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", [c for c in RUN_CONFIGS if c not in STRATEGY_CONFIGS], ids=lambda p: p.stem)
def test_run_config_parses(capsys, config):
    parsed = print_config(capsys, config)
    assert parsed["model"]["preset"] in ("cpu", config.stem)


@pytest.mark.parametrize("config", STRATEGY_CONFIGS, ids=lambda p: p.stem)
def test_strategy_config_combines_with_a_preset(capsys, config):
    parsed = print_config(capsys, CONFIGS / "150m.yaml", config)
    assert parsed["trainer"]["devices"] == 8


@pytest.mark.parametrize("config", OPTIM_CONFIGS, ids=lambda p: p.stem)
def test_optimizer_config_combines_with_a_model_config(capsys, config):
    parsed = print_config(capsys, CONFIGS / "quickstart.yaml", config)
    callbacks = parsed["trainer"]["callbacks"]
    assert [c["class_path"] for c in callbacks] == ["lm_opt.callbacks.OptimizerCallback"]
    assert parsed["data"]["path"] == "embedded"


def optimizers_of(parsed: dict) -> list[dict]:
    """Every optimizer of the OptimizerCallback: the one, or each route's."""
    args = parsed["trainer"]["callbacks"][0]["init_args"]
    return [args["optimizer"]] if args.get("optimizer") else [r["optimizer"] for r in args["routes"]]


@pytest.mark.parametrize("config", ["adamw", "adafactor", "adalayer", "frozen_adalayer", "sgd_adalayer_last_norm",
                                    "sgd_adalayer_last", "sgd_adafactor_last_norm"])
def test_the_studys_adaptive_optimizers_use_eps_1e_15(capsys, config):
    """eps is 1e-15 for every optimizer in the study's sweeps (AdamW, Adafactor*, Adalayer)."""
    parsed = print_config(capsys, CONFIGS / "quickstart.yaml", CONFIGS / "optim" / f"{config}.yaml")
    adaptive = [o for o in optimizers_of(parsed) if "eps" in o["init_args"]]
    assert adaptive and all(o["init_args"]["eps"] == 1e-15 for o in adaptive)


@pytest.mark.parametrize("config", [c for c in RUN_CONFIGS if c not in STRATEGY_CONFIGS],
                         ids=lambda p: p.stem)
def test_every_run_configs_adamw_uses_the_studys_eps(capsys, config):
    assert optimizers_of(print_config(capsys, config))[0]["init_args"]["eps"] == 1e-15


def test_signum_uses_the_lr_sweeps_beta_0_9(capsys):
    parsed = print_config(capsys, CONFIGS / "quickstart.yaml", CONFIGS / "optim" / "signum.yaml")
    assert optimizers_of(parsed)[0]["init_args"]["momentum"] == 0.9

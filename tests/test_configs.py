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
    assert parsed["model"]["preset"] in ("tiny", config.stem)


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

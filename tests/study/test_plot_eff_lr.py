import pytest

from cli_helpers import fit, tiny_args
from lm_opt.model import GPT, ModelConfig
from lm_opt.study.plot_eff_lr import depth, main, panels, read_quantiles


def test_plot_of_a_run_shows_every_parameter(tmp_path):
    fit(*tiny_args(tmp_path, "run", 4, "--config", "configs/optim/adalayer.yaml", "--eff_lr.every_n_steps", "2"))
    series = read_quantiles(tmp_path / "run")
    assert "lm_head.weight" in series and "lm_head.weight/rows" in series
    assert [step for step, _ in series["lm_head.weight"][50]] == [1, 3]
    main([str(tmp_path / "run")])
    png = tmp_path / "run" / "eff_lr.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensors_are_grouped_by_kind_so_depth_adds_lines_not_panels():
    names = [n for n, _ in GPT(ModelConfig.from_name("tiny", n_layer=12)).named_parameters()] + ["lm_head.weight/rows"]
    groups = panels(names)
    assert list(groups) == ["QKV", "attention out", "MLP in", "MLP out", "norms", "embedding",
                            "last layer: spread across logits", "last layer"]
    assert groups["QKV"] == [f"blocks.{i}.attn.qkv.weight" for i in range(12)]
    assert groups["MLP out"] == [f"blocks.{i}.mlp.proj.weight" for i in range(12)]
    assert groups["last layer"] == ["lm_head.weight"]
    assert groups["last layer: spread across logits"] == ["lm_head.weight/rows"]
    assert "norm.weight" in groups["norms"] and sum(map(len, groups.values())) == len(names)
    assert depth("blocks.11.mlp.fc.weight") == 11 and depth("wte.weight") is None


def test_a_run_without_quantiles_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty")])
    assert "eff_lr.every_n_steps" in capsys.readouterr().err

import pytest

from cli_helpers import fit, tiny_args
from lm_opt.model import GPT, ModelConfig
from lm_opt.study.plot_eff_lr import depth, main, numbers, panels, read_quantiles


def test_plot_of_a_run_shows_every_parameter(tmp_path):
    fit(*tiny_args(tmp_path, "run", 4, "--config", "configs/optim/adalayer.yaml", "--eff_lr.every_n_steps", "2"))
    series = read_quantiles(tmp_path / "run")
    assert "lm_head.weight" in series and "lm_head.weight/rows" in series
    assert [step for step, _ in series["lm_head.weight"][50]] == [1, 3]
    main([str(tmp_path / "run")])
    png = tmp_path / "run" / "eff_lr.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| last layer: spread across logits | 1 |" in (tmp_path / "run" / "eff_lr.md").read_text()


def test_the_numbers_are_the_spread_within_a_tensor_and_the_move_of_its_median():
    def quantiles(q5, q50, q95):  # at steps 10 and 20
        return {5: [(10, q5[0]), (20, q5[1])], 50: [(10, q50[0]), (20, q50[1])], 95: [(10, q95[0]), (20, q95[1])]}

    series = {"lm_head.weight/rows": quantiles((1e-4, 1e-4), (1e-3, 1e-3), (1e-2, 1e-1)),
              "blocks.0.mlp.fc.weight": quantiles((1e-3, 1e-2), (1e-3, 1e-2), (1e-3, 1e-2))}
    table = numbers(series)
    assert table[0] == "Logged at steps 10 .. 20 (2 times)."
    assert "| MLP in | 1 | 0.001 | 0.01 | 0.00 | 1.00 |" in table
    assert "| last layer: spread across logits | 1 | 0.001 | 0.001 | 3.00 | 0.00 |" in table


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

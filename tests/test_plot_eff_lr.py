import pytest

from cli_helpers import fit, tiny_args
from lm_opt.plot_eff_lr import main, read_quantiles


def test_plot_of_a_run_shows_every_parameter(tmp_path):
    fit(*tiny_args(tmp_path, "run", 4, "--config", "configs/optim/adalayer.yaml", "--eff_lr.every_n_steps", "2"))
    series = read_quantiles(tmp_path / "run")
    assert "lm_head.weight" in series and "lm_head.weight/rows" in series
    assert [step for step, _ in series["lm_head.weight"][50]] == [1, 3]
    main([str(tmp_path / "run")])
    png = tmp_path / "run" / "eff_lr.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_quantiles_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty")])
    assert "eff_lr.every_n_steps" in capsys.readouterr().err

"""lm_opt.user_yaml reads a YAML as `fit` does (jsonargparse's loader), and as PyYAML did wherever
PyYAML already read a float, so that the shipped configs and committed sweeps mean what they meant."""

from pathlib import Path

import pytest
import yaml
from jsonargparse import get_loader

from lm_opt.user_yaml import load_yaml

SCALARS = ["3e-3", "1e-4", "1E5", "-2e+3", "+1e5", "0e5", "1e05", "3.16e-3", "3.0e-03", "1.0e+5", "1.", "1.5", ".5",
           ".5e-3", ".5e3", "1_000.5", "1:30.5", "1:30", ".inf", "-.Inf", ".nan", "1", "017", "0x1F", "0o17", "1_000",
           "2024-01-01", "2024-01-01 10:00:00", "true", "yes", "off", "null", "~", "e5", "3e", "1e5.5", "3e-3x",
           "1.2.3", "'3e-3'", "[3e-3, 1e-2]", "{lr: 3e-3}"]


@pytest.mark.parametrize("scalar", SCALARS)
def test_a_value_reads_as_jsonargparse_reads_it_for_fit(scalar):
    text = f"x: {scalar}\n"
    assert repr(load_yaml(text)) == repr(get_loader("yaml")(text))


def test_numbers_in_exponent_form_are_floats_and_plain_floats_are_unchanged():
    assert load_yaml("lr: [3e-3, 1e-4, 1E5, 3.16e-3]") == {"lr": [0.003, 0.0001, 100000.0, 0.00316]}
    for scalar in SCALARS:
        old = yaml.safe_load(f"x: {scalar}")["x"]
        if isinstance(old, float) and old == old:  # nan is never equal to itself
            assert load_yaml(f"x: {scalar}")["x"] == old, scalar


def test_every_shipped_config_reads_as_before():
    for path in sorted(Path("configs").rglob("*.yaml")):
        assert load_yaml(path.read_text()) == yaml.safe_load(path.read_text()), path


def test_a_syntax_error_keeps_its_line_and_column():
    with pytest.raises(yaml.YAMLError) as err:
        load_yaml("name: micro\nout_dir: [\n")
    assert err.value.problem_mark.line == 2

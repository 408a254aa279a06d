"""The YAML a user writes (configs, optimizer YAMLs, sweep specs), read as `fit` reads it.

PyYAML's `safe_load` follows YAML 1.1, where a float needs a dot and a signed exponent: `3e-3`,
`1e-4` and `1E5` are strings there. `fit` parses its configs with jsonargparse, whose YAML loader
resolves floats as YAML 1.2 does (and leaves dates as strings), so `fit` trains at lr 0.003 where a
`safe_load` reader refuses the string '3e-3'. `card`, `sweep` and `report` read every user YAML
through `Loader`, jsonargparse's rules, so that a file means the same to them as to `fit`
(tests/test_user_yaml.py holds the two loaders equal). Every scalar that YAML 1.1 reads as a float
reads as the same float here, so the point names of committed sweeps stay as they were.
"""

import re
from pathlib import Path
from typing import Any

import yaml

FLOAT_TAG = "tag:yaml.org,2002:float"
TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
FLOAT = re.compile(r"""^(?:
     [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?  # 0.003, 3.0e-3, 3.e-3 (YAML 1.1 needs the sign)
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+                # 3e-3, 1E5: YAML 1.2 only
    |\.[0-9_]+(?:[eE][-+][0-9]+)?                    # .5
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*     # 1:30.5, YAML 1.1's base 60, which jsonargparse keeps
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader with jsonargparse's implicit types: YAML 1.2's floats, no timestamps.

    The pure-Python SafeLoader, not libyaml's: its syntax errors carry the line and column that
    lm_opt.errors.invalid_yaml names.
    """


Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (FLOAT_TAG, TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver(FLOAT_TAG, FLOAT, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """`text` parsed as `fit` parses it; yaml.YAMLError where it is not YAML."""
    return yaml.load(text, Loader=Loader)


def read_yaml(path: str | Path) -> Any:
    """The file at `path` parsed as `fit` parses it; OSError or yaml.YAMLError as the reading fails."""
    return load_yaml(Path(path).read_text())

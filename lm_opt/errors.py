"""Mistakes in what a user gave, told apart from bugs.

`python -m lm_opt` ends a `UserError` as one `error:` line on stderr with exit status 2, as
jsonargparse ends a bad option; any other exception is a bug and keeps its traceback.
`LM_OPT_DEBUG=1` (or `--debug`) shows the traceback of a user error too.
"""

import os
from pathlib import Path

import yaml

DEBUG_ENV = "LM_OPT_DEBUG"


class UserError(ValueError):
    """A bad config value, file, checkpoint or route; the message names it and what was expected.

    A ValueError, so that code validating arguments the usual way keeps catching it.
    """


def debug_mode() -> bool:
    """Whether user errors should show their traceback."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def invalid_yaml(path: str | Path, err: yaml.YAMLError) -> str:
    """A YAML syntax error as one line naming the file, line and column (PyYAML, given the file's
    text, names only `<unicode string>`)."""
    mark = getattr(err, "problem_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{path}{where}: invalid YAML: {getattr(err, 'problem', None) or err}"

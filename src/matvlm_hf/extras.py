"""Optional dependencies of the commands (pyproject extras): a clear error naming the extra when one is missing."""

from __future__ import annotations

import importlib.util

from .errors import UserError

# import name -> (the pyproject extra that installs it, the distribution)
EXTRAS = {"matplotlib": ("plots", "matplotlib"), "yaml": ("yaml", "pyyaml")}


def require(module: str, needed_by: str) -> None:
    """Raise `UserError` naming the extra to install when `module` (a key of EXTRAS) cannot be imported.

    needed_by: what needs it, for the message (e.g. "matvlm quickstart's report"). Call it before long work starts.
    """
    if importlib.util.find_spec(module) is None:
        extra, dist = EXTRAS[module]
        raise UserError(
            f'{needed_by} needs {dist}, which is not installed: pip install "matvlm-hf[{extra}]" '
            f'(in a checkout: pip install -e ".[{extra}]").'
        )

"""Alias: `matvlm_hf.recipe` moved to `matvlm_hf.training.recipe` (old imports keep working)."""

import sys

from .training import recipe as _moved

sys.modules[__name__] = _moved

"""Alias: `matvlm_hf.data` moved to `matvlm_hf.training.data` (old imports keep working)."""

import sys

from .training import data as _moved

sys.modules[__name__] = _moved

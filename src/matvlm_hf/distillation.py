"""Alias: `matvlm_hf.distillation` moved to `matvlm_hf.training.distillation` (old imports keep working)."""

import sys

from .training import distillation as _moved

sys.modules[__name__] = _moved

"""Alias: `matvlm_hf.model_card` moved to `matvlm_hf.convert.model_card` (old imports keep working)."""

import sys

from .convert import model_card as _moved

sys.modules[__name__] = _moved

"""Alias: `matvlm_hf.fabricate` moved to `matvlm_hf.convert.fabricate` (old imports keep working)."""

import sys

from .convert import fabricate as _moved

sys.modules[__name__] = _moved

"""Alias: `matvlm_hf.fabricate_authors` moved to `matvlm_hf.convert.fabricate_authors` (old imports keep working)."""

import sys

from .convert import fabricate_authors as _moved

sys.modules[__name__] = _moved

"""Alias: `matvlm_hf.authors_checkpoint` moved to `matvlm_hf.convert.authors_checkpoint` (old imports keep working)."""

import sys

from .convert import authors_checkpoint as _moved

sys.modules[__name__] = _moved

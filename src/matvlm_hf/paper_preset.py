"""Alias: `matvlm_hf.paper_preset` moved to `matvlm_hf.convert.paper_preset` (old imports keep working)."""

import sys

from .convert import paper_preset as _moved

sys.modules[__name__] = _moved

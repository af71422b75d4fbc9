"""Alias: `matvlm_hf.conversion` moved to `matvlm_hf.convert.conversion` (old imports and `python -m` keep working)."""

import sys

from .convert import conversion as _moved

if __name__ == "__main__":
    _moved.main()
else:
    sys.modules[__name__] = _moved

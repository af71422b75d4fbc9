"""Alias: `matvlm_hf.study` moved to `matvlm_hf.synthetic.study` (old imports and `python -m` keep working)."""

import sys

from .synthetic import study as _moved

if __name__ == "__main__":
    _moved.main()
else:
    sys.modules[__name__] = _moved

"""Alias: `matvlm_hf.benchmark` moved to `matvlm_hf.synthetic.benchmark` (old imports and `python -m` keep working)."""

import sys

from .synthetic import benchmark as _moved

if __name__ == "__main__":
    _moved.main()
else:
    sys.modules[__name__] = _moved

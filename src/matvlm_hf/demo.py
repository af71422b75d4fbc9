"""Alias: `matvlm_hf.demo` moved to `matvlm_hf.synthetic.demo` (old imports and `python -m` keep working)."""

import sys

from .synthetic import demo as _moved

if __name__ == "__main__":
    _moved.main()
else:
    sys.modules[__name__] = _moved

"""Alias: `matvlm_hf.quickstart` moved to `matvlm_hf.synthetic.quickstart`
(old imports and `python -m` keep working)."""

import sys

from .synthetic import quickstart as _moved

if __name__ == "__main__":
    _moved.main()
else:
    sys.modules[__name__] = _moved

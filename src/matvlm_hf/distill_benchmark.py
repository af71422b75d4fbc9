"""Alias: `matvlm_hf.distill_benchmark` moved to `matvlm_hf.synthetic.distill_benchmark`
(old imports and `python -m` keep working)."""

import sys

from .synthetic import distill_benchmark as _moved

if __name__ == "__main__":
    _moved.main()
else:
    sys.modules[__name__] = _moved

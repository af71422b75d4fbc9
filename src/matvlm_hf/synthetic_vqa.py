"""Alias: `matvlm_hf.synthetic_vqa` moved to `matvlm_hf.synthetic.synthetic_vqa`
(old imports and `python -m` keep working)."""

import sys

from .synthetic import synthetic_vqa as _moved

if __name__ == "__main__":
    _moved.main()
else:
    sys.modules[__name__] = _moved

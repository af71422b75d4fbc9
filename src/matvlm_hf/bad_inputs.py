"""Alias: `matvlm_hf.bad_inputs` moved to `matvlm_hf.synthetic.bad_inputs`
(old imports and `python -m` keep working)."""

import sys

from .synthetic import bad_inputs as _moved

if __name__ == "__main__":
    _moved.main()
else:
    sys.modules[__name__] = _moved

"""Alias: `matvlm_hf.train_cli` moved to `matvlm_hf.commands.distill` (the trainer factory `build_trainer` to
`matvlm_hf.training.trainer_factory`); old imports and `python -m` keep working."""

import sys

from .commands import distill as _moved

if __name__ == "__main__":
    _moved.main()
else:
    sys.modules[__name__] = _moved

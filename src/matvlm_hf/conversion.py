"""Alias: `matvlm_hf.conversion` moved to `matvlm_hf.convert.conversion` (the library) and its `main` to
`matvlm_hf.commands.convert` (the `matvlm convert` command, which the library may not import). This module stands
for both: attributes are read from and written to the library module, so old imports and patches of its functions
keep working; `main` is the command's; `python -m matvlm_hf.conversion` runs the command."""

import sys
import types

from .commands.convert import main
from .convert import conversion as _moved


class _Alias(types.ModuleType):
    """`matvlm_hf.convert.conversion` plus `main`: reads fall through to it, writes go to it."""

    def __getattr__(self, name: str):
        return getattr(_moved, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(_moved, name, value)

    def __dir__(self) -> list[str]:
        return sorted({*dir(_moved), "main"})


if __name__ == "__main__":
    main()
else:
    sys.modules[__name__].__class__ = _Alias

"""The error type of a user's mistake: `matvlm` prints its message and exits 2, without a traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or options; the message names the file, tensor, sample or option at fault and what to do."""

"""The error a user causes, as opposed to a bug.

Every error the user can fix (a config value, a data row, a file, a checkpoint that does not fit the run)
is a `UserError`: its message names what is wrong, where (the key, file, row or folder) and the fix. The
command line prints it as one `error: ...` block and exits with code 2, without a traceback; any other
exception is a bug and keeps its traceback. `IMGALIGN_DEBUG=1` or `imgalign --debug` shows the traceback of
a UserError too.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: the message says what, where and the fix."""


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed here: corrupt, incomplete, or written by another kind of run."""


class NonFiniteError(UserError):
    """Training stopped: the loss or gradient norm was non-finite for too many optimizer steps in a row."""

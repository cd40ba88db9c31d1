"""User-facing errors.

A `SlimError` is a mistake the user can fix (a wrong path, an impossible setting). Its message is
one line that names the problem and the fix; the CLI prints it without a traceback and exits 2.
Anything else that escapes is a bug in slimlm and keeps its traceback.
"""

from __future__ import annotations


class SlimError(Exception):
    """A user error: the message names the problem and the fix, on one line."""

    exit_code = 2

"""The errors a user can fix. The CLI prints each as one line (naming the file or key and the fix) and exits 2;
any other exception is a bug in medldm and keeps its traceback (exit 3).

Each is also a builtin type (``InputError`` is a ``ValueError``, ``ResourceError`` a ``RuntimeError``), so code
that catches the builtin keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in what the user gave or has (input, config, machine): the message names it and the fix."""


class InputError(UserError, ValueError):
    """Bad input: a file that cannot be used, an option or a value that is refused, a dataset that does not fit."""


class ResourceError(UserError, RuntimeError):
    """The machine cannot do it as asked: GPU memory, a device that is not there, a graph the card cannot capture."""


class StoppedError(UserError, RuntimeError):
    """A run stopped by one of its checks (e.g. a non-finite loss); the message says what to change."""


def not_utf8(path: object, error: UnicodeDecodeError) -> InputError:
    """The error for a text file (CSV, YAML, JSON) that is not UTF-8, naming it and the fix."""
    return InputError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8 (from a "
                      "spreadsheet: \"CSV UTF-8\")")

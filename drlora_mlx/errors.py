"""The errors that end a run with one line instead of a traceback.

Every error a user can cause derives from ``InputError``: its message is the
one line the command line prints (``drlora-mlx: error: ...``) before it exits
with code 2. Errors that stop a run for another reason (a non-finite step, a
signal, diverged processes) derive from ``RunStopped`` and carry their own
exit code. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DRLoRAError(Exception):
    """An error the command line reports in one line and ends with ``exit_code``."""

    exit_code = 1
    label = "error"  # printed as "drlora-mlx: <label>: <message>"; empty for plain notices


class InputError(DRLoRAError, ValueError):
    """Something the user gave (a flag, a file, a model, a folder) cannot be used;
    the message names it and says what to do instead."""

    exit_code = 2


class ConfigError(InputError):
    """A setting out of range or of the wrong type; the message names it."""


class RunStopped(DRLoRAError):
    """A run stopped before its end for a reason that is not bad input."""

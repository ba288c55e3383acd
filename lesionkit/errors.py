"""The one exception type a user sees: a message, shown as one line without a traceback, and an exit code.

`UsageError` (exit 2): the command was given something wrong: a flag, a config, a file, a checkpoint,
data of the wrong classes. Fix the command. `RunError` (exit 1): something failed while running (a
non-finite loss, a corrupt sample met while reading). The CLI catches `LesionkitError` once
(`lesionkit.cli.run_command`); library code raises the subclass naming the culprit.
"""

from __future__ import annotations


class LesionkitError(Exception):
    exit_code = 1


class UsageError(LesionkitError, ValueError):
    """Bad input; the message names the culprit and, where it can, the fix."""

    exit_code = 2


class RunError(LesionkitError, RuntimeError):
    """A failure while running; what was saved before it is intact."""

    exit_code = 1


class ConfigError(UsageError):
    """A bad recipe, flag or config value (before any process group starts)."""


class CorruptDataError(RunError):
    """A shard or sample that cannot be read; the message names the shard and the sample key."""


def message(exc: BaseException) -> str:
    """The one-line message of an error, also when a DataLoader worker re-raised it with the text of its
    traceback inside (`Caught CorruptDataError in DataLoader worker process 0. Original Traceback ...`)."""
    text, marker = str(exc), f"{type(exc).__module__}.{type(exc).__name__}: "
    return text.rsplit(marker, 1)[1].strip() if marker in text else text.strip()

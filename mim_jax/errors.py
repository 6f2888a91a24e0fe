"""Errors a user must act on. `python -m mim_jax.main` prints them as ONE line (no traceback)
and exits with `exit_code`; anything else that escapes is a bug and keeps its traceback."""
from __future__ import annotations


class RunError(Exception):
    """The run cannot go on and the message says why and what to do."""
    exit_code = 1


class ConfigError(RunError, ValueError):
    """A config field, command-line value or workdir that cannot work: found before any
    compute. A ValueError too, so callers that catch ValueError keep working."""
    exit_code = 2


class DataError(RunError):
    """The data cannot feed the run: no decodable images, fewer than one batch, missing
    labels. The message names the dataset (folder or split) and what was found."""


class CheckpointError(RunError):
    """No checkpoint can be restored, or one could not be saved."""


class Stopped(RunError):
    """The run was stopped by a signal (preemption, Ctrl-C) after saving the checkpoint the
    message names; exits like a signalled command: 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def one_line(message: str) -> str:
    """Messages may wrap for readability in code; the user sees them on one line."""
    return " ".join(str(message).split())

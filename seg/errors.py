"""The mistakes a user can make, and the runs that cannot go on: each is reported by the
experiment scripts as one line naming the field, file or step (seg/cli.py), never a traceback.

Library builders raise plain ValueError naming the config field; `config_errors()` turns those
into ConfigError at the boundary of a command, so that a genuine bug (any other exception)
still shows its traceback.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


class Error(Exception):
    """Reported as one line."""


class ConfigError(Error, ValueError):
    """A config value, flag or command-line argument that cannot work; the message names it."""


class DataError(Error, ValueError):
    """Data on disk that cannot be read as configured; the message names the file or field."""


class NonFiniteError(Error, RuntimeError):
    """The loss or the train state went NaN / infinite; the message names the step."""


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """ValueError (and a missing file) raised inside becomes ConfigError; Errors pass through."""
    try:
        yield
    except Error:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None

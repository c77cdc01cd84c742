"""What every experiment script shares: absl's app.run with each user mistake reported as one
line on stderr (exit status 1) instead of a traceback, wherever it surfaces: a misspelt
`--config.` override, a config file that does not load, a bad value met by a builder
(seg.errors.Error), bad data met in a DataLoader worker, a non-finite loss. Any other exception
is a bug and keeps its traceback. The library defines no flags; scripts do.
"""
from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Callable, Sequence

from absl import app, flags

from seg.errors import Error


def run(main: Callable[[list[str]], None]) -> None:
    """app.run(main) with one-line errors; warnings are one line each too."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"

    def guarded(argv):
        try:
            main(argv)
        except Error as e:
            # under torchrun every rank meets the same error: rank 0's line is the report
            sys.exit(f"error: {one_line(str(e))}" if os.environ.get("RANK", "0") == "0" else 1)

    app.run(guarded, flags_parser=parse_flags)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's parser, with a bad flag or config file reported as one line."""
    try:
        return flags.FLAGS(list(argv))
    except Exception as e:  # noqa: BLE001 - config files run arbitrary code while loading
        sys.exit(f"error: {flag_error(e, argv)}")


def flag_error(e: BaseException, argv: Sequence[str]) -> str:
    """The one line that says what is wrong with the command line."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}: {e.msg}: {(e.text or '').strip()}"
    message = one_line(str(e))
    if isinstance(e, (AttributeError, KeyError)):  # ml_collections on an unknown field
        key = re.search(r"'([^'\\]+)", str(e))
        path = _override_path(argv, key.group(1)) if key else None
        hint = re.search(r'Did you mean "([^"]+)"', str(e))
        if path:
            return (f"--{path}: no such field" +
                    (f" (did you mean {path.rsplit('.', 1)[0]}.{hint.group(1)}?)" if hint else ""))
    return message


def _override_path(argv: Sequence[str], key: str) -> str | None:
    """The dotted flag (config.optimizer.lrr) of argv whose last part is `key`."""
    for arg in argv:
        m = re.match(r"--?([\w.]+)=?", arg)
        if m and "." in m.group(1) and m.group(1).rsplit(".", 1)[1] == key:
            return m.group(1)
    return None


_HEADER = re.compile(r"(?:^|\s)[A-Za-z_][\w.]*(?:Error|Exception): ")


def one_line(message: str) -> str:
    """A message as one line. An exception re-raised from a DataLoader worker, or from a config
    file that failed to load, carries the original traceback in its text: its last part, the
    original error's message, is what the user needs."""
    if "Traceback (most recent call last)" not in message:
        return " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    last = lines[-1] if len(lines) > 1 else message   # absl joins lines with spaces
    headers = list(_HEADER.finditer(last))
    return last[headers[0 if len(lines) > 1 else -1].end():].strip() if headers else last

"""Errors, and the one way every entry point reports them.

The rule: a problem with the user's input (data, config values, paths, a launch) raises `SpkdistError`
with one line naming the file, key or option and the problem; it is reported as `spkdist: error: ...`
with exit code 2, never with a traceback. A caller passing impossible arguments to a library function is
a programming error: `ValueError` (or `TypeError`), which ends in a traceback because it is a bug.
Command-line flags are checked by the command line (argparse); library code names settings by their
field names, not by flags.

Unusable input items (a file, a JSON entry, a manifest line) are `BadItemError`s, and `BadInput` is the
policy for them: stop at the first one, or skip and record each (the skipped items end up in
index.json, so nothing is dropped silently).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field


class SpkdistError(Exception):
    """A problem with the user's input (data, config, paths), reported as one line without a traceback."""


class BadItemError(SpkdistError):
    """An unusable input item: `where` names it (a path, `file:line`, a JSON location), `reason` says why."""

    def __init__(self, where: str | os.PathLike, reason: str):
        reason = " ".join(reason.split())  # one line, even when it quotes a library's multi-line message
        super().__init__(f"{where}: {reason}")
        self.where = str(where)
        self.reason = reason

    def __reduce__(self):  # worker processes send these back to the main process
        return BadItemError, (self.where, self.reason)


@dataclass
class BadInput:
    """The policy for bad items of one run (`skip`: leave them out instead of stopping), and the items
    it skipped."""

    skip: bool
    skipped: list[dict[str, str]] = field(default_factory=list)

    def report(self, error: BadItemError) -> None:
        """Stop the run with `error`, or (skipping) record it and let the caller skip the item."""
        if not self.skip:
            raise error
        self.skipped.append({"path": error.where, "reason": error.reason})


def exit_code(command: Callable[[], int | None]) -> int:
    """Run an entry point's work and return its exit code: 0 (or what it returns); 2 with one
    `spkdist: error: ...` line for a SpkdistError; 130 with `spkdist: interrupted` for Ctrl-C.
    Every entry point (`spkdist ...`, `launch/train.py`) ends through here."""
    try:
        return command() or 0
    except SpkdistError as e:
        print(f"spkdist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spkdist: interrupted", file=sys.stderr)
        return 130


def child_error(stderr: str) -> str:
    """The one-line error of a failed child process (a spkdist command's, without its prefix)."""
    lines = stderr.strip().splitlines()
    return lines[-1].removeprefix("spkdist: error: ") if lines else "(no output)"

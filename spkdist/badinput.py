"""What happens to an unusable input item (a file, a JSON entry, a manifest line): stop, or skip and record.

Readers and feature extractors raise `BadItemError` naming the item and the problem. `BadInput` applies
the user's choice: by default the first bad item stops the run with that one-line message; with
`--skip-bad` it is left out, and the list of skipped items ends up in index.json, so nothing is ever
dropped silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import SpkdistError


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
    """The policy for bad items of one run, and the items it skipped."""

    skip: bool
    skipped: list[dict[str, str]] = field(default_factory=list)

    def report(self, error: BadItemError) -> None:
        """Stop the run with `error`, or (with --skip-bad) record it and let the caller skip the item."""
        if not self.skip:
            raise error
        self.skipped.append({"path": error.where, "reason": error.reason})

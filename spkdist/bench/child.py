"""A benchmark's training child, run with its output shown as it comes."""

from __future__ import annotations

import codecs
import subprocess
import sys

TAIL_BYTES = 65_536
"""How much of the child's output is kept for the error message of a failed run."""


def run_live(command: list[str]) -> tuple[int, str]:
    """Run `command`, passing its stdout and stderr (progress bar, evaluation lines) on to our stderr as
    they come, so an hour-long training is not silent and our stdout keeps only the benchmark's report
    and JSON line. Returns the exit code and the last TAIL_BYTES of the output."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a chunk may split a character
    tail = b""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as child:
        while chunk := child.stdout.read1(4096):
            sys.stderr.write(decoder.decode(chunk))
            sys.stderr.flush()
            tail = (tail + chunk)[-TAIL_BYTES:]
    sys.stderr.write(decoder.decode(b"", final=True))
    return child.returncode, tail.decode(errors="replace")

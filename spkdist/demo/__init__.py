"""The embedded demo corpus: FSDD recordings (CC BY-SA 4.0, see FSDD-NOTICE.md)."""

from pathlib import Path

FSDD_ARCHIVE = Path(__file__).with_name("fsdd-recordings.tar.gz")

"""What every sender does: send a delivery's files, and probe whether its destination answers."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from dicom_ai_node.values import DeliveryOutcome


class Sender(Protocol):
    def send(self, files: list[Path]) -> DeliveryOutcome:
        """Send all `files` (Part 10 SEG/SR) in ONE association / request / session."""
        ...

    def probe(self, timeout: float) -> bool | None:
        """Does the destination answer at all (C-ECHO, HTTP HEAD or GET), within `timeout` seconds?
        None when it cannot be probed (missing credentials or TLS files: the send says why)."""
        ...

"""What one delivery attempt tells the retry logic."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    # When not delivered: True if retrying cannot help (SOP class refused, HTTP 400/401/403/404 ...),
    # False for transient failures (connection refused, HTTP 5xx/408/429, Out of Resources ...).
    permanent: bool
    reason: str  # plain words for the admin, e.g. "association rejected (transient): ..."
    remote_status: str | None = None  # e.g. "0xA700", "HTTP 503", "A-ASSOCIATE-RJ 2/3/1"


class Sender(Protocol):
    def send(self, files: list[Path]) -> Outcome:
        """Send all `files` (Part 10 SEG/SR) in ONE association / request / session."""
        ...

    def probe(self, timeout: float) -> bool | None:
        """Does the destination answer at all (C-ECHO, HTTP HEAD or GET), within `timeout` seconds?
        None when it cannot be probed (missing credentials or TLS files: the send says why)."""
        ...

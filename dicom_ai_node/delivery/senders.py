"""What every sender does, and one factory, so the delivery runner never needs to know how a destination is reached."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..config import DestinationConfig, DicomwebDestination, DimseDestination, OrthancDestination
from ..values import DeliveryOutcome
from .dicomweb import StowRsSender
from .dimse import DimseSender
from .orthanc import OrthancRestSender


class Sender(Protocol):
    def send(self, files: list[Path]) -> DeliveryOutcome:
        """Send all `files` (Part 10 SEG/SR) in ONE association / request / session."""
        ...

    def probe(self, timeout: float) -> bool | None:
        """Does the destination answer at all (C-ECHO, HTTP HEAD or GET), within `timeout` seconds?
        None when it cannot be probed (missing credentials or TLS files: the send says why)."""
        ...


def make_sender(name: str, destination: DestinationConfig, our_ae_title: str) -> Sender:
    """The sender for the destination's kind; `name` tags its log lines, `our_ae_title` is the calling AE (DIMSE)."""
    match destination:
        case DimseDestination():
            return DimseSender(name, destination, our_ae_title)
        case DicomwebDestination():
            return StowRsSender(name, destination)
        case OrthancDestination():
            return OrthancRestSender(name, destination)
    raise TypeError(f"no sender for {type(destination).__name__}")

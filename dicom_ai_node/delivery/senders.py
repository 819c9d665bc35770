"""One factory, so the delivery runner never needs to know how a destination is reached."""

from __future__ import annotations

from ..config import DestinationConfig, DicomwebDestination, DimseDestination, OrthancDestination
from .dicomweb import StowRsSender
from .dimse import DimseSender
from .orthanc import OrthancRestSender
from .outcome import Sender


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

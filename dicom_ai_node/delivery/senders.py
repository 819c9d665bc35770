"""One factory, so the delivery runner never needs to know how a destination is reached."""

from __future__ import annotations

from ..config import DestinationConfig
from .dicomweb import StowRsSender
from .dimse import DimseSender
from .orthanc import OrthancRestSender
from .outcome import Sender


def make_sender(name: str, destination: DestinationConfig, our_ae_title: str) -> Sender:
    """The sender for `destination.kind`; `name` tags its debug log lines, `our_ae_title` is the calling AE (DIMSE)."""
    if destination.kind == "dimse":
        return DimseSender(name, destination, our_ae_title)
    if destination.kind == "dicomweb":
        return StowRsSender(name, destination)
    return OrthancRestSender(name, destination)

"""Who may open an association: the called AE title and an optional allow-list of senders."""

from __future__ import annotations

from dataclasses import dataclass

from dicom_ai_node.config import AllowedCaller

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 §9.3.4:
# rejected-permanent, DICOM UL service-user, calling / called AE title not recognized.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)


@dataclass(frozen=True)
class Rejection:
    reason: str
    result_source_diagnostic: tuple[int, int, int]


@dataclass(frozen=True)
class AssociationPolicy:
    our_ae_title: str
    require_called_ae_title: bool
    allowed_callers: tuple[AllowedCaller, ...]

    def check(self, called_ae: str, calling_ae: str, host: str) -> Rejection | None:
        """None to accept, else why the association is rejected."""
        called_ae, calling_ae = called_ae.strip(), calling_ae.strip()
        if self.require_called_ae_title and called_ae != self.our_ae_title:
            return Rejection(
                f"called AE title {called_ae!r} is not this node's {self.our_ae_title!r}", REJECT_CALLED_AE
            )
        if not self.allowed_callers:
            return None
        titles = [caller for caller in self.allowed_callers if caller.ae_title == calling_ae]
        if not titles:
            return Rejection(f"calling AE title {calling_ae!r} is not in dimse.allowed_callers", REJECT_CALLING_AE)
        if not any(caller.host in (None, host) for caller in titles):
            hosts = ", ".join(sorted(str(caller.host) for caller in titles))
            return Rejection(
                f"calling AE title {calling_ae!r} is allowed only from {hosts}, not from {host}", REJECT_CALLING_AE
            )
        return None

"""What the Storage SCP (and STOW-RS) accepts: every standard storage SOP class, in the
transfer syntaxes scanners and PACS actually send; by configuration also retired storage
classes and SOP classes nobody knows (private, or newer than this node), as a PACS does.

Instances are stored as received, so accepting a compressed syntax costs
nothing on the receive path; decoding happens when a series is processed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydicom import uid
from pydicom._uid_dict import UID_dictionary  # pydicom has no public way to list the UIDs it knows
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

ACCEPTED_TRANSFER_SYNTAXES: list[str] = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
]


def _dictionary_storage_classes(retired: bool) -> list[str]:
    """Storage SOP classes (PS3.4 Annex B, and the retired ones of earlier editions) in pydicom's UID dictionary.

    Storage Commitment is a service about storage, not a stored object; a DICOMDIR
    (Media Storage Directory) is never sent by C-STORE.
    """
    return sorted(
        key for key, (name, kind, _info, retirement, _keyword) in UID_dictionary.items()
        if kind == "SOP Class" and "Storage" in name and "Storage Commitment" not in name
        and key != uid.MediaStorageDirectoryStorage and (retirement == "Retired") == retired
    )


# pynetdicom's list, plus the current storage classes it lacks (Hanging Protocol, Color Palette, Inventory, ...).
STORAGE_SOP_CLASSES: list[str] = sorted(
    {context.abstract_syntax for context in AllStoragePresentationContexts}
    | set(_dictionary_storage_classes(retired=False))
)
RETIRED_STORAGE_SOP_CLASSES: list[str] = [
    sop_class for sop_class in _dictionary_storage_classes(retired=True) if sop_class not in STORAGE_SOP_CLASSES
]
VERIFICATION_SOP_CLASS: str = Verification

_STANDARD = frozenset(STORAGE_SOP_CLASSES)
_RETIRED = frozenset(RETIRED_STORAGE_SOP_CLASSES)


class SopClassKind(enum.StrEnum):
    STANDARD = "standard"  # a storage SOP class of the current standard
    RETIRED = "retired"  # a storage SOP class the standard has retired (old devices still send them)
    UNKNOWN = "unknown"  # in no dictionary: private, or newer than this node
    NOT_STORAGE = "not storage"  # a known class of another service (query/retrieve, worklist, print, ...)


def classify(sop_class_uid: str) -> SopClassKind:
    if sop_class_uid in _STANDARD:
        return SopClassKind.STANDARD
    if sop_class_uid in _RETIRED:
        return SopClassKind.RETIRED
    if sop_class_uid not in UID_dictionary:
        return SopClassKind.UNKNOWN
    return SopClassKind.NOT_STORAGE


def describe(sop_class_uid: str) -> str:
    """`1.2.3 (Name)` for a known class, `1.2.3 (private or unknown SOP class)` otherwise."""
    kind = classify(sop_class_uid)
    if kind is SopClassKind.UNKNOWN:
        return f"{sop_class_uid} (private or unknown SOP class)"
    name = uid.UID(sop_class_uid).name
    return f"{sop_class_uid} ({name}, retired)" if kind is SopClassKind.RETIRED else f"{sop_class_uid} ({name})"


@dataclass(frozen=True)
class StoragePolicy:
    """Which SOP classes are stored: the standard's always; retired and unknown ones as configured
    (storage.accept_retired_sop_classes, storage.accept_unknown_sop_classes; Orthanc's
    UnknownSopClassAccepted is the same idea)."""

    accept_retired: bool = True
    accept_unknown: bool = True

    def accepts(self, sop_class_uid: str) -> bool:
        kind = classify(sop_class_uid)
        return (
            kind is SopClassKind.STANDARD
            or (kind is SopClassKind.RETIRED and self.accept_retired)
            or (kind is SopClassKind.UNKNOWN and self.accept_unknown)
        )

    @property
    def negotiated_sop_classes(self) -> list[str]:
        """The storage classes offered at every association (unknown ones are added per request: see scp.py)."""
        return STORAGE_SOP_CLASSES + (RETIRED_STORAGE_SOP_CLASSES if self.accept_retired else [])

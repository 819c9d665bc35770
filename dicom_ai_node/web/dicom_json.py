"""The DICOM JSON model (PS3.18 F.2) of the attributes QIDO-RS and STOW-RS answer with."""

from __future__ import annotations

from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

DICOM_JSON = "application/dicom+json"


def tag(keyword: str) -> str:
    """The DICOM JSON key of `keyword`: its tag as eight upper-case hex digits."""
    return f"{tag_for_keyword(keyword):08X}"


_NAME_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def person_name(value: str) -> dict[str, str]:
    """A PN value in the JSON model (PS3.18 F.2.2): its `=`-separated component groups by name, empty ones left out."""
    return {group: text for group, text in zip(_NAME_GROUPS, value.split("=")) if text}


def dicom_json(values: dict[str, Any]) -> dict[str, Any]:
    """Keyword -> value(s) to the DICOM JSON model; None or empty gives the attribute without Value.

    A sequence's value is a list of keyword -> value dicts, one per item.
    """
    result: dict[str, Any] = {}
    for keyword, value in values.items():
        vr = "UR" if keyword == "RetrieveURL" else dictionary_VR(keyword)
        items = value if isinstance(value, list) else [] if value in (None, "") else [value]
        element: dict[str, Any] = {"vr": vr}
        if items:
            if vr == "PN":
                items = [person_name(str(item)) for item in items]
            elif vr == "SQ":
                items = [dicom_json(item) for item in items]
            elif vr in ("IS", "US", "UL", "SL", "SS"):
                items = [int(item) for item in items]
            element["Value"] = items
        result[tag(keyword)] = element
    return dict(sorted(result.items()))

"""Instance metadata with bulk data by reference (PS3.18 §8.6.2, F.2.6), and the bulk data those URIs name.

A binary value (VR OB, OD, OF, OL, OV, OW, UN) longer than BULK_DATA_THRESHOLD bytes, and the pixel data
whatever its size, appears in metadata as a BulkDataURI instead of an InlineBinary:

    {instance URL}/bulkdata/{tag}                      a top-level attribute, e.g. .../bulkdata/7FE00010
    {instance URL}/bulkdata/{tag}/{item}/{tag}...      inside sequences: the sequence's tag, the item's
                                                       index counted from 0, then the attribute's tag

Tags are eight hex digits (as DICOM JSON keys).  Pixel data is served with the same Accept negotiation
as frames (wado.py); any other value as its bytes (little endian), application/octet-stream.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRBigEndian

from dicom_ai_node.web.dicom_json import tag
from dicom_ai_node.web.problem import HTTPProblem
from dicom_ai_node.web.transcode import DEFERRED_VALUE_BYTES, PIXEL_DATA_KEYWORDS

BULK_DATA_THRESHOLD = 1024  # bytes; longer binary values go by reference
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW", "OB/OW", "US/OW"})
_PIXEL_TAGS = frozenset(Tag(keyword) for keyword in PIXEL_DATA_KEYWORDS)


def instance_metadata(path: Path, instance_url: str) -> dict[str, Any]:
    """Every attribute of one stored instance as DICOM JSON, bulk data as BulkDataURIs under `instance_url`,
    and the File Meta Information's TransferSyntaxUID (viewers read it to decode frames)."""
    ds = pydicom.dcmread(path, defer_size=DEFERRED_VALUE_BYTES)
    metadata = _dataset_json(ds, f"{instance_url}/bulkdata", top_level=True)
    metadata[tag("TransferSyntaxUID")] = {"vr": "UI", "Value": [str(ds.file_meta.TransferSyntaxUID)]}
    return dict(sorted(metadata.items()))


def _dataset_json(ds: Dataset, uri: str, top_level: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for element_tag in ds.keys():
        raw = ds.get_item(element_tag, keep_deferred=True)
        key = f"{int(element_tag):08X}"
        vr, length = _vr_and_length(raw, element_tag, ds)
        if vr in _BINARY_VRS and (length > BULK_DATA_THRESHOLD or (top_level and element_tag in _PIXEL_TAGS)):
            result[key] = {"vr": _json_vr(vr, ds), "BulkDataURI": f"{uri}/{key}"}
            continue
        element = ds[element_tag]
        if element.VR == "SQ":
            result[key] = {"vr": "SQ", "Value": [_dataset_json(item, f"{uri}/{key}/{index}")
                                                 for index, item in enumerate(element.value)]}
        else:
            result[key] = element.to_json_dict(None, 1 << 62)
    return result


def _vr_and_length(raw: Any, element_tag: BaseTag, ds: Dataset) -> tuple[str, int]:
    """The VR and value length of an element without reading a deferred value."""
    if isinstance(raw, RawDataElement):
        vr = raw.VR or (dictionary_VR(element_tag) if _known(element_tag) else "UN")
        return vr, raw.length
    value = raw.value
    return raw.VR, len(value) if isinstance(value, bytes | bytearray) else 0


def _known(element_tag: BaseTag) -> bool:
    try:
        dictionary_VR(element_tag)
        return True
    except KeyError:
        return False


def _json_vr(vr: str, ds: Dataset) -> str:
    """An ambiguous VR (Pixel Data's "OB or OW") resolved as PS3.5 Annex A does."""
    if " or " not in vr and "/" not in vr:
        return vr
    encapsulated = ds.file_meta.TransferSyntaxUID.is_encapsulated if hasattr(ds, "file_meta") else False
    return "OB" if encapsulated or int(ds.get("BitsAllocated", 16)) <= 8 else "OW"


def parse_bulk_path(path: str) -> list[int]:
    """`7FE00010` or `00540016/0/00181078` -> tags and item indexes alternating; 400 if malformed."""
    steps = path.strip("/").split("/")
    if len(steps) % 2 == 0 or not all(
        re.fullmatch(r"[0-9A-Fa-f]{8}", step) if number % 2 == 0 else re.fullmatch(r"[0-9]{1,9}", step)
        for number, step in enumerate(steps)
    ):
        raise HTTPProblem(400, f"bulk data path {path[:80]!r}: expected TAG or TAG/ITEM/TAG... "
                          "(tags as eight hex digits, items counted from 0)")
    return [int(step, 16) if number % 2 == 0 else int(step) for number, step in enumerate(steps)]


def is_pixel_data(steps: list[int]) -> bool:
    return len(steps) == 1 and steps[0] in _PIXEL_TAGS


def bulk_value(path: Path, steps: list[int]) -> bytes:
    """A binary value (not top-level pixel data) named by a bulk data path, little endian; 404 if absent."""
    ds = pydicom.dcmread(path, defer_size=DEFERRED_VALUE_BYTES)
    big_endian = ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    current: Dataset = ds
    for depth in range(0, len(steps) - 1, 2):
        sequence = current.get(steps[depth])
        if sequence is None or sequence.VR != "SQ" or steps[depth + 1] >= len(sequence.value):
            raise HTTPProblem(404, f"no item {steps[depth + 1]} of ({steps[depth]:08X}) in this instance")
        current = sequence.value[steps[depth + 1]]
    element = current.get(steps[-1])
    if element is None or element.VR not in _BINARY_VRS or not isinstance(element.value, bytes | bytearray):
        raise HTTPProblem(404, f"({steps[-1]:08X}) is not a bulk data attribute of this instance")
    value = bytes(element.value)
    width = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}.get(element.VR, 1)
    if big_endian and width > 1:  # bulk data is little endian (PS3.18 §8.7.3.3.1)
        value = np.frombuffer(value, dtype=f">u{width}").astype(f"<u{width}").tobytes()
    return value

"""Read and check the header of a received dataset without decoding pixels.

pydicom parses leniently: a dataset cut off in the middle of its pixel data
still "reads".  A node that must never lose a study cannot answer Success to
half an image, so truncation is checked explicitly: every element with a
defined length must have all its bytes, encapsulated pixel data must end with
its sequence delimiter, and native pixel data must be as long as
Rows x Columns x Samples x Bits Allocated x Frames says.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from functools import cache
from io import BytesIO
from typing import BinaryIO

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_dataset  # the public meta reader takes only paths
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicom_ai_node.store.files import FileRange
from dicom_ai_node.values import InstanceHeader

UNDEFINED_LENGTH = 0xFFFFFFFF
MAX_UID_LENGTH = 64  # PS3.5 §6.2, VR UI; also the index's UID columns
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
PIXEL_DATA = Tag(0x7FE0, 0x0010)
_OTHER_PIXEL_DATA = (Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009))  # Float / Double Float Pixel Data
_ITEM = (0xFFFE, 0xE000)
# Values longer than this (pixel data, waveforms, documents) are skipped, not read: only their extent is
# checked.  A 512x512 CT slice then costs no copy of its pixels, in memory or out of a STOW-RS part's file.
_DEFERRED_BYTES = 1 << 16
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)


class RejectedDataset(ValueError):
    """A dataset the node will not store; `status` is the C-STORE failure status to answer."""

    # PS3.4 Annex B.2.3 / pynetdicom: 0xA900 "Data Set does not match SOP Class",
    # 0xC210 "Cannot understand: failed to decode the dataset".
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


CANNOT_UNDERSTAND = 0xC210
DOES_NOT_MATCH_SOP_CLASS = 0xA900
OUT_OF_RESOURCES = 0xA700

DEFAULT_MAX_INFLATED_BYTES = 256 << 20  # storage.max_inflated_mb
# A deflated dataset inflates at most to its pixel data (as its own header describes it) plus this much:
# room for the other elements, however large an SR or an icon sequence gets.
_INFLATED_BEYOND_PIXELS = 64 << 20
_INFLATE_STEP = 1 << 20


def inflate(raw: bytes, max_bytes: int) -> bytearray:
    """Inflate a Deflated Explicit VR Little Endian dataset step by step, refusing a compression bomb.

    A few kilobytes can inflate to gigabytes, so output is produced one MiB at
    a time and stops at a cap: `max_bytes` (storage.max_inflated_mb), or less
    when the first MiB describes the image (Rows x Columns x Samples x Bits
    Allocated x Frames), since a dataset is hardly bigger than its pixel data.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = bytearray(inflater.decompress(raw, _INFLATE_STEP))
        described = _described_size(bytes(data)) if inflater.unconsumed_tail else 0
        # Only an image description lowers the cap: objects without pixels (a PDF, an SR, a mesh) may be large.
        capped_by_description = bool(described) and described + _INFLATED_BEYOND_PIXELS < max_bytes
        cap = described + _INFLATED_BEYOND_PIXELS if capped_by_description else max_bytes
        while inflater.unconsumed_tail and len(data) <= cap:
            data += inflater.decompress(inflater.unconsumed_tail, _INFLATE_STEP)
        if len(data) <= cap:
            data += inflater.flush()
    except zlib.error as exc:
        raise RejectedDataset(CANNOT_UNDERSTAND, f"deflated dataset cannot be inflated: {exc}") from None
    if len(data) > cap and capped_by_description:
        raise RejectedDataset(
            CANNOT_UNDERSTAND,
            f"deflated dataset inflates past {cap >> 20} MiB, far more than the image it describes: refused "
            "(a compression bomb?)",
        )
    if len(data) > cap:
        raise RejectedDataset(
            OUT_OF_RESOURCES, f"deflated dataset inflates past {cap >> 20} MiB (storage.max_inflated_mb): refused"
        )
    if not inflater.eof:
        raise RejectedDataset(CANNOT_UNDERSTAND, "dataset truncated: the deflated stream ends before its end marker")
    return data


def _described_size(head: bytes) -> int:
    """Pixel data size the image description in `head` (the start of a dataset) implies.

    0 when there is none, or when `head` (one step of output) ends before it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = read_dataset(BytesIO(head), False, True, stop_when=lambda tag, vr, length: tag >= PIXEL_DATA)
            if "Rows" not in ds:
                return 0
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
            bits = int(ds.BitsAllocated)
            return int(ds.Rows) * int(ds.Columns) * samples * frames * bits // 8
        except Exception:  # pydicom raises many types for a cut-off or malformed header
            return 0


def parse_header(
    dataset: bytes | FileRange,
    transfer_syntax: str,
    affected_sop_instance_uid: str | None = None,
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
) -> InstanceHeader:
    """Check `dataset` (as sent, without file meta; in memory or in a file) and extract the index fields.

    Long values are not read (`_DEFERRED_BYTES`), but every element must lie whole within the dataset.
    """
    if isinstance(dataset, FileRange):
        with open(dataset.path, "rb", buffering=0) as file:
            if transfer_syntax == DeflatedExplicitVRLittleEndian:  # inflated in memory, step by step
                file.seek(dataset.offset)
                return _parse(file.read(dataset.size), transfer_syntax, affected_sop_instance_uid,
                              max_inflated_bytes)
            window = io.BufferedReader(_Window(file, dataset.offset, dataset.size), _DEFERRED_BYTES)
            return _parse(window, transfer_syntax, affected_sop_instance_uid, max_inflated_bytes)
    return _parse(dataset, transfer_syntax, affected_sop_instance_uid, max_inflated_bytes)


def _parse(
    dataset: bytes | BinaryIO, transfer_syntax: str, affected_sop_instance_uid: str | None, max_inflated_bytes: int
) -> InstanceHeader:
    ts = UID(transfer_syntax)
    if isinstance(dataset, bytes):
        dataset = BytesIO(inflate(dataset, max_inflated_bytes) if ts == DeflatedExplicitVRLittleEndian else dataset)
    total = dataset.seek(0, os.SEEK_END)
    dataset.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(dataset, ts.is_implicit_VR, ts.is_little_endian, defer_size=_DEFERRED_BYTES)
            _check_complete(ds, dataset, ts.is_little_endian, total)
            _read_deferred_text(ds, dataset)
            return _header(ds, ts, affected_sop_instance_uid)
    except RejectedDataset:
        raise
    except Exception as exc:  # pydicom raises many types for malformed input
        raise RejectedDataset(CANNOT_UNDERSTAND, f"dataset cannot be parsed: {type(exc).__name__}: {exc}") from None


class _Window(io.RawIOBase):
    """`size` bytes from `offset` of an open file, as a file of their own (the dataset after a file's meta)."""

    def __init__(self, file: io.FileIO, offset: int, size: int) -> None:
        super().__init__()
        self._file = file
        self._offset = offset
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = max(0, min(len(buffer), self._size - self._position))
        if not count:
            return 0
        read = os.preadv(self._file.fileno(), [memoryview(buffer)[:count]], self._offset + self._position)
        self._position += read
        return read


def _check_complete(ds: Dataset, stream: BinaryIO, little_endian: bool, total: int) -> None:
    """Every element read or skipped must lie whole within the `total` bytes of the dataset."""
    if len(ds) == 0:
        raise RejectedDataset(CANNOT_UNDERSTAND, "dataset cannot be parsed: no data elements found")
    for raw in ds.values():  # as read: a deferred value stays unread
        if not isinstance(raw, RawDataElement):  # a sequence, which pydicom read whole
            continue
        tag = raw.tag
        if raw.length == UNDEFINED_LENGTH:
            if tag == PIXEL_DATA:
                _check_fragments(stream, raw.value_tell, total, little_endian)
            continue
        if raw.length > total:
            raise RejectedDataset(
                CANNOT_UNDERSTAND,
                f"not a valid DICOM dataset: element {tag} claims {raw.length} bytes, the whole dataset has {total}",
            )
        if raw.value_tell + raw.length > total:
            raise RejectedDataset(
                CANNOT_UNDERSTAND,
                f"dataset truncated: element {tag} has {max(0, total - raw.value_tell)} of its {raw.length} bytes",
            )
    if PIXEL_DATA in ds:
        _check_native_pixel_length(ds)
    elif "Rows" in ds and not any(tag in ds for tag in _OTHER_PIXEL_DATA):
        raise RejectedDataset(
            DOES_NOT_MATCH_SOP_CLASS, "image attributes (Rows, Columns) but no Pixel Data: dataset truncated?"
        )


def _check_fragments(stream: BinaryIO, start: int, total: int, little_endian: bool) -> None:
    """Walk the items of encapsulated pixel data from `start`; they must chain to its sequence delimiter
    (whose length, always zero, may be missing at the very end, as pydicom allows)."""
    tag_format, length_format = ("<HH", "<L") if little_endian else (">HH", ">L")
    offset = start
    while offset + 4 <= total:
        stream.seek(offset)
        group, element = struct.unpack(tag_format, stream.read(4))
        if (group, element) == _SEQUENCE_DELIMITER:
            return
        if (group, element) != _ITEM or offset + 8 > total:
            break
        (length,) = struct.unpack(length_format, stream.read(4))
        if offset + 8 + length > total:
            break
        offset += 8 + length
    raise RejectedDataset(CANNOT_UNDERSTAND, "dataset truncated: encapsulated pixel data ends mid-fragment")


def _read_deferred_text(ds: Dataset, stream: BinaryIO) -> None:
    """Read the long values that are not bulk data (a text may be indexed, however odd its length)."""
    for raw in list(ds.values()):  # as read: a deferred value stays unread
        if not isinstance(raw, RawDataElement) or raw.value is not None or raw.length in (0, UNDEFINED_LENGTH):
            continue
        if (_dictionary_vr(raw.tag) if raw.VR in (None, "UN") else raw.VR) not in _BULK_VRS:
            stream.seek(raw.value_tell)
            ds[raw.tag] = raw._replace(value=stream.read(raw.length))


def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:  # a private or unknown element: bytes as far as the node knows
        return "UN"


_BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW", "US or SS or OW"})


def _check_native_pixel_length(ds: Dataset) -> None:
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if getattr(raw, "length", UNDEFINED_LENGTH) == UNDEFINED_LENGTH:
        return
    rows, columns, bits = _integer(ds, "Rows"), _integer(ds, "Columns"), _integer(ds, "BitsAllocated")
    samples, frames = _integer(ds, "SamplesPerPixel") or 1, _integer(ds, "NumberOfFrames") or 1
    if rows is None or columns is None or bits is None:
        missing = [keyword for keyword, value in zip(("Rows", "Columns", "BitsAllocated"), (rows, columns, bits))
                   if value is None]
        raise RejectedDataset(DOES_NOT_MATCH_SOP_CLASS,
                              f"pixel data without a valid image description: no valid {', '.join(missing)}")
    expected = (rows * columns * samples * bits * frames + 7) // 8
    actual = raw.length  # all there: _check_complete
    if actual < expected:
        raise RejectedDataset(
            CANNOT_UNDERSTAND,
            f"dataset truncated: pixel data has {actual} bytes, {rows}x{columns}x{frames} frames need {expected}",
        )


@cache
def _tag(keyword: str) -> int:
    """The tag of a keyword: looking elements up by tag is several times faster than by keyword."""
    return tag_for_keyword(keyword)


def _text(ds: Dataset, keyword: str) -> str | None:
    """The element's text, stripped; None when absent or empty.

    Runs ~20 times per received instance, so plain-ASCII values (the common case)
    are decoded from the raw bytes directly; anything else goes through pydicom,
    which applies the Specific Character Set.
    """
    tag = _tag(keyword)
    raw = ds.get_item(tag)
    if raw is None:
        return None
    value = raw.value
    if isinstance(value, bytes) and value.isascii():
        text = value.decode("ascii").strip(" \x00")
    else:
        converted = ds[tag].value
        if converted is None:
            return None
        values = converted if isinstance(converted, MultiValue) else [converted]
        text = "\\".join(str(v).strip() for v in values)
    return text or None


def _integer(ds: Dataset, keyword: str) -> int | None:
    """An IS value parsed from its text; a US value (Rows, Columns) from its two bytes in the dataset's byte
    order, else through pydicom.  Runs for every received instance: ingest speed is benchmarked."""
    raw = ds.get_item(_tag(keyword))
    if raw is None:
        return None
    try:
        if keyword not in _BINARY_INTEGERS:
            value = _text(ds, keyword)
        elif isinstance(raw, RawDataElement) and isinstance(raw.value, bytes) and len(raw.value) == 2:
            value = int.from_bytes(raw.value, "little" if raw.is_little_endian else "big")
        else:
            value = ds[_tag(keyword)].value
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


_BINARY_INTEGERS = {"Rows", "Columns", "BitsAllocated", "SamplesPerPixel"}


def _request_attributes(ds: Dataset) -> tuple[tuple[str | None, str | None], ...]:
    """(Scheduled Procedure Step ID, Requested Procedure ID) of each Request Attributes Sequence item.

    The sequence is parsed only when present (most instances have none): ingest speed is benchmarked.
    """
    if ds.get_item(_tag("RequestAttributesSequence")) is None:
        return ()
    return tuple(
        (_text(item, "ScheduledProcedureStepID"), _text(item, "RequestedProcedureID"))
        for item in ds[_tag("RequestAttributesSequence")].value or ()
    )


# ACR-NEMA 2.0 forms old devices still send (PS3.5 §6.2, DA and TM notes): "1994.11.05", "11:20:00".
_LEGACY_DATE = re.compile(r"([0-9]{4})\.([0-9]{2})\.([0-9]{2})")
_LEGACY_TIME = re.compile(r"([0-9]{2}):([0-9]{2})(?::([0-9]{2}(?:\.[0-9]{1,6})?))?")


def _date(ds: Dataset, keyword: str) -> str | None:
    """A DA as YYYYMMDD: the ACR-NEMA form is rewritten, so it is indexed and matched like any other."""
    text = _text(ds, keyword)
    legacy = _LEGACY_DATE.fullmatch(text or "")
    return "".join(legacy.groups()) if legacy else text


def _time(ds: Dataset, keyword: str) -> str | None:
    """A TM as HHMMSS.FFFFFF: the ACR-NEMA form (with colons) is rewritten likewise."""
    text = _text(ds, keyword)
    legacy = _LEGACY_TIME.fullmatch(text or "")
    return "".join(part for part in legacy.groups() if part) if legacy else text


def _header(ds: Dataset, ts: UID, affected_sop_instance_uid: str | None) -> InstanceHeader:
    uids = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = _text(ds, keyword)
        if value is None:
            raise RejectedDataset(DOES_NOT_MATCH_SOP_CLASS, f"dataset lacks {keyword} (0020/0008 Type 1 attribute)")
        # Kept exactly as sent even when it is not a valid UID (real anonymised data has 64 hex characters):
        # it never names a file (store/files.py path_component).  Longer than the UI maximum it fits no index;
        # a control character (a line feed) is a corrupt value that would forge log lines.
        if len(value) > MAX_UID_LENGTH or _CONTROL.search(value):
            raise RejectedDataset(
                DOES_NOT_MATCH_SOP_CLASS,
                f"{keyword} is not a valid UID, nor one the node can keep (at most {MAX_UID_LENGTH} characters, "
                f"none a control character; PS3.5 §6.2, VR UI): {value[:80]!r}",
            )
        uids[keyword] = value
    if affected_sop_instance_uid and affected_sop_instance_uid.strip() != uids["SOPInstanceUID"]:
        raise RejectedDataset(
            DOES_NOT_MATCH_SOP_CLASS,
            f"SOPInstanceUID {uids['SOPInstanceUID']} in the dataset differs from the C-STORE request's "
            f"Affected SOP Instance UID {affected_sop_instance_uid}",
        )
    return InstanceHeader(
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax_uid=str(ts),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_date(ds, "StudyDate"),
        study_time=_time(ds, "StudyTime"),
        study_description=_text(ds, "StudyDescription"),
        modality=_text(ds, "Modality"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        series_description=_text(ds, "SeriesDescription"),
        series_number=_integer(ds, "SeriesNumber"),
        instance_number=_integer(ds, "InstanceNumber"),
        image_type=_text(ds, "ImageType"),
        rows=_integer(ds, "Rows"),
        columns=_integer(ds, "Columns"),
        number_of_frames=_integer(ds, "NumberOfFrames"),
        study_id=_text(ds, "StudyID"),
        referring_physician_name=_text(ds, "ReferringPhysicianName"),
        patient_birth_date=_date(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"),
        timezone_offset_from_utc=_text(ds, "TimezoneOffsetFromUTC"),
        specific_character_set=_text(ds, "SpecificCharacterSet"),
        performed_procedure_step_start_date=_date(ds, "PerformedProcedureStepStartDate"),
        performed_procedure_step_start_time=_time(ds, "PerformedProcedureStepStartTime"),
        request_attributes=_request_attributes(ds),
        bits_allocated=_integer(ds, "BitsAllocated"),
    )


@dataclass(frozen=True)
class FileMeta:
    """What the node needs of a Part-10 file's File Meta Information (PS3.10 §7.1)."""

    transfer_syntax_uid: str
    sop_class_uid: str | None  # Media Storage SOP Class UID
    sop_instance_uid: str | None  # Media Storage SOP Instance UID
    dataset_offset: int  # where the dataset starts; the bytes after it go on untouched


_FILE_META_UIDS = {0x0002: "sop_class_uid", 0x0003: "sop_instance_uid", 0x0010: "transfer_syntax_uid"}
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


def split_part10(data: bytes | memoryview) -> FileMeta:
    """The File Meta of a Part-10 file, read as PS3.10 encodes it (explicit VR little endian) element by element;
    as leniently as pydicom reads it only when that fails (some writers encode it implicitly).  ValueError if
    the file is not Part-10 or has no Transfer Syntax UID."""
    if len(data) < 132 or bytes(data[128:132]) != b"DICM":
        raise ValueError("not a DICOM Part-10 file (no 128-byte preamble followed by DICM)")
    head = bytes(data[: min(len(data), 1 << 16)])
    values: dict[str, str | None] = {"sop_class_uid": None, "sop_instance_uid": None, "transfer_syntax_uid": None}
    position = 132
    while position + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, position)
        if group != 2:
            break
        vr = head[position + 4 : position + 6]
        if not vr.isalpha() or not vr.isupper():
            return _lenient_file_meta(head)
        if vr in _LONG_VRS:
            if position + 12 > len(head):
                return _lenient_file_meta(head)
            (length,) = struct.unpack_from("<L", head, position + 8)
            start = position + 12
        else:
            (length,) = struct.unpack_from("<H", head, position + 6)
            start = position + 8
        if length == UNDEFINED_LENGTH or start + length > len(head):
            return _lenient_file_meta(head)
        if element in _FILE_META_UIDS:
            text = head[start : start + length].decode("ascii", "replace").strip(" \x00")
            values[_FILE_META_UIDS[element]] = text or None
        position = start + length
    if not values["transfer_syntax_uid"]:
        raise ValueError("the File Meta Information has no TransferSyntaxUID (0002,0010)")
    return FileMeta(dataset_offset=position, **values)  # type: ignore[arg-type]


def _lenient_file_meta(head: bytes) -> FileMeta:
    stream = BytesIO(head)
    stream.seek(132)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = _read_file_meta_info(stream)
    if "TransferSyntaxUID" not in meta:
        raise ValueError("the File Meta Information has no TransferSyntaxUID (0002,0010)")
    return FileMeta(
        transfer_syntax_uid=str(meta.TransferSyntaxUID),
        sop_class_uid=str(meta.get("MediaStorageSOPClassUID", "")) or None,
        sop_instance_uid=str(meta.get("MediaStorageSOPInstanceUID", "")) or None,
        dataset_offset=stream.tell(),
    )

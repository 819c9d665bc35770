"""Pixel data out of stored files: frames as stored bitstreams or decoded, and instances transcoded.

Everything here reads one stored file and returns bytes for one part; the callers stream parts one at a
time, so memory holds one frame (frames, bulk data) or one instance (transcoding), never a study.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom import encaps
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import get_decoder, get_encoder, pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_ai_node.web.multipart import read_range
from dicom_ai_node.web.problem import HTTPProblem
from dicom_ai_node.web.transfer_syntax import AS_STORED, NOT_FOR_THE_WEB

DEFERRED_VALUE_BYTES = 1 << 16  # values longer than this (the pixel data) stay in the file while a header is read
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_NATIVE_LITTLE_ENDIAN = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})


def stored_syntax(path: Path) -> UID:
    """The transfer syntax a stored file is encoded in, from its File Meta Information alone."""
    return UID(read_file_meta_info(path).TransferSyntaxUID)


def can_decode(syntax: UID) -> bool:
    """Whether pixel data in `syntax` can be decoded here (native syntaxes always)."""
    if not syntax.is_encapsulated:
        return True
    try:
        return get_decoder(syntax).is_available
    except NotImplementedError:
        return False


def can_encode(syntax: UID) -> bool:
    """Whether the node can write instances in `syntax`: native little endian, deflate, or an available encoder."""
    if syntax in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        return True
    if not syntax.is_encapsulated or syntax in NOT_FOR_THE_WEB:
        return False
    try:
        return get_encoder(syntax).is_available
    except NotImplementedError:
        return False


@dataclass(frozen=True)
class StoredPixels:
    """Where a stored instance's top-level pixel data lies, found from its header (the value is not read)."""

    path: Path
    syntax: UID
    keyword: str
    offset: int  # of the value in the file
    length: int  # 0xFFFFFFFF when encapsulated
    frames: int
    frame_bits: int  # of a decoded frame
    extended_offsets: tuple[bytes, bytes] | None

    @property
    def decodable(self) -> bool:
        return can_decode(self.syntax)

    @property
    def frame_bytes(self) -> int:
        return (self.frame_bits + 7) // 8


def stored_pixels(path: Path) -> StoredPixels:
    """The pixel data of a stored instance; 404 when it has none."""
    ds = pydicom.dcmread(path, defer_size=DEFERRED_VALUE_BYTES)
    keyword = next((name for name in PIXEL_DATA_KEYWORDS if name in ds), None)
    if keyword is None:
        raise HTTPProblem(404, "this instance has no pixel data (Pixel Data, Float Pixel Data or Double Float Pixel Data)")
    raw = ds.get_item(keyword, keep_deferred=True)
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated)
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    return StoredPixels(path, syntax, keyword, raw.value_tell, raw.length, int(ds.get("NumberOfFrames") or 1),
                        bits, extended)


def check_frames(pixels: StoredPixels, numbers: list[int], native: bool) -> None:
    """Before a response starts: 404 for a frame number past the instance's frames, 406 for single frames
    of bit-packed native pixel data (they do not start on byte boundaries)."""
    for number in numbers:
        if number > pixels.frames:
            raise HTTPProblem(404, f"frame {number} does not exist: the instance has {pixels.frames} frame(s)")
    if not native and not pixels.syntax.is_encapsulated and pixels.frame_bits % 8 and pixels.frames > 1:
        raise HTTPProblem(406, "frames of this bit-packed pixel data do not start on byte boundaries: "
                          "retrieve the whole instance or its pixel data instead")


def native_frames(pixels: StoredPixels, numbers: list[int]) -> Iterator[bytes]:
    """The stored bitstream of each encapsulated frame asked for, in the order asked (PS3.5 A.4).

    The Basic or Extended Offset Table finds a frame directly; without one, one fragment per frame (the
    usual case) is located from the item headers alone, and fragments spanning frames are left to pydicom
    (it finds frame boundaries from the codestreams' markers)."""
    with pixels.path.open("rb") as file:
        file.seek(pixels.offset)
        basic = encaps.parse_basic_offsets(file)
        fragments = None
        if not basic and pixels.extended_offsets is None and pixels.frames > 1:
            count, offsets = encaps.parse_fragments(file)  # file positions of each fragment's item tag
            if count == pixels.frames:
                fragments = offsets
        for number in numbers:
            if fragments is not None:
                length = int.from_bytes(read_range(file, fragments[number - 1] + 4, 4), "little")
                yield read_range(file, fragments[number - 1] + 8, length)
                continue
            file.seek(pixels.offset)
            yield encaps.get_frame(file, number - 1, number_of_frames=pixels.frames,
                                   extended_offsets=pixels.extended_offsets)


def decoded_frames(pixels: StoredPixels, numbers: list[int]) -> Iterator[bytes]:
    """Each frame asked for as uncompressed little-endian bytes (Explicit VR Little Endian pixel data).

    Native little endian frames are cut from the file; encapsulated ones are decoded one frame at a time
    (pydicom reads only that frame); big endian and deflated files are decoded as a whole."""
    if pixels.syntax in _NATIVE_LITTLE_ENDIAN:
        with pixels.path.open("rb") as file:
            for number in numbers:
                yield read_range(file, pixels.offset + (number - 1) * pixels.frame_bytes, pixels.frame_bytes)
        return
    if pixels.syntax.is_encapsulated:
        for number in numbers:
            yield _little_endian(pixel_array(pixels.path, index=number - 1))
        return
    every = pydicom.dcmread(pixels.path).pixel_array  # big endian or deflated: no frame can be read alone
    if pixels.frames == 1:
        every = every[np.newaxis]
    for number in numbers:
        yield _little_endian(every[number - 1])


def _little_endian(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def instance_in(path: Path, acceptable: list[str]) -> tuple[UID, BinaryIO | None]:
    """The first acceptable transfer syntax this stored instance can be sent in, and its bytes.

    None for the bytes means: send the file unchanged (it is already in that syntax).  A lossy original is
    sent as stored when "*" is acceptable; otherwise it is decoded, which loses nothing more.  406 when none
    of `acceptable` can be produced."""
    stored = stored_syntax(path)
    refused = ""
    for wanted in acceptable:
        if (wanted == AS_STORED or wanted == stored) and stored not in NOT_FOR_THE_WEB:
            return stored, None
        # PS3.18 §8.7.3: never implicit VR or big endian on the web; "*" then means Explicit VR Little Endian.
        target = ExplicitVRLittleEndian if wanted == AS_STORED else UID(wanted)
        if can_encode(target) and (not stored.is_encapsulated or can_decode(stored)):
            try:
                return target, transcode(path, target)
            except (NotImplementedError, ValueError, RuntimeError) as exc:  # an encoder refusing this image
                refused = f" ({target.name}: {exc})"
                continue
    names = ", ".join(acceptable)
    raise HTTPProblem(406, f"this instance is stored as {stored.name} ({stored}); the node cannot send it in any of "
                      f"the transfer syntaxes asked ({names}): ask for * (as stored) or {ExplicitVRLittleEndian}"
                      + refused)


def transcode(path: Path, target: UID) -> BytesIO:
    """The stored instance re-encoded in `target` (a syntax for which `can_encode` holds), as a Part 10 file."""
    ds = pydicom.dcmread(path)
    to_explicit_little_endian(ds)
    if target.is_encapsulated and any(keyword in ds for keyword in PIXEL_DATA_KEYWORDS):
        ds.compress(target, generate_instance_uid=False)  # lossless: the same instance (PS3.5 8.2)
    elif target.is_encapsulated:
        target = ExplicitVRLittleEndian  # no pixel data: nothing to compress
    ds.file_meta.TransferSyntaxUID = target
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    out.seek(0)
    return out


def to_explicit_little_endian(ds: Dataset) -> None:
    """Decode or re-order the pixel data so `ds` can be written in Explicit VR Little Endian."""
    stored = UID(ds.file_meta.TransferSyntaxUID)
    if "PixelData" in ds and stored.is_encapsulated:
        ds.decompress(generate_instance_uid=False)
    elif "PixelData" in ds and stored == ExplicitVRBigEndian:
        ds.PixelData = _little_endian(ds.pixel_array)
        ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_original_encoding(False, True)

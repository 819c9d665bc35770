"""WADO-RS: stored instances, their metadata and their native frames, streamed from the files.

Received instances and the node's own results (SEG, SR in `result_objects`) are
served as one archive, so a viewer finds the SEG next to the CT it was computed from.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian
from sqlalchemy import Engine, select
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from dicom_ai_node.store.queries import all_instances
from dicom_ai_node.web.dicom_json import DICOM_JSON, tag
from dicom_ai_node.web.multipart import multipart_files, parse_media_type, read_chunks
from dicom_ai_node.web.problem import HTTPProblem

_NATIVE_LITTLE_ENDIAN = frozenset({ExplicitVRLittleEndian, "1.2.840.10008.1.2"})
_DEFERRED_VALUE_BYTES = 1 << 16  # values longer than this (the pixel data) stay in the file while a header is read


class Archive:
    """The stored files WADO-RS streams, found in the index."""

    def __init__(self, engine: Engine, storage_root: Path) -> None:
        self.engine = engine
        self.root = storage_root

    def files(self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None) -> list[Path]:
        """The stored files of a study, series or instance, in series and instance order; [] if unknown."""
        every_instance = all_instances()
        conditions = [every_instance.c.study_uid == study_uid]
        if series_uid:
            conditions.append(every_instance.c.series_uid == series_uid)
        if sop_uid:
            conditions.append(every_instance.c.sop_uid == sop_uid)
        statement = (
            select(every_instance.c.file_path)
            .where(*conditions)
            .order_by(every_instance.c.produced, every_instance.c.series_uid, every_instance.c.instance_number,
                      every_instance.c.sop_uid)
        )
        with self.engine.connect() as connection:
            return [self.root / path for path in connection.execute(statement).scalars()]


def _accepts(request: Request, media_type: str) -> bool:
    """Whether the Accept header allows multipart/related parts of `media_type`."""
    accept = request.headers.get("accept")
    if not accept:
        return True
    for item in accept.split(","):
        main, params = parse_media_type(item)
        if main in ("*/*", "multipart/*"):
            return True
        if main == "multipart/related" and params.get("type", media_type).lower() in (media_type, "*/*", "*"):
            return True
    return False



def retrieve_response(request: Request, paths: list[Path]) -> Response:
    if not paths:
        raise HTTPProblem(404, "no such study, series or instance")
    if not _accepts(request, "application/dicom"):
        raise HTTPProblem(406, 'instances are served as multipart/related; type="application/dicom" only')
    boundary = secrets.token_hex(16)
    return StreamingResponse(
        multipart_files(paths, boundary),
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


def instance_metadata(path: Path) -> dict[str, Any]:
    """Full DICOM JSON of one instance without its pixel data (viewers fetch frames separately)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    metadata = ds.to_json_dict(bulk_data_threshold=1 << 30)
    metadata[tag("TransferSyntaxUID")] = {"vr": "UI", "Value": [str(ds.file_meta.TransferSyntaxUID)]}
    return dict(sorted(metadata.items()))


def metadata_response(paths: list[Path]) -> Response:
    """The metadata of each instance as one JSON array, produced an instance at a time (a study may hold
    thousands, and enhanced multi-frame headers run to megabytes each)."""

    def array() -> Iterator[bytes]:
        yield b"["
        for number, path in enumerate(paths):
            yield (b"," if number else b"") + json.dumps(
                instance_metadata(path), ensure_ascii=False, allow_nan=False, separators=(",", ":")
            ).encode()
        yield b"]"

    return StreamingResponse(array(), media_type=DICOM_JSON)


def frame_numbers(frame_list: str) -> list[int]:
    """The frame numbers of a `frames/{list}` URL in the order asked; 400 unless each is a positive integer.

    A repeated number is refused, not removed: PS3.18 defines the list as non-duplicate frame numbers,
    and refusing keeps the response's parts matching the request one to one.  With numbers distinct and
    at most NumberOfFrames, no response is larger than the instance's pixel data (400 copies of frame 1
    were once 200 MB built in memory).
    """
    numbers: dict[int, None] = {}  # ordered, and a set
    for item in frame_list.split(","):
        if not re.fullmatch(r"[1-9][0-9]{0,9}", item):
            raise HTTPProblem(400, f"frame {item[:20]!r}: frames are listed as positive integers separated by commas")
        if int(item) in numbers:
            raise HTTPProblem(400, f"frame {int(item)} is listed more than once: a frame list holds distinct numbers")
        numbers[int(item)] = None
    return list(numbers)


@dataclass(frozen=True)
class PixelFrames:
    """Where the native frames of a stored instance lie in its file."""

    path: Path
    offset: int  # of the Pixel Data value
    size: int  # bytes per frame
    count: int


def pixel_frames(path: Path) -> PixelFrames:
    """Locate native (uncompressed, little endian) frames from the header alone; the pixel data is not read."""
    ds = pydicom.dcmread(path, defer_size=_DEFERRED_VALUE_BYTES)
    ts = UID(ds.file_meta.TransferSyntaxUID)
    if ts not in _NATIVE_LITTLE_ENDIAN or "PixelData" not in ds:
        raise HTTPProblem(
            406, f"frames are served for native little-endian pixel data only; this instance is {ts.name}: "
            "retrieve the whole instance instead"
        )
    bits = ds.Rows * ds.Columns * ds.get("SamplesPerPixel", 1) * ds.BitsAllocated
    if bits % 8:
        raise HTTPProblem(406, "frames of this bit-packed pixel data do not start on byte boundaries")
    pixels = ds.get_item("PixelData", keep_deferred=True)
    size = bits // 8
    count = min(int(ds.get("NumberOfFrames") or 1), pixels.length // size)
    return PixelFrames(path, pixels.value_tell, size, count)


def frames_response(source: PixelFrames, numbers: list[int]) -> Response:
    """The frames asked for, streamed from the file a block at a time; 404 if one does not exist."""
    for number in numbers:
        if number > source.count:
            raise HTTPProblem(404, f"frame {number} does not exist: the instance has {source.count} frame(s)")
    boundary = secrets.token_hex(16)
    head = (f"--{boundary}\r\nContent-Type: application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
            "\r\n\r\n").encode()

    def parts() -> Iterator[bytes]:
        with source.path.open("rb") as file:
            for number in numbers:
                yield head
                yield from read_chunks(file, source.offset + (number - 1) * source.size, source.size)
                yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(
        parts(),
        media_type=f'multipart/related; type="application/octet-stream"; '
        f"transfer-syntax={ExplicitVRLittleEndian}; boundary={boundary}",
    )

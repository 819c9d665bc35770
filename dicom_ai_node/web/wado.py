"""WADO-RS: stored instances, their metadata, frames and bulk data, streamed from the files.

Received instances and the node's own results (SEG, SR in `result_objects`) are
served as one archive, so a viewer finds the SEG next to the CT it was computed from.
What each part is encoded in follows the Accept header (transfer_syntax.py, PS3.18 §8.7); files already
in the syntax asked go out unchanged, a MiB at a time, and the rest is transcoded one instance or frame at
a time in Starlette's thread pool (it iterates these synchronous generators there), off the event loop.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, select
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from dicom_ai_node.store.queries import all_instances
from dicom_ai_node.web.bulkdata import bulk_value, instance_metadata, is_pixel_data
from dicom_ai_node.web.dicom_json import DICOM_JSON
from dicom_ai_node.web.multipart import BLOCK_BYTES, read_chunks
from dicom_ai_node.web.problem import HTTPProblem
from dicom_ai_node.web.transcode import (
    StoredPixels,
    check_frames,
    decoded_frames,
    instance_in,
    native_frames,
    stored_pixels,
)
from dicom_ai_node.web.transfer_syntax import OCTET_STREAM, PixelEncoding, instance_syntaxes, pixel_encoding

log = logging.getLogger(__name__)


class Archive:
    """The stored files WADO-RS streams, found in the index."""

    def __init__(self, engine: Engine, storage_root: Path) -> None:
        self.engine = engine
        self.root = storage_root

    def files(self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None) -> list[Path]:
        """The stored files of a study, series or instance, in series and instance order; [] if unknown."""
        return [path for *_, path in self.instances(study_uid, series_uid, sop_uid)]

    def instances(self, study_uid: str, series_uid: str | None = None,
                  sop_uid: str | None = None) -> list[tuple[str, str, str, Path]]:
        """(study, series, SOP instance UID, file) of each instance of a study, series or instance, in order."""
        every_instance = all_instances()
        conditions = [every_instance.c.study_uid == study_uid]
        if series_uid:
            conditions.append(every_instance.c.series_uid == series_uid)
        if sop_uid:
            conditions.append(every_instance.c.sop_uid == sop_uid)
        statement = (
            select(every_instance.c.study_uid, every_instance.c.series_uid, every_instance.c.sop_uid,
                   every_instance.c.file_path)
            .where(*conditions)
            .order_by(every_instance.c.produced, every_instance.c.series_uid, every_instance.c.instance_number,
                      every_instance.c.sop_uid)
        )
        with self.engine.connect() as connection:
            return [(study, series, sop, self.root / path) for study, series, sop, path in connection.execute(statement)]




def retrieve_response(request: Request, paths: list[Path]) -> Response:
    """Instances as multipart/related application/dicom parts, each in the best transfer syntax the Accept
    header allows (default Explicit VR Little Endian, PS3.18 Table 8.7.3-2); the part's Content-Type names it.

    The first instance is prepared before the response starts, so a syntax the node cannot produce is a
    406; a later instance of a series or study that cannot be produced is left out and logged."""
    if not paths:
        raise HTTPProblem(404, "no such study, series or instance")
    acceptable = instance_syntaxes(request.headers.get("accept"))
    first = instance_in(paths[0], acceptable)
    boundary = secrets.token_hex(16)

    def parts() -> Iterator[bytes]:
        for number, path in enumerate(paths):
            try:
                syntax, transcoded = first if number == 0 else instance_in(path, acceptable)
            except HTTPProblem as exc:
                log.warning("WADO-RS: %s left out of the response: %s", path.name, exc)
                continue
            with (transcoded or path.open("rb")) as file:
                size = os.fstat(file.fileno()).st_size if transcoded is None else len(transcoded.getbuffer())
                yield (f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={syntax}\r\n"
                       f"Content-Length: {size}\r\n\r\n").encode()
                yield from read_chunks(file, 0, size)
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(parts(), media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


def metadata_response(paths: list[Path], instance_urls: list[str]) -> Response:
    """The metadata of each instance as one JSON array, produced an instance at a time (a study may hold
    thousands, and enhanced multi-frame headers run to megabytes each)."""

    def array() -> Iterator[bytes]:
        yield b"["
        for number, (path, url) in enumerate(zip(paths, instance_urls, strict=True)):
            yield (b"," if number else b"") + json.dumps(
                instance_metadata(path, url), ensure_ascii=False, allow_nan=False, separators=(",", ":")
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


def frames_response(request: Request, pixels: StoredPixels, numbers: list[int]) -> Response:
    """The frames asked for, in that order, one part each: the stored bitstreams or decoded to little endian,
    as the Accept header allows (PS3.18 §8.7.3, Tables 8.7.3-4 and 8.7.3-5); 404 if a frame does not exist."""
    encoding = pixel_encoding(request.headers.get("accept"), pixels.syntax, pixels.decodable)
    check_frames(pixels, numbers, encoding.native)
    if not encoding.multipart and len(numbers) > 1:
        raise HTTPProblem(406, "several frames need a multipart/related response; the Accept header allows "
                          "only a single part")
    frames = native_frames(pixels, numbers) if encoding.native else decoded_frames(pixels, numbers)
    return _pixel_response(encoding, frames)


def bulkdata_response(request: Request, path: Path, steps: list[int], location: str) -> Response:
    """The bulk data a metadata BulkDataURI names.  Pixel data: negotiated as for frames, one part per frame
    when encapsulated frames go as stored, else the whole value in one part (PS3.18 §8.7.3.3); other values:
    their bytes, application/octet-stream."""
    if is_pixel_data(steps):
        pixels = stored_pixels(path)
        encoding = pixel_encoding(request.headers.get("accept"), pixels.syntax, pixels.decodable)
        every = list(range(1, pixels.frames + 1))
        if encoding.native:
            if not encoding.multipart and pixels.frames > 1:
                raise HTTPProblem(406, "the frames of this encapsulated pixel data go as one part each: "
                                  "accept multipart/related")
            return _pixel_response(encoding, native_frames(pixels, every), location)
        bit_packed = not pixels.syntax.is_encapsulated and pixels.frame_bits % 8
        whole = _native_value(pixels) if bit_packed else decoded_frames(pixels, every)
        return _pixel_response(encoding, [whole], location)
    value = bulk_value(path, steps)
    encoding = PixelEncoding(OCTET_STREAM, "", False, True)
    return _pixel_response(encoding, [iter([value])], location)


def _native_value(pixels: StoredPixels) -> Iterator[bytes]:
    """Bit-packed native pixel data (e.g. a BINARY SEG) as stored: frames do not split it on byte boundaries."""
    with pixels.path.open("rb") as file:
        yield from read_chunks(file, pixels.offset, pixels.length)


def _pixel_response(encoding: PixelEncoding, parts: Iterator[bytes] | list[Iterator[bytes]],
                    location: str | None = None) -> Response:
    """Parts of pixel data (each bytes, or an iterator of blocks) as multipart/related, or one single part."""
    part_type = encoding.media_type + (f"; transfer-syntax={encoding.transfer_syntax}" if encoding.transfer_syntax
                                       else "")
    if not encoding.multipart:
        (only,) = list(parts)
        return StreamingResponse(_blocks(only), media_type=part_type)
    boundary = secrets.token_hex(16)
    head = f"--{boundary}\r\nContent-Type: {part_type}\r\n"
    head += f"Content-Location: {location}\r\n\r\n" if location else "\r\n"

    def body() -> Iterator[bytes]:
        for part in parts:
            yield head.encode()
            yield from _blocks(part)
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    parameters = f"; transfer-syntax={encoding.transfer_syntax}" if encoding.transfer_syntax else ""
    return StreamingResponse(
        body(), media_type=f'multipart/related; type="{encoding.media_type}"{parameters}; boundary={boundary}'
    )


def _blocks(part: bytes | Iterator[bytes]) -> Iterator[bytes]:
    if isinstance(part, bytes):
        for start in range(0, len(part), BLOCK_BYTES):
            yield part[start : start + BLOCK_BYTES]
    else:
        yield from part

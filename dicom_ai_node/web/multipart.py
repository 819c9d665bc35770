"""multipart/related (RFC 2387) as DICOMweb uses it: media type parameters, parts located in a spooled body,
and stored files written out as parts; a block at a time, so memory does not grow with a body's size."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

BLOCK_BYTES = 1 << 20  # read and written at a time
PART_HEAD_BYTES = 1 << 16  # a part's header block, and the File Meta Information, fit in this
# Parts of one STOW-RS request: a 4000-slice series fits; each part costs a scan of the spooled body.
MAX_STOW_PARTS = 20000


def parse_media_type(header: str) -> tuple[str, dict[str, str]]:
    """`multipart/related; type="application/dicom"; boundary=x` -> ("multipart/related", {...})."""
    main, _, rest = header.partition(";")
    params: dict[str, str] = {}
    for match in re.finditer(r'\s*([^=;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)\s*;?', rest):
        value = match.group(2).strip()
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[match.group(1).lower()] = value
    return main.strip().lower(), params


@dataclass(frozen=True)
class Part:
    """One part of a multipart body kept in a file: its headers, and where its content lies."""

    headers: dict[str, str]
    start: int
    end: int


class MultipartError(ValueError):
    """The body is not a complete multipart message (malformed or truncated)."""


def parse_multipart(body: BinaryIO, boundary: str) -> list[Part]:
    """Locate the parts of a whole multipart body in a seekable file; MultipartError unless it is closed.

    The file is scanned a block at a time, so memory stays one block whatever the body's size; the
    contents stay in the file until `read_range` fetches one part.
    """
    delimiter = b"--" + boundary.encode("latin-1")
    start = _find(body, delimiter, 0)
    if start < 0:
        raise MultipartError("the body does not contain the boundary given in Content-Type")
    parts: list[Part] = []
    position = start + len(delimiter)
    while not (head := read_range(body, position, PART_HEAD_BYTES)).startswith(b"--"):
        number = len(parts) + 1
        if number > MAX_STOW_PARTS:
            raise MultipartError(f"more than {MAX_STOW_PARTS} parts: send the instances in several requests")
        line_end = head.find(b"\r\n")
        headers_end = head.find(b"\r\n\r\n", line_end) if line_end >= 0 else -1
        if headers_end < 0:
            raise MultipartError(f"part {number} has no complete header block (truncated body?)")
        headers = {}
        for line in head[line_end + 2 : headers_end].decode("latin-1").split("\r\n"):
            if line:
                name, colon, value = line.partition(":")
                if not colon:
                    raise MultipartError(f"part {number}: malformed header line {line[:80]!r}")
                headers[name.strip().lower()] = value.strip()
        content_start = position + headers_end + 4
        end = _find(body, b"\r\n" + delimiter, content_start)
        if end < 0:
            raise MultipartError(f"part {number} is not closed by a boundary (truncated body?)")
        parts.append(Part(headers, content_start, end))
        position = end + 2 + len(delimiter)
    if not parts:
        raise MultipartError("the multipart body has no parts")
    return parts


def _find(file: BinaryIO, needle: bytes, start: int) -> int:
    """Offset of the first `needle` at or after `start` in `file`, or -1; reads one block at a time."""
    overlap = len(needle) - 1
    position = start
    while True:
        block = read_range(file, position, BLOCK_BYTES + overlap)
        found = block.find(needle)
        if found >= 0:
            return position + found
        if len(block) < BLOCK_BYTES + overlap:
            return -1
        position += BLOCK_BYTES


def read_range(file: BinaryIO, start: int, size: int) -> bytes:
    """Up to `size` bytes of `file` from offset `start` (fewer at its end)."""
    file.seek(start)
    return file.read(size)


def read_chunks(file: BinaryIO, start: int, size: int) -> Iterator[bytes]:
    """Exactly `size` bytes of `file` from `start`, a block at a time, for streaming responses."""
    file.seek(start)
    while size:
        chunk = file.read(min(BLOCK_BYTES, size))
        if not chunk:
            raise OSError(f"{file.name} ends {size} bytes before the end of what it was expected to hold")
        size -= len(chunk)
        yield chunk


def multipart_files(paths: list[Path], boundary: str) -> Iterator[bytes]:
    """Stream stored files unchanged as multipart/related parts (runs in the thread pool), a block at a time."""
    for path in paths:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {size}\r\n\r\n".encode()
            yield from read_chunks(file, 0, size)
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()

"""multipart/related (RFC 2387) as DICOMweb uses it: media type parameters, parts located (and their content
handed on) while a body arrives, and stored files written out as parts; a block at a time, so memory does not
grow with a body's size."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

BLOCK_BYTES = 1 << 20  # read and written at a time
PART_HEAD_BYTES = 1 << 16  # a part's header block, and the File Meta Information, fit in this
# Parts of one STOW-RS request: a 4000-slice series fits, and the list of parts stays small.
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


class ContentSink(Protocol):
    """Where a scanner puts each part's content as it goes by (a file per part)."""

    def part_started(self, headers: dict[str, str]) -> None: ...

    def content(self, data: memoryview) -> None: ...

    def part_ended(self) -> None: ...


class MultipartScanner:
    """Locates the parts of a multipart body while it arrives, fed in order a block at a time.

    Memory holds a part's header block and a few bytes of the last block, never a part's
    content: parts are found as offsets into the body, and their content, once known to be
    content, goes to `sink` if there is one, straight from the block it came in (not copied).
    `close` raises MultipartError unless the body ended with its close delimiter.
    """

    def __init__(self, boundary: str, sink: ContentSink | None = None) -> None:
        self._sink = sink
        self._delimiter = b"--" + boundary.encode("latin-1")
        self._content_end = b"\r\n" + self._delimiter
        self._pending = b""  # bytes of earlier blocks not scanned yet: a cut header block or delimiter
        self._data: bytes | bytearray = b""  # what is being scanned, from `_position` (body offset `_offset`)
        self._position = 0
        self._offset = 0
        self._state = "preamble"  # then "head" (after a delimiter), "content", "closed"
        self._headers: dict[str, str] = {}
        self._content_start = 0
        self.parts: list[Part] = []

    def feed(self, *blocks: bytes | bytearray) -> list[Part]:
        """The parts the body up to the end of `blocks` (consecutive) completes."""
        found = len(self.parts)
        for block in blocks:
            if self._state == "closed":  # the epilogue is ignored (RFC 2046 §5.1.1)
                break
            self._scan(block)
        return self.parts[found:]

    def close(self) -> list[Part]:
        """All parts, once the body is known to be whole; MultipartError if it is not."""
        number = len(self.parts) + 1
        if self._state == "preamble":
            raise MultipartError("the body does not contain the boundary given in Content-Type")
        if self._state == "head":
            raise MultipartError(f"part {number} has no complete header block (truncated body?)")
        if self._state == "content":
            raise MultipartError(f"part {number} is not closed by a boundary (truncated body?)")
        if not self.parts:
            raise MultipartError("the multipart body has no parts")
        return self.parts

    def _scan(self, block: bytes | bytearray) -> None:
        pending, end = self._pending, self._content_end
        if pending and self._state == "content" and len(block) >= len(end) - 1:
            # The few bytes held back in case a delimiter began there: content unless one does.
            if (pending + bytes(block[: len(end) - 1])).find(end) < 0:
                self._data, self._position = pending, 0
                self._consume_content(len(pending))
                pending = b""
        self._data, self._position = (pending + bytes(block)) if pending else block, 0
        while self._step():
            pass
        self._pending = bytes(self._data[self._position :]) if self._state != "closed" else b""
        self._data = b""

    def _step(self) -> bool:
        """Advance over one delimiter, header block or part content; False when more input is needed."""
        data, position = self._data, self._position
        left = len(data) - position
        if self._state == "preamble":
            found = data.find(self._delimiter, position)
            if found < 0:
                self._consume(max(0, left - len(self._delimiter) + 1))
                return False
            self._consume(found - position + len(self._delimiter))
            self._state = "head"
            return True
        if self._state == "head":
            if left < 2:
                return False
            if data.startswith(b"--", position):
                self._state = "closed"
                return False
            number = len(self.parts) + 1
            line_end = data.find(b"\r\n", position)
            headers_end = data.find(b"\r\n\r\n", line_end) if line_end >= 0 else -1
            if headers_end < 0:
                if left >= PART_HEAD_BYTES:
                    raise MultipartError(f"part {number} has no complete header block within {PART_HEAD_BYTES} bytes")
                return False
            if number > MAX_STOW_PARTS:
                raise MultipartError(f"more than {MAX_STOW_PARTS} parts: send the instances in several requests")
            self._headers = _part_headers(bytes(data[line_end + 2 : headers_end]), number)
            self._consume(headers_end + 4 - position)
            self._content_start = self._offset
            self._state = "content"
            if self._sink is not None:
                self._sink.part_started(self._headers)
            return True
        if self._state == "content":
            found = data.find(self._content_end, position)
            if found < 0:
                self._consume_content(max(0, left - len(self._content_end) + 1))
                return False
            self._consume_content(found - position)
            self.parts.append(Part(self._headers, self._content_start, self._offset))
            if self._sink is not None:
                self._sink.part_ended()
            self._consume(len(self._content_end))
            self._state = "head"
            return True
        return False

    def _consume_content(self, count: int) -> None:
        if self._sink is not None and count:
            with memoryview(self._data) as view, view[self._position : self._position + count] as content:
                self._sink.content(content)
        self._consume(count)

    def _consume(self, count: int) -> None:
        self._position += count
        self._offset += count


def _part_headers(block: bytes, number: int) -> dict[str, str]:
    headers = {}
    for line in block.decode("latin-1").split("\r\n"):
        if line:
            name, colon, value = line.partition(":")
            if not colon:
                raise MultipartError(f"part {number}: malformed header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
    return headers


def parse_multipart(body: BinaryIO, boundary: str) -> list[Part]:
    """Locate the parts of a whole multipart body in a seekable file; MultipartError unless it is closed."""
    scanner = MultipartScanner(boundary)
    body.seek(0)
    while block := body.read(BLOCK_BYTES):
        scanner.feed(block)
    return scanner.close()


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

"""Accept-header negotiation of WADO-RS responses (PS3.18 §8.7): which media type and transfer syntax
each part is sent in, for whole instances (application/dicom) and for pixel data (frames, bulk data).

The rules, from PS3.18 §8.7.3 and §8.7.5:
- An Accept header lists media ranges with optional q-values; the best (highest q, then first) that the
  node can produce wins; q=0 excludes.  None the node can produce: 406, naming what it could send.
- A multipart range names its parts' media type in `type`; `*/*`, `multipart/*` and a missing header
  accept anything.  `image/x-dicom-rle` and `image/x-jls` (older names) mean image/dicom-rle and image/jls.
- `transfer-syntax=*` means as stored; no transfer-syntax parameter means Explicit VR Little Endian
  (§8.7.3.5.2 and the defaults of Tables 8.7.3-2 and 8.7.3-4), except for an image media type
  (image/jpeg, image/jls, ...), where the node sends the stored bitstream when its syntax is of that type.
- Implicit VR Little Endian and Explicit VR Big Endian are never sent (§8.7.3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_ai_node.web.multipart import parse_media_type
from dicom_ai_node.web.problem import HTTPProblem

OCTET_STREAM = "application/octet-stream"
DICOM = "application/dicom"
ANY = "*/*"
AS_STORED = "*"
# PS3.18 Table 8.7.3-5: the media type of each compressed transfer syntax's bitstream.
IMAGE_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls", "*": ANY}
NOT_FOR_THE_WEB = frozenset({ImplicitVRLittleEndian, ExplicitVRBigEndian})


@dataclass(frozen=True)
class MediaRange:
    """One acceptable representation from the Accept header."""

    media_type: str  # of the parts of a multipart/related range, or of a single-part body; */* for anything
    transfer_syntax: str | None  # None: not given; "*": as stored
    quality: float
    multipart: bool


def media_ranges(accept: str | None) -> list[MediaRange]:
    """The Accept header's ranges, best first (q-value, then the order given); q=0 left out."""
    if not accept or not accept.strip():
        return [MediaRange(ANY, None, 1.0, True)]
    ranges: list[tuple[float, int, MediaRange]] = []
    for position, item in enumerate(_split_list(accept)):
        main, params = parse_media_type(item)
        try:
            quality = float(params.get("q", "1"))
        except ValueError:
            raise HTTPProblem(400, f"Accept: q={params['q']!r} is not a number between 0 and 1") from None
        if quality <= 0:
            continue
        multipart = main in ("multipart/related", "multipart/*", ANY)
        media_type = params.get("type", ANY).lower() if main == "multipart/related" else (
            ANY if main == "multipart/*" else main)
        media_type = _ALIASES.get(media_type, media_type)
        ranges.append((-quality, position, MediaRange(media_type, params.get("transfer-syntax"), quality, multipart)))
    return [media_range for *_, media_range in sorted(ranges, key=lambda item: item[:2])]


def _split_list(header: str) -> list[str]:
    """Split a header list at commas outside quoted strings."""
    return [item.strip() for item in re.findall(r'(?:[^,"]|"(?:[^"\\]|\\.)*")+', header) if item.strip()]


def instance_syntaxes(accept: str | None) -> list[str]:
    """Transfer syntaxes acceptable for whole instances, best first ("*": as stored); 406 if none.

    A range without transfer-syntax means Explicit VR Little Endian (PS3.18 Table 8.7.3-2)."""
    syntaxes: list[str] = []
    for media_range in media_ranges(accept):
        if media_range.multipart and media_range.media_type in (DICOM, ANY, "application/*"):
            syntax = media_range.transfer_syntax or ExplicitVRLittleEndian
            if syntax not in syntaxes and syntax not in NOT_FOR_THE_WEB:
                syntaxes.append(syntax)
    if not syntaxes:
        raise HTTPProblem(
            406, 'instances are served as multipart/related; type="application/dicom" with transfer-syntax * '
            f"(as stored), {ExplicitVRLittleEndian} (the default) or another syntax the node can encode; "
            f"the Accept header {accept!r} allows none of them"
        )
    return syntaxes


@dataclass(frozen=True)
class PixelEncoding:
    """How pixel data goes out: the stored bitstream of each frame, or decoded to Explicit VR Little Endian."""

    media_type: str
    transfer_syntax: str
    native: bool  # True: the encapsulated frames as stored
    multipart: bool


def pixel_encoding(accept: str | None, stored: UID, decodable: bool) -> PixelEncoding:
    """The representation of an instance's frames or pixel data that the Accept header asks for.

    `stored` is the instance's transfer syntax; `decodable` whether the node can decode it (a native one
    always is).  Frames of encapsulated data go as their own bitstreams (Table 8.7.3-5) or decoded;
    native data always goes decoded to little endian (Table 8.7.3-4)."""
    encapsulated = stored.is_encapsulated
    own_type = IMAGE_MEDIA_TYPES.get(stored, OCTET_STREAM)
    for media_range in media_ranges(accept):
        syntax, multipart = media_range.transfer_syntax, media_range.multipart
        decoded = PixelEncoding(OCTET_STREAM, ExplicitVRLittleEndian, False, multipart) if decodable else None
        as_stored = PixelEncoding(own_type if media_range.media_type.startswith("image/") else OCTET_STREAM,
                                  stored, True, multipart) if encapsulated else decoded
        if media_range.media_type in (OCTET_STREAM, ANY, "application/*"):
            if syntax in (None, ExplicitVRLittleEndian):
                # A client accepting anything takes the stored bitstream when the node cannot decode it.
                choice = decoded or (as_stored if media_range.media_type == ANY and syntax is None else None)
            elif syntax == AS_STORED or syntax == stored:
                choice = as_stored
            else:
                choice = None
        elif media_range.media_type in (own_type, "image/*") and encapsulated:
            choice = as_stored if syntax in (None, AS_STORED, stored) else None
        else:
            choice = None
        if choice is not None:
            return choice
    can = [f"multipart/related; type={OCTET_STREAM}; transfer-syntax={ExplicitVRLittleEndian}"] if decodable else []
    if encapsulated:
        can += [f"multipart/related; type={own_type}; transfer-syntax={stored}",
                f"multipart/related; type={OCTET_STREAM}; transfer-syntax=*"]
    raise HTTPProblem(406, f"this instance's pixel data ({stored.name}) can be served as {' or '.join(can) or 'nothing'}"
                      f"; the Accept header {accept!r} allows none of them")

"""WADO-RS Retrieve Rendered and Thumbnail resources (PS3.18 §10.4.1.1.3-4, §8.3.5.1, §8.7.4).

Images are decoded by pydicom (with the pylibjpeg plugins for compressed syntaxes) one frame at a
time, taken through the grayscale pipeline of PS3.4 N.2 (Modality LUT, VOI from the request or the
object, MONOCHROME1 inverted) to 8 bits per channel, cut to the asked source region, scaled to the
viewport and encoded with Pillow as JPEG (the default), PNG or GIF.  A resource holding one image is
answered with that image; one holding several (a multi-frame instance, a frame list, a series, a
study) as multipart/related, one part per image, in the order of the resource, when the client
accepts it (dcm4chee-arc answers the same way); a single-image media type cannot carry several
images, so that is a 406 with the way out in the message.
"""

from __future__ import annotations

import io
import math
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, pixel_array
from pydicom.uid import SegmentationStorage
from starlette.datastructures import QueryParams
from starlette.responses import Response, StreamingResponse

from dicom_ai_node.web.multipart import parse_media_type
from dicom_ai_node.web.problem import HTTPProblem

# PS3.18 Table 8.7.4-1: image/jpeg is the default Rendered Media Type, png and gif are required.
RENDERED_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif")
_PIL_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}
DEFAULT_QUALITY = 90  # JPEG quality when the request has no `quality` (PS3.18 §8.3.5.1 leaves it to the server)
MAX_VIEWPORT = 4096  # pixels, each side: a bigger viewport would only cost memory and time
MAX_RENDERED_IMAGES = 1000  # per response: a 200-slice CT series fits; a bigger one is asked for per series/instance
THUMBNAIL_SIZE = 128  # pixels: a thumbnail without `viewport` fits in this square (never enlarged)
_WINDOW_FUNCTIONS = ("linear", "linear-exact", "sigmoid")  # PS3.18 §8.3.5.1, PS3.3 C.11.2.1.2-3
_HEADER_ONLY = 1 << 16  # values longer than this stay in the file while a header is read

# Archive.files: the stored files of a study, series or instance, in order.
Files = Callable[[str, str | None, str | None], list[Path]]


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): centre and width in modality units, and the function."""

    center: float
    width: float
    function: str  # one of _WINDOW_FUNCTIONS


@dataclass(frozen=True)
class Viewport:
    """PS3.18 §8.3.5.1: the viewport's size and the source region (sw, sh negative: flipped)."""

    width: int
    height: int
    sx: int = 0
    sy: int = 0
    sw: int | None = None  # None: to the right edge
    sh: int | None = None  # None: to the bottom edge


@dataclass(frozen=True)
class RenderOptions:
    """The rendering query parameters of one request, checked (400 for a malformed one)."""

    window: Window | None = None
    viewport: Viewport | None = None
    quality: int = DEFAULT_QUALITY
    thumbnail: bool = False

    @classmethod
    def from_query(cls, query: QueryParams, thumbnail: bool = False) -> RenderOptions:
        """Parse `window`, `viewport` and `quality`.  `annotation` and `iccprofile` values other than
        "no" are not supported and, as PS3.18 §8.3 requires for unsupported values, ignored: no
        annotation is burnt in and no ICC profile is embedded.  A thumbnail takes `viewport=vw,vh`
        only (PS3.18 Table 8.3.5-1) and the object's own window."""
        if thumbnail:
            return cls(viewport=_viewport(query["viewport"], thumbnail=True) if "viewport" in query else None,
                       thumbnail=True)
        return cls(
            window=_window(query["window"]) if "window" in query else None,
            viewport=_viewport(query["viewport"]) if "viewport" in query else None,
            quality=_quality(query["quality"]) if "quality" in query else DEFAULT_QUALITY,
        )


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise HTTPProblem(400, f"{what} {text[:20]!r} is not a number") from None
    if not math.isfinite(value):
        raise HTTPProblem(400, f"{what} must be a finite number")
    return value


def _window(text: str) -> Window:
    """`window=center,width,function` (PS3.18 §8.3.5.1)."""
    items = text.split(",")
    if len(items) != 3:
        raise HTTPProblem(400, f"window={text[:60]!r}: expected window=center,width,function, "
                               f"function one of {', '.join(_WINDOW_FUNCTIONS)}")
    center = _number(items[0], "window center")
    width = _number(items[1], "window width")
    function = items[2].strip().lower()
    if function not in _WINDOW_FUNCTIONS:
        raise HTTPProblem(400, f"window function {items[2][:20]!r}: expected one of {', '.join(_WINDOW_FUNCTIONS)}")
    if width < 1 if function == "linear" else width <= 0:  # PS3.3 C.11.2.1.2.1: linear needs width >= 1
        raise HTTPProblem(400, f"window width {width:g} is out of range for {function} (linear: >= 1, else > 0)")
    return Window(center, width, function)


def _viewport(text: str, thumbnail: bool = False) -> Viewport:
    """`viewport=vw,vh[,sx,sy,sw,sh]`, the source values each optional (PS3.18 §8.3.5.1)."""
    items = [item.strip() for item in text.split(",")]
    usage = "viewport=vw,vh" if thumbnail else "viewport=vw,vh or viewport=vw,vh,sx,sy,sw,sh"
    if len(items) not in ((2,) if thumbnail else (2, 6)):
        raise HTTPProblem(400, f"viewport={text[:60]!r}: expected {usage}")
    numbers: list[int | None] = []
    for name, item in zip(("vw", "vh", "sx", "sy", "sw", "sh"), items):
        if not item and name not in ("vw", "vh"):
            numbers.append(None)
            continue
        if not re.fullmatch(r"-?[0-9]{1,6}", item):
            raise HTTPProblem(400, f"viewport {name}={item[:20]!r} is not an integer ({usage})")
        numbers.append(int(item))
    width, height = numbers[0], numbers[1]
    assert width is not None and height is not None
    if not (0 < width <= MAX_VIEWPORT and 0 < height <= MAX_VIEWPORT):
        raise HTTPProblem(400, f"viewport {width}x{height}: vw and vh are between 1 and {MAX_VIEWPORT}")
    sx, sy, sw, sh = (numbers[2:] + [None] * 4)[:4]
    if (sx or 0) < 0 or (sy or 0) < 0 or sw == 0 or sh == 0:
        raise HTTPProblem(400, "viewport sx and sy are >= 0, sw and sh non-zero (negative flips the image)")
    return Viewport(width, height, sx or 0, sy or 0, sw, sh)


def _quality(text: str) -> int:
    """`quality` is an integer from 1 to 100 (PS3.18 §8.3.5.1); it matters for image/jpeg only."""
    if not re.fullmatch(r"[0-9]{1,3}", text) or not 1 <= int(text) <= 100:
        raise HTTPProblem(400, f"quality={text[:20]!r}: expected an integer from 1 to 100")
    return int(text)


@dataclass(frozen=True)
class Negotiated:
    media_type: str
    multipart: bool


def acceptable(query: QueryParams, header: str | None) -> str | None:
    """The Acceptable Media Types: the `accept` query parameter replaces the Accept header (PS3.18 §8.3.3.1)."""
    return ",".join(query.getlist("accept")) if "accept" in query else header


def negotiate(accept: str | None, images: int) -> Negotiated:
    """The media type for `images` rendered images, from the Accept header or the `accept` query
    parameter (PS3.18 §8.7.5; the query parameter replaces the header).  Highest q first, then the
    client's order; 406 when nothing acceptable can carry the images."""
    offers: list[tuple[float, int, int, bool]] = []  # (-q, position, our preference, multipart)
    for position, item in enumerate((accept or "*/*").split(",")):
        main, params = parse_media_type(item)
        try:
            weight = float(params.get("q", "1"))
        except ValueError:
            weight = 1.0
        if weight <= 0:
            continue
        if main == "multipart/related":
            inner = params.get("type", "image/jpeg").lower()
            offers.extend((-weight, position, choice, True) for choice in _matching(inner))
        elif main == "multipart/*":
            offers.append((-weight, position, 0, True))
        else:
            offers.extend((-weight, position, choice, False) for choice in _matching(main))
            if main == "*/*":
                offers.extend((-weight, position, choice, True) for choice in _matching(main))
    usable = sorted(offer for offer in offers if offer[3] or images == 1)
    if not usable:
        if images > 1 and offers:
            single = RENDERED_MEDIA_TYPES[offers[0][2]]
            raise HTTPProblem(406, f"this resource renders to {images} images, which a single {single} "
                                   'cannot hold: accept multipart/related; type="image/jpeg" (or image/png), '
                                   "or ask for one frame (.../frames/{n}/rendered) or a thumbnail")
        raise HTTPProblem(406, f"rendered resources are served as {', '.join(RENDERED_MEDIA_TYPES)} "
                               "(or multipart/related of those); none is acceptable to this request")
    _, _, choice, multipart = usable[0]
    return Negotiated(RENDERED_MEDIA_TYPES[choice], multipart)


def _matching(pattern: str) -> list[int]:
    """Indexes into RENDERED_MEDIA_TYPES of the types `pattern` (maybe a wildcard) names."""
    if pattern in ("*/*", "image/*", "*"):
        return list(range(len(RENDERED_MEDIA_TYPES)))
    return [RENDERED_MEDIA_TYPES.index(pattern)] if pattern in RENDERED_MEDIA_TYPES else []


@dataclass(frozen=True)
class FrameRef:
    """One image to render: a file and the 0-based index of the frame in it."""

    path: Path
    index: int


@dataclass(frozen=True)
class ImageHeader:
    """What is needed to plan rendering, from the header only."""

    frames: int  # 0: no pixel data (SR, KOS, ...)
    sop_class_uid: str


def image_header(path: Path) -> ImageHeader:
    ds = pydicom.dcmread(path, defer_size=_HEADER_ONLY, specific_tags=["SOPClassUID", "NumberOfFrames", "PixelData"])
    frames = int(ds.get("NumberOfFrames") or 1) if "PixelData" in ds else 0
    return ImageHeader(frames, str(ds.get("SOPClassUID", "")))


def image_frames(paths: Sequence[Path], frame_numbers: Sequence[int] | None = None) -> list[FrameRef]:
    """Every frame of every image among `paths`, in order (or the 1-based `frame_numbers` of the one
    instance); objects without pixel data are skipped in a study or series.  An instance or frame
    list that has no image is a 406, a frame beyond the instance a 404; more than MAX_RENDERED_IMAGES
    images a 400 (the work of one response is bounded)."""
    if frame_numbers is not None or len(paths) == 1:
        header = image_header(paths[0])
        if not header.frames:
            raise HTTPProblem(406, f"this instance (SOP Class {header.sop_class_uid}) has no pixel data; "
                                   "the node renders images only (retrieve it as application/dicom instead)")
        numbers = range(1, header.frames + 1) if frame_numbers is None else frame_numbers
        refs = [_frame(paths[0], header, number) for number in numbers]
    else:
        refs = []
        for path in paths:
            refs.extend(FrameRef(path, index) for index in range(image_header(path).frames))
            _check_bound(len(refs))
        if not refs:
            raise HTTPProblem(406, "nothing here has pixel data (structured reports and the like): nothing to render")
    _check_bound(len(refs))
    return refs


def _frame(path: Path, header: ImageHeader, number: int) -> FrameRef:
    """Frame `number` (1-based) of the instance; 404 beyond its last frame."""
    if number > header.frames:
        raise HTTPProblem(404, f"frame {number} does not exist: the instance has {header.frames} frame(s)")
    return FrameRef(path, number - 1)


def _check_bound(count: int) -> None:
    if count > MAX_RENDERED_IMAGES:
        raise HTTPProblem(400, f"this resource renders to more than {MAX_RENDERED_IMAGES} images: ask for it "
                               "series by series, instance by instance, or for its thumbnail")


def representative_frame(paths: Sequence[Path], frame_numbers: Sequence[int] | None = None) -> FrameRef:
    """The image a thumbnail shows (PS3.18 §10.4.3.3.4 leaves the choice to the server): the first frame
    asked, else the middle frame of the image instance nearest the middle of the list (a series: the
    middle slice).  Headers are read from the middle outwards, so a homogeneous series costs one read."""
    middle = len(paths) // 2
    by_distance = sorted(range(len(paths)), key=lambda position: abs(position - middle))
    for path in (paths[position] for position in by_distance):
        header = image_header(path)
        if header.frames:
            return _frame(path, header, frame_numbers[0] if frame_numbers else header.frames // 2 + 1)
    raise HTTPProblem(406, "nothing here has pixel data (structured reports and the like): no thumbnail")


def thumbnail_frame(files: Files, study: str, series: str | None, instance: str | None,
                    frame_numbers: Sequence[int] | None) -> FrameRef:
    """The representative frame of a study (the middle image of its first series with images: received
    series come before the node's results), series, instance or frame list; 404 if it is unknown."""
    paths = files(study, series, instance)
    if not paths:
        raise HTTPProblem(404, "no such study, series or instance")
    if series is None:
        for path in paths:
            if image_header(path).frames:
                first = str(pydicom.dcmread(path, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
                paths = files(study, first, None)
                break
    return representative_frame(paths, frame_numbers)


def rendered_frames(files: Files, study: str, series: str | None, instance: str | None,
                    frame_numbers: Sequence[int] | None) -> list[FrameRef]:
    """The frames a rendered study, series, instance or frame list shows; 404 if it is unknown."""
    paths = files(study, series, instance)
    if not paths:
        raise HTTPProblem(404, "no such study, series or instance")
    return image_frames(paths, frame_numbers)


def render_frame(ref: FrameRef, options: RenderOptions) -> np.ndarray:
    """One frame as 8-bit grayscale (rows, columns) or RGB (rows, columns, 3), windowed, cut and scaled."""
    ds = pydicom.dcmread(ref.path, stop_before_pixels=True)
    pixels = pixel_array(ref.path, index=ref.index)  # one frame decoded; YBR converted to RGB
    if ds.get("SamplesPerPixel", 1) > 1:
        image = _to_8_bits(pixels, int(ds.BitsStored))
    elif ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        colors = apply_color_lut(pixels, ds)  # 8- or 16-bit RGB, as the palette's descriptor says
        image = _to_8_bits(colors, 8 * colors.dtype.itemsize)
    else:
        image = _grayscale(pixels, ds, ref.index, options.window)
    return _fit(image, options)


def _to_8_bits(pixels: np.ndarray, bits: int) -> np.ndarray:
    if bits <= 8:
        return pixels.astype(np.uint8)
    return np.rint(pixels.astype(np.float64) * (255 / (2**bits - 1))).astype(np.uint8)


def _grayscale(pixels: np.ndarray, ds: Dataset, index: int, requested: Window | None) -> np.ndarray:
    """PS3.4 N.2 grayscale pipeline: Modality LUT, then the VOI (the request's window, else the object's
    first window or VOI LUT, else the frame's range), then MONOCHROME1 inverted."""
    frame = _frame_attributes(ds, index)
    if ds.get("SOPClassUID") == SegmentationStorage:
        # SEG (PS3.3 C.8.20.2): BINARY frames are 0/1, FRACTIONAL 0..MaximumFractionalValue.
        top = 1 if ds.get("SegmentationType") == "BINARY" else int(ds.get("MaximumFractionalValue") or 255)
        image = pixels.astype(np.float64) * (255 / top)
    else:
        values = apply_modality_lut(pixels, frame).astype(np.float64)
        window = requested or _object_window(frame)
        if window is not None:
            image = _apply_window(values, window)
        elif "VOILUTSequence" in frame:
            bits = int(frame.VOILUTSequence[0].LUTDescriptor[2])
            image = apply_voi(values, frame) * (255 / (2**bits - 1))
        else:
            low, high = float(values.min()), float(values.max())
            image = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        image = 255 - image
    return image


def _frame_attributes(ds: Dataset, index: int) -> Dataset:
    """The Modality LUT and VOI attributes that apply to frame `index`: the top level's, overridden by the
    Shared then the Per-Frame Functional Groups (enhanced multi-frame objects keep them there)."""
    frame = Dataset()
    for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "WindowCenter",
                    "WindowWidth", "VOILUTFunction", "VOILUTSequence", "BitsStored", "PixelRepresentation",
                    "PhotometricInterpretation"):
        if keyword in ds:
            frame[keyword] = ds[keyword]
    groups = [ds.get("SharedFunctionalGroupsSequence", [None])[0]]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    groups.append(per_frame[index] if index < len(per_frame) else None)
    for group in groups:
        for macro in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            if group is not None and group.get(macro):
                for element in group[macro][0]:
                    frame[element.tag] = element
    return frame


def _object_window(frame: Dataset) -> Window | None:
    """The object's first Window Center/Width and its VOI LUT Function (PS3.3 C.11.2.1.2-3)."""
    if "WindowCenter" not in frame or "WindowWidth" not in frame:
        return None
    center, width = frame.WindowCenter, frame.WindowWidth
    center = float(center[0] if isinstance(center, Sequence) else center)
    width = float(width[0] if isinstance(width, Sequence) else width)
    function = str(frame.get("VOILUTFunction") or "LINEAR").lower().replace("_", "-")
    if function not in _WINDOW_FUNCTIONS or width <= 0 or (function == "linear" and width < 1):
        return None
    return Window(center, width, function)


def _apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """The VOI function of PS3.3 C.11.2.1.2.1 (linear), C.11.2.1.3.2 (linear-exact), C.11.2.1.3.1 (sigmoid)
    onto the output range 0..255."""
    c, w = window.center, window.width
    if window.function == "sigmoid":
        return 255 / (1 + np.exp(-4 * (values - c) / w))
    if window.function == "linear-exact":
        return np.where(values <= c - w / 2, 0, np.where(values > c + w / 2, 255, ((values - c) / w + 0.5) * 255))
    low, high = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    inside = ((values - (c - 0.5)) / max(w - 1, 1) + 0.5) * 255  # width 1: a threshold, never used
    return np.where(values <= low, 0, np.where(values > high, 255, inside))


def _fit(image: np.ndarray, options: RenderOptions) -> np.ndarray:
    """The source region (flipped when sw or sh is negative), scaled to fit the viewport with its aspect
    ratio kept (PS3.18 §8.3.5.1); a thumbnail without viewport fits THUMBNAIL_SIZE, never enlarged."""
    viewport = options.viewport
    if viewport is None:
        if not options.thumbnail or max(image.shape[:2]) <= THUMBNAIL_SIZE:
            return image
        viewport = Viewport(THUMBNAIL_SIZE, THUMBNAIL_SIZE)
    rows, columns = image.shape[:2]
    if viewport.sx >= columns or viewport.sy >= rows:
        raise HTTPProblem(400, f"viewport source region starts at ({viewport.sx},{viewport.sy}), "
                               f"outside the {columns}x{rows} image")
    right = columns if viewport.sw is None else min(columns, viewport.sx + abs(viewport.sw))
    bottom = rows if viewport.sh is None else min(rows, viewport.sy + abs(viewport.sh))
    region = image[viewport.sy:bottom, viewport.sx:right]
    if viewport.sw is not None and viewport.sw < 0:
        region = region[:, ::-1]
    if viewport.sh is not None and viewport.sh < 0:
        region = region[::-1, :]
    height, width = region.shape[:2]
    scale = min(viewport.width / width, viewport.height / height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == (width, height):
        return np.ascontiguousarray(region)
    return np.asarray(Image.fromarray(np.ascontiguousarray(region)).resize(size, Image.Resampling.LANCZOS))


def encode(image: np.ndarray, media_type: str, quality: int) -> bytes:
    """The image in `media_type`; JPEG is baseline 8-bit Huffman, as PS3.18 §8.7.4 requires."""
    buffer = io.BytesIO()
    picture = Image.fromarray(image)
    if media_type == "image/jpeg":
        picture.save(buffer, format="JPEG", quality=quality, progressive=False, optimize=False)
    else:
        picture.save(buffer, format=_PIL_FORMATS[media_type])
    return buffer.getvalue()


def render(ref: FrameRef, options: RenderOptions, media_type: str) -> bytes:
    return encode(render_frame(ref, options), media_type, options.quality)


def rendered_response(refs: list[FrameRef], options: RenderOptions, negotiated: Negotiated) -> Response:
    """One image as itself, or each image as a part of multipart/related, rendered as the body is sent
    (one frame in memory at a time).  Call from a worker thread: a single image is rendered here."""
    if not negotiated.multipart:
        return Response(render(refs[0], options, negotiated.media_type), media_type=negotiated.media_type)
    boundary = secrets.token_hex(16)
    head = f"--{boundary}\r\nContent-Type: {negotiated.media_type}\r\n\r\n".encode()

    def parts() -> Iterator[bytes]:
        for ref in refs:
            yield head + render(ref, options, negotiated.media_type) + b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(
        parts(), media_type=f'multipart/related; type="{negotiated.media_type}"; boundary={boundary}'
    )

"""A result burned into images: Secondary Capture (PS3.3 A.8.1), for viewers that show nothing else.

Each key slice of a result (each segment's largest cross-section, each finding's slice) becomes one RGB image:
the slice in its window, the outlines and boxes burned in, a legend, and a banner saying that it is not for
diagnostic use.  Burned-in pixels cannot be switched off, so these images are a last resort and say so.
"""

from __future__ import annotations

import math

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from ..inference.volume import Volume
from .marks import Drawing, display_window
from .seg import copy_body_part
from .uids import name_uid

BANNER = "NOT FOR DIAGNOSTIC USE"
# Small images are enlarged (nearest neighbour, whole factors) to at least this many pixels across, so the
# legend and banner are legible and the lines thin next to the anatomy.
_MIN_WIDTH = 512
_BANNER_COLOUR = (255, 255, 0)


def build_secondary_captures(
    volume: Volume,
    drawing: Drawing,
    *,
    series_number: int,
    series_instance_uid: str,
    manufacturer: str,
    software_version: str,
    model_name: str,
) -> list[hd.sc.SCImage]:
    """One Secondary Capture per key slice of `drawing`, in slice order, numbered 1, 2, ...; SOP Instance UIDs
    derived from the series UID and the source image, so a re-run writes the same objects."""
    images = []
    scale = max(1, math.ceil(_MIN_WIDTH / volume.shape[2]))
    orientation = _patient_orientation(volume)
    for number, k in enumerate(sorted(drawing.key_slices), start=1):
        frame = volume.frames[k]
        source = next(s for s in volume.sources if s.SOPInstanceUID == frame.sop_instance_uid)
        pixels = _render(volume, drawing, k, scale, f"{model_name} ({manufacturer} {software_version})")
        row_mm, column_mm = volume.spacing[1], volume.spacing[0]
        image = hd.sc.SCImage(
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            study_instance_uid=volume.study_instance_uid,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=name_uid("secondary-capture", series_instance_uid, frame.sop_instance_uid,
                                      str(frame.frame_number or 0)),
            instance_number=number,
            manufacturer=manufacturer,
            patient_id=source.get("PatientID"),
            patient_name=source.get("PatientName"),
            patient_birth_date=source.get("PatientBirthDate"),
            patient_sex=source.get("PatientSex") or None,
            accession_number=source.get("AccessionNumber"),
            study_id=source.get("StudyID"),
            study_date=source.get("StudyDate"),
            study_time=source.get("StudyTime"),
            referring_physician_name=source.get("ReferringPhysicianName"),
            pixel_spacing=(row_mm / scale, column_mm / scale),
            patient_orientation=(orientation[0][0], orientation[1][0]),  # highdicom takes one letter each
        )
        image.PatientOrientation = list(orientation)
        copy_body_part(image, source)
        image.BurnedInAnnotation = "YES"
        image.SeriesDescription = f"{model_name} key images, not for diagnostic use"[:64]
        image.DerivationDescription = f"{source.get('Modality', '')} image with {model_name} results burned in"[:1024]
        image.ImageComments = BANNER
        image.SourceImageSequence = DicomSequence([_reference(frame.sop_class_uid, frame.sop_instance_uid,
                                                              frame.frame_number)])
        images.append(image)
    return images


def _render(volume: Volume, drawing: Drawing, k: int, scale: int, credit: str) -> np.ndarray:
    """Slice k in its window, enlarged by `scale`, with its marks, the legend and the banner: (rows, columns, 3)."""
    low, high = _window(volume)
    grey = np.clip((volume.pixels[k] - low) / (high - low) * 255.0, 0, 255).astype(np.uint8)
    image = Image.fromarray(grey).resize((grey.shape[1] * scale, grey.shape[0] * scale), Image.NEAREST).convert("RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, image.width // 40))
    width = max(1, scale // 2)
    shown = sorted({mark.layer for mark in drawing.marks if mark.slice_index == k})
    for mark in drawing.marks:
        if mark.slice_index != k:
            continue
        colour = drawing.layers[mark.layer].colour
        # PIL draws at pixel indices: an edge between pixels n - 1 and n lies at n * scale - 0.5 once enlarged.
        draw.line([(float(x) * scale - 0.5, float(y) * scale - 0.5) for x, y in mark.polyline], fill=colour,
                  width=width)
        if mark.text:
            anchor = (float(mark.polyline[:, 0].max()) * scale + 4, float(mark.polyline[:, 1].min()) * scale)
            draw.text(anchor, mark.text, fill=colour, font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    line_height = font.size + 6
    for row, layer in enumerate(shown):
        top = 6 + row * line_height
        colour = drawing.layers[layer].colour
        draw.rectangle([6, top, 6 + font.size, top + font.size], fill=colour)
        draw.text((12 + font.size, top), drawing.layers[layer].legend, fill=(255, 255, 255), font=font,
                  stroke_width=2, stroke_fill=(0, 0, 0))
    banner = f"{BANNER} - {credit}"
    draw.rectangle([0, image.height - line_height - 6, image.width, image.height], fill=(0, 0, 0))
    draw.text((6, image.height - line_height - 2), banner, fill=_BANNER_COLOUR, font=font)
    return np.asarray(image)


def _window(volume: Volume) -> tuple[float, float]:
    """(low, high) of the display window (`marks.display_window`), else the slice range."""
    window = display_window(volume)
    if window is None:
        low, high = float(volume.pixels.min()), float(volume.pixels.max())
        return low, max(high, low + 1.0)
    centre, width = window
    return centre - width / 2, centre + width / 2


def _patient_orientation(volume: Volume) -> tuple[str, str]:
    """Patient Orientation (PS3.3 C.7.6.1.1.1): the patient direction along the rows and down the columns, each
    the letters (L/R, P/A, H/F for LPS +x, +y, +z) of the direction cosine's components, the largest first, those
    under 0.25 left out: "L\\P" axial, "LF\\P" for a row tilted towards the feet."""
    letters = (("R", "L"), ("A", "P"), ("F", "H"))
    directions = []
    for axis in (0, 1):
        cosine = volume.affine[:3, axis] / np.linalg.norm(volume.affine[:3, axis])
        order = sorted(range(3), key=lambda component: -abs(cosine[component]))
        directions.append("".join(letters[c][int(cosine[c] > 0)] for c in order if abs(cosine[c]) >= 0.25))
    return directions[0], directions[1]


def _reference(sop_class_uid: str, sop_instance_uid: str, frame_number: int | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    if frame_number is not None:
        item.ReferencedFrameNumber = frame_number
    return item

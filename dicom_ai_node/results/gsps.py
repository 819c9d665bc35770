"""A result drawn as a Grayscale Softcopy Presentation State (PS3.3 A.33.1), for viewers that show no SEG.

Most PACS viewers apply a presentation state to the images it references: the outlines and boxes appear over
the original images, one graphic layer per segment or type of finding in its colour, and the reader can switch
the presentation state off.  It changes no pixel.
"""

from __future__ import annotations

import re
from collections import defaultdict

import highdicom as hd
from pydicom.dataset import Dataset

from ..inference.volume import Volume
from .marks import Drawing, display_window
from .seg import copy_body_part, with_patient_and_study


def build_gsps(
    volume: Volume,
    drawing: Drawing,
    *,
    series_number: int,
    series_instance_uid: str,
    sop_instance_uid: str,
    manufacturer: str,
    software_version: str,
    device_serial_number: str,
    model_name: str,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """One presentation state for the whole series: every mark of `drawing` on the image (or frame) its slice came
    from, in its layer; the images' own window (or a soft-tissue window for a CT without one), so the images look
    as they do without it."""
    sources = _sources_by_uid(volume)
    layers = [
        hd.pr.GraphicLayer(
            layer_name=_layer_name(layer.name, index),
            order=index + 1,
            description=layer.legend[:64],
            display_color=hd.color.CIELabColor.from_rgb(*layer.colour),
        )
        for index, layer in enumerate(drawing.layers)
    ]
    by_image: dict[tuple[int, int], list] = defaultdict(list)
    for mark in drawing.marks:
        by_image[(mark.slice_index, mark.layer)].append(mark)
    annotations = []
    for (k, layer), marks in sorted(by_image.items()):
        frame = volume.frames[k]
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[sources[frame.sop_instance_uid]],
                graphic_layer=layers[layer],
                referenced_frame_number=frame.frame_number,
                graphic_objects=[
                    hd.pr.GraphicObject(
                        hd.pr.GraphicTypeValues.POLYLINE, mark.polyline, hd.pr.AnnotationUnitsValues.PIXEL
                    )
                    for mark in marks
                ],
                text_objects=[
                    hd.pr.TextObject(
                        mark.text,
                        hd.pr.AnnotationUnitsValues.PIXEL,
                        anchor_point=(float(mark.polyline[:, 0].max()), float(mark.polyline[:, 1].min())),
                        anchor_point_visible=False,
                        text_justification=hd.pr.TextJustificationValues.LEFT,
                    )
                    for mark in marks
                    if mark.text
                ]
                or None,
            )
        )
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=list(sources.values()),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=model_name[:64],
        software_versions=software_version,
        device_serial_number=device_serial_number,
        content_label="AI_RESULT",
        content_description=f"{model_name} results, not for diagnostic use"[:64],
        graphic_layers=layers,
        graphic_annotations=annotations,
        voi_lut_transformations=_window(volume),
    )
    copy_body_part(gsps, volume.sources[0])
    return gsps


def _sources_by_uid(volume: Volume) -> dict[str, Dataset]:
    """The source images by SOP Instance UID, the first with its absent Type 2 patient and study attributes empty
    (highdicom copies them from it)."""
    sources = {source.SOPInstanceUID: source for source in volume.sources}
    first = next(iter(sources))
    sources[first] = with_patient_and_study(sources[first])
    return sources


def _layer_name(name: str, index: int) -> str:
    """A Graphic Layer (CS, 16 characters: upper case letters, digits, space, underscore), unique by its index."""
    cleaned = re.sub(r"[^A-Z0-9 _]", "_", name.upper()).strip() or "LAYER"
    return f"{cleaned[:12]}_{index + 1}"


def _window(volume: Volume) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    window = display_window(volume)
    if window is None:
        return None
    return [hd.pr.SoftcopyVOILUTTransformation(window_center=window[0], window_width=window[1])]

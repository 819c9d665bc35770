"""Synthetic CT phantom with analytically known anatomy.

Used by the tests, the benchmarks and the demo: nothing is downloaded, and the
volumes of the structures are known exactly, so segmentation results can be
checked against ground truth.  Shapes are defined in patient (LPS) coordinates,
so any slice orientation, spacing or patient position samples the same object.

NOT patient data and not anatomically faithful; a geometry test object.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

# Hounsfield units of the phantom's materials.
HU_AIR = -1000
HU_SOFT_TISSUE = 40
HU_LUNG = -850
HU_BONE = 700
HU_NODULE = 40  # a solid nodule: soft tissue in the lung
HU_CONTRAST_BLOOD = 250  # blood in the aorta in an arterial phase with iodinated contrast (unenhanced: soft tissue)
RESCALE_INTERCEPT = -1024

_IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1447.1"  # dicom-ai-node test data

# Axial orientation of a feet-first scan: the image's rows run towards the patient's right.
FEET_FIRST_AXIAL = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def oblique_orientation(degrees_about_y: float) -> tuple[float, ...]:
    """ImageOrientationPatient of axial planes rotated about the patient's y axis, rounded to fit a DS."""
    angle = math.radians(degrees_about_y)
    row = (math.cos(angle), 0.0, -math.sin(angle))
    return tuple(round(v, 10) for v in (*row, 0.0, 1.0, 0.0))


@dataclass(frozen=True)
class PhantomGeometry:
    """Where the phantom's structures are, in millimetres (patient LPS frame)."""

    body_semi_axes: tuple[float, float] = (160.0, 110.0)  # elliptic cylinder along z
    lung_centres_x: tuple[float, float] = (-70.0, 70.0)
    lung_centre_y: float = -5.0
    lung_semi_axes: tuple[float, float, float] = (45.0, 60.0, 80.0)
    spine_centre: tuple[float, float] = (0.0, 75.0)  # posterior is +y in LPS
    spine_radius: float = 15.0
    aorta_centre: tuple[float, float] = (0.0, 35.0)  # between the lungs, in front of the spine
    aorta_radius: float = 12.0
    contrast: bool = False  # blood in the aorta at HU_CONTRAST_BLOOD instead of soft tissue
    # Solid nodules in the lungs: (x, y, z, radius) in mm, z from the lungs' centre like the lungs' own.
    nodules: tuple[tuple[float, float, float, float], ...] = ()

    def label_at(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, z_centre: float) -> np.ndarray:
        """HU value of each patient-space point (arrays broadcast together)."""
        ax, by = self.body_semi_axes
        hu = np.full(np.broadcast(x, y, z).shape, HU_AIR, dtype=np.int16)
        body = (x / ax) ** 2 + (y / by) ** 2 <= 1.0
        hu[body] = HU_SOFT_TISSUE
        la, lb, lc = self.lung_semi_axes
        dz = np.broadcast_to(z - z_centre, hu.shape)
        for cx in self.lung_centres_x:
            lung = ((x - cx) / la) ** 2 + ((y - self.lung_centre_y) / lb) ** 2 + (dz / lc) ** 2 <= 1.0
            hu[lung] = HU_LUNG
        for nx, ny, nz, radius in self.nodules:
            hu[(x - nx) ** 2 + (y - ny) ** 2 + (dz - nz) ** 2 <= radius**2] = HU_NODULE
        if self.contrast:
            aorta_x, aorta_y = self.aorta_centre
            aorta = (x - aorta_x) ** 2 + (y - aorta_y) ** 2 <= self.aorta_radius**2
            hu[np.broadcast_to(aorta, hu.shape)] = HU_CONTRAST_BLOOD
        sx, sy = self.spine_centre
        spine = (x - sx) ** 2 + (y - sy) ** 2 <= self.spine_radius**2
        hu[np.broadcast_to(spine, hu.shape)] = HU_BONE
        return hu

    def analytic_volumes_ml(self, scan_length_mm: float) -> dict[str, float]:
        """Exact volumes (mL) of each structure within a scan of the given length (lungs: their air, without the
        nodules in them)."""
        ax, by = self.body_semi_axes
        la, lb, lc = self.lung_semi_axes
        lungs = 2 * (4.0 / 3.0) * math.pi * la * lb * lc - sum((4.0 / 3.0) * math.pi * r**3 for *_, r in self.nodules)
        bone = math.pi * self.spine_radius**2 * scan_length_mm
        body = math.pi * ax * by * scan_length_mm
        return {"body": body / 1000.0, "lungs": lungs / 1000.0, "bone": bone / 1000.0}


@dataclass
class CTPhantom:
    """A CT series description; `datasets()` renders it slice by slice."""

    slices: int = 200
    rows: int = 512
    columns: int = 512
    pixel_spacing: tuple[float, float] = (0.7, 0.7)  # (between rows, between columns)
    slice_spacing: float = 1.25
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    patient_position: str = "HFS"
    geometry: PhantomGeometry = field(default_factory=PhantomGeometry)
    patient_id: str = "PHANTOM-001"
    patient_name: str = "Phantom^CT"
    accession_number: str = "ACC0001"
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    series_number: int = 1
    noise_hu: float = 0.0
    seed: int = 0
    lung_z_centre: float = 0.0  # move the lungs off the stack centre so head and feet differ
    gantry_tilt_deg: float = 0.0  # slices step along z and y while the orientation stays as given
    # Series of one session share one (MR sequences of one exam); None: one of its own, derived from the series
    frame_of_reference_uid: str | None = None

    @classmethod
    def feet_first(cls, **kwargs) -> CTPhantom:
        """A feet-first supine scan: FFS, rows towards the patient's right, slice 1 nearest the head."""
        return cls(patient_position="FFS", orientation=FEET_FIRST_AXIAL, **kwargs)

    @property
    def normal(self) -> np.ndarray:
        row = np.array(self.orientation[:3])
        col = np.array(self.orientation[3:])
        return np.cross(row, col)

    @property
    def scan_length_mm(self) -> float:
        return self.slices * self.slice_spacing

    def slice_origin(self, index: int) -> np.ndarray:
        """ImagePositionPatient of slice `index`, the stack centred on the origin."""
        row = np.array(self.orientation[:3])
        col = np.array(self.orientation[3:])
        half_w = (self.columns - 1) / 2 * self.pixel_spacing[1]
        half_h = (self.rows - 1) / 2 * self.pixel_spacing[0]
        offset = (index - (self.slices - 1) / 2) * self.slice_spacing
        tilt_shift = offset * math.tan(math.radians(self.gantry_tilt_deg)) * col
        return -half_w * row - half_h * col + offset * self.normal + tilt_shift

    def hu_at(self, points_lps: np.ndarray) -> np.ndarray:
        """Noise-free HU at patient points of shape (..., 3): the ground truth a loaded volume must match."""
        points = np.asarray(points_lps, dtype=np.float64)
        return self.geometry.label_at(points[..., 0], points[..., 1], points[..., 2], z_centre=self.lung_z_centre)

    def slice_hu(self, index: int) -> np.ndarray:
        row = np.array(self.orientation[:3])
        col = np.array(self.orientation[3:])
        origin = self.slice_origin(index)
        c = np.arange(self.columns) * self.pixel_spacing[1]
        r = np.arange(self.rows) * self.pixel_spacing[0]
        pts = origin[None, None, :] + c[None, :, None] * row + r[:, None, None] * col
        hu = self.hu_at(pts)
        if self.noise_hu:
            rng = np.random.default_rng(self.seed + index)
            hu = hu + rng.normal(0, self.noise_hu, hu.shape).round().astype(np.int16)
        return hu

    def stored_values(self, index: int) -> np.ndarray:
        """Slice `index` as stored pixel values (12 bits in 16, intercept -1024)."""
        return (self.slice_hu(index).astype(np.int32) - RESCALE_INTERCEPT).clip(0, 4095).astype(np.uint16)

    def dataset(self, index: int) -> Dataset:
        stored = self.stored_values(index)
        sop_uid = generate_uid()
        ds = _base_dataset(self, sop_uid)
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = _position_ds(self.slice_origin(index))
        ds.SliceLocation = round(float(np.dot(self.slice_origin(index), self.normal)), 4)
        ds.PixelData = stored.tobytes()
        return ds

    def datasets(self):
        for index in range(self.slices):
            yield self.dataset(index)

    def write(self, folder: Path) -> list[Path]:
        """Write the series as Part 10 files, one per slice; returns the paths."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, ds in enumerate(self.datasets()):
            path = folder / f"CT{index + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths

    def enhanced_dataset(self, frame_order: Sequence[int] | None = None) -> Dataset:
        """The series as one Enhanced CT Image Storage instance; frame n holds slice frame_order[n].

        The default order is slice order; a shuffled order checks that readers sort frames by position.
        """
        order = list(range(self.slices)) if frame_order is None else list(frame_order)
        sop_uid = generate_uid()
        ds = _common_dataset(self, EnhancedCTImageStorage, sop_uid)
        ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]  # synthesised, not acquired
        ds.InstanceNumber = 1
        ds.ContentQualification = "RESEARCH"
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.PresentationLUTShape = "IDENTITY"
        ds.PixelPresentation = "MONOCHROME"
        ds.VolumetricProperties = "VOLUME"
        ds.VolumeBasedCalculationTechnique = "NONE"
        ds.AcquisitionContextSequence = DicomSequence()
        ds.ManufacturerModelName = "Phantom"
        ds.DeviceSerialNumber = "0"
        ds.SoftwareVersions = "1"
        ds.NumberOfFrames = len(order)
        _set_pixel_module(ds, self)

        dimension_uid = generate_uid(entropy_srcs=[sop_uid, "dimensions"])
        ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=dimension_uid)]
        ds.DimensionOrganizationType = "3D"
        ds.DimensionIndexSequence = [
            _item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=keyword,
                FunctionalGroupPointer="FrameContentSequence",
                DimensionDescriptionLabel=label,
            )
            for keyword, label in (("StackID", "Stack"), ("InStackPositionNumber", "Position in stack"))
        ]

        shared = _item(
            PixelMeasuresSequence=[_item(PixelSpacing=list(self.pixel_spacing), SliceThickness=self.slice_spacing)],
            PlaneOrientationSequence=[_item(ImageOrientationPatient=_orientation_ds(self.orientation))],
            PixelValueTransformationSequence=[
                _item(RescaleIntercept=RESCALE_INTERCEPT, RescaleSlope=1, RescaleType="HU")
            ],
            FrameVOILUTSequence=[_item(WindowCenter=40, WindowWidth=400)],
            FrameAnatomySequence=[
                _item(
                    AnatomicRegionSequence=[
                        _item(CodeValue="51185008", CodingSchemeDesignator="SCT", CodeMeaning="Chest")
                    ],
                    FrameLaterality="U",
                )
            ],
            IrradiationEventIdentificationSequence=[
                _item(IrradiationEventUID=generate_uid(entropy_srcs=[self.series_uid, "irradiation"]))
            ],
            CTImageFrameTypeSequence=[
                _item(
                    FrameType=list(ds.ImageType),
                    PixelPresentation="MONOCHROME",
                    VolumetricProperties="VOLUME",
                    VolumeBasedCalculationTechnique="NONE",
                )
            ],
        )
        ds.SharedFunctionalGroupsSequence = [shared]
        ds.PerFrameFunctionalGroupsSequence = [
            _item(
                FrameContentSequence=[
                    _item(StackID="1", InStackPositionNumber=index + 1, DimensionIndexValues=[1, index + 1])
                ],
                PlanePositionSequence=[_item(ImagePositionPatient=_position_ds(self.slice_origin(index)))],
            )
            for index in order
        ]
        ds.PixelData = np.stack([self.stored_values(index) for index in order]).tobytes()
        return ds

    def write_multiframe(self, path: Path, frame_order: Sequence[int] | None = None) -> Path:
        """Write `enhanced_dataset(frame_order)` as a Part 10 file; returns the path."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.enhanced_dataset(frame_order).save_as(path, enforce_file_format=True)
        return path


def _item(**attributes) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _position_ds(position: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in position]


def _orientation_ds(orientation: Sequence[float]) -> list[float]:
    """Direction cosines rounded so that each fits the 16 characters of a DS."""
    return [round(float(v), 10) for v in orientation]


def _common_dataset(phantom: CTPhantom, sop_class_uid: str, sop_uid: str) -> Dataset:
    """Patient, study, series, equipment and frame of reference: what single- and multi-frame share."""
    now = _dt.datetime(2026, 1, 15, 10, 30, 0)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.SeriesDate = ds.StudyDate
    ds.ContentDate = ds.StudyDate
    ds.StudyTime = now.strftime("%H%M%S")
    ds.SeriesTime = ds.StudyTime
    ds.ContentTime = ds.StudyTime
    ds.AccessionNumber = phantom.accession_number
    ds.Modality = "CT"
    ds.Manufacturer = "dicom-ai-node synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic CT phantom"
    ds.SeriesDescription = "Phantom axial"
    ds.PatientName = phantom.patient_name
    ds.PatientID = phantom.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = phantom.patient_position
    ds.StudyInstanceUID = phantom.study_uid
    ds.SeriesInstanceUID = phantom.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = phantom.series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = phantom.frame_of_reference_uid or generate_uid(entropy_srcs=[phantom.series_uid, "FoR"])
    ds.PositionReferenceIndicator = ""
    return ds


def _set_pixel_module(ds: Dataset, phantom: CTPhantom) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = phantom.rows
    ds.Columns = phantom.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0


def _base_dataset(phantom: CTPhantom, sop_uid: str) -> Dataset:
    ds = _common_dataset(phantom, CTImageStorage, sop_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = phantom.slice_spacing
    ds.KVP = 120
    if phantom.gantry_tilt_deg:
        ds.GantryDetectorTilt = phantom.gantry_tilt_deg
    ds.ImageOrientationPatient = _orientation_ds(phantom.orientation)
    _set_pixel_module(ds, phantom)
    ds.PixelSpacing = list(phantom.pixel_spacing)
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    return ds

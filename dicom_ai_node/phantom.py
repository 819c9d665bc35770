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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# Hounsfield units of the phantom's materials.
HU_AIR = -1000
HU_SOFT_TISSUE = 40
HU_LUNG = -850
HU_BONE = 700
RESCALE_INTERCEPT = -1024

_IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1447.1"  # dicom-ai-node test data


@dataclass(frozen=True)
class PhantomGeometry:
    """Where the phantom's structures are, in millimetres (patient LPS frame)."""

    body_semi_axes: tuple[float, float] = (160.0, 110.0)  # elliptic cylinder along z
    lung_centres_x: tuple[float, float] = (-70.0, 70.0)
    lung_centre_y: float = -5.0
    lung_semi_axes: tuple[float, float, float] = (45.0, 60.0, 80.0)
    spine_centre: tuple[float, float] = (0.0, 75.0)  # posterior is +y in LPS
    spine_radius: float = 15.0

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
        sx, sy = self.spine_centre
        spine = (x - sx) ** 2 + (y - sy) ** 2 <= self.spine_radius**2
        hu[np.broadcast_to(spine, hu.shape)] = HU_BONE
        return hu

    def analytic_volumes_ml(self, scan_length_mm: float) -> dict[str, float]:
        """Exact volumes (mL) of each structure within a scan of the given length."""
        ax, by = self.body_semi_axes
        la, lb, lc = self.lung_semi_axes
        lungs = 2 * (4.0 / 3.0) * math.pi * la * lb * lc
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
        return -half_w * row - half_h * col + offset * self.normal

    def slice_hu(self, index: int) -> np.ndarray:
        row = np.array(self.orientation[:3])
        col = np.array(self.orientation[3:])
        origin = self.slice_origin(index)
        c = np.arange(self.columns) * self.pixel_spacing[1]
        r = np.arange(self.rows) * self.pixel_spacing[0]
        pts = origin[None, None, :] + c[None, :, None] * row + r[:, None, None] * col
        hu = self.geometry.label_at(pts[..., 0], pts[..., 1], pts[..., 2], z_centre=0.0)
        if self.noise_hu:
            rng = np.random.default_rng(self.seed + index)
            hu = hu + rng.normal(0, self.noise_hu, hu.shape).round().astype(np.int16)
        return hu

    def dataset(self, index: int) -> Dataset:
        stored = (self.slice_hu(index).astype(np.int32) - RESCALE_INTERCEPT).clip(0, 4095)
        sop_uid = generate_uid()
        ds = _base_dataset(self, sop_uid)
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in self.slice_origin(index)]
        ds.SliceLocation = round(float(np.dot(self.slice_origin(index), self.normal)), 4)
        ds.PixelData = stored.astype(np.uint16).tobytes()
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


def _base_dataset(phantom: CTPhantom, sop_uid: str) -> Dataset:
    now = _dt.datetime(2026, 1, 15, 10, 30, 0)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
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
    ds.SliceThickness = phantom.slice_spacing
    ds.KVP = 120
    ds.PatientPosition = phantom.patient_position
    ds.StudyInstanceUID = phantom.study_uid
    ds.SeriesInstanceUID = phantom.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = phantom.series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = list(phantom.orientation)
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[phantom.series_uid, "FoR"])
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = phantom.rows
    ds.Columns = phantom.columns
    ds.PixelSpacing = list(phantom.pixel_spacing)
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    return ds

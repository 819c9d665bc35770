"""Synthetic MR phantom: the CT phantom's shapes with T1-like MR contrast, as MR Image Storage.

The anatomy is the CT phantom's (same PhantomGeometry, same patient-space definition), so an MR
model's output can be checked against the same analytic ground truth; only the signal differs:
dark lungs and air, bright soft tissue, Rician noise and an optional smooth bias field, which is
what makes MR harder than CT for a fixed threshold and why the demo bundle learns instead.

NOT patient data and not a physical MR simulation; a geometry test object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage

from dicom_ai_node.inference.volume import SourceFrame, Volume
from dicom_ai_node.phantoms.ct import HU_AIR, HU_BONE, HU_CONTRAST_BLOOD, HU_LUNG, HU_SOFT_TISSUE, CTPhantom

_MAX_STORED = 4095  # 12 bits stored, as the CT phantom's pixel module declares


@dataclass(frozen=True)
class MRContrast:
    """Noise-free signal of each phantom material in stored units (a T1-weighted gradient echo look)."""

    air: float = 0.0
    soft_tissue: float = 800.0
    lung: float = 60.0
    bone: float = 350.0
    enhanced_blood: float = 1600.0  # blood with a gadolinium agent (the geometry's `contrast`): T1 shortened

    def signal(self, hu: np.ndarray) -> np.ndarray:
        """Signal for the CT phantom's material map (its HU values name the materials)."""
        materials = [HU_AIR, HU_SOFT_TISSUE, HU_LUNG, HU_BONE, HU_CONTRAST_BLOOD]
        values = [self.air, self.soft_tissue, self.lung, self.bone, self.enhanced_blood]
        return np.select([hu == m for m in materials], values, default=self.air).astype(np.float64)


@dataclass
class MRPhantom(CTPhantom):
    """An MR series of the CT phantom's object; `noise_hu` is unused (MR noise is `noise_fraction`)."""

    patient_name: str = "Phantom^MR"
    contrast: MRContrast = field(default_factory=MRContrast)
    noise_fraction: float = 0.02  # Rician noise sigma as a fraction of the soft-tissue signal
    bias_per_100mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # linear receive-coil bias along LPS x, y, z
    # The sequence its header declares (PS3.3 C.8.3.1), so routes can tell a T1 from a FLAIR; the signal stays
    # `contrast`'s.  The geometry's `contrast` adds a ContrastBolusAgent.
    series_description: str = "Phantom T1 axial"
    scanning_sequence: str = "GR"
    sequence_variant: str = "SP"
    repetition_time: float = 7.5
    echo_time: float = 3.0
    inversion_time: float | None = None

    def slice_points(self, index: int) -> np.ndarray:
        """Patient (LPS) coordinates of every pixel centre of slice `index`, shape (rows, columns, 3)."""
        row = np.array(self.orientation[:3])
        col = np.array(self.orientation[3:])
        c = np.arange(self.columns) * self.pixel_spacing[1]
        r = np.arange(self.rows) * self.pixel_spacing[0]
        return self.slice_origin(index)[None, None, :] + c[None, :, None] * row + r[:, None, None] * col

    def slice_signal(self, index: int) -> np.ndarray:
        """Slice `index` as MR signal: material contrast x bias field, then Rician noise."""
        points = self.slice_points(index)
        signal = self.contrast.signal(self.hu_at(points))
        signal *= np.clip(1.0 + points @ np.asarray(self.bias_per_100mm) / 100.0, 0.0, None)
        if self.noise_fraction:
            # Magnitude of a complex signal with Gaussian noise on both channels: MR's Rician noise floor.
            sigma = self.noise_fraction * self.contrast.soft_tissue
            rng = np.random.default_rng(self.seed + index)
            signal = np.hypot(signal + rng.normal(0.0, sigma, signal.shape), rng.normal(0.0, sigma, signal.shape))
        return signal

    def stored_values(self, index: int) -> np.ndarray:
        """Slice `index` as stored pixel values (12 bits in 16, no rescale: MR signal is unitless)."""
        return np.rint(self.slice_signal(index)).clip(0, _MAX_STORED).astype(np.uint16)

    def dataset(self, index: int) -> Dataset:
        """Slice `index` as an MR Image Storage instance (the CT phantom's header, made MR)."""
        ds = super().dataset(index)
        ds.SOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.Modality = "MR"
        for keyword in ("KVP", "GantryDetectorTilt", "RescaleIntercept", "RescaleSlope", "RescaleType"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.StudyDescription = "Synthetic MR phantom"
        ds.SeriesDescription = self.series_description
        ds.ScanningSequence = self.scanning_sequence
        ds.SequenceVariant = self.sequence_variant
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.SequenceName = "phantom_t1_gre"
        ds.RepetitionTime = self.repetition_time
        ds.EchoTime = self.echo_time
        if self.inversion_time is not None:
            ds.InversionTime = self.inversion_time
        if self.geometry.contrast:
            ds.ContrastBolusAgent = "Gadobutrol"
        ds.EchoTrainLength = 1
        ds.FlipAngle = 12
        ds.MagneticFieldStrength = 1.5
        ds.ImagingFrequency = 63.87
        ds.ImagedNucleus = "1H"
        ds.SpacingBetweenSlices = self.slice_spacing
        ds.WindowCenter = round(self.contrast.soft_tissue / 2)
        ds.WindowWidth = round(self.contrast.soft_tissue * 1.2)
        return ds

    def enhanced_dataset(self, frame_order: Sequence[int] | None = None) -> Dataset:
        """Not provided: the parent would write Enhanced CT, and Enhanced MR is a different IOD."""
        raise NotImplementedError("MRPhantom writes single-frame MR Image Storage only")

    def write(self, folder: Path) -> list[Path]:
        """Write the series as Part 10 files, one per slice; returns the paths."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, ds in enumerate(self.datasets()):
            path = folder / f"MR{index + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths

    @property
    def affine(self) -> np.ndarray:
        """Voxel (column, row, slice) -> patient LPS mm, as Volume.affine defines it."""
        if self.gantry_tilt_deg:
            raise ValueError("an MR stack has no gantry tilt")
        affine = np.eye(4)
        affine[:3, 0] = np.array(self.orientation[:3]) * self.pixel_spacing[1]
        affine[:3, 1] = np.array(self.orientation[3:]) * self.pixel_spacing[0]
        affine[:3, 2] = self.normal * self.slice_spacing
        affine[:3, 3] = self.slice_origin(0)
        return affine

    def volume(self) -> Volume:
        """The series as the node's Volume, without a round trip through files (tests, training)."""
        datasets = list(self.datasets())
        pixels = np.stack([np.frombuffer(ds.PixelData, np.uint16).reshape(self.rows, self.columns) for ds in datasets])
        for ds in datasets:
            del ds.PixelData
        first = datasets[0]
        return Volume(
            pixels=pixels.astype(np.float32),
            affine=self.affine,
            frames=[SourceFrame(MRImageStorage, str(ds.SOPInstanceUID), None) for ds in datasets],
            sources=datasets,
            frame_of_reference_uid=str(first.FrameOfReferenceUID),
            study_instance_uid=str(first.StudyInstanceUID),
            series_instance_uid=str(first.SeriesInstanceUID),
            modality="MR",
        )

    def lung_mask(self, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        """Analytic lungs on a grid: bool (slices, rows, columns) for a Volume-style LPS affine and shape."""
        slices, rows, columns = shape
        k, j, i = np.meshgrid(np.arange(slices), np.arange(rows), np.arange(columns), indexing="ij")
        points = np.stack([i, j, k, np.ones_like(i)], axis=-1) @ affine.T
        return self.hu_at(points[..., :3]) == HU_LUNG

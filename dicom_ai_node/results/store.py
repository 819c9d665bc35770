"""Writing result objects durably, next to the instances of their study."""

from __future__ import annotations

from io import BytesIO

from pydicom.dataset import Dataset

from dicom_ai_node.store.files import InstanceStore
from dicom_ai_node.values import StoredResult


def store_result(store: InstanceStore, kind: str, dataset: Dataset) -> StoredResult:
    """Write one result; it may use the disk down to the results' floor (raises DiskFull below it)."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    data = buffer.getbuffer()
    relative = store.relative_path(dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID)
    store.write_instance(relative, data, results=True)
    return StoredResult(
        kind=kind,
        sop_class_uid=str(dataset.SOPClassUID),
        sop_instance_uid=str(dataset.SOPInstanceUID),
        series_instance_uid=str(dataset.SeriesInstanceUID),
        study_instance_uid=str(dataset.StudyInstanceUID),
        file_path=relative,
        file_size=len(data),
    )

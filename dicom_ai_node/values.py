"""The small typed values that cross stages: what one stage hands the next.

Stages talk through the database and these values, never through each other's
internals.  Standard library only, and nothing of ours: any stage can import
this module without pulling in another stage.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# --- ingest ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceHeader:
    """The header fields ingest extracts from a dataset for the index and the router."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_description: str | None = None
    modality: str | None = None
    body_part_examined: str | None = None
    series_description: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    image_type: str | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int | None = None
    # QIDO-RS matching keys and return attributes (PS3.18 Tables 10.6.1-5, 10.6.3-x)
    study_id: str | None = None
    referring_physician_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    timezone_offset_from_utc: str | None = None
    specific_character_set: str | None = None
    performed_procedure_step_start_date: str | None = None
    performed_procedure_step_start_time: str | None = None
    # (Scheduled Procedure Step ID, Requested Procedure ID) of each Request Attributes Sequence item
    request_attributes: tuple[tuple[str | None, str | None], ...] = ()
    bits_allocated: int | None = None


@dataclass(frozen=True)
class Sender:
    """Who sent an instance, and by which way in."""

    ae_title: str | None
    host: str | None
    source: str = "dimse"

    def __str__(self) -> str:
        return f"{self.ae_title or '?'}@{self.host or '?'} ({self.source})"


class IngestOutcome(enum.Enum):
    """What recording one received instance in the index did."""

    NEW = "new"
    DUPLICATE = "duplicate"  # same SOP Instance UID already stored: first copy kept
    LATE = "late"  # new instance for a series that had completed: re-opened for re-processing


# --- series completion and routing ------------------------------------------------------------


@dataclass(frozen=True)
class CompletedSeries:
    series_instance_uid: str
    study_instance_uid: str
    modality: str | None
    instances: int
    reprocess: bool


@dataclass(frozen=True)
class SequenceFacts:
    """How a series was acquired, from one instance's header: MR sequence attributes (PS3.3 C.8.3.1), contrast,
    slice thickness and when."""

    scanning_sequence: frozenset[str] = frozenset()
    sequence_variant: frozenset[str] = frozenset()
    echo_time: float | None = None
    repetition_time: float | None = None
    inversion_time: float | None = None
    contrast_agent: str | None = None
    slice_thickness: float | None = None
    acquired: str = ""  # SeriesDate + SeriesTime (else AcquisitionDate + AcquisitionTime), to sort by


@dataclass(frozen=True)
class SeriesFacts:
    """What the router knows about a complete series, from the index."""

    series_instance_uid: str
    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    sop_class_uids: frozenset[str]
    image_types: frozenset[str]
    instances: int
    # From the header of one of its instances: what study routes' roles match and choose by.
    sequence: SequenceFacts = field(default_factory=SequenceFacts)
    series_number: int | None = None


@dataclass(frozen=True)
class RouteDecision:
    """Which models a series goes to and where their results go, decided once when it is routed."""

    route: str | None
    models: tuple[str, ...]
    destinations: tuple[str, ...]
    reason: str
    priority: str = "routine"  # the route's (config.PriorityName)
    notify: tuple[str, ...] = ()  # the webhooks the route notifies


# --- inference and results ------------------------------------------------------------------


@dataclass(frozen=True)
class StoredResult:
    kind: str  # SEG | SR
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    file_path: str
    file_size: int


@dataclass(frozen=True)
class StageTimes:
    load: float | None = None
    inference: float | None = None
    write: float | None = None


@dataclass(frozen=True)
class Found:
    """What a model found in a series, for the job and its event: how many findings (0 is "no findings") and a
    line an admin reads, e.g. "Lungs 1811 mL, Bone 144 mL" or "no findings: Nodule absent"."""

    count: int
    summary: str


# --- delivery -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one delivery attempt tells the retry logic."""

    delivered: bool
    # When not delivered: True if retrying cannot help (SOP class refused, HTTP 400/401/403/404 ...),
    # False for transient failures (connection refused, HTTP 5xx/408/429, Out of Resources ...).
    permanent: bool
    reason: str  # plain words for the admin, e.g. "association rejected (transient): ..."
    remote_status: str | None = None  # e.g. "0xA700", "HTTP 503", "A-ASSOCIATE-RJ 2/3/1"

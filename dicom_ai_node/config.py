"""Configuration: one TOML file, loaded once and validated at start-up.

Unknown keys and bad values stop start-up with a message that names the key
(`dimse.port: Input should be less than or equal to 65535`), because a typo in
a hospital's config must not silently fall back to a default.
Relative paths are resolved against the folder of the config file, so the node
behaves the same whatever directory it is started from: every `Path` field of
every section goes through one validator (`_Section`), defaults included.
Destinations and models are tables of several kinds: one class per kind, chosen
by the table's `kind`, so a key of another kind is an unknown key.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dicom_ai_node.errors import NodeError

CONFIG_ENV = "DICOM_AI_NODE_CONFIG"
DEFAULT_CONFIG = Path("config.toml")

_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # default character repertoire, no backslash
_WEB_CLIENT_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,16}")  # recorded as the sender's "AE title" of STOW-RS instances
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONFIG_FOLDER = "config_folder"  # validation context: the folder relative paths are resolved against


def _check_ae_title(value: str) -> str:
    value = value.strip()
    if not _AE_TITLE.fullmatch(value):
        raise ValueError("an AE title is 1 to 16 printable ASCII characters, no backslash")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


def _check_http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return value


HttpUrl = Annotated[str, AfterValidator(_check_http_url)]


def _in_config_folder(path: Path, info: ValidationInfo) -> Path:
    """`path` resolved against the config file's folder when validating a file (load_config), else as given."""
    folder = (info.context or {}).get(_CONFIG_FOLDER)
    return path if folder is None or path.is_absolute() else folder / path


class _Section(BaseModel):
    """A table of the config file.  Defaults and nested sections are validated too (validate_default,
    revalidate_instances), so that every path, given or default, goes through `_paths_in_config_folder`."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, revalidate_instances="always")

    @field_validator("*")
    @classmethod
    def _paths_in_config_folder(cls, value: object, info: ValidationInfo) -> object:
        return _in_config_folder(value, info) if isinstance(value, Path) else value


class NodeSection(_Section):
    ae_title: AETitle = "AI_NODE"
    # On SIGTERM: stop accepting, let running jobs and sends finish for this long, then exit.
    # Whatever is cut off is re-run or re-sent after the next start (same derived UIDs).
    shutdown_grace_seconds: float = Field(30.0, ge=0)


class AllowedCaller(_Section):
    """A sender allowed to open associations; `host` pins it to one address, `tls_subject` to a certificate."""

    ae_title: AETitle
    host: str | None = None
    # "CN=ct1.hospital.local" or "CN=ct1,O=Hospital": every attribute given must be in the subject of the
    # client certificate the sender presented on the TLS port (which then needs a client certificate).
    tls_subject: str | None = None

    @field_validator("tls_subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        if value is not None:
            subject_attributes(value)
        return value


def subject_attributes(subject: str) -> frozenset[tuple[str, str]]:
    """("CN", "ct1"), ... of a subject written as in RFC 4514 ("CN=ct1,O=Hospital"); ValueError if it is not."""
    attributes = set()
    for part in re.split(r"(?<!\\),", subject):
        name, equals, value = part.partition("=")
        if not equals or not name.strip() or not value.strip():
            raise ValueError(f"{subject!r} is not a subject such as CN=ct1.hospital.local,O=Hospital")
        attributes.add((name.strip().upper(), value.strip().replace("\\,", ",")))
    return frozenset(attributes)


class DimseTLS(_Section):
    """DICOM TLS (PS3.15 Annex B, BCP 195 profile: TLS 1.2 or newer, forward-secret AEAD ciphers) on its own port."""

    port: int = Field(2762, ge=1, le=65535)  # IANA's dicom-tls port
    cert_file: Path  # the node's certificate (PEM), chain included
    key_file: Path
    ca_file: Path | None = None  # CAs that sign the senders' client certificates
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _ca(self) -> DimseTLS:
        if self.require_client_certificate and self.ca_file is None:
            raise ValueError("require_client_certificate needs ca_file (the CA that signs the senders' certificates)")
        return self


class DimseSection(_Section):
    bind: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    plain: bool = True  # false: only the TLS port ([dimse.tls]) listens
    tls: DimseTLS | None = None
    max_associations: int = Field(10, ge=1, le=1000)
    max_associations_per_host: int = Field(0, ge=0, le=1000)  # 0 = only max_associations applies
    # TCP connections that have not sent an association request yet (idle, slow, or not DICOM at all).
    max_pending_connections: int = Field(32, ge=1, le=1000)
    # Bounds the memory one PDU can take; 0 = unlimited (a peer may then send PDUs of up to 4 GiB).
    max_pdu_size: int = Field(1 << 20, ge=0)
    # Largest dataset one C-STORE may carry; it is held in memory while it arrives.
    max_dataset_mb: int = Field(2048, ge=1, le=1 << 20)
    require_called_ae_title: bool = True
    allowed_callers: list[AllowedCaller] = []
    # A new connection must have sent its whole association request within this time.
    acse_timeout_seconds: float = Field(10.0, gt=0)
    dimse_timeout_seconds: float = Field(60.0, gt=0)
    network_timeout_seconds: float = Field(60.0, gt=0)

    @field_validator("max_pdu_size")
    @classmethod
    def _pdu(cls, value: int) -> int:
        if value and not 4096 <= value < 1 << 32:
            raise ValueError("must be 0 (unlimited) or from 4096 bytes to 4 GiB")
        return value

    @model_validator(mode="after")
    def _listeners(self) -> DimseSection:
        if not self.plain and self.tls is None:
            raise ValueError("plain = false needs [dimse.tls]: the node would not listen at all")
        if self.tls is not None and self.plain and self.tls.port == self.port:
            raise ValueError("tls.port must differ from port (or set plain = false)")
        needs_certificate = [caller.ae_title for caller in self.allowed_callers if caller.tls_subject]
        if needs_certificate and (self.tls is None or self.tls.ca_file is None):
            raise ValueError(
                f"allowed_callers with tls_subject ({', '.join(needs_certificate)}) need [dimse.tls] with ca_file"
            )
        return self


class StorageSection(_Section):
    path: Path = Path("var/storage")
    min_free_mb: int = Field(1024, ge=0)
    # Results (SEG, SR) may fill the disk down to this floor, below min_free_mb, so arrivals never
    # starve the results of what was already received.  Unset: a quarter of min_free_mb.
    results_min_free_mb: int | None = Field(None, ge=0)
    # Largest dataset a Deflated Explicit VR Little Endian instance may inflate to (a few KB can inflate to
    # gigabytes); one whose image description promises less is held to that.
    max_inflated_mb: int = Field(256, ge=1)
    # Store instances of storage SOP classes the standard has retired (e.g. the old Ultrasound Image Storage
    # 1.2.840.10008.5.1.4.1.1.6), and of SOP classes no dictionary knows (private, or newer than the node),
    # by C-STORE and STOW-RS, as a PACS does (Orthanc: UnknownSopClassAccepted).  false: refused as unsupported.
    accept_retired_sop_classes: bool = True
    accept_unknown_sop_classes: bool = True

    @model_validator(mode="after")
    def _results_floor(self) -> StorageSection:
        if self.results_min_free_mb is not None and self.results_min_free_mb > self.min_free_mb:
            raise ValueError(f"results_min_free_mb ({self.results_min_free_mb}) must not be above min_free_mb "
                             f"({self.min_free_mb}): it is the reserve results may use after arrivals stop")
        return self

    @property
    def results_floor_mb(self) -> int:
        """`results_min_free_mb`, or its default: a quarter of `min_free_mb`."""
        return self.min_free_mb // 4 if self.results_min_free_mb is None else self.results_min_free_mb


class DatabaseSection(_Section):
    url: str = "sqlite:///var/dicom-ai-node.sqlite"

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str, info: ValidationInfo) -> str:
        if not value.startswith(("sqlite:///", "postgresql")):
            raise ValueError("must start with sqlite:/// or postgresql:// (postgresql+psycopg://)")
        if value.startswith("sqlite:///"):  # the file's path, as any path field
            return "sqlite:///" + str(_in_config_folder(Path(value.removeprefix("sqlite:///")), info))
        return value


class SeriesSection(_Section):
    stable_seconds: float = Field(60.0, gt=0)
    check_interval_seconds: float = Field(1.0, gt=0, le=60)
    # A series with instances refused for a transient reason (0xA700, 0x0110) waits this long after
    # the last refusal for the sender to re-send them, then completes with what it has (warning event).
    refused_wait_seconds: float = Field(3600.0, gt=0)
    # A quiet series sent by a configured peer (its calling AE title is a [peers] ae_title) is complete only once
    # the node holds as many instances as the peer says it holds for the series (C-FIND,
    # NumberOfSeriesRelatedInstances): it waits this long after its last instance for the rest, then completes
    # with what it has (warning event).  0: quiet alone decides.
    sender_count_wait_seconds: float = Field(600.0, ge=0)


class Peer(_Section):
    """A DICOM node we talk to: `echo`, and `fetch` studies from (a PACS that answers C-FIND and C-MOVE; it must
    know the node's AE title, host and port, as the destination it moves the images to)."""

    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)


class ModelConfig(_Section):
    """A model by name; `kind` says how it is loaded, each kind its own class (build that class, not this one)."""

    kind: str

    device: str = "auto"  # auto = cuda when present, else cpu
    # BINARY SEG (segments may overlap) or LABELMAP (one label per voxel; overlap is an error).
    seg_type: Literal["binary", "labelmap"] = "binary"
    # A segmentation that found nothing (every segment the SEG would hold is empty) is stated in the SR; True
    # also makes and sends the empty SEG.
    seg_when_empty: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value


class BuiltinModelConfig(ModelConfig):
    """A built-in CT model, nothing to load from disk: the tissue segmentation (the default), a lung nodule
    candidate detector or a contrast classifier; demonstrations, not for clinical use."""

    kind: Literal["builtin"] = "builtin"
    model: Literal["ct-tissue", "ct-lung-nodules", "ct-contrast"] = "ct-tissue"


class _ModelFromFile(ModelConfig):
    """A model loaded from `path`, which must exist when the config is read: a node whose model is not
    there must not start and report "ready", to fail at the first series routed to it."""

    path: Path
    mixed_precision: bool = False
    labels: dict[str, str] = {}  # label name -> "SCT:code:meaning" (networks that do not name their channels)
    # What the network returns: "segmentation" (a label per voxel: SEG and SR), "classification" (one
    # probability per class for the whole series: an SR with the answer) or "detection" (boxes or points with a
    # class and a score each: an SR with one finding per box).  Unset: a MONAI bundle's metadata says
    # (network_data_format.outputs of type "probabilities" or format "classes" is a classification, of type
    # "object" a detection), else segmentation.  The classes of a classification or a detection are, in order,
    # its channels or class indices (0, 1, ...), each coded in `labels`.
    output: Literal["segmentation", "classification", "detection"] | None = None
    # What a classification is about or a detection looks for, "SCHEME:code:meaning", e.g. "SCT:7140000:Contrast
    # agent"; a detector of one class looks for that class unless this says otherwise.
    finding: str | None = None
    # A detector's findings scored below this are left out of the report (detectors return many low-scored boxes
    # for their evaluation, e.g. MONAI's lung nodule detector down to 0.02).
    min_score: float = Field(0.5, ge=0.0, le=1.0)
    # For a study route: the roles (its route's `inputs`) the network reads, one input channel each in this order,
    # every role's series resampled onto the first one's grid (results lie on it).  Empty: one series.
    inputs: list[str] = []
    # Roles it can run without (their channel is zeros), when its route processes a study with roles missing.
    optional_inputs: list[str] = []

    @model_validator(mode="after")
    def _optional_inputs(self) -> _ModelFromFile:
        if unknown := [role for role in self.optional_inputs if role not in self.inputs]:
            raise ValueError(f"optional_inputs {unknown} are not among its inputs {self.inputs}")
        if len(set(self.inputs)) != len(self.inputs):
            raise ValueError("inputs name a role twice")
        return self

    @field_validator("path")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        if not value.exists():
            raise ValueError(
                f"{value} does not exist (a relative path is resolved against the folder of the config file)"
            )
        return value


class MonaiBundleConfig(_ModelFromFile):
    """A MONAI bundle directory in Model Zoo layout: its own pre- and postprocessing."""

    kind: Literal["monai_bundle"] = "monai_bundle"
    # Array orientation the network expects, replacing the bundle's Orientationd (older Zoo bundles were
    # trained on LPS arrays); None keeps the bundle's own.
    orientation: Literal["RAS", "LPS"] | None = None

    @field_validator("path")
    @classmethod
    def _directory(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"{value} is not a directory (a MONAI bundle is one)")
        return value


class TorchScriptConfig(_ModelFromFile):
    """A TorchScript file plus the preprocessing it does not carry."""

    kind: Literal["torchscript"] = "torchscript"
    orientation: Literal["RAS", "LPS"] = "RAS"  # array orientation the network was trained on
    target_spacing: tuple[float, float, float] | None = None  # mm along the RAS-oriented axes; None = native grid
    intensity_window: tuple[float, float] | None = None  # clipped and scaled to [0, 1]; None = raw values
    roi_size: tuple[int, int, int] = (96, 96, 96)  # sliding-window patch

    @field_validator("path")
    @classmethod
    def _file(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"{value} is not a file (a TorchScript model is one)")
        return value


AnyModelConfig = Annotated[BuiltinModelConfig | MonaiBundleConfig | TorchScriptConfig, Field(discriminator="kind")]


PriorityName = Literal["stat", "high", "routine", "low"]  # store.models.Priority by name


MsRange = tuple[float, float]  # an inclusive range, low to high


class SeriesRule(_Section):
    """Header conditions a series must meet, each only when set: what a series route and a study route's role
    share."""

    body_part_examined: str | None = None
    series_description: str | None = None  # regular expression, searched case-insensitively
    image_type_contains: str | None = None
    sop_class_uids: list[str] = []
    min_slices: int = Field(1, ge=1)
    # MR sequence attributes (PS3.3 C.8.3.1): ScanningSequence (0018,0020) and SequenceVariant (0018,0021) must
    # hold every code listed (e.g. ["IR"] for an inversion recovery such as FLAIR, ["SE"]); EchoTime,
    # RepetitionTime and InversionTime (0018,0081/0080/0082) must lie in [low, high] ms; `contrast` True wants a
    # ContrastBolusAgent (0018,0010), False wants none.
    scanning_sequence: list[str] = []
    sequence_variant: list[str] = []
    echo_time: MsRange | None = None
    repetition_time: MsRange | None = None
    inversion_time: MsRange | None = None
    contrast: bool | None = None

    @field_validator("series_description")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @field_validator("echo_time", "repetition_time", "inversion_time")
    @classmethod
    def _range(cls, value: MsRange | None) -> MsRange | None:
        if value is not None and value[0] > value[1]:
            raise ValueError("a range is [low, high], low first")
        return value

    @field_validator("scanning_sequence", "sequence_variant")
    @classmethod
    def _codes(cls, value: list[str]) -> list[str]:
        return [code.strip().upper() for code in value]


class RoleConfig(SeriesRule):
    """One series a study route's model reads (T1, FLAIR, the CT of a PET/CT ...).  Its modality is the route's
    unless it names its own; when several series of the study match, `prefer` picks one: the latest acquired
    (a repeated sequence), the one with most slices, or the one with the thinnest slices."""

    modality: str | None = None
    prefer: Literal["latest", "most_slices", "thinnest_slices"] = "latest"


class RouteConfig(SeriesRule):
    """Which series (or studies) go to which models; series routes are tried in order, the first match wins.

    A study route (`unit = "study"`) names the series its models read by role (`inputs`): one job per study and
    model, with the series of every role.  Its conditions apply to every role, each role adds its own."""

    name: str
    modality: str
    unit: Literal["series", "study"] = "series"
    inputs: dict[str, RoleConfig] = {}
    # A study route's roles still missing `study_wait_seconds` after the study's last series completed: "skip"
    # the study (the reason recorded), "process" it without them (only if every model lists them in its
    # optional_inputs) or "wait" for them (said once; a late series is still processed).
    missing_role: Literal["skip", "process", "wait"] = "skip"
    study_wait_seconds: float = Field(600.0, gt=0)
    models: list[str] = Field(min_length=1)
    destinations: list[str] = []
    # How urgent its jobs are (and their results' deliveries): workers take stat, then high, routine, low; the
    # oldest first within each.  `dicom-ai-node prioritize STUDY` overrides it for one study.
    priority: PriorityName = "routine"
    notify: list[str] = []  # names in [webhooks], told when results are delivered or a job fails

    @model_validator(mode="after")
    def _unit(self) -> RouteConfig:
        if self.unit == "study" and not self.inputs:
            raise ValueError("a study route names the series its models read: inputs = { role = { ... } }")
        if self.unit == "series" and self.inputs:
            raise ValueError('inputs are for study routes: add unit = "study"')
        for role in self.inputs:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", role):
                raise ValueError(f"inputs.{role}: role names use letters, digits, '-' and '_'")
        return self


# What a destination may receive, and the kind of result object (`result_objects.kind`) each is.
Output = Literal["seg", "sr", "gsps", "sc"]
OUTPUT_KINDS: dict[str, str] = {"seg": "SEG", "sr": "SR", "gsps": "PR", "sc": "SC"}
DEFAULT_OUTPUTS: tuple[Output, ...] = ("seg", "sr")


class DestinationConfig(_Section):
    """Where results go: a DICOM node (C-STORE), a DICOMweb server (STOW-RS) or Orthanc's REST API; `kind`
    says which, each kind its own class (build that class, not this one)."""

    kind: str

    timeout_seconds: float = Field(60.0, gt=0)
    # Which result objects it receives: SEG and SR by default; "gsps" (presentation states with the outlines,
    # for viewers that show no SEG) and "sc" (secondary captures with outlines burned in, for viewers that show
    # nothing else) are made only for jobs that have a destination asking for them.
    outputs: list[Output] = Field(default_factory=lambda: list(DEFAULT_OUTPUTS), min_length=1)

    @field_validator("outputs")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("names an output twice")
        return value


class DimseDestination(DestinationConfig):
    """C-STORE to a DICOM node, over DICOM TLS with `tls`."""

    kind: Literal["dimse"] = "dimse"
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    tls_ca_file: Path | None = None  # CAs that sign the destination's certificate; None = the system's
    tls_cert_file: Path | None = None  # our client certificate (PEM), for a destination that asks for one
    tls_key_file: Path | None = None  # its key, unless in tls_cert_file

    @model_validator(mode="after")
    def _tls_files(self) -> DimseDestination:
        given = [key for key in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(self, key) is not None]
        if given and not self.tls:
            raise ValueError(f"{', '.join(given)}: not used unless tls = true")
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_key_file needs tls_cert_file")
        return self


class HttpDestination(DestinationConfig):
    """A destination reached over HTTP(S).  Secrets never sit in the config file or on a command line:
    `password_env` / `token_env` name environment variables that hold them."""

    url: HttpUrl
    username: str | None = None
    password_env: str | None = None
    token_env: str | None = None

    @model_validator(mode="after")
    def _credentials(self) -> HttpDestination:
        if self.username and not self.password_env:
            raise ValueError("username needs password_env (the environment variable holding the password)")
        if self.username and self.token_env:
            raise ValueError("use either username + password_env or token_env, not both")
        return self


class DicomwebDestination(HttpDestination):
    """STOW-RS; `url` is the DICOMweb root."""

    kind: Literal["dicomweb"] = "dicomweb"


class OrthancDestination(HttpDestination):
    """Orthanc's REST API; `url` is its base URL."""

    kind: Literal["orthanc"] = "orthanc"
    labels: list[str] = []  # put on the study after upload (Orthanc 1.12 or newer)


AnyDestinationConfig = Annotated[
    DimseDestination | DicomwebDestination | OrthancDestination, Field(discriminator="kind")
]
_ANY_DESTINATION: TypeAdapter[AnyDestinationConfig] = TypeAdapter(AnyDestinationConfig)


def destination_from(data: dict[str, Any]) -> AnyDestinationConfig:
    """The destination of the class `data["kind"]` names, as a [destinations] table of the config file
    builds it (without the config file's folder: relative paths stay as given)."""
    return _ANY_DESTINATION.validate_python(data)


WebhookEvent = Literal["delivered", "failed"]


class WebhookConfig(_Section):
    """An HTTP(S) endpoint told about a route's results in JSON (a RIS, a worklist, a chat bridge): "delivered" once
    every delivery of a job's results is delivered (or the job had none to make), "failed" when a job fails or is
    skipped, or a delivery of its results is dead.  Every call is signed with HMAC-SHA256 under the secret in the
    environment variable `secret_env`, so the receiver can tell the node's calls from anyone's; calls are retried
    like deliveries ([delivery] backoff and give-up window)."""

    url: HttpUrl
    secret_env: str
    on: list[WebhookEvent] = Field(default_factory=lambda: ["delivered", "failed"], min_length=1)
    timeout_seconds: float = Field(10.0, gt=0, le=300)
    # The payload names the study by its UIDs and AccessionNumber, and carries the job's summary and error;
    # PatientID only when this is true.  Point a webhook only at a receiver allowed to hold these.
    include_patient_id: bool = False
    # The payload identifies a study: it travels encrypted (https) unless the receiver is on this host or this
    # is set, on a network the hospital trusts (HMAC signs the body; it does not hide it).
    allow_plain_http: bool = False

    @model_validator(mode="after")
    def _encrypted(self) -> WebhookConfig:
        url = urlsplit(self.url)
        loopback = url.hostname in ("127.0.0.1", "localhost", "::1")
        if url.scheme != "https" and not loopback and not self.allow_plain_http:
            raise ValueError("use an https url: the payload identifies studies (or set allow_plain_http = true "
                             "on a network you trust)")
        return self


class SourceConfig(_Section):
    """A PACS the node pulls from; kind orthanc: Orthanc's change feed, each series once stable.

    Only series a route would send to a model are pulled, and never the node's own SEG
    and SR.  The password sits in the environment variable `password_env` names.
    """

    kind: Literal["orthanc"]
    url: HttpUrl  # base URL of Orthanc's REST API
    username: str | None = None
    password_env: str | None = None
    poll_seconds: float = Field(5.0, gt=0, le=3600)
    batch_size: int = Field(100, ge=1, le=10000)  # changes read per request to /changes
    timeout_seconds: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _credentials(self) -> SourceConfig:
        if self.username and not self.password_env:
            raise ValueError("username needs password_env (the environment variable holding the password)")
        return self


class DeliverySection(_Section):
    # Transient failures (destination down or busy, HTTP 5xx) are retried until this long after the first
    # failed attempt, the last attempt at the end of the window; then the delivery is `dead`.  A fraction
    # is fine (tests use seconds).  Permanent refusals are dead at once.  Either way `retry D<id>` sends again.
    give_up_after_hours: float = Field(24.0, gt=0, le=24 * 366)
    # Exponential backoff with equal jitter: the n-th retry waits between half and all of
    # min(max, initial * 2**(n-1)).
    initial_backoff_seconds: float = Field(5.0, gt=0)
    max_backoff_seconds: float = Field(600.0, gt=0)
    # While a destination fails, one probe per destination (C-ECHO; HTTP HEAD of a DICOMweb root;
    # GET /system of Orthanc) this often: once it answers again, its waiting deliveries go at once
    # instead of sleeping out their backoff.
    probe_seconds: float = Field(10.0, gt=0, le=3600)
    concurrent: int = Field(4, ge=1, le=64)

    @model_validator(mode="before")
    @classmethod
    def _no_attempt_limit(cls, data: object) -> object:
        if isinstance(data, dict) and "max_attempts" in data:
            raise ValueError(
                "max_attempts is gone: deliveries now retry transient failures for a time, "
                "give_up_after_hours (default 24); remove max_attempts"
            )
        return data


class WorkersSection(_Section):
    # Jobs run in worker processes apart from the SCP, so receiving never waits for inference.
    processes: int = Field(1, ge=0, le=64)
    poll_seconds: float = Field(0.5, gt=0, le=60)


class FetchSection(_Section):
    """How studies asked for with `dicom-ai-node fetch` are retrieved (C-MOVE to the node, one study at a time)."""

    # Studies start only within this daily window of the node's local time, "HH:MM-HH:MM" (it may wrap midnight:
    # "22:00-06:00" is nights only), so backfills leave the PACS to the day's work; None: any time.  A study
    # started just before the end is moved to its end.
    window: str | None = None
    # At most this many studies started per hour (0: no limit), however many are queued.
    max_studies_per_hour: int = Field(0, ge=0)
    timeout_seconds: float = Field(3600.0, gt=0)  # one study's whole C-MOVE; then aborted and tried again later

    @field_validator("window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d", value):
            raise ValueError("must be HH:MM-HH:MM, e.g. 22:00-06:00")
        if value is not None and value[:5] == value[6:]:
            raise ValueError("starts and ends at the same time: no fetch would ever start (leave it unset for any "
                             "time)")
        return value


class LoggingSection(_Section):
    level: str = "INFO"
    file: Path | None = None
    # `file` is rotated once it reaches max_mb MiB (dicom-ai-node.log -> .log.1 -> ... -> .log.<backups>,
    # the oldest dropped); the node and its workers share it (logs.SharedRotatingFileHandler).
    # 0 = never rotated by the node (an external logrotate, without copytruncate, may move it away).
    max_mb: int = Field(100, ge=0)
    backups: int = Field(5, ge=1, le=1000)

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return value


class WebClient(_Section):
    """One caller: a bearer token (OHIF, a script) or a basic-auth user named `name`."""

    name: str
    token_sha256: str | None = None  # hex SHA-256 of the bearer token
    token_env: str | None = None  # environment variable holding the bearer token
    password_env: str | None = None  # environment variable holding the basic-auth password of `name`
    write: bool = True  # may store (STOW-RS); read-only clients get 403 there
    # May search and retrieve (QIDO-RS, WADO-RS); false for a sender that only stores, or a Prometheus
    # scraper that only reads /metrics (which any client may).
    read: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _WEB_CLIENT_NAME.fullmatch(value):
            raise ValueError("1 to 16 characters: letters, digits, '_', '.', '@', '-'")
        return value

    @field_validator("token_sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.fullmatch(value.lower()):
            raise ValueError("must be 64 hex digits (sha256sum of the token)")
        return value and value.lower()

    @model_validator(mode="after")
    def _one_credential(self) -> WebClient:
        given = [key for key in ("token_sha256", "token_env", "password_env") if getattr(self, key)]
        if len(given) != 1:
            raise ValueError("give exactly one of token_sha256, token_env, password_env")
        return self


class WebSection(_Section):
    """The DICOMweb server (STOW-RS, QIDO-RS, WADO-RS) and its probes.

    Secrets never sit in the config file in clear: a client's bearer token is given as its SHA-256 (safe to keep
    in a file, since tokens are long and random) or as the name of an environment variable holding it; a
    basic-auth password only through an environment variable.
    """

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # DICOMweb root: OHIF's qidoRoot / wadoRoot / stowRoot is http://host:port{base_path}.
    base_path: str = "/dicom-web"
    clients: list[WebClient] = []
    # Without credentials: reads (QIDO/WADO) and writes (STOW) are refused unless allowed here.
    allow_anonymous_read: bool = False
    allow_anonymous_write: bool = False
    # /metrics names calling AE titles and web clients, so it needs a client's credential unless this is set.
    allow_anonymous_metrics: bool = False
    cors_origins: list[str] = []  # e.g. ["http://localhost:3000"] for an OHIF dev server; "*" = any
    # Largest STOW-RS body, MiB.  Each part is written to a file in storage.path as it arrives, never held in
    # memory, so this bounds disk, not memory: 2 GiB holds a 4000-slice CT series in one request.
    max_request_mb: int = Field(2048, ge=1)
    qido_max_results: int = Field(1000, ge=1, le=100000)  # also the default `limit`
    # HTTPS (TLS 1.2 or newer, BCP 195): the server's certificate (PEM, chain included) and its private key.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # CAs (PEM) that sign client certificates: a client presenting a certificate must have one they signed;
    # with tls_require_client_certificate every client must present one, besides its token or password.
    tls_ca_file: Path | None = None
    tls_require_client_certificate: bool = False

    @field_validator("base_path")
    @classmethod
    def _base(cls, value: str) -> str:
        value = "/" + value.strip("/")
        if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)*/?", value):
            raise ValueError("a URL path such as /dicom-web")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _unique(self) -> WebSection:
        names = [client.name for client in self.clients]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"clients: duplicate name(s) {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _tls(self) -> WebSection:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_ca_file needs tls_cert_file and tls_key_file (HTTPS)")
        if self.tls_require_client_certificate and self.tls_ca_file is None:
            raise ValueError("tls_require_client_certificate needs tls_ca_file (the CA signing client certificates)")
        return self


class Config(_Section):
    node: NodeSection = NodeSection()
    dimse: DimseSection = DimseSection()
    storage: StorageSection = StorageSection()
    database: DatabaseSection = DatabaseSection()
    series: SeriesSection = SeriesSection()
    peers: dict[str, Peer] = {}
    # The built-in models, one per task; only the tissue segmentation is routed by default.
    models: dict[str, AnyModelConfig] = {
        "ct-tissue": BuiltinModelConfig(),
        "ct-lung-nodules": BuiltinModelConfig(model="ct-lung-nodules"),
        "ct-contrast": BuiltinModelConfig(model="ct-contrast"),
    }
    routes: list[RouteConfig] = [RouteConfig(name="ct", modality="CT", min_slices=3, models=["ct-tissue"])]
    workers: WorkersSection = WorkersSection()
    destinations: dict[str, AnyDestinationConfig] = {}
    webhooks: dict[str, WebhookConfig] = {}
    sources: dict[str, SourceConfig] = {}
    fetch: FetchSection = FetchSection()
    delivery: DeliverySection = DeliverySection()
    logging: LoggingSection = LoggingSection()
    web: WebSection = WebSection()
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _names(self) -> Config:
        tables = (("peers", self.peers), ("models", self.models), ("destinations", self.destinations),
                  ("webhooks", self.webhooks), ("sources", self.sources))
        for table, names in tables:
            for name in names:
                if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                    raise ValueError(f"{table}.{name}: names use letters, digits, '-' and '_'")
        for name in self.sources:
            if len(name) > 16:  # pulled instances record it as their sender's AE title
                raise ValueError(f"sources.{name}: at most 16 characters")
        names = [route.name for route in self.routes]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"routes: each route needs its own name ({', '.join(twice)} named twice)")
        for index, route in enumerate(self.routes):
            for model in route.models:
                if model not in self.models:
                    known = ", ".join(sorted(self.models)) or "none"
                    raise ValueError(f"routes.{index}.models: no model named {model!r} in [models] (known: {known})")
            self._check_inputs(index, route)
            for destination in route.destinations:
                if destination != "origin" and destination not in self.destinations:
                    known = ", ".join(sorted(self.destinations)) or "none"
                    raise ValueError(
                        f"routes.{index}.destinations: no destination named {destination!r} in [destinations] "
                        f"(known: origin, {known})"
                    )
            for webhook in route.notify:
                if webhook not in self.webhooks:
                    known = ", ".join(sorted(self.webhooks)) or "none"
                    raise ValueError(f"routes.{index}.notify: no webhook named {webhook!r} in [webhooks] "
                                     f"(known: {known})")
        return self

    def _check_inputs(self, index: int, route: RouteConfig) -> None:
        """A study route's models read its roles, a series route's models one series."""
        for model in route.models:
            inputs = getattr(self.models[model], "inputs", [])
            if route.unit == "series" and inputs:
                raise ValueError(f"routes.{index}.models: {model!r} reads the roles {inputs}: its route needs "
                                 f'unit = "study" and those inputs')
            if route.unit == "study" and not hasattr(self.models[model], "inputs"):
                raise ValueError(f"routes.{index}.models: {model!r} is a built-in model that reads one series; a "
                                 "study route's models are torchscript or monai_bundle models with inputs")
            if route.unit == "study" and set(inputs) != set(route.inputs):
                raise ValueError(f"routes.{index}.models: {model!r} reads the roles {inputs or 'none (one series)'}"
                                 f", the route's inputs are {list(route.inputs)}: set models.{model}.inputs to them "
                                 "in its channel order")
            if route.missing_role == "process" and not getattr(self.models[model], "optional_inputs", []):
                raise ValueError(f'routes.{index}.missing_role: "process" needs models that can run without a role, '
                                 f"and models.{model}.optional_inputs names none (or use \"skip\" or \"wait\")")
            first = next(iter(route.inputs), None)
            if first in getattr(self.models[model], "optional_inputs", []):
                raise ValueError(f"routes.{index}.inputs: its first role {first!r} gives the results their grid: "
                                 f"models.{model}.optional_inputs cannot name it")

    def route(self, name: str) -> RouteConfig | None:
        return next((route for route in self.routes if route.name == name), None)

    def outputs_of(self, destination: str) -> tuple[str, ...]:
        """What a destination named in a route receives; `origin` (the sender) and a destination no longer
        configured receive the defaults."""
        configured = self.destinations.get(destination)
        return tuple(configured.outputs) if configured is not None else DEFAULT_OUTPUTS


class ConfigError(NodeError):
    """The configuration file is missing, unreadable or invalid; the message says where."""


def config_path(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG


def load_config(explicit: Path | None = None) -> Config:
    path = config_path(explicit)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path} (use --config or {CONFIG_ENV})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        config = Config.model_validate(raw, context={_CONFIG_FOLDER: path.resolve().parent})
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid configuration:\n{_describe(exc, raw)}") from None
    return config.model_copy(update={"source": path.resolve()})


def _describe(exc: ValidationError, raw: dict[str, Any]) -> str:
    lines = []
    for error in exc.errors():
        key, kind = _key(error["loc"], raw)
        if error["type"] == "extra_forbidden":
            message = "unknown key" + (f" for kind = {kind!r}" if kind else "")
        elif error["type"] in ("union_tag_not_found", "union_tag_invalid"):
            key = f"{key}.kind"
            expected = error.get("ctx", {}).get("expected_tags")
            message = f"must be one of {expected}" if expected else "Field required"
        else:
            message = error["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {message}" if key else f"  {message}")
    return "\n".join(lines)


def _key(loc: tuple[int | str, ...], raw: object) -> tuple[str, str | None]:
    """The key in the file of an error's location, and the table's kind: pydantic puts the kind in the location
    (destinations.pacs.dimse.url) where the file has none (destinations.pacs.url)."""
    parts: list[str] = []
    kind = None
    for part in loc:
        if isinstance(raw, dict) and part not in raw and raw.get("kind") == part:
            kind = str(part)
            continue
        parts.append(str(part))
        if isinstance(raw, dict):
            raw = raw.get(part)
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            raw = None
    return ".".join(parts), kind

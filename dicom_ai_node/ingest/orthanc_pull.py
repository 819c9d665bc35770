"""Pull from an Orthanc PACS: follow its change feed and take each series Orthanc calls stable.

Pulling needs nothing configured on the PACS side (no auto-routing rule, no modality
entry for the node): the node reads `/changes`, and for every `StableSeries` decides
from Orthanc's tags whether a route would send the series to a model.  Only then are
its files downloaded, each one through the normal ingest path (`Receiver`: checks,
durable write, index), after which completion, routing, inference and delivery run as
for C-STORE.

- Loop prevention: the node's own results (SEG, SR, Manufacturer "dicom-ai-node") are
  never pulled, so delivering results to the same Orthanc cannot feed them back.
- Position in the feed: the sequence number of the last change handled is stored in
  `source_cursors` after each pulled series and at the end of each batch.  A crash
  between an ingest and that write pulls the series again, and instances the index
  already holds are not downloaded again: work may repeat, it is never skipped.
- First start (no cursor yet): the feed is taken up at Orthanc's current last change
  (`/changes?last`), stored at once; the PACS's history is NOT pulled.  Send older
  studies to the node by C-STORE if they should be processed.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from orthanc_api_client import OrthancApiClient
from orthanc_api_client import exceptions as orthanc_errors
from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql, sqlite

from dicom_ai_node.config import Config, SourceConfig
from dicom_ai_node.events import EventKind, Level
from dicom_ai_node.ingest.parse import split_part10
from dicom_ai_node.ingest.receive import OUT_OF_RESOURCES, PROCESSING_FAILURE, Receiver
from dicom_ai_node.routing.rules import choose_route
from dicom_ai_node.store.models import SourceCursor, utcnow
from dicom_ai_node.values import Sender, SeriesFacts

log = logging.getLogger(__name__)

# What the node writes into its result objects (dicom_ai_node.results.objects.MANUFACTURER, which the
# ingest stage does not import: results build on inference and highdicom, which the receiver must not load).
NODE_MANUFACTURER = "dicom-ai-node"
_SEG_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."

_cursors = SourceCursor.__table__


class SourceUnavailable(Exception):
    """Orthanc cannot be asked right now (down, refusing, misconfigured credentials); retried next poll."""


class _RetryLater(Exception):
    """An instance could not be ingested for a reason that may pass (disk full, database down):
    the feed stops before its series, so nothing after it is skipped."""


class _Stopped(Exception):
    """stop() was called in the middle of a series; it is pulled again after the next start."""


@dataclass(frozen=True)
class PollResult:
    changes: int  # changes read from the feed in this batch
    series: int  # series pulled
    instances: int  # instances ingested (already held ones are not downloaded again)
    more: bool  # the feed has more changes waiting right now


def own_result_reason(sop_class_uid: str, manufacturer: str) -> str | None:
    """Why a series must never be pulled because it is (or looks like) the node's own output."""
    if sop_class_uid in _SEG_SOP_CLASSES:
        return "a Segmentation (the node's results are never processed again)"
    if sop_class_uid.startswith(_SR_PREFIX):
        return "a Structured Report (the node's results are never processed again)"
    if manufacturer.strip() == NODE_MANUFACTURER:
        return f"Manufacturer is {NODE_MANUFACTURER!r}: written by this kind of node"
    return None


class OrthancPuller:
    """One `[sources.NAME]` of kind orthanc: `poll_once()` handles a batch; `start()` polls in a thread."""

    def __init__(self, name: str, source: SourceConfig, config: Config, engine: Engine, receiver: Receiver) -> None:
        self.name = name
        self.source = source
        self.routes = config.routes
        self.engine = engine
        self.receiver = receiver
        self.url = source.url.rstrip("/")
        self.sender = Sender(ae_title=name, host=urlsplit(self.url).hostname, source="orthanc")
        self._client: OrthancApiClient | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: str | None = None  # the last failure, so a long outage is reported once

    # -- the feed ---------------------------------------------------------------------------

    def poll_once(self) -> PollResult:
        """Read one batch of changes after the stored cursor and pull the stable series in it."""
        cursor = self.cursor()
        if cursor is None:
            cursor = int(self._get_json("changes", {"last": ""})["Last"])
            self._save_cursor(cursor)
            self.receiver.index.report(
                EventKind.SOURCE_STARTED,
                f"source {self.name} ({self.url}): following new series from Orthanc change {cursor} on; "
                "studies already in the PACS are not pulled",
                logger=log,
            )
        answer = self._get_json("changes", {"since": cursor, "limit": self.source.batch_size})
        handled, series, instances = cursor, 0, 0
        try:
            for change in answer["Changes"]:
                if change["ChangeType"] == "StableSeries":
                    pulled = self._take_series(change["ID"])
                    series += pulled > 0
                    instances += pulled
                    self._save_cursor(change["Seq"])
                handled = change["Seq"]
        except _Stopped:
            return PollResult(len(answer["Changes"]), series, instances, more=False)
        if handled != cursor:
            self._save_cursor(handled)
        return PollResult(len(answer["Changes"]), series, instances, more=not answer["Done"])

    def cursor(self) -> int | None:
        """The sequence number of the last change handled; None before the first start."""
        with self.engine.connect() as connection:
            return connection.execute(select(_cursors.c.last_change).where(_cursors.c.name == self.name)).scalar()

    def _save_cursor(self, last_change: int) -> None:
        insert = (sqlite.insert if self.engine.dialect.name == "sqlite" else postgresql.insert)(_cursors)
        statement = insert.values(name=self.name, last_change=last_change, updated_at=utcnow())
        statement = statement.on_conflict_do_update(
            index_elements=["name"],
            set_={"last_change": statement.excluded.last_change, "updated_at": statement.excluded.updated_at},
        )
        with self.engine.begin() as connection:
            connection.execute(statement)

    # -- one series -------------------------------------------------------------------------

    def _take_series(self, series_id: str) -> int:
        """Pull the series if a route wants it; the number of instances ingested."""
        try:
            instances = self._get_json(f"series/{series_id}/instances")
            if not instances:
                return 0
            tags = self._get_json(f"instances/{instances[0]['ID']}/simplified-tags")
        except orthanc_errors.ResourceNotFound:
            log.info("%s: series %s was deleted from Orthanc before it could be pulled", self.name, series_id)
            return 0
        uid = str(tags.get("SeriesInstanceUID", series_id))
        reason = own_result_reason(str(tags.get("SOPClassUID", "")), str(tags.get("Manufacturer", "")))
        if reason is None:
            decision = choose_route(_facts(tags, len(instances)), self.routes)
            reason = None if decision.route else decision.reason
        if reason is not None:
            log.info("%s: series %s (%s) not pulled: %s", self.name, uid, tags.get("Modality", "?"), reason)
            return 0
        pulled = 0
        for instance in instances:
            if self._stop.is_set():
                raise _Stopped
            sop_instance_uid = instance.get("MainDicomTags", {}).get("SOPInstanceUID")
            if sop_instance_uid and self.receiver.index.stored_series_id(sop_instance_uid) is not None:
                continue  # held already: pulled before a restart, or sent to the node directly too
            pulled += self._ingest(instance["ID"], sop_instance_uid)
        log.info("%s: series %s pulled: %d new instance(s) of %d", self.name, uid, pulled, len(instances))
        return pulled

    def _ingest(self, instance_id: str, sop_instance_uid: str | None) -> int:
        try:
            data = self._get(f"instances/{instance_id}/file").content
        except orthanc_errors.ResourceNotFound:
            return 0  # deleted from Orthanc meanwhile
        try:
            meta = split_part10(data)
        except ValueError as exc:
            log.error("%s: instance %s is not usable: %s", self.name, instance_id, exc)
            return 0
        received = self.receiver.receive(
            data[meta.dataset_offset :], meta.transfer_syntax_uid, lambda: data, self.sender, sop_instance_uid
        )
        if received.status in (OUT_OF_RESOURCES, PROCESSING_FAILURE):
            raise _RetryLater(f"instance {sop_instance_uid or instance_id} not ingested: {received.reason}")
        return int(received.ok)  # any other refusal is final for this file and is in the audit trail

    # -- Orthanc's REST API -----------------------------------------------------------------

    def _client_or_new(self) -> OrthancApiClient:
        if self._client is None:
            password = None
            if self.source.username:
                password = os.environ.get(self.source.password_env or "")
                if password is None:
                    raise SourceUnavailable(f"environment variable {self.source.password_env} (password_env) is not set")
            self._client = OrthancApiClient(self.url, user=self.source.username, pwd=password)
        return self._client

    def _get(self, endpoint: str, params: dict[str, Any] | None = None) -> requests.Response:
        response = self._client_or_new().get(endpoint, params=params, timeout=self.source.timeout_seconds)
        if response is None:  # orthanc_api_client returns None when its own retries run out
            raise SourceUnavailable(f"no answer to GET /{endpoint} from {self.url}")
        return response

    def _get_json(self, endpoint: str, params: dict[str, Any] | None = None) -> Any:
        return self._get(endpoint, params).json()

    # -- the background thread --------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"pull-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        """Stop between instances; a series cut short is pulled again after the next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def _run(self) -> None:
        while not self._stop.is_set():
            more = False
            try:
                more = self.poll_once().more
                self._healthy()
            except Exception as exc:  # Orthanc or the database away: report once, retry every poll
                self._failed(exc)
            if not more:
                self._stop.wait(self.source.poll_seconds)

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, orthanc_errors.NotAuthorized):
            problem = "Orthanc refuses the credentials (check username and password_env)"
        elif isinstance(exc, (orthanc_errors.ConnectionError, orthanc_errors.TimeoutError)):
            problem = f"Orthanc does not answer ({type(exc).__name__})"
        elif isinstance(exc, (SourceUnavailable, _RetryLater)):
            problem = str(exc)
        else:
            problem = f"{type(exc).__name__}: {exc}"
        if problem == self._failing:
            log.debug("%s: still failing: %s", self.name, problem)
            return
        self._failing = problem
        log.error("%s: pulling from %s failed, retrying every %g s: %s", self.name, self.url,
                  self.source.poll_seconds, problem, exc_info=not isinstance(exc, (orthanc_errors.OrthancApiException, SourceUnavailable, _RetryLater)))
        self.receiver.index.record(  # the database may be what failed: `record` never raises
            EventKind.SOURCE_FAILED,
            f"source {self.name} ({self.url}): {problem}; retrying every {self.source.poll_seconds:g} s",
            Level.ERROR,
        )

    def _healthy(self) -> None:
        if self._failing is not None:
            log.info("%s: pulling from %s works again", self.name, self.url)
            self._failing = None


def _facts(tags: dict[str, Any], instances: int) -> SeriesFacts:
    """What the router would know about the series, from its first instance's tags in Orthanc."""
    image_type = tags.get("ImageType")
    return SeriesFacts(
        series_instance_uid=str(tags.get("SeriesInstanceUID", "")),
        modality=tags.get("Modality"),
        body_part_examined=tags.get("BodyPartExamined"),
        series_description=tags.get("SeriesDescription"),
        sop_class_uids=frozenset({str(tags.get("SOPClassUID", ""))}),
        image_types=frozenset({str(image_type)}) if image_type else frozenset(),
        instances=instances,
    )

"""The event catalogue: one vocabulary for the log, the audit trail and the README, and a `report` that never raises."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from sqlalchemy import select, text

from dicom_ai_node.events import EventKind, Level
from dicom_ai_node.store import db
from dicom_ai_node.store.index import Index, insert_event
from dicom_ai_node.store.models import Event

README = Path(__file__).resolve().parent.parent / "README.md"
STUDY = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture
def index(tmp_path) -> Index:
    engine = db.make_engine(f"sqlite:///{tmp_path}/node.sqlite")
    db.upgrade(engine)
    return Index(engine)


def test_report_logs_and_records_the_same_words(index: Index, caplog) -> None:
    logger = logging.getLogger("dicom_ai_node.test")
    with caplog.at_level(logging.INFO, logger="dicom_ai_node"):
        index.report(EventKind.SOURCE_STARTED, "source pacs: following new series", logger=logger,
                     study_instance_uid=STUDY)
    with index.engine.connect() as connection:
        row = connection.execute(select(Event.kind, Event.level, Event.message, Event.study_instance_uid)).one()
    assert tuple(row) == ("source-started", "info", "source pacs: following new series", STUDY)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("dicom_ai_node.test", logging.INFO, "source pacs: following new series")
    ]


def test_report_never_raises_when_the_audit_trail_cannot_be_written(index: Index, caplog) -> None:
    """The decision it reports was already acted on: a database that refuses the row must not undo it."""
    with index.engine.begin() as connection:
        connection.execute(text("DROP TABLE events"))
    with caplog.at_level(logging.WARNING, logger="dicom_ai_node"):
        index.report(EventKind.UNSUPPORTED_SOP_CLASS, "CT1 proposed a SOP class not stored", Level.WARNING,
                     logger=logging.getLogger("dicom_ai_node.test"), calling_ae_title="CT1")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "CT1 proposed a SOP class not stored"
    assert "could not write to the audit trail (unsupported-sop-class): CT1 proposed" in messages[1]


def test_a_kind_outside_the_catalogue_cannot_be_written(index: Index) -> None:
    with index.engine.begin() as connection, pytest.raises(ValueError, match="no-such-kind"):
        insert_event(connection, "no-such-kind", "misspelt")  # type: ignore[arg-type]


def test_jobs_and_deliveries_name_their_end_state() -> None:
    assert EventKind.of_job("skipped") is EventKind.JOB_SKIPPED
    assert EventKind.of_delivery("dead") is EventKind.DELIVERY_DEAD
    with pytest.raises(ValueError):
        EventKind.of_job("queued")  # a job is never reported as queued


def test_every_kind_is_explained_in_the_readme() -> None:
    """An admin reading `dicom-ai-node events` can look every kind up."""
    listed = set(re.findall(r"^\| `([a-z-]+)` \|", README.read_text(), flags=re.MULTILINE))
    assert listed == {kind.value for kind in EventKind}

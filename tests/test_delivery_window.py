"""Deliveries survive a PACS maintenance window (issue 9, items 9 and 10).

Transient failures are retried for `delivery.give_up_after_hours` after the first failed attempt,
not for a number of attempts; while a destination is down one probe per destination asks it every
`delivery.probe_seconds` whether it answers, and once it does its deliveries go at once instead of
sleeping out their backoff; a dead delivery names the command that sends it again; `resend` of a
purged study says why it cannot send anything and what to do instead.  Real Orthanc as the PACS.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest
from conftest import storescu
from orthanc import orthanc_servers
from sqlalchemy import select, update

from dicom_ai_node.config import DeliverySection, DicomwebDestination, DimseDestination, OrthancDestination
from dicom_ai_node.delivery.queue import DeliveryQueue, _queue
from dicom_ai_node.delivery.senders import make_sender
from dicom_ai_node.phantoms import CTPhantom
from dicom_ai_node.store.models import Delivery, Event, Instance, Job, Series, Study, utcnow
from dicom_ai_node.values import DeliveryOutcome

USER, PASSWORD, PASSWORD_ENV = "alice", "s3cret", "TEST_WINDOW_PACS_PASSWORD"


@pytest.fixture
def orthancs(tmp_path):
    with orthanc_servers(tmp_path / "pacs") as make:
        yield make


def _ct(tmp_path, slices: int = 12):
    phantom = CTPhantom(slices=slices, rows=64, columns=64, pixel_spacing=(6.0, 6.0), slice_spacing=10.0)
    return phantom, phantom.write(tmp_path / f"ct-{phantom.series_uid[-6:]}")


def _node(node_factory, destinations: dict, **delivery):
    return node_factory(
        workers={"processes": 1},
        destinations=destinations,
        routes=[{"name": "ct", "modality": "CT", "min_slices": 3, "models": ["ct-tissue"],
                 "destinations": list(destinations)}],
        delivery=delivery,
    )


def _dimse(orthanc, **overrides) -> dict:
    return {"kind": "dimse", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port} | overrides


def _when(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso.removesuffix("Z"))


# --- the probe of each kind of destination --------------------------------------------------------


def test_probe_tells_a_destination_that_answers_from_one_that_is_down(orthancs, monkeypatch):
    """C-ECHO, HTTP HEAD of the DICOMweb root, GET /system: with the destination's credentials.  A server
    that answers at all is up (a wrong password or called AE title is for the send to report)."""
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    pacs = orthancs(users={USER: PASSWORD}, check_called_aet=True)
    auth = {"username": USER, "password_env": PASSWORD_ENV}
    kinds = {
        "dimse": DimseDestination(**_dimse(pacs)),
        "dimse, called AE title unknown": DimseDestination(**_dimse(pacs, ae_title="NOT_ORTHANC")),
        "dicomweb": DicomwebDestination(url=pacs.dicomweb_url, **auth),
        "orthanc": OrthancDestination(url=pacs.url, **auth),
        "orthanc, no credentials (401)": OrthancDestination(url=pacs.url),
    }
    probes = {name: make_sender(name, destination, "AI_NODE") for name, destination in kinds.items()}
    assert {name: sender.probe(5) for name, sender in probes.items()} == dict.fromkeys(kinds, True)
    pacs.stop()
    started = time.monotonic()
    assert {name: sender.probe(5) for name, sender in probes.items()} == dict.fromkeys(kinds, False)
    assert time.monotonic() - started < 5  # a refused connection is cheap
    monkeypatch.delenv(PASSWORD_ENV)
    assert probes["orthanc"].probe(5) is None  # cannot probe without the secret: backoff alone decides


# --- the queue: a time window, not a number of attempts -------------------------------------------


def _job_of_series(connection, study_uid: str, calling_ae_title: str) -> int:
    study_id = connection.execute(Study.__table__.insert().values(study_instance_uid=study_uid)).inserted_primary_key[0]
    series_id = connection.execute(
        Series.__table__.insert().values(series_instance_uid=f"{study_uid}.1", study_id=study_id, state="routed",
                                         reprocess_requested=False, late_instances=0, duplicates_received=0)
    ).inserted_primary_key[0]
    connection.execute(
        Instance.__table__.insert().values(
            sop_instance_uid=f"{study_uid}.1.1", series_id=series_id, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1", file_path="x.dcm", file_size=1,
            calling_ae_title=calling_ae_title, source="dimse",
        )
    )
    return connection.execute(
        Job.__table__.insert().values(series_id=series_id, route="ct", model="ct-tissue", state="done", attempts=1)
    ).inserted_primary_key[0]


def _claim(queue: DeliveryQueue, delivery_id: int):
    with queue.engine.begin() as connection:
        connection.execute(update(Delivery).where(Delivery.id == delivery_id).values(next_attempt_at=utcnow()))
    (claimed,) = [d for d in queue.claim_due(10) if d.id == delivery_id]
    return claimed


def _row(queue: DeliveryQueue, delivery_id: int):
    with queue.engine.connect() as connection:
        return connection.execute(select(Delivery.__table__).where(Delivery.id == delivery_id)).one()


def test_give_up_is_time_based_capped_at_the_window_and_names_the_retry_command(engine, tmp_path):
    down = DeliveryOutcome(False, False, "cannot connect to PACS@127.0.0.1:104: connection refused")
    queue = DeliveryQueue(engine, tmp_path, DeliverySection(give_up_after_hours=60 / 3600, initial_backoff_seconds=5,
                                                            max_backoff_seconds=600))
    with engine.begin() as connection:
        _queue(connection, _job_of_series(connection, "1.2.3.1", "CT1"), "pacs")
    (claimed,) = queue.claim_due(10)
    delivery_id = claimed.id

    # Many failures inside the window: still failing, never dead, whatever the number of attempts.
    for attempt in range(1, 21):
        assert claimed.attempt == attempt
        assert queue.record(claimed, down).value == "failed", attempt
        if attempt < 20:
            claimed = _claim(queue, delivery_id)
    row = _row(queue, delivery_id)
    assert row.attempts == 20 and row.failing_since is not None
    # The backoff (up to 600 s at attempt 20) is cut at the end of the window: the last attempt falls there.
    assert row.next_attempt_at == row.failing_since + dt.timedelta(seconds=60)

    # At the end of the window the next transient failure makes it dead, with the command to send it again.
    with engine.begin() as connection:
        connection.execute(update(Delivery).where(Delivery.id == delivery_id)
                           .values(failing_since=utcnow() - dt.timedelta(seconds=61)))
    assert queue.record(_claim(queue, delivery_id), down).value == "dead"
    row = _row(queue, delivery_id)
    assert row.last_error.endswith(f"; send it again with: dicom-ai-node retry D{delivery_id}")
    with engine.connect() as connection:
        message = connection.execute(select(Event.message).where(Event.kind == "delivery-dead")).scalar_one()
    assert "gave up: still failing 61 s after the first failed attempt (21 attempt(s)" in message
    assert message.endswith(f"send it again with: dicom-ai-node retry D{delivery_id}")

    # `retry` starts a fresh window.
    assert queue.retry(delivery_id)
    row = _row(queue, delivery_id)
    assert (row.state, row.attempts, row.failing_since) == ("pending", 0, None)

    # A permanent refusal is dead at once, also with the command.
    refused = DeliveryOutcome(False, True, "association rejected (permanent) by PACS: called AE title not recognised")
    assert queue.record(_claim(queue, delivery_id), refused).value == "dead"
    with engine.connect() as connection:
        messages = connection.execute(select(Event.message).where(Event.kind == "delivery-dead")
                                      .order_by(Event.id)).scalars().all()
    assert "dead, permanent failure: association rejected" in messages[-1]
    assert messages[-1].endswith(f"once that is fixed, send it again with: dicom-ai-node retry D{delivery_id}")

    # Delivered: the failure run is over.
    assert queue.retry(delivery_id)
    delivered = DeliveryOutcome(True, False, "1 object(s) stored")
    assert queue.record(_claim(queue, delivery_id), delivered).value == "delivered"
    assert _row(queue, delivery_id).failing_since is None


def test_a_destination_back_makes_only_its_own_deliveries_due(engine, tmp_path):
    """`origin` is a different peer per sender: CT1 answering again resumes CT1's deliveries only."""
    queue = DeliveryQueue(engine, tmp_path, DeliverySection())
    down = DeliveryOutcome(False, False, "connection refused")
    with engine.begin() as connection:
        for study, calling, destination in (("1.2.3.1", "CT1", "origin"), ("1.2.3.2", "CT2", "origin"),
                                            ("1.2.3.3", "CT1", "pacs"), ("1.2.3.4", "CT1", "other")):
            _queue(connection, _job_of_series(connection, study, calling), destination)
    for claimed in queue.claim_due(10):
        queue.record(claimed, down)  # next attempt 2.5 to 5 s away
    assert sorted(queue.waiting_destinations()) == [("origin", "CT1"), ("origin", "CT2"), ("other", None),
                                                    ("pacs", None)]
    assert queue.undelivered("origin", "CT1") == queue.undelivered("origin", "CT2") == 1
    assert queue.due_now("origin", "CT1") == 1
    assert queue.due_now("pacs") == 1
    due = {d.destination + (f" {d.calling_ae_title}" if d.destination == "origin" else "") for d in
           queue.claim_due(10)}
    assert due == {"origin CT1", "pacs"}


# --- a real node and a real Orthanc ---------------------------------------------------------------


def test_pacs_back_after_a_long_outage_gets_its_deliveries_within_a_probe_interval(node_factory, orthancs, tmp_path):
    """Down for several backoff steps, with the next attempt still well ahead when Orthanc answers again:
    both deliveries go within about a probe interval, not when their backoff runs out; one probe of the
    PACS for both deliveries, for the whole outage."""
    pacs = orthancs()
    node = _node(node_factory, {"pacs": _dimse(pacs)}, initial_backoff_seconds=20.0, max_backoff_seconds=300.0,
                 probe_seconds=1.0, give_up_after_hours=1.0)
    node.start()
    pacs.stop()
    phantoms = [_ct(tmp_path) for _ in range(2)]
    for _, paths in phantoms:
        assert storescu(node.port, *paths).returncode == 0

    def waiting_long() -> list[dict] | None:
        rows = node.json("deliveries")
        failing = len(rows) == 2 and all(r["state"] == "failed" and r["attempts"] >= 3 for r in rows)
        if failing and min(_when(r["next_attempt_at"]) for r in rows) - utcnow() >= dt.timedelta(seconds=30):
            return rows
        return None

    waiting = node.wait_for(waiting_long, timeout=240, what="both deliveries failing, next attempts >= 30 s away")
    pacs.start()
    back = utcnow()
    delivered = node.wait_for(
        lambda: len(rows := node.json("deliveries", "--state", "delivered")) == 2 and rows, timeout=60,
        what="both deliveries delivered",
    )
    for before in waiting:
        (after,) = [row for row in delivered if row["id"] == before["id"]]
        sent = _when(after["delivered_at"])
        assert sent < _when(before["next_attempt_at"]), "sent when its backoff ran out, not when the PACS was back"
        assert (sent - back).total_seconds() < 10, after  # probe interval (1 s) + dispatch (0.5 s) + the send
        assert after["attempts"] == before["attempts"] + 1  # the probe sends nothing itself
    assert pacs.count_instances() == 4
    log = node.log()
    assert log.count("destination pacs does not answer; probing it every 1 s") == 1, log[-3000:]
    resumed = [e for e in node.json("events") if e["kind"] == "delivery-resumed"]
    assert resumed and "destination pacs answers again: 2 waiting delivery(ies) sent now" in resumed[0]["message"]
    assert "gives up in" in next(e for e in node.json("events") if e["kind"] == "delivery-failed")["message"]


def test_past_the_window_dead_with_the_retry_command_and_permanent_refusal_dead_at_once(
    node_factory, orthancs, tmp_path
):
    gone, strict = orthancs(), orthancs(check_called_aet=True)
    gone.stop()
    window = 8.0  # seconds
    node = _node(node_factory, {"gone": _dimse(gone), "refusing": _dimse(strict, ae_title="NOT_ORTHANC")},
                 initial_backoff_seconds=1.0, max_backoff_seconds=2.0, probe_seconds=1.0,
                 give_up_after_hours=window / 3600)
    node.start()
    _, paths = _ct(tmp_path)
    assert storescu(node.port, *paths).returncode == 0

    rows = node.wait_for(lambda: len(found := node.json("deliveries", "--state", "dead")) == 2 and found,
                         timeout=120, what="both deliveries dead")
    dead = {row["destination"]: row for row in rows}
    refused, gave_up = dead["refusing"], dead["gone"]
    assert refused["attempts"] == 1 and refused["remote_status"] == "A-ASSOCIATE-RJ 1/1/7"
    assert refused["last_error"].endswith(f"send it again with: dicom-ai-node retry D{refused['id']}")

    assert gave_up["attempts"] > 2
    assert gave_up["last_error"].endswith(f"send it again with: dicom-ai-node retry D{gave_up['id']}")
    failing_for = (_when(gave_up["last_attempt_at"]) - _when(gave_up["failing_since"])).total_seconds()
    assert window - 0.5 <= failing_for <= window + 3, gave_up  # the last attempt falls at the end of the window
    messages = {e["message"] for e in node.json("events") if e["kind"] == "delivery-dead"}
    assert any("to gone: dead, gave up: still failing " in m and "after the first failed attempt" in m
               and m.endswith(f"send it again with: dicom-ai-node retry D{gave_up['id']}") for m in messages), messages
    assert any("to refusing: dead, permanent failure" in m and "once that is fixed" in m for m in messages), messages

    # The command the message names sends it again.
    gone.start()
    assert "will be sent again now" in node.cli("retry", f"D{gave_up['id']}").stdout
    node.wait_for(lambda: node.json("deliveries", "--state", "delivered"), timeout=60, what="the retried delivery")
    assert gone.count_instances() == 2


def test_resend_of_a_purged_study_is_refused_with_the_reason(node_factory, orthancs, tmp_path):
    pacs = orthancs()
    node = _node(node_factory, {"pacs": _dimse(pacs)}, initial_backoff_seconds=1.0, max_backoff_seconds=3.0)
    node.start()
    phantom, paths = _ct(tmp_path)
    assert storescu(node.port, *paths).returncode == 0
    node.wait_for(lambda: node.json("deliveries", "--state", "delivered"), timeout=120, what="the delivery")
    assert f"removed study {phantom.study_uid}" in node.cli("purge", "--older-than", "0").stdout
    (purged,) = [e for e in node.json("events", "--study", phantom.study_uid) if e["kind"] == "purged"]

    refused = node.cli("resend", phantom.study_uid, "--to", "pacs", check=False)
    assert refused.returncode == 2, refused
    said = " ".join(refused.stderr.split())
    assert f"its results were purged on {purged['at'][:10]} " in said, said
    assert "and its images with them, so there is nothing to send and nothing to re-process" in said
    assert "send the study to the node again" in said
    assert "queued" not in refused.stdout + said
    assert len(node.json("deliveries")) == 1  # nothing queued

    # What the message says to do works: the study sent again is processed anew and delivered (same UIDs) ...
    assert storescu(node.port, *paths).returncode == 0
    node.wait_for(lambda: len(node.json("deliveries", "--state", "delivered")) == 2, timeout=120,
                  what="the re-processed study delivered")
    # ... and resend works again, sending only the result set that is on file.
    assert "1 result set(s)" in node.cli("resend", phantom.study_uid, "--to", "pacs").stdout
    node.wait_for(lambda: len(node.json("deliveries", "--state", "delivered")) == 3, timeout=60, what="the resend")
    assert pacs.count_instances() == 2
    assert all(not row["last_error"] for row in node.json("deliveries"))

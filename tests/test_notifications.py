"""Webhooks (issue 12, item 5): a RIS, a worklist or a chat channel told when results are delivered or a job fails.

A real HTTP receiver on loopback checks every call's HMAC signature as a receiver would; a real DICOM SCP on loopback
is the PACS the results are delivered to first.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import PEER_ENV, free_port, storescu
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, SegmentationStorage

from dicom_ai_node.phantoms import CTPhantom, MRPhantom

SECRET = "a shared secret for the test"


class Receiver:
    """An HTTP endpoint that answers with `statuses` in turn (the last one from then on) and keeps what it got."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.calls: list[tuple[dict[str, str], bytes, float]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body, time.time()))
                status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def verified(self, secret: str = SECRET) -> list[dict]:
        """Each call's JSON, once its signature is checked as a receiver must: HMAC-SHA256 over "<timestamp>.<body>",
        compared in constant time, with a timestamp close to the receiver's clock."""
        payloads = []
        for headers, body, received in self.calls:
            timestamp = headers["x-dicom-ai-node-timestamp"]
            expected = "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body,
                                            hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers["x-dicom-ai-node-signature"], expected)
            assert abs(received - int(timestamp)) < 60 and headers["content-type"] == "application/json"
            payload = json.loads(body)
            assert headers["x-dicom-ai-node-event"] == payload["event"]
            assert headers["x-dicom-ai-node-notification"] == payload["id"]
            payloads.append(payload)
        return payloads


@pytest.fixture
def secret(monkeypatch):
    monkeypatch.setitem(PEER_ENV, "RIS_SECRET", SECRET)


@pytest.fixture
def pacs():
    """A PACS on loopback that stores SEG and SR."""
    ae = AE(ae_title="PACS")
    for context in (SegmentationStorage, Comprehensive3DSRStorage):
        ae.add_supported_context(context)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)])
    yield port
    server.shutdown()


def _ct(tmp_path) -> CTPhantom:
    phantom = CTPhantom(slices=12, rows=64, columns=64, pixel_spacing=(6.0, 6.0), slice_spacing=10.0)
    phantom.write(tmp_path / "ct")
    return phantom


def _node(node_factory, webhooks: dict, routes: list, **settings):
    return node_factory(workers={"processes": 1}, webhooks=webhooks, routes=routes,
                        delivery={"initial_backoff_seconds": 0.2, "max_backoff_seconds": 0.5, "probe_seconds": 0.5,
                                  **settings.pop("delivery", {})}, **settings)


def test_results_delivered_to_the_pacs_are_announced_once_signed_and_retried(node_factory, secret, pacs, tmp_path):
    """The RIS hears of the results once the PACS holds them, not before; a 503 is retried with the same call id."""
    ris = Receiver(503, 200)
    node = _node(
        node_factory, {"ris": {"url": ris.url, "secret_env": "RIS_SECRET"}},
        [{"name": "ct", "modality": "CT", "min_slices": 3, "models": ["ct-tissue"], "destinations": ["pacs"],
          "notify": ["ris"]},
         {"name": "mr", "modality": "MR", "min_slices": 3, "models": ["ct-tissue"]}],  # notifies no one
        destinations={"pacs": {"kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs}},
    )
    node.start()
    mr = MRPhantom(slices=8, rows=32, columns=32, pixel_spacing=(6.0, 6.0), slice_spacing=8.0)
    assert storescu(node.port, *mr.write(tmp_path / "mr")).returncode == 0
    node.wait_for(lambda: node.json("jobs", "--state", "failed"), timeout=120, what="the MR job, failed, told no one")
    phantom = _ct(tmp_path)
    assert storescu(node.port, *sorted((tmp_path / "ct").iterdir())).returncode == 0
    node.wait_for(lambda: len(ris.calls) == 2, timeout=120, what="the call and its retry")
    first, second = ris.verified()
    assert first == second and first["event"] == "results-delivered"
    (job,) = node.json("jobs", "--state", "done")
    (delivery,) = node.json("deliveries")
    results = node.json("job", "show", str(job["id"]))["results"]
    assert first["job"] | {"finished_at": None} == {
        "id": f"J{job['id']}", "model": "ct-tissue", "model_version": job["model_version"], "route": "ct",
        "priority": "routine", "state": "done", "findings": job["findings"], "summary": job["summary"],
        "error": None, "finished_at": None}
    assert first["study"] == {"StudyInstanceUID": phantom.study_uid, "AccessionNumber": phantom.accession_number}
    assert [(r["kind"], r["SOPInstanceUID"]) for r in first["results"]] == [
        (r["kind"], r["SOPInstanceUID"]) for r in results]
    assert [(d["destination"], d["state"]) for d in first["deliveries"]] == [("pacs", "delivered")]
    delivered_at = dt.datetime.fromisoformat(delivery["delivered_at"].removesuffix("Z")).replace(tzinfo=dt.UTC)
    assert delivered_at.timestamp() <= ris.calls[0][2]
    kinds = [e["kind"] for e in node.json("events", "--study", phantom.study_uid)]
    assert (kinds.count("notification-failed"), kinds.count("notification-sent")) == (1, 1)
    time.sleep(1.5)  # a few more passes of the runner: nothing more is owed
    assert len(ris.calls) == 2


def test_a_failed_job_and_a_dead_delivery_are_announced_a_refusal_is_not_retried(node_factory, secret, tmp_path):
    """A CT model routed an MR series fails: the RIS hears "job-failed" with the error.  A CT whose PACS never
    answers: "delivery-dead" once the delivery gives up, never "results-delivered".  The chat webhook answers 400:
    dead at once, with the reason in `events`."""
    ris, chat = Receiver(200), Receiver(400)
    node = _node(
        node_factory,
        {"ris": {"url": ris.url, "secret_env": "RIS_SECRET", "include_patient_id": True},
         "chat": {"url": chat.url, "secret_env": "RIS_SECRET", "on": ["failed"]}},
        [{"name": "mr", "modality": "MR", "min_slices": 3, "models": ["ct-tissue"], "notify": ["ris", "chat"]},
         {"name": "ct", "modality": "CT", "min_slices": 3, "models": ["ct-tissue"], "destinations": ["pacs"],
          "notify": ["ris"]}],
        destinations={"pacs": {"kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}},
        delivery={"give_up_after_hours": 2 / 3600},
    )
    node.start()
    mr = MRPhantom(slices=8, rows=32, columns=32, pixel_spacing=(6.0, 6.0), slice_spacing=8.0)
    assert storescu(node.port, *mr.write(tmp_path / "mr")).returncode == 0
    phantom = _ct(tmp_path)
    assert storescu(node.port, *sorted((tmp_path / "ct").iterdir())).returncode == 0
    node.wait_for(lambda: len(ris.calls) == 2 and chat.calls, timeout=120, what="the calls")
    by_event = {payload["event"]: payload for payload in ris.verified()}
    assert set(by_event) == {"job-failed", "delivery-dead"}
    failed = by_event["job-failed"]
    assert failed["job"]["state"] == "failed" and "CT only" in failed["job"]["error"]
    assert failed["study"]["PatientID"] == mr.patient_id and failed["results"] == []
    dead = by_event["delivery-dead"]
    assert dead["study"]["StudyInstanceUID"] == phantom.study_uid
    assert [d["state"] for d in dead["deliveries"]] == ["dead"] and dead["deliveries"][0]["error"]
    assert dead["delivery"] == dead["deliveries"][0]["id"]
    (to_chat,) = chat.verified()
    assert to_chat["event"] == "job-failed" and "PatientID" not in to_chat["study"]
    (gave_up,) = [e for e in node.json("events") if e["kind"] == "notification-dead"]
    assert "chat" in gave_up["message"] and "HTTP 400" in gave_up["message"]
    time.sleep(1.5)
    assert len(chat.calls) == 1 and len(ris.calls) == 2
    calls = {(call["webhook"], call["event"]): call for call in node.json("notifications")}
    assert {key: call["state"] for key, call in calls.items()} == {
        ("ris", "job-failed"): "delivered", ("ris", "delivery-dead"): "delivered", ("chat", "job-failed"): "dead"}
    assert node.json("status")["notifications"]["dead"] == 1
    chat.statuses = [200]  # the chat bridge is fixed: the admin makes the call again
    assert "made again" in node.cli("retry", f"N{calls['chat', 'job-failed']['id']}").stdout
    node.wait_for(lambda: len(chat.calls) == 2, what="the call made again")
    assert chat.verified()[1]["id"] == to_chat["id"]


def test_a_webhook_without_its_secret_stops_the_node_from_starting(node_factory):
    """Every call it is owed would go unsigned: the admin hears it at start-up, not at the first result."""
    node = node_factory(webhooks={"ris": {"url": "http://127.0.0.1:9/hook", "secret_env": "UNSET_TEST_SECRET"}})
    with pytest.raises(AssertionError, match="UNSET_TEST_SECRET"):
        node.start()
    assert "webhooks.ris.secret_env" in node.log()

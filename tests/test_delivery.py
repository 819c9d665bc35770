"""Results reach the PACS: Orthanc as the PACS, storescu as the scanner, the node in between,
including a PACS that is down, a PACS that refuses SEG, and kill -9 at each stage."""

from __future__ import annotations

import logging
import signal
import subprocess
import time

import numpy as np
import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import update

from conftest import PEER_ENV, NodeProcess, dciodvfy_errors, dcmtk, free_port, storescu
from orthanc import orthanc_servers

from dicom_ai_node.config import load_config
from dicom_ai_node.phantoms import CTPhantom
from dicom_ai_node.store.db import make_engine
from dicom_ai_node.store.models import Job


@pytest.fixture
def orthancs(tmp_path):
    with orthanc_servers(tmp_path / "pacs") as make:
        yield make


def _ct(tmp_path, slices: int = 24):
    phantom = CTPhantom(slices=slices, rows=96, columns=96, pixel_spacing=(4.0, 4.0), slice_spacing=10.0)
    return phantom, phantom.write(tmp_path / f"ct-{phantom.series_uid[-6:]}")


def _delivering_node(node_factory, destinations: dict, **extra):
    return node_factory(
        workers={"processes": 1},
        destinations=destinations,
        routes=[{"name": "ct", "modality": "CT", "min_slices": 3, "models": ["ct-tissue"],
                 "destinations": list(destinations)}],
        delivery={"initial_backoff_seconds": 1.0, "max_backoff_seconds": 3.0},
        **extra,
    )


def _wait_deliveries(node, state: str, count: int, timeout: float = 120) -> list[dict]:
    return node.wait_for(
        lambda: len(rows := node.json("deliveries", "--state", state)) >= count and rows,
        timeout=timeout,
        what=f"{count} delivery(ies) {state}",
    )


def _orthanc_copy_valid(orthanc, tmp_path, sop_instance_uid: str) -> None:
    instance = orthanc.instance_id(sop_instance_uid)
    assert instance is not None, f"{sop_instance_uid} is not in Orthanc"
    path = tmp_path / f"{sop_instance_uid}.dcm"
    path.write_bytes(orthanc.instance_file(instance))
    assert dciodvfy_errors(path) == []


def test_results_arrive_by_cstore_stowrs_and_orthanc_rest(node_factory, orthancs, tmp_path):
    by_dimse, by_stow, by_rest = orthancs(), orthancs(), orthancs()
    node = _delivering_node(node_factory, {
        "pacs-dimse": {"kind": "dimse", "ae_title": by_dimse.aet, "host": "127.0.0.1", "port": by_dimse.dicom_port},
        "pacs-stow": {"kind": "dicomweb", "url": by_stow.dicomweb_url},
        "pacs-rest": {"kind": "orthanc", "url": by_rest.url},
    })
    node.start()
    phantom, paths = _ct(tmp_path)
    assert storescu(node.port, *paths).returncode == 0

    delivered = _wait_deliveries(node, "delivered", 3)
    assert {row["destination"] for row in delivered} == {"pacs-dimse", "pacs-stow", "pacs-rest"}
    (job,) = node.json("jobs")
    results = node.json("job", "show", str(job["id"]))["results"]
    for orthanc in (by_dimse, by_stow, by_rest):
        assert orthanc.count_instances() == 2  # SEG and SR, once each
        for result in results:
            _orthanc_copy_valid(orthanc, tmp_path, result["SOPInstanceUID"])
        study = orthanc.get("/studies")
        assert len(study) == 1
        assert orthanc.get(f"/studies/{study[0]}")["MainDicomTags"]["StudyInstanceUID"] == phantom.study_uid


def test_each_destination_receives_the_outputs_it_asks_for(node_factory, orthancs, tmp_path):
    """A PACS whose viewers show no SEG asks for the presentation state and the secondary captures as well; one
    that shows SEG gets SEG and SR only; a viewer that wants only the presentation state gets just that.  Each
    object Orthanc holds passes dciodvfy."""
    default, everything, gsps_only = orthancs(), orthancs(), orthancs()
    node = _delivering_node(node_factory, {
        "pacs-seg": {"kind": "dimse", "ae_title": default.aet, "host": "127.0.0.1", "port": default.dicom_port},
        "pacs-all": {"kind": "dimse", "ae_title": everything.aet, "host": "127.0.0.1", "port": everything.dicom_port,
                     "outputs": ["seg", "sr", "gsps", "sc"]},
        "viewer-gsps": {"kind": "dicomweb", "url": gsps_only.dicomweb_url, "outputs": ["gsps"]},
    })
    node.start()
    phantom, paths = _ct(tmp_path)
    assert storescu(node.port, *paths).returncode == 0

    _wait_deliveries(node, "delivered", 3)
    (job,) = node.json("jobs")
    results = node.json("job", "show", str(job["id"]))["results"]
    by_kind: dict[str, list[str]] = {}
    for result in results:
        by_kind.setdefault(result["kind"], []).append(result["SOPInstanceUID"])
    assert sorted(by_kind) == ["PR", "SC", "SEG", "SR"] and len(by_kind["PR"]) == 1 and by_kind["SC"], by_kind
    expected = {default: ["SEG", "SR"], everything: ["PR", "SC", "SEG", "SR"], gsps_only: ["PR"]}
    for orthanc, kinds in expected.items():
        wanted = [uid for kind in kinds for uid in by_kind[kind]]
        assert orthanc.count_instances() == len(wanted), (kinds, orthanc.count_instances())
        for uid in wanted:
            _orthanc_copy_valid(orthanc, tmp_path, uid)


def test_a_presentation_state_that_cannot_be_made_costs_nothing_else(node_factory, orthancs, tmp_path):
    """One slice stored with another rescale intercept (same Hounsfield units): a single presentation state cannot
    carry two Modality LUTs, so it is left out, said in a job-incomplete event; the SEG and SR are made and
    delivered all the same."""
    pacs = orthancs()
    node = _delivering_node(node_factory, {
        "pacs": {"kind": "dimse", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port,
                 "outputs": ["seg", "sr", "gsps"]},
    })
    node.start()
    phantom, paths = _ct(tmp_path)
    odd = pydicom.dcmread(paths[5])
    stored = odd.pixel_array.astype(np.int32) - 24  # intercept -1000 instead of -1024: the same HU
    odd.PixelData = stored.clip(0, 4095).astype(np.uint16).tobytes()
    odd.RescaleIntercept = -1000
    odd.save_as(paths[5], enforce_file_format=True)
    assert storescu(node.port, *paths).returncode == 0

    (delivery,) = _wait_deliveries(node, "delivered", 1)
    (job,) = node.json("jobs")
    assert job["state"] == "done"
    kinds = sorted(result["kind"] for result in node.json("job", "show", str(job["id"]))["results"])
    assert kinds == ["SEG", "SR"]
    assert pacs.count_instances() == 2
    (incomplete,) = [e for e in node.json("events", "--study", phantom.study_uid) if e["kind"] == "job-incomplete"]
    assert "a presentation state not made" in incomplete["message"] and "RescaleIntercept" in incomplete["message"]


def test_pacs_down_then_up_delivers_with_failed_attempts_visible(node_factory, orthancs, tmp_path):
    pacs = orthancs()
    node = _delivering_node(
        node_factory, {"pacs": {"kind": "dimse", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}}
    )
    node.start()
    pacs.stop()
    _, paths = _ct(tmp_path)
    assert storescu(node.port, *paths).returncode == 0
    node.wait_for(lambda: node.json("deliveries", "--state", "failed"), timeout=120, what="a failed attempt")
    time.sleep(20)  # the PACS stays down for 20 s while the node keeps trying
    pacs.start()

    (delivery,) = _wait_deliveries(node, "delivered", 1)
    assert delivery["attempts"] > 1
    assert pacs.count_instances() == 2
    failures = [e for e in node.json("events") if e["kind"] == "delivery-failed"]
    assert failures and "retry in" in failures[0]["message"]


@pytest.fixture
def ct_only_scp():
    """A PACS that stores CT but not SEG or SR: a permanent refusal at negotiation."""
    ae = AE(ae_title="CT_ONLY")
    ae.add_supported_context(CTImageStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)])
    yield port
    server.shutdown()


def test_refused_sop_class_is_dead_then_retry_after_config_fix(node_factory, orthancs, ct_only_scp, tmp_path):
    node = _delivering_node(
        node_factory, {"pacs": {"kind": "dimse", "ae_title": "CT_ONLY", "host": "127.0.0.1", "port": ct_only_scp}}
    )
    node.start()
    _, paths = _ct(tmp_path)
    assert storescu(node.port, *paths).returncode == 0
    (dead,) = _wait_deliveries(node, "dead", 1)
    assert dead["attempts"] == 1  # permanent: no retries
    assert "not supported" in dead["last_error"]

    # The admin points the destination at a PACS that takes SEG and SR, restarts, and retries.
    pacs = orthancs()
    node.stop()
    node.settings["destinations"]["pacs"].update(ae_title=pacs.aet, port=pacs.dicom_port)
    node.start()
    assert "will be sent again" in node.cli("retry", f"D{dead['id']}").stdout
    _wait_deliveries(node, "delivered", 1)
    assert pacs.count_instances() == 2


def _send_in_background(port: int, paths) -> subprocess.Popen:
    return subprocess.Popen(
        [dcmtk("storescu"), "-aec", "AI_NODE", "127.0.0.1", str(port), *map(str, paths)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=PEER_ENV,
    )


@pytest.mark.parametrize("stage", ["receive", "inference", "delivery"])
def test_kill_9_at_each_stage_ends_in_pacs_exactly_once(node_factory, orthancs, tmp_path, stage):
    pacs = orthancs()
    # After a kill during receive, the scanner's re-send must land within stable_seconds of the
    # restart, or the part received before the kill is (rightly) processed as a series of its own.
    quiet = {"series": {"stable_seconds": 10, "check_interval_seconds": 0.2}} if stage == "receive" else {}
    node = _delivering_node(
        node_factory,
        {"pacs": {"kind": "dimse", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
        **quiet,
    )
    node.start()
    phantom, paths = _ct(tmp_path, slices=60)
    if stage == "receive":
        sender = _send_in_background(node.port, paths)
        node.wait_for(lambda: (s := node.json("studies")) and s[0]["NumberOfStudyRelatedInstances"] >= 10,
                      what="instances arriving")
        node.stop(signal.SIGKILL)
        sender.wait(timeout=60)
        node.start()
        assert storescu(node.port, *paths).returncode == 0  # the scanner sends again what failed
    elif stage == "inference":  # killed as soon as the job exists: queued, or already running
        assert storescu(node.port, *paths).returncode == 0
        node.wait_for(lambda: node.json("jobs"), what="the job")
        node.stop(signal.SIGKILL)
        node.start()
    else:
        pacs.stop()
        assert storescu(node.port, *paths).returncode == 0
        node.wait_for(lambda: node.json("deliveries", "--state", "failed"), timeout=120, what="a delivery attempt")
        node.stop(signal.SIGKILL)
        pacs.start()
        node.start()

    delivered = _wait_deliveries(node, "delivered", 1, timeout=180)
    assert len(delivered) == 1
    assert pacs.count_instances() == 2  # SEG and SR exactly once, whatever was interrupted
    (series,) = node.json("series", phantom.study_uid)
    assert series["NumberOfSeriesRelatedInstances"] == 60
    for result in node.json("job", "show", str(node.json("jobs", "--state", "done")[0]["id"]))["results"]:
        assert pacs.instance_id(result["SOPInstanceUID"]) is not None
        assert pydicom.uid.UID(result["SOPInstanceUID"]).is_valid


def test_admin_commands_and_a_down_destination_blocks_no_other(node_factory, orthancs, tmp_path, database_url):
    """One PACS down, one up: the up one gets its results at once; then resend, purge and cancel."""
    if not database_url.startswith("sqlite"):
        pytest.skip("CLI behaviour; the PostgreSQL path is covered by the tests above")
    up, down = orthancs(), orthancs()
    down.stop()
    node = _delivering_node(node_factory, {
        "up": {"kind": "dimse", "ae_title": up.aet, "host": "127.0.0.1", "port": up.dicom_port},
        "down": {"kind": "dimse", "ae_title": down.aet, "host": "127.0.0.1", "port": down.dicom_port},
    })
    node.start()
    phantom, paths = _ct(tmp_path)
    assert storescu(node.port, *paths).returncode == 0
    (delivered,) = _wait_deliveries(node, "delivered", 1)
    assert delivered["destination"] == "up" and up.count_instances() == 2
    node.wait_for(lambda: node.json("deliveries", "--state", "failed"), what="the down PACS failing")
    status = node.json("status")
    assert status["deliveries"]["delivered"] == 1 and status["deliveries"]["oldest_undelivered_seconds"] is not None
    assert "deliveries" in node.cli("status").stdout

    # resend: the same objects again to `up` (same UIDs: Orthanc still holds them once).
    assert "queued for up" in node.cli("resend", phantom.study_uid, "--to", "up").stdout
    _wait_deliveries(node, "delivered", 2)
    assert up.count_instances() == 2
    # purge keeps a study that is not fully delivered (the `down` delivery is pending) ...
    kept = node.cli("purge", "--older-than", "0").stdout
    assert "0 study(ies)" in kept and (node.storage / phantom.study_uid).exists()
    # ... and removes it once everything reached its destinations.
    down.start()
    node.cli("retry", "--all-failed")
    node.wait_for(lambda: not node.json("deliveries", "--state", "failed")
                  and not node.json("deliveries", "--state", "pending"), what="all delivered")
    removed = node.cli("purge", "--older-than", "0").stdout
    assert f"removed study {phantom.study_uid}: 24 instance(s), 2 result(s)" in removed
    assert not (node.storage / phantom.study_uid).exists()
    assert node.json("studies")[0]["NumberOfStudyRelatedInstances"] == 0
    assert any(e["kind"] == "purged" for e in node.json("events", "--study", phantom.study_uid))


def test_cancel_a_queued_job_and_retry_it(node_factory, tmp_path, database_url):
    if not database_url.startswith("sqlite"):
        pytest.skip("CLI behaviour; the PostgreSQL path is covered by the tests above")
    node = node_factory()  # no worker here: the job stays queued
    node.start()
    _, paths = _ct(tmp_path, slices=4)
    assert storescu(node.port, *paths).returncode == 0
    (job,) = node.wait_for(lambda: node.json("jobs", "--state", "queued"), what="a queued job")
    assert f"job {job['id']} cancelled" in node.cli("cancel", f"J{job['id']}").stdout
    assert node.json("jobs")[0]["state"] == "cancelled"
    again = node.cli("cancel", f"J{job['id']}", check=False)
    assert again.returncode == 2 and "is cancelled; only queued or failed jobs" in again.stderr
    assert "queued again" in node.cli("retry", f"J{job['id']}").stdout
    assert node.json("jobs")[0]["state"] == "queued"
    wrong = node.cli("retry", "42", check=False)
    assert wrong.returncode == 2 and "J<id>" in wrong.stderr


# --- routing decides once -----------------------------------------------------------------------


def _route_one_job_then_rename_its_route(node_factory, tmp_path) -> NodeProcess:
    """A job routed by route `ct` to `pacs`; then, the node stopped, the route is renamed and sends to `archive`."""
    unreachable = {"kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
    route = {"modality": "CT", "min_slices": 3, "models": ["ct-tissue"]}
    node = node_factory(destinations={"pacs": unreachable, "archive": unreachable},
                        routes=[{"name": "ct", **route, "destinations": ["pacs"]}])
    node.start()
    _, paths = _ct(tmp_path, slices=8)
    assert storescu(node.port, *paths).returncode == 0
    node.wait_for(lambda: node.json("jobs", "--state", "queued"), what="a queued job")
    node.stop()
    node.settings["routes"] = [{"name": "ct-renamed", **route, "destinations": ["archive"]}]
    node.write_config()
    return node


def _run_the_job(node: NodeProcess) -> list[str]:
    """Run the queued job in a worker with the node's config as it is now; the destinations of its deliveries."""
    from dicom_ai_node.worker import Worker  # torch loads only in the tests that run a model

    worker = Worker(load_config(node.config_path))
    try:
        assert worker.run_once() is not None
    finally:
        worker.engine.dispose()
    (job,) = node.json("jobs")
    assert job["state"] == "done", job
    return sorted(row["destination"] for row in node.json("deliveries"))


def test_results_go_where_routing_sent_them_though_the_route_was_renamed(node_factory, tmp_path):
    """Routing decides once: the destinations are stored with the job, not looked up again by route name."""
    node = _route_one_job_then_rename_its_route(node_factory, tmp_path)
    assert _run_the_job(node) == ["pacs"]


def test_a_job_queued_before_destinations_were_stored_looks_its_route_up(node_factory, tmp_path, caplog):
    """Jobs queued before migration 0007 have no destinations: they take their route's by name, and say so
    when the route is gone."""
    node = _route_one_job_then_rename_its_route(node_factory, tmp_path)
    engine = make_engine(node.database_url)
    with engine.begin() as connection:
        connection.execute(update(Job).values(destinations=None))
    engine.dispose()
    with caplog.at_level(logging.WARNING, logger="dicom_ai_node.worker"):
        assert _run_the_job(node) == []
    assert "its route 'ct' is no longer configured: its results are not delivered" in caplog.text

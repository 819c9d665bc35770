"""Receiving: dcmtk's storescu as the scanner, a real `dicom-ai-node serve` as the SCP.

Every test here runs on SQLite and on PostgreSQL (see `database_url`).
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from pynetdicom import AE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import CTImageStorage

from conftest import PEER_ENV, dcmtk, storescu

from dicom_ai_node.phantoms import CTPhantom


DONE_RECEIVING = ("complete", "routed", "not-routed")  # completion hands the series on to routing


def _study(node, study_uid: str) -> dict | None:
    return next((row for row in node.json("studies") if row["StudyInstanceUID"] == study_uid), None)


def _series(node, study_uid: str) -> list[dict]:
    return node.json("series", study_uid)


def _dataset_bytes(path: Path) -> bytes:
    """The dataset as encoded after the File Meta Information (what travels on the wire)."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def _stored_files(node) -> list[Path]:
    return sorted(node.storage.rglob("*.dcm"))


def test_ct_200_slices_indexed_durably_and_completed(node, ct_200):
    phantom, paths = ct_200
    result = storescu(node.port, *paths)
    assert result.returncode == 0, result.stderr

    study = _study(node, phantom.study_uid)
    assert study["NumberOfStudyRelatedInstances"] == 200
    assert study["ModalitiesInStudy"] == ["CT"]
    assert study["PatientID"] == "PHANTOM-001" and study["AccessionNumber"] == "ACC0001"
    files = _stored_files(node)
    assert len(files) == 200
    assert not list(node.storage.rglob("*.tmp"))
    # Laid out by study/series/instance UID, the bytes exactly as sent.
    sample = files[0]
    assert sample.parent.parent.name == phantom.study_uid and sample.parent.name == phantom.series_uid
    original = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths[:20]}
    for sop_uid, source in original.items():
        stored = node.storage / phantom.study_uid / phantom.series_uid / f"{sop_uid}.dcm"
        assert _dataset_bytes(stored) == _dataset_bytes(source)

    completed = node.wait_for(
        lambda: _study(node, phantom.study_uid)["state"] in DONE_RECEIVING, timeout=30, what="series completion"
    )
    assert completed
    (series,) = _series(node, phantom.study_uid)
    assert series["NumberOfSeriesRelatedInstances"] == 200 and series["completed_at"]
    events = node.json("events", "--study", phantom.study_uid)
    assert [e["kind"] for e in events] == ["receiving", "complete", "routed"]
    assert "200 instance(s)" in events[1]["message"]


def test_duplicate_resend_is_idempotent(node, small_ct, tmp_path):
    phantom, paths = small_ct
    assert storescu(node.port, *paths).returncode == 0
    assert storescu(node.port, *paths).returncode == 0  # the whole series again: all Success

    (series,) = _series(node, phantom.study_uid)
    assert series["NumberOfSeriesRelatedInstances"] == len(paths)
    assert series["duplicates_received"] == len(paths)
    assert len(_stored_files(node)) == len(paths)

    # The same SOP Instance UID with other content: Success, and the first copy is what stays.
    changed = pydicom.dcmread(paths[0])
    changed.PatientName = "Someone^Else"
    changed.save_as(tmp_path / "changed.dcm")
    assert storescu(node.port, tmp_path / "changed.dcm").returncode == 0
    stored = node.storage / phantom.study_uid / phantom.series_uid / f"{changed.SOPInstanceUID}.dcm"
    assert _dataset_bytes(stored) == _dataset_bytes(paths[0])
    assert _series(node, phantom.study_uid)[0]["duplicates_received"] == len(paths) + 1
    assert not list(node.storage.rglob("*.tmp"))


def test_rejected_calling_and_called_ae_titles(node_factory, small_ct):
    _, paths = small_ct
    node = node_factory(
        dimse={"allowed_callers": [{"ae_title": "CT_SCANNER"}, {"ae_title": "PINNED", "host": "10.9.8.7"}]}
    )
    node.start()

    unknown = storescu(node.port, paths[0], calling="INTRUDER")
    wrong_called = storescu(node.port, paths[0], calling="CT_SCANNER", called="SOMEONE_ELSE")
    wrong_host = storescu(node.port, paths[0], calling="PINNED")
    allowed = storescu(node.port, paths[0], calling="CT_SCANNER")

    for refused in (unknown, wrong_called, wrong_host):
        assert refused.returncode != 0
        assert "Association Rejected" in refused.stderr, refused.stderr
    assert allowed.returncode == 0, allowed.stderr
    reasons = [e["message"] for e in node.json("events") if e["kind"] == "association-rejected"]
    assert reasons == [
        "association from INTRUDER@127.0.0.1 rejected: calling AE title 'INTRUDER' is not in dimse.allowed_callers",
        "association from CT_SCANNER@127.0.0.1 rejected: called AE title 'SOMEONE_ELSE' is not this node's "
        "'AI_NODE'",
        "association from PINNED@127.0.0.1 rejected: calling AE title 'PINNED' is allowed only from 10.9.8.7, "
        "not from 127.0.0.1",
    ]
    assert "INTRUDER@127.0.0.1 rejected" in node.log()
    assert len(_stored_files(node)) == 1


def _raw_dataset_file(tmp_path: Path, name: str, source: Path, dataset_bytes: bytes) -> Path:
    """A Part 10 file with `source`'s valid File Meta and `dataset_bytes` as its dataset."""
    _, meta_end = split_dataset(source)
    path = tmp_path / name
    path.write_bytes(source.read_bytes()[:meta_end] + dataset_bytes)
    return path


def test_malformed_datasets_fail_and_the_association_stays_usable(node, small_ct, tmp_path, monkeypatch):
    # pynetdicom's documented switch to send a file's dataset bytes without decoding them.
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    _, paths = small_ct
    garbage = _raw_dataset_file(tmp_path, "garbage.dcm", paths[0], b"\x99\x99" * 3000)
    first = _dataset_bytes(paths[0])
    truncated = _raw_dataset_file(tmp_path, "truncated.dcm", paths[0], first[: len(first) - 1000])
    pixel_data_at = first.index(b"\xe0\x7f\x10\x00")
    no_pixels = _raw_dataset_file(tmp_path, "cut-before-pixels.dcm", paths[0], first[:pixel_data_at])

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AI_NODE")
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(path) for path in (garbage, truncated, no_pixels, paths[1])]
    finally:
        assoc.release()

    assert [status.Status for status in statuses] == [0xC210, 0xC210, 0xA900, 0x0000]
    assert "truncated" in statuses[1].ErrorComment
    failures = [e for e in node.json("events") if e["kind"] == "store-failed"]
    assert len(failures) == 3 and all(e["level"] == "error" for e in failures)
    assert "not a valid DICOM dataset" in failures[0]["message"]
    assert "element (7FE0,0010) has 7192 of its 8192 bytes" in failures[1]["message"]
    assert "MODALITY" in failures[1]["message"]
    assert "no Pixel Data" in failures[2]["message"]
    assert len(_stored_files(node)) == 1
    assert not list(node.storage.rglob("*.tmp"))


def test_missing_uid_is_refused_with_reason(node, tmp_path):
    phantom = CTPhantom(slices=1, rows=16, columns=16)
    ds = phantom.dataset(0)
    del ds.SeriesInstanceUID
    path = tmp_path / "no-series-uid.dcm"
    ds.save_as(path, enforce_file_format=True)

    result = storescu(node.port, path, extra=["-v"])
    assert "Error: DataSetDoesNotMatchSOPClass" in result.stderr, result.stderr
    (event,) = [e for e in node.json("events") if e["kind"] == "store-failed"]
    assert "lacks SeriesInstanceUID" in event["message"]
    assert _stored_files(node) == []


def test_restart_while_receiving_loses_nothing(node_factory, tmp_path):
    phantom = CTPhantom(slices=10, rows=64, columns=64, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)
    paths = phantom.write(tmp_path / "series")
    node = node_factory(series={"stable_seconds": 6})
    node.start()

    assert storescu(node.port, *paths[:5]).returncode == 0
    node.stop(signal.SIGKILL)  # no goodbye: the state must already be in the database
    time.sleep(7)  # down for longer than stable_seconds: the series must not complete at start-up
    node.start()
    time.sleep(1)  # several completion passes (check_interval_seconds)
    assert _study(node, phantom.study_uid)["state"] == "receiving"
    assert storescu(node.port, *paths[5:]).returncode == 0  # the sender sends the rest once the node is back

    node.wait_for(lambda: _study(node, phantom.study_uid)["state"] in DONE_RECEIVING, what="completion after restart")
    (series,) = _series(node, phantom.study_uid)
    assert series["NumberOfSeriesRelatedInstances"] == 10
    assert series["late_instances"] == 0 and not series["reprocess_requested"]
    assert len(_stored_files(node)) == 10

    # Killed again after the last instance but before completion: completion fires after restart.
    other = CTPhantom(slices=3, rows=32, columns=32, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)
    assert storescu(node.port, *other.write(tmp_path / "other")).returncode == 0
    node.stop(signal.SIGKILL)
    node.start()
    node.wait_for(lambda: _study(node, other.study_uid)["state"] in DONE_RECEIVING, what="completion of a killed series")
    kinds = [e["kind"] for e in node.json("events", "--study", phantom.study_uid)]
    assert kinds == ["receiving", "receiving-interrupted", "complete", "routed"]
    assert "still receiving when the node last stopped" in node.log()


def test_late_instance_reopens_series_for_reprocessing(node, small_ct):
    phantom, paths = small_ct
    assert storescu(node.port, *paths[:-1]).returncode == 0
    node.wait_for(lambda: _study(node, phantom.study_uid)["state"] in DONE_RECEIVING, what="first completion")

    assert storescu(node.port, paths[-1]).returncode == 0
    (series,) = _series(node, phantom.study_uid)
    assert series["state"] == "receiving"
    assert series["reprocess_requested"] is True and series["late_instances"] == 1
    node.wait_for(lambda: _study(node, phantom.study_uid)["state"] in DONE_RECEIVING, what="second completion")
    events = node.json("events", "--study", phantom.study_uid)
    kinds = [e["kind"] for e in events]
    assert kinds == ["receiving", "complete", "routed", "late-instance", "complete", "routed"]
    assert "re-processing requested" in events[4]["message"]
    assert f"{len(paths)} instance(s)" in events[4]["message"]


def test_out_of_resources_when_disk_below_threshold(node_factory, small_ct):
    _, paths = small_ct
    node = node_factory(storage={"min_free_mb": 1 << 40})  # more than any disk has
    node.start()
    result = storescu(node.port, paths[0], extra=["-v"])
    assert result.returncode != 0
    assert "OutOfResources" in result.stderr, result.stderr
    (event,) = [e for e in node.json("events") if e["kind"] == "store-failed"]
    assert "0xA700" in event["message"] and "storage.min_free_mb" in event["message"]
    assert list(node.storage.rglob("*")) == []  # nothing written half-way
    status = node.cli("status").stdout
    assert "below storage.min_free_mb" in status


def test_parallel_associations(node, tmp_path):
    import concurrent.futures

    phantoms = [
        CTPhantom(slices=12, rows=64, columns=64, pixel_spacing=(5.0, 5.0), slice_spacing=5.0) for _ in range(4)
    ]
    sets = [p.write(tmp_path / f"s{i}") for i, p in enumerate(phantoms)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda paths: storescu(node.port, *paths), sets))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    counts = {row["StudyInstanceUID"]: row["NumberOfStudyRelatedInstances"] for row in node.json("studies")}
    assert counts == {p.study_uid: 12 for p in phantoms}


def test_sender_killed_mid_series_leaves_only_whole_instances(node, ct_200, small_ct):
    """A scanner that dies mid-transfer: what was acknowledged is whole and indexed, the rest is not there."""
    phantom, paths = ct_200
    sender = subprocess.Popen(
        [dcmtk("storescu"), "-aet", "DYING", "-aec", "AI_NODE", "127.0.0.1", str(node.port), *map(str, paths)],
        env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while len(_stored_files(node)) < 20:  # polled closely: the whole series takes under a second
        assert time.monotonic() < deadline and sender.poll() is None, "the sender did not get going"
        time.sleep(0.005)
    sender.kill()
    sender.wait()
    time.sleep(1)  # let the node notice the dropped connection

    indexed = _study(node, phantom.study_uid)["NumberOfStudyRelatedInstances"]
    files = _stored_files(node)
    assert 20 <= indexed < 200 and len(files) == indexed
    assert not list(node.storage.rglob("*.tmp"))
    sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    for stored in files:
        assert _dataset_bytes(stored) == _dataset_bytes(sources[stored.stem])

    other, other_paths = small_ct  # the node carries on: the next sender is served as usual
    assert storescu(node.port, *other_paths).returncode == 0
    assert _study(node, other.study_uid)["NumberOfStudyRelatedInstances"] == 8


def test_association_aborted_by_the_sender(node, small_ct):
    phantom, paths = small_ct
    ae = AE("ABORTER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AI_NODE")
    assert assoc.is_established
    assert assoc.send_c_store(pydicom.dcmread(paths[0])).Status == 0x0000
    assoc.abort()
    assert storescu(node.port, *paths[1:]).returncode == 0
    assert _study(node, phantom.study_uid)["NumberOfStudyRelatedInstances"] == 8
    node.wait_for(lambda: "ABORTER" in node.log_path.read_text() and "aborted" in node.log_path.read_text(),
                  timeout=10, what="the abort in the log")


def test_unsupported_sop_class_is_refused_and_logged(node_factory):
    """A modality proposing a SOP class nobody knows learns it at negotiation when the node is set to refuse
    them (storage.accept_unknown_sop_classes = false); the admin sees it."""
    node = node_factory(storage={"accept_unknown_sop_classes": False})
    node.start()
    private = "1.2.826.0.1.3680043.10.1447.99.1"
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(private)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AI_NODE")
    assert assoc.is_established
    try:
        assert [context.abstract_syntax for context in assoc.rejected_contexts] == [private]
        assert [context.abstract_syntax for context in assoc.accepted_contexts] == [CTImageStorage]
    finally:
        assoc.release()
    (event,) = node.wait_for(
        lambda: [e for e in node.json("events") if e["kind"] == "unsupported-sop-class"], what="the event"
    )
    assert private in event["message"] and "MODALITY" in event["message"]
    assert "does not store" in node.log()


@pytest.fixture
def sqlite_only(database_url):
    if not database_url.startswith("sqlite"):
        pytest.skip("inspects the SQLite file directly")
    return database_url


def test_sqlite_runs_in_wal_mode(node, small_ct, sqlite_only):
    _, paths = small_ct
    assert storescu(node.port, *paths).returncode == 0
    with sqlite3.connect(sqlite_only.removeprefix("sqlite:///")) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("SELECT count(*) FROM instances").fetchone()[0] == len(paths)

"""Faults a node meets in a hospital (issue 15, items 11-14): a full disk, kill -9, two senders of one
instance at once, an admin naming something that is not there.

Every case ends the same way: an authorised sender is served right after, and no acknowledged
instance is lost or changed (index rows equal files, every stored file byte-identical to what was sent,
no temporary file left).  Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from conftest import PEER_ENV, NodeProcess, dcmtk, storescu
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select

from dicom_ai_node.config import ConfigError, load_config
from dicom_ai_node.phantoms import CTPhantom
from dicom_ai_node.store.db import make_engine, upgrade
from dicom_ai_node.store.files import DiskFull, InstanceStore
from dicom_ai_node.store.index import Index
from dicom_ai_node.store.models import Instance, ResultObject
from dicom_ai_node.store.reconcile import last_check, reconcile
from dicom_ai_node.values import InstanceHeader, Sender

MiB = 2**20


def _small(slices: int = 6, side: int = 32) -> CTPhantom:
    return CTPhantom(slices=slices, rows=side, columns=side, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)


def _sources(paths: list[Path]) -> dict[str, Path]:
    """SOP Instance UID -> the file a sender sends."""
    return {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID: path for path in paths}


def _dataset_bytes(path: Path) -> bytes:
    """The dataset as encoded after the File Meta Information (what travels on the wire)."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def _index(node: NodeProcess) -> tuple[dict[str, Instance], set[str]]:
    """The index rows of received instances by SOP Instance UID, and the files of the node's results."""
    engine = make_engine(node.database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(Instance.__table__)).all()
            results = connection.execute(select(ResultObject.file_path)).scalars().all()
    finally:
        engine.dispose()
    return {row.sop_instance_uid: row for row in rows}, set(results)


def _rows(node: NodeProcess) -> dict[str, Instance]:
    return _index(node)[0]


def assert_archive_intact(node: NodeProcess, acknowledged: dict[str, Path]) -> dict[str, Instance]:
    """Rows equal files (sizes too), no temporary file, every acknowledged instance stored byte-identical."""
    rows, results = _index(node)
    files = {path.relative_to(node.storage).as_posix() for path in node.storage.rglob("*.dcm")}
    assert files == {row.file_path for row in rows.values()} | results, "index rows and files differ"
    assert not list(node.storage.rglob("*.tmp")), "temporary files left behind"
    for row in rows.values():
        assert (node.storage / row.file_path).stat().st_size == row.file_size, row.sop_instance_uid
    for sop_uid, source in acknowledged.items():
        assert sop_uid in rows, f"acknowledged instance {sop_uid} is lost"
        assert _dataset_bytes(node.storage / rows[sop_uid].file_path) == _dataset_bytes(source), sop_uid
    return rows


def assert_served(node: NodeProcess, folder: Path) -> dict[str, Path]:
    """An authorised sender stores a new series at once; returns what it sent."""
    paths = _small(3, 16).write(folder)
    result = storescu(node.port, *paths, calling="AFTER")
    assert result.returncode == 0, result.stderr
    sent = _sources(paths)
    assert set(sent) <= set(_rows(node))
    return sent


def _series(node: NodeProcess, phantom: CTPhantom) -> dict:
    (series,) = node.json("series", phantom.study_uid)
    return series


# --- 11. disk full ----------------------------------------------------------------------------------------


def test_results_use_their_reserve_and_wait_for_disk_space(node_factory, tmp_path, monkeypatch):
    """Results may use the disk below min_free_mb; a job that still finds no room waits, then runs."""
    from dicom_ai_node.worker import Worker

    phantom = CTPhantom(slices=24, rows=96, columns=96, pixel_spacing=(4.0, 4.0), slice_spacing=5.0)
    sent = _sources(phantom.write(tmp_path / "ct"))
    node = node_factory(storage={"min_free_mb": 400})  # results may go down to 100 MiB (a quarter)
    node.start()
    assert storescu(node.port, *sent.values()).returncode == 0
    node.wait_for(lambda: node.json("jobs", "--state", "queued"), what="the job queued")
    node.stop()

    free = {"bytes": 50 * MiB}  # below the results' floor too
    monkeypatch.setattr(InstanceStore, "free_bytes", lambda self: free["bytes"])
    worker = Worker(load_config(node.config_path))
    try:
        assert worker.run_once() is not None
        (job,) = node.json("jobs")
        assert job["state"] == "queued", job
        assert job["error"].startswith("waiting for disk space:") and "storage.results_min_free_mb" in job["error"]
        assert worker.run_once() is None  # not taken again while there is no room: no busy loop
        assert "1 waiting for disk space" in node.cli("status").stdout
        waiting = [e for e in node.json("events") if e["kind"] == "job-waiting"]
        assert len(waiting) == 1 and "waiting for disk space" in waiting[0]["message"]

        free["bytes"] = 300 * MiB  # space returns: above the results' floor, still below min_free_mb
        with pytest.raises(DiskFull):
            worker.store.check_space(1)  # a received instance would be refused now ...
        assert worker.run_once() is not None  # ... while the job's results are written
    finally:
        worker.engine.dispose()
    (job,) = node.json("jobs")
    assert job["state"] == "done" and job["attempts"] == 2 and job["error"] is None, job
    detail = node.json("job", "show", str(job["id"]))
    assert {r["kind"] for r in detail["results"]} == {"SEG", "SR"}

    node.start()
    assert_archive_intact(node, {**sent, **assert_served(node, tmp_path / "after")})


def test_results_floor_above_the_instances_floor_is_refused(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[storage]\nmin_free_mb = 100\nresults_min_free_mb = 200\n")
    with pytest.raises(ConfigError, match="storage: results_min_free_mb .200. must not be above min_free_mb .100."):
        load_config(path)
    path.write_text("[storage]\nmin_free_mb = 100\n")
    assert load_config(path).storage.results_floor_mb == 25


def _refuse_while_disk_is_full(node: NodeProcess, paths: list[Path]) -> None:
    """Send `paths` while the node finds the disk below its minimum: every one is refused (0xA700)."""
    node.stop()
    node.settings["storage"] = {"min_free_mb": 1 << 30}  # more than any disk has
    node.start()
    result = storescu(node.port, *paths, extra=["-v", "--no-halt"])
    assert result.stderr.count("Refused: OutOfResources") == len(paths), result.stderr
    node.stop()
    node.settings["storage"] = {"min_free_mb": 1}  # space is back
    node.start()


def test_series_with_refused_instances_waits_for_the_re_send(node_factory, tmp_path):
    phantom = _small(8)
    paths = phantom.write(tmp_path / "ct")
    node = node_factory()  # stable_seconds = 2
    node.start()
    assert storescu(node.port, *paths[:5]).returncode == 0
    _refuse_while_disk_is_full(node, paths[5:])

    time.sleep(4)  # quiet for well over stable_seconds (and the hold after the restart)
    series = _series(node, phantom)
    assert series["state"] == "receiving", series
    assert series["state_reason"] == "waiting for 3 refused instance(s) to be re-sent"
    assert "3 refused instance(s) waiting to be re-sent" in node.cli("status").stdout
    assert "waiting for 3 refused instance(s)" in node.cli("series", phantom.study_uid).stdout

    assert storescu(node.port, *paths[5:]).returncode == 0  # the sender re-sends what was refused
    node.wait_for(lambda: _series(node, phantom)["state"] != "receiving", what="completion")
    complete = [e for e in node.json("events", "--study", phantom.study_uid) if e["kind"] == "complete"]
    assert len(complete) == 1 and "8 instance(s)" in complete[0]["message"]
    assert "refused instance" not in node.cli("status").stdout
    assert_archive_intact(node, {**_sources(paths), **assert_served(node, tmp_path / "after")})


def test_refused_instances_never_re_sent_complete_the_series_incomplete(node_factory, tmp_path):
    phantom = _small(8)
    paths = phantom.write(tmp_path / "ct")
    node = node_factory(series={"refused_wait_seconds": 3})
    node.start()
    assert storescu(node.port, *paths[:6]).returncode == 0
    _refuse_while_disk_is_full(node, paths[6:])

    node.wait_for(lambda: _series(node, phantom)["state"] != "receiving", what="completion without them")
    kinds = {e["kind"]: e for e in node.json("events", "--study", phantom.study_uid)}
    assert "2 refused instance(s) were not re-sent" in kinds["series-incomplete"]["message"]
    assert "6 instance(s)" in kinds["complete"]["message"]
    assert_archive_intact(node, {**_sources(paths[:6]), **assert_served(node, tmp_path / "after")})


# --- 12. kill -9 ------------------------------------------------------------------------------------------


def test_start_up_repairs_what_a_crash_leaves(node_factory, tmp_path):
    phantom = _small(6)
    paths = phantom.write(tmp_path / "ct")
    node = node_factory(series={"stable_seconds": 60})
    node.start()
    assert storescu(node.port, *paths).returncode == 0
    node.stop(signal.SIGKILL)

    # What kill -9 leaves: a row committed while its file was still being written, a temporary
    # file, a STOW-RS part still arriving, and a whole file whose row was never committed (none was acknowledged).
    rows = _rows(node)
    lost = rows[pydicom.dcmread(paths[2]).SOPInstanceUID]
    (node.storage / lost.file_path).unlink()
    folder = (node.storage / lost.file_path).parent
    (folder / f"{lost.sop_instance_uid}.dcm.139872.tmp").write_bytes(b"half an instance")
    (node.storage / ".incoming").mkdir()
    (node.storage / ".incoming" / "4242.139872.7.tmp").write_bytes(b"half a STOW-RS part")
    unacknowledged = _small(1).write(tmp_path / "extra")[0]
    orphan = folder / f"{generate_uid()}.dcm"
    orphan.write_bytes(unacknowledged.read_bytes())
    node.start()

    assert lost.sop_instance_uid not in _rows(node)
    assert not orphan.exists()
    (event,) = [e for e in node.json("events") if e["kind"] == "instance-lost"]
    assert event["SOPInstanceUID"] == lost.sop_instance_uid and event["calling_ae_title"] == "STORESCU"
    assert "STORESCU" in event["message"]
    assert _series(node, phantom)["NumberOfSeriesRelatedInstances"] == 5
    status = node.cli("status").stdout
    assert "removed 1 index row(s) without a file" in status, status
    assert "deleted 2 temporary file(s)" in status and "deleted 1 unacknowledged file(s)" in status
    assert not any((node.storage / ".incoming").iterdir())
    assert node.json("status")["last_start_up"]["level"] == "warning"
    assert_archive_intact(node, {k: v for k, v in _sources(paths).items() if k != lost.sop_instance_uid})

    assert storescu(node.port, *paths).returncode == 0  # the sender sends the series again
    assert_archive_intact(node, {**_sources(paths), **assert_served(node, tmp_path / "after")})
    node.stop(signal.SIGKILL)
    node.start()
    assert "nothing to repair" in node.cli("status").stdout


@pytest.mark.parametrize("instances", [5, 80])
def test_start_up_check_removes_nothing_when_the_files_look_gone(database_url, tmp_path, instances):
    """Storage not mounted (or emptied by hand) is not a crash: the index of the last hour stays,
    also when it holds fewer rows than a crash could leave."""
    engine = make_engine(database_url)
    upgrade(engine)
    try:
        index = Index(engine)
        phantom = _small(instances, 8)
        for ds in phantom.datasets():
            header = InstanceHeader(phantom.study_uid, phantom.series_uid, ds.SOPInstanceUID, ds.SOPClassUID,
                                    ExplicitVRLittleEndian, instance_number=ds.InstanceNumber)
            index.record_instance(header, Sender("CT1", "10.0.0.5"), f"{phantom.study_uid}/{phantom.series_uid}/"
                                  f"{ds.SOPInstanceUID}.dcm", 1000)
        (tmp_path / "storage").mkdir()  # as the node makes it: there, but empty
        repair = reconcile(engine, tmp_path / "storage", max_in_flight=10)
        assert repair.rows_removed == [] and repair.rows_kept_without_file == instances
        assert last_check(engine)["level"] == "error" and "is the storage mounted" in last_check(engine)["message"]
        with engine.connect() as connection:
            assert connection.execute(select(func.count()).select_from(Instance)).scalar_one() == instances
    finally:
        engine.dispose()


def test_start_up_check_finds_files_where_their_rows_say(database_url, tmp_path):
    """A Series Instance UID reused under a second study: its instance's file is under that study's folder."""
    engine = make_engine(database_url)
    upgrade(engine)
    try:
        index, store = Index(engine), InstanceStore(tmp_path / "storage", 0)
        phantom = _small(1, 8)
        for study in ("1.2.826.0.1.3680043.10.1447.1", "1.2.826.0.1.3680043.10.1447.2"):
            sop = f"{study}.9"
            header = InstanceHeader(study, phantom.series_uid, sop, "1.2.840.10008.5.1.4.1.1.2",
                                    ExplicitVRLittleEndian)
            relative = store.relative_path(study, phantom.series_uid, sop)
            store.write_instance(relative, b"whole and acknowledged")
            index.record_instance(header, Sender("CT1", "10.0.0.5"), relative, 22)
        repair = reconcile(engine, tmp_path / "storage", max_in_flight=10)
        assert repair.rows_removed == [] and repair.unacknowledged_files == 0
        with engine.connect() as connection:
            assert connection.execute(select(func.count()).select_from(Instance)).scalar_one() == 2
    finally:
        engine.dispose()


def test_kill_9_while_four_senders_store(node_factory, tmp_path):
    """Random kill -9 of the node under 4 senders; after each restart rows equal files, then scanners re-send."""
    phantoms = [_small(40, 128) for _ in range(4)]
    sets = [phantom.write(tmp_path / f"s{n}") for n, phantom in enumerate(phantoms)]
    sent = {sop: path for paths in sets for sop, path in _sources(paths).items()}
    node = node_factory()
    node.start()
    rng = random.Random(15)

    def send_all() -> list[subprocess.Popen]:
        return [
            subprocess.Popen([dcmtk("storescu"), "-aet", f"SCANNER{n}", "-aec", "AI_NODE", "127.0.0.1",
                              str(node.port), *map(str, paths)],
                             env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for n, paths in enumerate(sets)
        ]

    def stored() -> list[int]:
        return [len(list((node.storage / p.study_uid / p.series_uid).glob("*.dcm"))) for p in phantoms]

    for _ in range(5):
        target = sum(stored()) + rng.randint(5, 60)
        senders = send_all()
        deadline = time.monotonic() + 30
        # Each sender past its first instance: the index knows every series then (a crash during the
        # very first instance of a new study leaves its leftovers where the start-up check does not look).
        while (sum(stored()) < target or min(stored()) < 2) and any(s.poll() is None for s in senders):
            assert time.monotonic() < deadline, "the senders did not get going"
            time.sleep(0.002)
        node.stop(signal.SIGKILL)
        for sender in senders:
            sender.wait(timeout=30)
        node.start()
        assert_archive_intact(node, {})  # what the crash cut off is repaired before anyone is served

    senders = send_all()  # as scanners do: send again what was not acknowledged (here: everything)
    assert [sender.wait(timeout=60) for sender in senders] == [0, 0, 0, 0]
    assert_archive_intact(node, {**sent, **assert_served(node, tmp_path / "after")})


# --- 13. two senders of one SOP Instance UID at once ------------------------------------------------------


def _send(port: int, ae_title: str, datasets: list[pydicom.Dataset], start: threading.Barrier) -> list[int]:
    ae = AE(ae_title)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="AI_NODE")
    assert assoc.is_established
    try:
        start.wait(timeout=30)
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


def test_two_senders_of_the_same_instances_at_once(node, tmp_path):
    """The row and the kept file describe the same copy, whichever sender's copy that is."""
    phantom = _small(60, 32)
    copies = {}
    for ae_title, offset, comment in (("SENDER_A", 0, "copy A"), ("SENDER_B", 1000, "copy B, a longer one")):
        copies[ae_title] = []
        for ds in phantom.datasets():
            ds.InstanceNumber += offset
            ds.ImageComments = comment
            copies[ae_title].append(ds)
    sops = [ds.SOPInstanceUID for ds in copies["SENDER_A"]]
    for ds in copies["SENDER_B"]:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sops[ds.InstanceNumber - 1001]

    for _ in range(2):  # two rounds of 120 arrivals: the race showed in 1-2 of 120
        start = threading.Barrier(2)
        answers: dict[str, list[int]] = {}
        threads = [
            threading.Thread(target=lambda ae=ae: answers.__setitem__(ae, _send(node.port, ae, copies[ae], start)))
            for ae in copies
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert answers == {ae: [0] * 60 for ae in copies}
        rows = assert_archive_intact(node, {})
        for sop in sops:
            row = rows[sop]
            stored = pydicom.dcmread(node.storage / row.file_path)
            assert (row.instance_number, row.calling_ae_title) == (
                stored.InstanceNumber,
                stored.file_meta.SourceApplicationEntityTitle,
            ), f"the row of {sop} describes the other copy"
        for datasets in copies.values():  # a fresh set of UIDs for the next round
            for ds, sop in zip(datasets, new := [generate_uid() for _ in sops]):
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        sops = new
    assert_served(node, tmp_path / "after")


def test_a_new_row_over_a_leftover_file_replaces_the_file(node, tmp_path):
    """A file no row describes (a crash, an index failure) is never taken for the copy just acknowledged."""
    phantom = _small(2)
    paths = phantom.write(tmp_path / "ct")
    stale = pydicom.dcmread(paths[0])
    stale.InstanceNumber = 99
    leftover = node.storage / phantom.study_uid / phantom.series_uid / f"{stale.SOPInstanceUID}.dcm"
    leftover.parent.mkdir(parents=True)
    stale.save_as(leftover, enforce_file_format=True)

    assert storescu(node.port, *paths).returncode == 0
    rows = assert_archive_intact(node, _sources(paths))
    assert pydicom.dcmread(leftover).InstanceNumber == rows[stale.SOPInstanceUID].instance_number == 1

    # A row whose file went missing takes the copy re-sent, and describes it.
    other = pydicom.dcmread(paths[1])
    (node.storage / rows[other.SOPInstanceUID].file_path).unlink()
    other.InstanceNumber = 77
    other.save_as(tmp_path / "resent.dcm", enforce_file_format=True)
    assert storescu(node.port, tmp_path / "resent.dcm", calling="RESENDER").returncode == 0
    row = assert_archive_intact(node, {other.SOPInstanceUID: tmp_path / "resent.dcm"})[other.SOPInstanceUID]
    assert (row.instance_number, row.calling_ae_title) == (77, "RESENDER")
    assert_served(node, tmp_path / "after")


# --- 14. retry of something that does not exist -----------------------------------------------------------


@pytest.mark.parametrize(("target", "said"), [("D99", "no delivery 99"), ("J99", "no job 99")])
def test_retry_of_an_unknown_id_says_it_does_not_exist(node, tmp_path, target, said):
    result = node.cli("retry", target, check=False)
    assert result.returncode == 2
    assert said in result.stderr and "is not failed" not in result.stderr, result.stderr
    assert_served(node, tmp_path / "after")

"""Orthanc as the PACS the node pulls from: its change feed, only series a route wants, never the
node's own results, and a cursor in the database that survives restarts.

Most tests drive `OrthancPuller` in-process against a real Orthanc and a real database; the
last one runs the whole node (pull -> process -> deliver back to the same Orthanc)."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
import requests
from conftest import storescu
from orthanc import OrthancProcess, orthanc_servers
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from dicom_ai_node.config import Config
from dicom_ai_node.ingest.orthanc_pull import NODE_MANUFACTURER, OrthancPuller
from dicom_ai_node.ingest.parse import split_part10
from dicom_ai_node.ingest.receive import Receiver
from dicom_ai_node.phantoms import CTPhantom, MRPhantom
from dicom_ai_node.store.db import make_engine, upgrade
from dicom_ai_node.store.files import InstanceStore
from dicom_ai_node.store.index import Index
from dicom_ai_node.store.models import Event, Instance, Series

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


@pytest.fixture
def pacs(tmp_path) -> OrthancProcess:
    with orthanc_servers(tmp_path / "pacs") as make:
        yield make(settings={"StableAge": 2})


@pytest.fixture
def ingest(database_url, tmp_path):
    """(engine, receiver): the node's ingest path on a migrated database, without a node process."""
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine, Receiver(Index(engine), InstanceStore(tmp_path / "storage", 2**20))
    engine.dispose()


def _puller(pacs: OrthancProcess, ingest, **source) -> OrthancPuller:
    engine, receiver = ingest
    config = Config(sources={"pacs": {"kind": "orthanc", "url": pacs.url, "poll_seconds": 0.2, **source}})
    return OrthancPuller("pacs", config.sources["pacs"], config, engine, receiver)


def _ct(tmp_path: Path, slices: int = 24, **kwargs) -> tuple[CTPhantom, list[Path]]:
    phantom = CTPhantom(slices=slices, rows=96, columns=96, pixel_spacing=(4.0, 4.0), slice_spacing=10.0, **kwargs)
    return phantom, phantom.write(tmp_path / f"ct-{phantom.series_uid[-8:]}")


def _send(pacs: OrthancProcess, paths: list[Path]) -> None:
    result = storescu(pacs.dicom_port, *paths, called=pacs.aet)
    assert result.returncode == 0, result.stderr


def _upload(pacs: OrthancProcess, path: Path) -> None:
    requests.post(pacs.url + "/instances", data=path.read_bytes(), timeout=30).raise_for_status()


def _wait_stable(pacs: OrthancProcess, count: int, timeout: float = 30) -> int:
    """Wait until Orthanc has announced `count` StableSeries; its last change sequence number."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        changes = pacs.get("/changes?limit=10000")
        if sum(change["ChangeType"] == "StableSeries" for change in changes["Changes"]) >= count:
            return changes["Last"]
        time.sleep(0.2)
    raise AssertionError(f"Orthanc did not announce {count} stable series within {timeout} s")


def _drain(puller: OrthancPuller) -> int:
    """Poll until the feed is read to its end; the number of instances ingested."""
    pulled = 0
    while True:
        result = puller.poll_once()
        pulled += result.instances
        if not result.more:
            return pulled


def _held(engine) -> tuple[int, int]:
    """(instances in the index, duplicates counted)."""
    with engine.connect() as connection:
        instances = connection.execute(select(func.count()).select_from(Instance)).scalar_one()
        duplicates = connection.execute(select(func.coalesce(func.sum(Series.duplicates_received), 0))).scalar_one()
    return instances, duplicates


def _series_held(engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.execute(select(Series.series_instance_uid)).scalars())


def test_pulls_a_stable_ct_series_once_and_resumes_after_restart(pacs, ingest, tmp_path):
    engine, _ = ingest
    _send(pacs, _ct(tmp_path, slices=4)[1])  # history: in the PACS before the node ever looked
    _wait_stable(pacs, 1)

    first = _puller(pacs, ingest)
    assert first.cursor() is None
    assert _drain(first) == 0  # first start: the feed is taken up at /changes?last, history is not pulled
    assert first.cursor() == pacs.get("/changes?last")["Last"]
    with engine.connect() as connection:
        assert connection.execute(select(Event.message).where(Event.kind == "source-started")).scalar_one()

    phantom, paths = _ct(tmp_path)
    _send(pacs, paths)
    last = _wait_stable(pacs, 2)
    assert _drain(first) == 24
    assert first.cursor() == last
    assert _held(engine) == (24, 0)
    with engine.connect() as connection:
        rows = connection.execute(select(Instance.source, Instance.calling_ae_title, Instance.calling_host)).all()
    assert set(rows) == {("orthanc", "pacs", "127.0.0.1")}
    assert _series_held(engine) == {phantom.series_uid}
    first.stop()

    again = _puller(pacs, ingest)  # a restart: the cursor is in the database
    assert again.cursor() == last
    assert _drain(again) == 0
    assert _held(engine) == (24, 0)  # nothing pulled twice, not even as a counted duplicate

    # A series that becomes stable while no puller runs is pulled by the next one, in its thread.
    later, later_paths = _ct(tmp_path, slices=6)
    _send(pacs, later_paths)
    last = _wait_stable(pacs, 3)
    resumed = _puller(pacs, ingest)
    resumed.start()
    try:
        deadline = time.monotonic() + 30
        while _held(engine)[0] < 30 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        resumed.stop()
    assert _held(engine) == (30, 0)
    assert _series_held(engine) == {phantom.series_uid, later.series_uid}
    assert resumed.cursor() == last


def _non_image(tmp_path: Path, sop_class_uid: str, modality: str, study_uid: str) -> Path:
    """A minimal object of `sop_class_uid` (Orthanc stores any well-formed dataset)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = "PULL"
    ds.PatientName = "Pull^Test"
    path = tmp_path / f"{modality}-{ds.SeriesInstanceUID[-8:]}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_never_pulls_results_nor_series_no_route_wants(pacs, ingest, tmp_path):
    engine, _ = ingest
    puller = _puller(pacs, ingest)
    _drain(puller)  # the cursor exists before anything arrives

    study_uid = generate_uid()
    _upload(pacs, _non_image(tmp_path, SEG_STORAGE, "SEG", study_uid))
    _upload(pacs, _non_image(tmp_path, BASIC_TEXT_SR, "SR", study_uid))
    produced, produced_paths = _ct(tmp_path, slices=4)  # an image series the node itself would have written
    for path in produced_paths:
        ds = pydicom.dcmread(path)
        ds.Manufacturer = NODE_MANUFACTURER
        ds.save_as(path)
    _send(pacs, produced_paths)
    mr = MRPhantom(slices=4, rows=64, columns=64, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)
    _send(pacs, mr.write(tmp_path / "mr"))  # no route for MR in the default config
    wanted, wanted_paths = _ct(tmp_path, slices=4)
    _send(pacs, wanted_paths)
    _wait_stable(pacs, 5)

    assert _drain(puller) == 4
    assert _series_held(engine) == {wanted.series_uid}
    assert produced.series_uid != wanted.series_uid


def test_node_manufacturer_is_what_the_worker_writes():
    from dicom_ai_node.results.objects import MANUFACTURER

    assert NODE_MANUFACTURER == MANUFACTURER


def test_split_part10_hands_over_the_dataset_untouched(tmp_path):
    _, (path, *_) = _ct(tmp_path, slices=1)
    data = path.read_bytes()
    meta = split_part10(data)
    dataset = data[meta.dataset_offset :]
    assert meta.transfer_syntax_uid == pydicom.dcmread(path).file_meta.TransferSyntaxUID
    assert data.endswith(dataset) and dataset[:2] != b"\x02\x00"
    with pytest.raises(ValueError, match="Part-10"):
        split_part10(dataset)


def test_node_pulls_processes_delivers_back_and_does_not_loop(node_factory, pacs, tmp_path):
    node = node_factory(
        workers={"processes": 1},
        sources={"pacs": {"kind": "orthanc", "url": pacs.url, "poll_seconds": 0.5}},
        destinations={"pacs-rest": {"kind": "orthanc", "url": pacs.url}},
        routes=[{"name": "ct", "modality": "CT", "min_slices": 3, "models": ["ct-tissue"],
                 "destinations": ["pacs-rest"]}],
    )
    node.start()
    node.wait_for(lambda: any(e["kind"] == "source-started" for e in node.json("events")), what="the source")
    phantom, paths = _ct(tmp_path)
    _send(pacs, paths)

    node.wait_for(lambda: node.json("deliveries", "--state", "delivered"), timeout=180, what="the delivery")
    assert pacs.count_instances() == 26  # the CT, then the node's SEG and SR
    # Orthanc announces the SEG and SR series as stable too; the node must leave them there.
    node.wait_for(lambda: node.log().count("not pulled: a ") >= 2, what="the results skipped", timeout=60)
    (series,) = node.json("series", phantom.study_uid)
    assert series["NumberOfSeriesRelatedInstances"] == 24
    assert len(node.json("jobs")) == 1

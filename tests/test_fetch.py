"""Pulling studies from a PACS that pushes nothing (issue 12, item 4): `fetch` by accession, by date range and
modality, or by UID; the node retrieves them by C-MOVE to its own AE, within its window and rate, and routes them
as pushed studies.  Orthanc is the PACS: it answers the C-FIND and performs the C-MOVE to the node's SCP."""

from __future__ import annotations

import datetime as dt
import socket
import time

import pydicom
import pytest
import requests
from conftest import free_port, storescu
from orthanc import orthanc_servers
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from sqlalchemy import insert, select, update

from dicom_ai_node.config import FetchSection, Peer
from dicom_ai_node.fetch.dimse import PeerError, StudyQuery, find_studies
from dicom_ai_node.fetch.runner import waiting_reason
from dicom_ai_node.phantoms import CTPhantom, MRPhantom
from dicom_ai_node.series.completion import SeriesCompletion
from dicom_ai_node.store.index import Index
from dicom_ai_node.store.models import Event, Fetch, Series, Study, utcnow


@pytest.fixture
def orthancs(tmp_path):
    with orthanc_servers(tmp_path / "pacs") as make:
        yield make


def _study(phantom: CTPhantom, folder, date: str) -> CTPhantom:
    """The phantom written to `folder`, dated `date`."""
    for path in phantom.write(folder):
        dataset = pydicom.dcmread(path)
        dataset.StudyDate = dataset.SeriesDate = dataset.ContentDate = date
        dataset.save_as(path)
    return phantom


def _pacs_holding_three_studies(orthancs, node, tmp_path) -> tuple:
    """Orthanc, knowing the node as a move destination, holding two CT studies and an MR study of January."""
    pacs = orthancs(modalities={"node": ("AI_NODE", "127.0.0.1", node.port)})
    grid = dict(slices=6, rows=48, columns=48, pixel_spacing=(8.0, 8.0), slice_spacing=10.0)
    first = _study(CTPhantom(accession_number="ACC-A", **grid), tmp_path / "a", "20260110")
    second = _study(CTPhantom(accession_number="ACC-B", **grid), tmp_path / "b", "20260120")
    mr = _study(MRPhantom(accession_number="ACC-M", **grid), tmp_path / "m", "20260115")
    for folder in ("a", "b", "m"):
        assert storescu(pacs.dicom_port, *sorted((tmp_path / folder).iterdir()), called=pacs.aet).returncode == 0
    return pacs, first, second, mr


def _peer(pacs) -> dict:
    return {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}}


def _fetched(node, state: str, count: int) -> list[dict]:
    return node.wait_for(lambda: (rows := [r for r in node.json("fetches") if r["state"] == state])
                         and len(rows) >= count and rows, timeout=120, what=f"{count} fetch(es) {state}")


def test_fetch_by_accession_then_by_dates_and_modality_routes_what_arrives(node_factory, orthancs, tmp_path):
    """With a quiet period no test waits for, a fetched series completes when the peer's C-MOVE ends."""
    node = node_factory(series={"stable_seconds": 3600})
    pacs, first, second, mr = _pacs_holding_three_studies(orthancs, node, tmp_path)
    node.settings["peers"] = _peer(pacs)
    node.start()

    answer = node.json("fetch", "pacs", "--accession", "ACC-A")
    assert [s["study_instance_uid"] for s in answer["found"]] == [first.study_uid] and answer["queued"] == 1
    assert (answer["found"][0]["instances"], answer["found"][0]["modalities"]) == (6, "CT")
    (done,) = _fetched(node, "done", 1)
    assert (done["completed"], done["failed"], done["NumberOfStudyRelatedInstances"]) == (6, 0, 6)
    series = node.wait_for(lambda: [s for s in node.json("series", first.study_uid) if s["state"] == "routed"],
                           what="the fetched series routed")
    assert series[0]["NumberOfSeriesRelatedInstances"] == 6
    (complete,) = [e for e in node.json("events", "--study", first.study_uid) if e["kind"] == "complete"]
    assert complete["message"] == "series complete: 6 instance(s), the peer's C-MOVE of the study has ended"

    january_ct = node.json("fetch", "pacs", "--dates", "20260101-20260131", "--modality", "CT")
    assert {s["study_instance_uid"] for s in january_ct["found"]} == {first.study_uid, second.study_uid}
    assert (january_ct["queued"], january_ct["already"]) == (1, 1)  # the first is fetched already
    _fetched(node, "done", 2)
    assert node.wait_for(lambda: node.json("series", second.study_uid), what="the second study")

    dry = node.json("fetch", "pacs", "--dates", "20260115", "--dry-run")
    assert [s["study_instance_uid"] for s in dry["found"]] == [mr.study_uid] and dry["queued"] == 0
    assert len(node.json("fetches")) == 2
    kinds = [e["kind"] for e in node.json("events")]
    assert kinds.count("fetch-requested") == 2 and kinds.count("fetch-done") == 2
    refused = node.cli("fetch", "pacs", check=False)
    assert refused.returncode != 0 and "say which studies" in refused.stderr
    bad_dates = node.cli("fetch", "pacs", "--dates", "2026-01-01", check=False)
    assert bad_dates.returncode != 0 and "YYYYMMDD-YYYYMMDD" in bad_dates.stderr


def test_a_study_the_node_refuses_is_not_done_but_tried_again(node_factory, orthancs, tmp_path):
    """The node's own SCP refuses the peer (not in dimse.allowed_callers): the peer fails every sub-operation, and
    the fetch is neither done nor given up at once: it is tried again later, with the reason in `events`."""
    node = node_factory(dimse={"allowed_callers": [{"ae_title": "STORESCU"}]})
    pacs, first, _, _ = _pacs_holding_three_studies(orthancs, node, tmp_path)
    node.settings["peers"] = _peer(pacs)
    node.start()
    assert node.json("fetch", "pacs", "--accession", "ACC-A")["queued"] == 1
    retried = node.wait_for(lambda: [e for e in node.json("events") if e["kind"] == "fetch-failed"], timeout=60,
                            what="the failed attempt")
    assert "attempt 1 of 5 failed" in retried[0]["message"] and retried[0]["level"] == "warning"
    (fetch,) = node.json("fetches")
    assert fetch["state"] == "queued" and fetch["error"] and not node.json("series", first.study_uid)


def test_the_rate_limit_holds_the_rest_and_a_peer_that_cannot_move_to_the_node_fails_with_the_fix(
        node_factory, orthancs, tmp_path):
    node = node_factory(fetch={"max_studies_per_hour": 1})
    pacs, first, second, _ = _pacs_holding_three_studies(orthancs, node, tmp_path)
    # Answers anyone's C-FIND and holds the first study too, but does not know the node as a move destination.
    stranger = orthancs(settings={"DicomAlwaysAllowFind": True})
    assert storescu(stranger.dicom_port, *sorted((tmp_path / "a").iterdir()), called=stranger.aet).returncode == 0
    node.settings["peers"] = {**_peer(pacs), "stranger": {"ae_title": stranger.aet, "host": "127.0.0.1",
                                                          "port": stranger.dicom_port}}
    node.start()
    assert node.json("fetch", "pacs", "--study", first.study_uid, "--study", second.study_uid)["queued"] == 2
    _fetched(node, "done", 1)
    status = node.json("status")["fetches"]
    assert (status["done"], status["queued"]) == (1, 1)
    assert "waiting: fetch.max_studies_per_hour (1) reached" in node.cli("status").stdout

    node.stop()  # the queued fetch survives a restart, still held by the rate limit
    node.settings["fetch"] = {}
    node.start()
    _fetched(node, "done", 2)

    assert node.json("fetch", "stranger", "--study", first.study_uid, "--again")["queued"] == 1
    (failed,) = _fetched(node, "failed", 1)
    assert "know the node's AE title AI_NODE as a move destination" in failed["error"]
    (event,) = [e for e in node.json("events") if e["kind"] == "fetch-failed"]
    assert f"dicom-ai-node retry F{failed['id']}" in event["message"]
    assert "queued again" in node.cli("retry", f"F{failed['id']}").stdout


@pytest.mark.parametrize(("window", "clock", "waits"), [
    ("22:00-06:00", "23:30", False), ("22:00-06:00", "05:59", False), ("22:00-06:00", "06:00", True),
    ("22:00-06:00", "12:00", True), ("08:00-18:00", "12:00", False), ("08:00-18:00", "18:00", True),
])
def test_the_window_may_wrap_midnight(window: str, clock: str, waits: bool):
    settings = FetchSection(window=window)
    now = dt.datetime.combine(dt.date(2026, 12, 1), dt.time.fromisoformat(clock))
    reason = waiting_reason(settings, now, started_last_hour=0)
    assert (reason is not None) == waits and (not waits or f"outside fetch.window {window}" in reason)
    assert waiting_reason(FetchSection(max_studies_per_hour=2), now, 2) == "fetch.max_studies_per_hour (2) reached"


def test_a_series_being_fetched_waits_out_any_pause_and_completes_when_the_move_ends(engine):
    """A PACS restoring a study from slow storage pauses far longer than the quiet period: while the C-MOVE runs the
    series waits (and says why); once it has ended the series completes at once, quiet or not."""
    completion = SeriesCompletion(Index(engine))
    long_ago = utcnow() - dt.timedelta(hours=1)
    with engine.begin() as connection:
        study = connection.execute(insert(Study).values(study_instance_uid="1.2.3")).inserted_primary_key[0]
        connection.execute(insert(Series).values(
            study_id=study, series_instance_uid="1.2.3.4", modality="CT", state="receiving", last_received_at=long_ago,
            first_received_at=long_ago, reprocess_requested=False, late_instances=0, duplicates_received=0))
        fetch = connection.execute(insert(Fetch).values(
            peer="pacs", study_instance_uid="1.2.3", asked="accession A", state="fetching", attempts=1,
            requested_at=long_ago, started_at=long_ago)).inserted_primary_key[0]
    assert completion.complete_stable_series(stable_seconds=60, refused_wait_seconds=600) == []
    (series,) = index_series(engine)
    assert (series.state, series.state_reason) == ("receiving", f"waiting for the C-MOVE of fetch F{fetch} to end")
    with engine.begin() as connection:
        connection.execute(update(Fetch).where(Fetch.id == fetch).values(state="done", finished_at=utcnow()))
    (done,) = completion.complete_stable_series(stable_seconds=3600, refused_wait_seconds=600)
    assert done.series_instance_uid == "1.2.3.4"
    with engine.connect() as connection:
        message = connection.execute(select(Event.message).where(Event.kind == "complete")).scalar_one()
    assert message.endswith("the peer's C-MOVE of the study has ended")


def index_series(engine) -> list:
    with engine.connect() as connection:
        return connection.execute(select(Series.state, Series.state_reason)).all()


def test_a_series_its_sending_pacs_holds_more_of_waits_for_the_rest(node_factory, orthancs, tmp_path):
    """Orthanc, a configured peer, sends half a series and pauses longer than the quiet period: the node asks it
    (C-FIND, NumberOfSeriesRelatedInstances) and waits; the rest arrives and the series completes, saying why."""
    node = node_factory()
    pacs = orthancs(modalities={"node": ("AI_NODE", "127.0.0.1", node.port)})
    phantom = CTPhantom(slices=6, rows=48, columns=48, pixel_spacing=(8.0, 8.0), slice_spacing=10.0)
    assert storescu(pacs.dicom_port, *phantom.write(tmp_path / "ct"), called=pacs.aet).returncode == 0
    node.settings["peers"] = _peer(pacs)
    node.start()
    instances = sorted(pacs.get("/instances"))

    def send(ids: list[str]) -> None:
        answer = requests.post(f"{pacs.url}/modalities/node/store", json={"Resources": ids, "Synchronous": True},
                               timeout=60)
        assert answer.status_code == 200, answer.text

    send(instances[:3])
    waiting = node.wait_for(lambda: [s for s in node.json("series", phantom.study_uid)
                                     if (s["state_reason"] or "").startswith("waiting for 3 of the 6")],
                            timeout=30, what="the series waiting for its sender")
    assert waiting[0]["state"] == "receiving"
    time.sleep(3)  # longer than the quiet period (2 s): still waiting
    assert node.json("series", phantom.study_uid)[0]["state"] == "receiving"
    send(instances[3:])
    node.wait_for(lambda: node.json("series", phantom.study_uid)[0]["state"] != "receiving", timeout=30,
                  what="the series complete")
    (complete,) = [e for e in node.json("events", "--study", phantom.study_uid) if e["kind"] == "complete"]
    assert complete["message"] == "series complete: 6 instance(s), no new instance for 2 s, and the sender pacs holds 6"


def test_a_sender_that_never_answers_holds_up_no_other_series(node_factory, tmp_path):
    """The configured peer behind a series accepts connections and never answers (a hung PACS): asking it happens
    off the stage thread, so another sender's series completes on time; the hung peer's series completes by quiet
    once the question has failed."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # connections complete in the backlog; nothing ever answers them
    try:
        node = node_factory(peers={"hung": {"ae_title": "STORESCU", "host": "127.0.0.1",
                                            "port": hung.getsockname()[1]}})
        node.start()
        grid = dict(slices=4, rows=32, columns=32, pixel_spacing=(8.0, 8.0), slice_spacing=10.0)
        from_hung, other = CTPhantom(**grid), CTPhantom(**grid)
        assert storescu(node.port, *from_hung.write(tmp_path / "hung")).returncode == 0
        sent = time.monotonic()
        assert storescu(node.port, *other.write(tmp_path / "other"), calling="OTHER").returncode == 0
        node.wait_for(lambda: node.json("series", other.study_uid)[0]["state"] != "receiving", timeout=8,
                      what="the other sender's series, complete on time")
        assert time.monotonic() - sent < 8
        assert node.json("series", from_hung.study_uid)[0]["state"] == "receiving"
        node.wait_for(lambda: node.json("series", from_hung.study_uid)[0]["state"] != "receiving", timeout=60,
                      what="the hung peer's series, complete by quiet once asking it failed")
    finally:
        hung.close()


def test_a_peer_that_answers_with_its_whole_archive_is_cut_off_and_asked_to_narrow():
    """A C-FIND answer past the limit is not kept growing in memory: the association is aborted and the admin is
    asked for a narrower query; the peer (and the next question) are served as before."""

    def answers(event):
        for number in range(30):
            match = Dataset()
            match.QueryRetrieveLevel = "STUDY"
            match.StudyInstanceUID = f"1.2.3.{number}"
            match.NumberOfStudyRelatedInstances = number
            yield 0xFF00, match

    ae = AE(ae_title="ARCHIVE")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, answers)])
    try:
        peer = Peer(ae_title="ARCHIVE", host="127.0.0.1", port=port)
        query = StudyQuery(study_date="20000101-20261231")
        with pytest.raises(PeerError, match="more than 25 studies matching dates 20000101-20261231: narrow"):
            find_studies("AI_NODE", "archive", peer, query, limit=25)
        found = find_studies("AI_NODE", "archive", peer, query, limit=100)
        assert [study.instances for study in found] == list(range(30))
    finally:
        server.shutdown()

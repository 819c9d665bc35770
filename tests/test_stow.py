"""STOW-RS answers as PS3.18 §10.5.3 and Annex I say, against a real node over HTTP, with requests and with
dicomweb-client: the study's RetrieveURL at the top, failure items that name the instance whenever it can be
read, and a warning (status 202) when the node keeps the first copy of an instance it already holds."""

from __future__ import annotations

import socket
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import requests
from conftest import NodeProcess
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid
from test_web import (
    AUTH,
    FAILED_SOP_SEQUENCE,
    FAILURE_REASON,
    REFERENCED_SOP_SEQUENCE,
    RETRIEVE_URL,
    SOP_INSTANCE_UID,
    dicomweb,
    parts_of,
    small_ct,
    stow,
    value,
    web_settings,
)

SOP_CLASS_UID, WARNING_REASON = "00081150", "00081196"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def web_node(node_factory) -> NodeProcess:
    node = node_factory(web=web_settings())
    node.start()
    return node


def _bare_dataset(path: Path) -> bytes:
    """The dataset alone, without preamble and File Meta Information (not a PS3.10 file)."""
    ds = pydicom.dcmread(path)
    del ds.file_meta
    ds.preamble = None
    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=False)
    return buffer.getvalue()


def test_retrieve_url_of_the_study_and_failures_that_name_their_instance(web_node: NodeProcess, tmp_path: Path):
    first, second = small_ct(tmp_path / "a"), small_ct(tmp_path / "b")
    study = pydicom.dcmread(first[0]).StudyInstanceUID

    # POST /studies, all of one study: the top-level RetrieveURL (PS3.18 Table I.1-1) is that study's.
    response = stow(web_node, [first[0].read_bytes(), first[1].read_bytes()])
    assert response.status_code == 200, response.text
    assert value(response.json(), RETRIEVE_URL) == f"{dicomweb(web_node)}/studies/{study}"

    # Instances of two studies: no one study URL; the attribute is there (Type 2), empty.
    response = stow(web_node, [first[2].read_bytes(), second[0].read_bytes()])
    assert response.status_code == 200, response.text
    assert response.json()[RETRIEVE_URL] == {"vr": "UR"}
    assert len(response.json()[REFERENCED_SOP_SEQUENCE]["Value"]) == 2

    # A part of another study than the URL's, a truncated file whose header reads, and a dataset sent without its
    # File Meta: each fails with its SOP Class and Instance UIDs; the good instance is stored (202).
    other = pydicom.dcmread(second[1])
    truncated = pydicom.dcmread(first[4])
    bare = pydicom.dcmread(first[5])
    response = stow(web_node, [first[3].read_bytes(), second[1].read_bytes(), first[4].read_bytes()[:-1000],
                               _bare_dataset(first[5])], path=f"/studies/{study}")
    assert response.status_code == 202, response.text
    assert value(response.json(), RETRIEVE_URL) == f"{dicomweb(web_node)}/studies/{study}"
    failures = {value(item, SOP_INSTANCE_UID): item for item in response.json()[FAILED_SOP_SEQUENCE]["Value"]}
    assert set(failures) == {other.SOPInstanceUID, truncated.SOPInstanceUID, bare.SOPInstanceUID}
    assert {value(item, SOP_CLASS_UID) for item in failures.values()} == {CT_IMAGE_STORAGE}
    assert value(failures[other.SOPInstanceUID], FAILURE_REASON) == 0xA900  # study mismatch
    assert value(failures[truncated.SOPInstanceUID], FAILURE_REASON) >> 12 == 0xC  # cannot understand
    assert value(failures[bare.SOPInstanceUID], FAILURE_REASON) == 0xC000
    (stored,) = response.json()[REFERENCED_SOP_SEQUENCE]["Value"]
    assert value(stored, SOP_INSTANCE_UID) == pydicom.dcmread(first[3]).SOPInstanceUID
    refused = " ".join(event["message"] for event in web_node.json("events") if event["kind"] == "store-failed")
    assert other.SOPInstanceUID in refused and truncated.SOPInstanceUID in refused
    assert sorted(row["NumberOfStudyRelatedInstances"] for row in web_node.json("studies")) == [1, 4]


def test_a_copy_of_an_instance_already_held_is_a_warning_and_the_first_copy_stays(web_node: NodeProcess,
                                                                                   tmp_path: Path):
    files = small_ct(tmp_path / "ct", patient_id="STOW-DUP")
    originals = [path.read_bytes() for path in files]
    datasets = [pydicom.dcmread(path) for path in files]
    study, series = datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID
    assert stow(web_node, originals[:3]).status_code == 200

    changed = pydicom.dcmread(files[0])
    changed.PatientName = "Changed^Copy"
    buffer = BytesIO()
    changed.save_as(buffer, enforce_file_format=True)
    # Two copies already held, one new instance, and the new one a second time in the same request.
    response = stow(web_node, [buffer.getvalue(), originals[1], originals[3], originals[3]])
    assert response.status_code == 202, response.text  # PS3.18 Table 10.5.3-1: stored, with warnings
    assert response.headers["warning"].startswith("299 ")
    items = response.json()[REFERENCED_SOP_SEQUENCE]["Value"]
    warned = [(value(item, SOP_INSTANCE_UID), value(item, WARNING_REASON) if WARNING_REASON in item else None)
              for item in items]
    uids = [ds.SOPInstanceUID for ds in datasets]
    assert warned == [(uids[0], 0xB000), (uids[1], 0xB000), (uids[3], None), (uids[3], 0xB000)]
    assert FAILED_SOP_SEQUENCE not in response.json()

    instance = f"{dicomweb(web_node)}/studies/{study}/series/{series}/instances/{uids[0]}"
    assert parts_of(requests.get(instance, headers=AUTH, timeout=30)) == [originals[0]]  # the first copy
    (row,) = web_node.json("studies")
    assert row["NumberOfStudyRelatedInstances"] == 4

    # dicomweb-client: a 202 is no error; the answer dataset carries the warning and the study's URL.
    client = DICOMwebClient(dicomweb(web_node), headers=AUTH)
    result = client.store_instances([datasets[2]])
    assert result.ReferencedSOPSequence[0].WarningReason == 0xB000
    # (dicomweb-client sends a Host header without the port, and the URLs are built from it.)
    assert result.RetrieveURL.endswith(f"/dicom-web/studies/{study}")
    fresh = pydicom.dcmread(files[4])
    fresh.SOPInstanceUID = fresh.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    result = client.store_instances([fresh])
    assert "WarningReason" not in result.ReferencedSOPSequence[0]
    assert result.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == fresh.SOPInstanceUID


def test_a_request_head_is_bounded(web_node: NodeProcess):
    """httptools parses bodies fast but buffers a head without bound: the server cuts it at 16 KiB (431)."""
    port = web_node.settings["web"]["port"]
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: node\r\nX-Padding: " + b"a" * 64 * 1024)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]

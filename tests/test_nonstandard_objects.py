"""Issue 10.8: every object a PACS may send is stored, as dcmtk's storescp stores it.

Retired storage SOP classes (the old Ultrasound Image Storage that old devices still
send) and private SOP classes are stored by C-STORE and STOW-RS unless switched off;
instances whose UIDs are not UIDs (64 hex characters after some anonymisers, in
pydicom-data's `bad_sequence.dcm`) are stored under a digest name, kept as sent in
the index and served by WADO-RS.  The scanner is dcmtk's storescu, the DICOMweb
client is `dicomweb-client`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from requests import HTTPError

from conftest import storescu
from test_web import AUTH, dicomweb, web_settings

from dicom_ai_node.phantoms import CTPhantom

RETIRED_US = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (retired)
PRIVATE_CLASS = "1.3.6.1.4.1.9590.100.1.2.999.7"  # in no dictionary


def _retired_us(tmp_path: Path, name: str) -> Path:
    """pydicom-data's real ultrasound image of the retired class, with fresh instance UIDs."""
    ds = pydicom.dcmread(get_testdata_file("color-pl.dcm"))
    assert ds.SOPClassUID == RETIRED_US
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / name)
    return tmp_path / name


def _private(tmp_path: Path, name: str, source: Path) -> Path:
    """A CT slice made an instance of a private SOP class, as some vendors' workstations send."""
    ds = pydicom.dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PRIVATE_CLASS
    ds.Modality = "OT"
    ds.save_as(tmp_path / name)
    return tmp_path / name


def _send_private(node, paths: list[Path]) -> list[int | None]:
    """C-STORE by pynetdicom as the SCU: dcmtk's storescu refuses to send SOP classes it does not know."""
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(PRIVATE_CLASS)
    association = ae.associate("127.0.0.1", node.port, ae_title="AI_NODE")
    if not association.is_established:
        return [None for _ in paths]
    try:
        statuses = []
        for path in paths:
            try:
                statuses.append(association.send_c_store(path).Status)
            except ValueError:  # no accepted presentation context for the class
                statuses.append(None)
        return statuses
    finally:
        association.release()


def _events(node, kind: str) -> list[dict]:
    return [event for event in node.json("events") if event["kind"] == kind]


def test_retired_and_private_classes_are_stored_by_cstore_and_stow(node_factory, tmp_path):
    node = node_factory(web=web_settings())
    node.start()
    slices = CTPhantom(slices=3, rows=32, columns=32).write(tmp_path / "ct")
    us = _retired_us(tmp_path, "us.dcm")
    private = [_private(tmp_path, f"private{i}.dcm", slices[i]) for i in range(2)]

    result = storescu(node.port, us, extra=["-R"])  # -R: propose the file's own SOP class
    assert result.returncode == 0, result.stderr + node.log()[-3000:]
    assert _send_private(node, private) == [0x0000, 0x0000]

    client = DICOMwebClient(dicomweb(node), headers=AUTH)
    stow_us = pydicom.dcmread(_retired_us(tmp_path, "us-stow.dcm"))
    stow_private = pydicom.dcmread(_private(tmp_path, "private-stow.dcm", slices[2]))
    answer = client.store_instances([stow_us, stow_private])
    assert len(answer.ReferencedSOPSequence) == 2 and "FailedSOPSequence" not in answer

    for path in (us, *private, tmp_path / "us-stow.dcm", tmp_path / "private-stow.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored = node.storage / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(path).PixelData, path.name
        retrieved = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert retrieved.SOPClassUID == ds.SOPClassUID

    # One event per series and class, not one per instance.
    nonstandard = _events(node, "nonstandard-sop-class")
    assert len(nonstandard) == 2, nonstandard
    messages = " ".join(event["message"] for event in nonstandard)
    assert f"{RETIRED_US} (Ultrasound Image Storage, retired)" in messages
    assert f"{PRIVATE_CLASS} (private or unknown SOP class)" in messages
    assert not _events(node, "unsupported-sop-class")

    # Routing does not stumble on them: no route matches (the default route wants CT).
    us_study = pydicom.dcmread(us, stop_before_pixels=True).StudyInstanceUID
    node.wait_for(lambda: node.json("series", us_study)[0]["state"] == "not-routed",
                  what="the retired US series not routed")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # configuration, not the database, decides
def test_retired_and_private_classes_refused_when_switched_off(node_factory, tmp_path):
    node = node_factory(web=web_settings(), storage={"accept_retired_sop_classes": False,
                                                      "accept_unknown_sop_classes": False})
    node.start()
    us = _retired_us(tmp_path, "us.dcm")
    private = _private(tmp_path, "private.dcm", CTPhantom(slices=1, rows=32, columns=32).write(tmp_path / "ct")[0])

    result = storescu(node.port, us, extra=["-R"])
    assert "no acceptable presentation contexts" in result.stderr.lower(), result.stderr
    assert _send_private(node, [private]) == [None]
    refused = " ".join(event["message"] for event in _events(node, "unsupported-sop-class"))
    assert RETIRED_US in refused and "storage.accept_retired_sop_classes" in refused
    assert PRIVATE_CLASS in refused and "storage.accept_unknown_sop_classes" in refused

    client = DICOMwebClient(dicomweb(node), headers=AUTH)
    with pytest.raises(HTTPError) as caught:
        client.store_instances([pydicom.dcmread(us), pydicom.dcmread(private)])
    assert caught.value.response.status_code == 409
    failed = caught.value.response.json()["00081198"]["Value"]
    assert {item["00081197"]["Value"][0] for item in failed} == {0x0122}
    assert node.json("studies") == []
    assert not list(node.storage.rglob("*.dcm"))


def test_uids_that_are_not_uids_are_stored_under_a_digest_and_served(node_factory, tmp_path):
    node = node_factory(web=web_settings())
    node.start()
    bad = Path(get_testdata_file("bad_sequence.dcm"))  # real anonymised CT: UIDs of 64 hex characters
    ds = pydicom.dcmread(bad, stop_before_pixels=True)
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    assert len(study) == 64 and not study.replace(".", "").isdigit()

    result = storescu(node.port, bad, extra=["-R", "-xs"])  # JPEG Lossless SV1, as in the file
    assert result.returncode == 0, result.stderr

    def digest(uid: str) -> str:
        return "sha256-" + hashlib.sha256(uid.encode()).hexdigest()

    stored = node.storage / digest(study) / digest(series) / f"{digest(sop)}.dcm"
    assert stored.exists(), sorted(node.storage.rglob("*.dcm"))
    (row,) = node.json("studies")
    assert row["StudyInstanceUID"] == study  # kept exactly as sent
    (flagged,) = _events(node, "invalid-uid")
    assert study in flagged["message"] and digest(sop) in flagged["message"]

    # A dangerous value by STOW-RS: never a path, still stored and indexed as sent.
    phantom = CTPhantom(slices=1, rows=32, columns=32)
    hostile = pydicom.dcmread(phantom.write(tmp_path / "hostile")[0])
    hostile.SeriesInstanceUID = "../../../escaped"  # as a path: storage/<study>/../../../escaped = tmp_path/escaped
    client = DICOMwebClient(dicomweb(node), headers=AUTH)
    answer = client.store_instances([hostile])
    assert len(answer.ReferencedSOPSequence) == 1
    folder = node.storage / phantom.study_uid / digest("../../../escaped")
    assert (folder / f"{hostile.SOPInstanceUID}.dcm").exists()
    assert not (tmp_path / "escaped").exists()

    # WADO-RS and QIDO-RS find the hex-UID instance by the UIDs as sent.
    # (dicomweb-client checks UIDs itself before asking, so plain HTTP here.)
    url = f"{dicomweb(node)}/studies/{study}/series/{series}/instances"
    (found,) = requests.get(url, headers=AUTH, timeout=30).json()
    assert found["00080018"]["Value"][0] == sop
    instance = requests.get(f"{url}/{sop}", timeout=30, headers={
        **AUTH, "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert instance.status_code == 200 and stored.read_bytes() in instance.content
    # URLs keep refusing what no stored UID can be.
    assert requests.get(f"{dicomweb(node)}/studies/{'1' * 65}", headers=AUTH, timeout=30).status_code == 400
    assert requests.get(f"{dicomweb(node)}/studies/a%5Cb/series", headers=AUTH, timeout=30).status_code == 400

    # The start-up repair finds the digest folders: the instance is neither lost nor deleted.
    node.stop()
    node.start()
    assert stored.exists()
    (row,) = [r for r in node.json("studies") if r["StudyInstanceUID"] == study]
    check = _events(node, "start-up-check")[-1]
    assert "nothing to repair" in check["message"], check

"""The DICOMweb server against a real node subprocess over real HTTP: STOW-RS, QIDO-RS, WADO-RS,
auth, probes and metrics, with requests and with dicomweb-client as OHIF-like callers."""

from __future__ import annotations

import base64
import hashlib
import random
import secrets
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import requests
from conftest import NodeProcess, free_port
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import FileMetaDataset

from dicom_ai_node.config import WebSection
from dicom_ai_node.phantoms import CTPhantom
from dicom_ai_node.web.app import Authenticator, AuthError
from dicom_ai_node.web.multipart import (
    MultipartError,
    MultipartScanner,
    parse_media_type,
    parse_multipart,
    read_range,
)

TOKEN = secrets.token_urlsafe(24)
READ_ONLY_TOKEN = secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE, FAILURE_REASON = "00081198", "00081199", "00081197"
SOP_INSTANCE_UID, RETRIEVE_URL = "00081155", "00081190"


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def web_settings(**extra) -> dict:
    return {
        "enabled": True,
        "port": free_port(),
        "clients": [
            {"name": "ohif", "token_sha256": _sha256(TOKEN)},
            {"name": "viewer", "token_sha256": _sha256(READ_ONLY_TOKEN), "write": False},
        ],
        **extra,
    }


def root(node: NodeProcess) -> str:
    return f"http://127.0.0.1:{node.settings['web']['port']}"


def dicomweb(node: NodeProcess) -> str:
    return root(node) + "/dicom-web"


@pytest.fixture
def web_node(node_factory) -> NodeProcess:
    node = node_factory(web=web_settings())
    node.start()
    return node


def multipart(blobs: list[bytes]) -> tuple[bytes, str]:
    boundary = secrets.token_hex(12)
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + blob + b"\r\n" for blob in blobs
    )
    return body + f"--{boundary}--\r\n".encode(), f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(node: NodeProcess, blobs: list[bytes], path: str = "/studies", headers=AUTH) -> requests.Response:
    body, content_type = multipart(blobs)
    return requests.post(dicomweb(node) + path, data=body, headers={**headers, "Content-Type": content_type},
                         timeout=60)


def parts_of(response: requests.Response) -> list[bytes]:
    _, params = parse_media_type(response.headers["content-type"])
    body = BytesIO(response.content)
    return [read_range(body, part.start, part.end - part.start) for part in parse_multipart(body, params["boundary"])]


def small_ct(folder: Path, **kwargs) -> list[Path]:
    return CTPhantom(slices=6, rows=32, columns=32, pixel_spacing=(10.0, 10.0), slice_spacing=10.0, **kwargs).write(
        folder
    )


def qido(node: NodeProcess, path: str, **params) -> list[dict]:
    response = requests.get(dicomweb(node) + path, params=params, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    return response.json()


def value(item: dict, tag: str):
    return item[tag].get("Value", [None])[0]


def test_stow_then_qido_finds_it_and_wado_returns_identical_files(web_node: NodeProcess, tmp_path: Path):
    files = small_ct(tmp_path / "ct")
    blobs = [path.read_bytes() for path in files]
    ds = pydicom.dcmread(files[0])
    study, series = ds.StudyInstanceUID, ds.SeriesInstanceUID

    response = stow(web_node, blobs)
    assert response.status_code == 200, response.text
    stored = response.json()[REFERENCED_SOP_SEQUENCE]["Value"]
    assert len(stored) == 6 and FAILED_SOP_SEQUENCE not in response.json()
    assert all(value(item, RETRIEVE_URL).startswith(f"{dicomweb(web_node)}/studies/{study}/series/") for item in stored)

    studies = qido(web_node, "/studies", PatientID="PHANTOM-001")
    assert [value(item, "0020000D") for item in studies] == [study]
    item = studies[0]
    assert item["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Phantom^CT"}]}
    assert value(item, "00201208") == 6 and value(item, "00201206") == 1  # instances, series
    assert item["00080061"]["Value"] == ["CT"]
    for matching in ({"PatientName": "phantom*"}, {"PatientName": "PHANTOM^C?"}, {"00100020": "PHANTOM-001"},
                     {"StudyDate": f"-{ds.StudyDate}"}, {"StudyDate": f"{ds.StudyDate}-"},
                     {"ModalitiesInStudy": "CT"}, {"AccessionNumber": ds.AccessionNumber},
                     {"StudyInstanceUID": study}):
        assert len(qido(web_node, "/studies", **matching)) == 1, matching
    for matching in ({"PatientName": "nobody*"}, {"ModalitiesInStudy": "MR"}, {"StudyDate": "19000101-19001231"},
                     {"offset": "1"}):
        assert qido(web_node, "/studies", **matching) == [], matching

    unsupported = requests.get(dicomweb(web_node) + "/studies", params={"InstitutionName": "x*"}, headers=AUTH)
    assert unsupported.status_code == 400 and "InstitutionName" in unsupported.json()["error"]  # never ignored
    assert requests.get(dicomweb(web_node) + "/studies", params={"limit": "x"}, headers=AUTH).status_code == 400

    (found,) = qido(web_node, f"/studies/{study}/series")
    assert value(found, "0020000E") == series and value(found, "00080060") == "CT"
    assert value(found, "00201209") == 6
    assert len(qido(web_node, "/series", Modality="CT")) == 1
    instances = qido(web_node, f"/studies/{study}/series/{series}/instances")
    assert len(instances) == 6 and {value(item, "00280010") for item in instances} == {32}
    assert len(qido(web_node, "/instances", limit="2")) == 2

    assert sorted(parts_of(requests.get(f"{dicomweb(web_node)}/studies/{study}/series/{series}", headers=AUTH))) == (
        sorted(blobs)
    )
    assert parts_of(requests.get(f"{dicomweb(web_node)}/studies/{study}", headers=AUTH)).__len__() == 6
    instance_url = f"{dicomweb(web_node)}/studies/{study}/series/{series}/instances/{ds.SOPInstanceUID}"
    assert parts_of(requests.get(instance_url, headers=AUTH)) == [blobs[0]]

    (metadata,) = requests.get(instance_url + "/metadata", headers=AUTH).json()
    assert value(metadata, "00280030") == 10.0 and value(metadata, "00280100") == 16  # PixelSpacing, BitsAllocated
    assert metadata["7FE00010"] == {"vr": "OW", "BulkDataURI": instance_url + "/bulkdata/7FE00010"}
    assert value(metadata, "00020010") == ds.file_meta.TransferSyntaxUID
    assert len(requests.get(f"{dicomweb(web_node)}/studies/{study}/series/{series}/metadata", headers=AUTH).json()) == 6

    frames = requests.get(instance_url + "/frames/1", headers=AUTH)
    assert frames.status_code == 200 and 'type="application/octet-stream"' in frames.headers["content-type"]
    assert parts_of(frames) == [ds.PixelData]
    assert requests.get(instance_url + "/frames/2", headers=AUTH).status_code == 404
    assert requests.get(f"{dicomweb(web_node)}/studies/1.2.3", headers=AUTH).status_code == 404

    assert [row["StudyInstanceUID"] for row in web_node.json("studies")] == [study]

    # The study in the URL must be the instance's: otherwise that instance fails with 0xA900.
    other = small_ct(tmp_path / "other")
    response = stow(web_node, [other[0].read_bytes()], path=f"/studies/{study}")
    assert response.status_code == 409
    (failure,) = response.json()[FAILED_SOP_SEQUENCE]["Value"]
    assert value(failure, FAILURE_REASON) == 0xA900
    assert len(web_node.json("studies")) == 1


def test_dicomweb_client_stores_searches_and_retrieves(web_node: NodeProcess, tmp_path: Path):
    files = small_ct(tmp_path / "ct", patient_id="DWC-1")
    datasets = [pydicom.dcmread(path) for path in files]
    client = DICOMwebClient(dicomweb(web_node), headers=AUTH)

    result = client.store_instances(datasets)
    assert len(result.ReferencedSOPSequence) == 6

    (study,) = client.search_for_studies(search_filters={"PatientID": "DWC-1"})
    study_uid = study["0020000D"]["Value"][0]
    series_uid = datasets[0].SeriesInstanceUID
    retrieved = client.retrieve_series(study_uid, series_uid)
    assert sorted(ds.SOPInstanceUID for ds in retrieved) == sorted(ds.SOPInstanceUID for ds in datasets)
    (frame,) = client.retrieve_instance_frames(study_uid, series_uid, datasets[2].SOPInstanceUID, frame_numbers=[1])
    assert frame == datasets[2].PixelData
    assert client.search_for_series(study_uid)[0]["00080060"]["Value"] == ["CT"]


def test_media_type_and_authentication(web_node: NodeProcess, tmp_path: Path):
    blob = small_ct(tmp_path / "ct")[0].read_bytes()
    url = dicomweb(web_node) + "/studies"
    for content_type in ("application/dicom", 'multipart/related; type="application/dicom+json"; boundary=x'):
        response = requests.post(url, data=blob, headers={**AUTH, "Content-Type": content_type})
        assert response.status_code == 415, content_type

    missing = stow(web_node, [blob], headers={})
    assert missing.status_code == 401 and "Bearer" in missing.headers["www-authenticate"]
    assert stow(web_node, [blob], headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert requests.get(url).status_code == 401
    read_only = {"Authorization": f"Bearer {READ_ONLY_TOKEN}"}
    assert stow(web_node, [blob], headers=read_only).status_code == 403
    assert requests.get(url, headers=read_only).status_code == 200
    assert web_node.json("studies") == []


def test_truncated_multipart_body_stores_nothing(web_node: NodeProcess, tmp_path: Path):
    body, content_type = multipart([path.read_bytes() for path in small_ct(tmp_path / "ct")])
    response = requests.post(dicomweb(web_node) + "/studies", data=body[: len(body) * 2 // 3],
                             headers={**AUTH, "Content-Type": content_type})
    assert response.status_code == 400 and "nothing stored" in response.json()["error"]
    assert requests.post(dicomweb(web_node) + "/studies", data=body[:-4],
                         headers={**AUTH, "Content-Type": content_type}).status_code == 400
    assert web_node.json("studies") == []


def _without_sop_instance_uid(path: Path) -> bytes:
    ds = pydicom.dcmread(path)
    meta = FileMetaDataset(ds.file_meta)
    del ds.SOPInstanceUID
    buffer = BytesIO()
    ds.file_meta = meta
    pydicom.dcmwrite(buffer, ds, enforce_file_format=False)
    return buffer.getvalue()


def test_partial_success_is_202_with_the_failure(web_node: NodeProcess, tmp_path: Path):
    good, bad = small_ct(tmp_path / "ct")[:2]
    response = stow(web_node, [good.read_bytes(), _without_sop_instance_uid(bad)])
    assert response.status_code == 202, response.text
    body = response.json()
    assert len(body[REFERENCED_SOP_SEQUENCE]["Value"]) == 1
    (failure,) = body[FAILED_SOP_SEQUENCE]["Value"]
    assert value(failure, FAILURE_REASON) == 0xA900
    assert value(failure, SOP_INSTANCE_UID) == pydicom.dcmread(bad).SOPInstanceUID
    assert any(event["kind"] == "store-failed" for event in web_node.json("events"))


def test_probes_and_metrics(web_node: NodeProcess, tmp_path: Path):
    assert requests.get(root(web_node) + "/healthz").text == "ok\n"
    ready = requests.get(root(web_node) + "/readyz")
    assert ready.status_code == 200 and ready.json() == {"database": "ok", "storage": "ok"}
    files = small_ct(tmp_path / "ct")
    assert stow(web_node, [path.read_bytes() for path in files]).status_code == 200
    size = sum(path.stat().st_size for path in files)
    metrics = requests.get(root(web_node) + "/metrics", headers=AUTH).text
    assert 'dicom_ai_node_instances_stored{calling_ae_title="ohif",source="stow"} 6.0' in metrics
    assert f'dicom_ai_node_bytes_stored{{calling_ae_title="ohif",source="stow"}} {float(size)}' in metrics
    assert 'dicom_ai_node_stow_instances_total{client="ohif",outcome="stored"} 6.0' in metrics
    assert 'dicom_ai_node_series{state="receiving"} 1.0' in metrics
    assert "dicom_ai_node_job_queue_depth 0.0" in metrics


def test_cors_preflight_for_a_configured_origin(node_factory):
    node = node_factory(web=web_settings(cors_origins=["http://viewer.example"], allow_anonymous_read=True))
    node.start()
    preflight = requests.options(
        dicomweb(node) + "/studies",
        headers={"Origin": "http://viewer.example", "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://viewer.example"
    assert requests.get(dicomweb(node) + "/studies").status_code == 200  # anonymous read allowed here


def test_node_seg_of_a_processed_ct_is_a_series_of_its_study(node_factory, tmp_path: Path):
    node = node_factory(web=web_settings(), workers={"processes": 1})
    node.start()
    phantom = CTPhantom(slices=24, rows=96, columns=96, pixel_spacing=(4.0, 4.0), slice_spacing=10.0)
    assert stow(node, [path.read_bytes() for path in phantom.write(tmp_path / "ct")]).status_code == 200
    node.wait_for(lambda: node.json("jobs", "--state", "done"), timeout=180, what="the job done")

    series = qido(node, f"/studies/{phantom.study_uid}/series")
    by_modality = {value(item, "00080060"): item for item in series}
    assert {"CT", "SEG", "SR"} <= set(by_modality)
    seg = by_modality["SEG"]
    seg_series = value(seg, "0020000E")
    (seg_instance,) = qido(node, f"/studies/{phantom.study_uid}/series/{seg_series}/instances")
    assert value(seg_instance, "00080016") == "1.2.840.10008.5.1.4.1.1.66.4"
    assert value(qido(node, "/studies", StudyInstanceUID=phantom.study_uid)[0], "00201206") >= 3
    assert "SEG" in qido(node, "/studies", ModalitiesInStudy="SEG")[0]["00080061"]["Value"]

    (blob,) = parts_of(requests.get(value(seg, RETRIEVE_URL), headers=AUTH))
    retrieved = pydicom.dcmread(BytesIO(blob))
    assert retrieved.Modality == "SEG" and retrieved.StudyInstanceUID == phantom.study_uid
    (metadata,) = requests.get(value(seg_instance, RETRIEVE_URL) + "/metadata", headers=AUTH).json()
    assert "52009230" in metadata  # PerFrameFunctionalGroupsSequence, which a viewer needs to place the frames
    assert 'dicom_ai_node_job_seconds_count{model="ct-tissue",stage="total"} 1.0' in (
        requests.get(root(node) + "/metrics", headers=AUTH).text
    )


def test_basic_users_and_tokens_from_environment_variables():
    settings = WebSection(
        enabled=True,
        clients=[{"name": "alice", "password_env": "ALICE_PW"}, {"name": "script", "token_env": "SCRIPT_TOKEN"}],
    )
    auth = Authenticator(settings, {"ALICE_PW": "s3cret", "SCRIPT_TOKEN": "tok"})

    class FakeRequest:
        def __init__(self, authorization: str) -> None:
            self.headers = {"authorization": authorization} if authorization else {}

    basic = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert auth.caller(FakeRequest(basic), write=True).name == "alice"
    assert auth.caller(FakeRequest("Bearer tok"), write=True).name == "script"
    for wrong in ("Basic " + base64.b64encode(b"alice:nope").decode(), "Basic !!", "Bearer nope", ""):
        with pytest.raises(Exception) as raised:
            auth.caller(FakeRequest(wrong), write=False)
        assert raised.value.status == 401
    with pytest.raises(AuthError, match="SCRIPT_TOKEN"):
        Authenticator(settings, {"ALICE_PW": "s3cret"})


class _Parts:
    """A ContentSink that keeps each part's headers and content, as STOW-RS writes them to files."""

    def __init__(self) -> None:
        self.parts: list[tuple[dict[str, str], bytearray]] = []
        self.open = False

    def part_started(self, headers: dict[str, str]) -> None:
        assert not self.open
        self.open = True
        self.parts.append((headers, bytearray()))

    def content(self, data: memoryview) -> None:
        assert self.open
        self.parts[-1][1].extend(data)

    def part_ended(self) -> None:
        assert self.open
        self.open = False


def test_multipart_scanner_finds_every_part_however_the_body_is_cut():
    """The scanner hands content on straight from the blocks it is fed (no copy), holding back the few bytes a
    delimiter may begin with: bodies full of near-delimiters, cut at random places, give back exactly their
    parts, and cut short they are refused."""
    rng = random.Random(20261130)
    trials = 0
    while trials < 1000:
        boundary = secrets.token_hex(rng.randint(1, 8))
        delimiter = b"--" + boundary.encode()
        contents = []
        for _ in range(rng.randint(1, 5)):
            pieces = [rng.choice([b"\r\n" + delimiter[: rng.randint(0, len(delimiter) - 1)], delimiter,
                                  rng.randbytes(rng.randint(0, 300))]) for _ in range(rng.randint(0, 6))]
            contents.append(b"".join(pieces))
        if any((content + b"\r\n" + delimiter).find(b"\r\n" + delimiter) != len(content) for content in contents):
            continue  # a content that holds its own delimiter is not a part but two
        trials += 1
        body = rng.choice([b"", b"preamble\r\n"]) + b"".join(
            delimiter + b"\r\nContent-Type: application/dicom\r\n\r\n" + content + b"\r\n" for content in contents
        ) + delimiter + b"--\r\nepilogue"
        cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randint(0, 12))))
        blocks = [body[start:end] for start, end in zip([0, *cuts], [*cuts, len(body)])]
        sink = _Parts()
        scanner = MultipartScanner(boundary, sink)
        while blocks:
            count = rng.randint(1, 3)
            scanner.feed(*blocks[:count])
            blocks = blocks[count:]
        parts = scanner.close()
        assert [bytes(content) for _, content in sink.parts] == contents
        assert [body[part.start : part.end] for part in parts] == contents
        assert all(headers == {"content-type": "application/dicom"} for headers, _ in sink.parts)
        short = MultipartScanner(boundary, _Parts())
        short.feed(body[: rng.randrange(len(body) - len(b"--\r\nepilogue"))])
        with pytest.raises(MultipartError):
            short.close()

"""The three senders against a real Orthanc (and a pynetdicom SCP or a tiny HTTP server where
Orthanc cannot be made to answer the way a test needs): what is delivered arrives intact,
and every failure is classified transient or permanent with a reason an admin can act on."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from conftest import dciodvfy_errors
from orthanc import OrthancProcess, orthanc_servers
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_ai_node.config import DestinationConfig, DicomwebDestination, DimseDestination, destination_from
from dicom_ai_node.delivery.senders import make_sender
from dicom_ai_node.inference.builtin import BuiltinCTModel
from dicom_ai_node.inference.segmentation import Segmentation
from dicom_ai_node.inference.volume import Volume, load_volume
from dicom_ai_node.phantoms import CTPhantom
from dicom_ai_node.results.seg import build_seg
from dicom_ai_node.results.sr import build_sr
from dicom_ai_node.values import DeliveryOutcome

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
USER, PASSWORD = "alice", "s3cret"
PASSWORD_ENV = "TEST_PACS_PASSWORD"
KINDS = ["dimse", "dicomweb", "orthanc"]


# --- objects to send ----------------------------------------------------------------------------


@dataclass
class Source:
    volume: Volume
    segmentation: Segmentation  # body, lungs, bone: lungs and bone do not overlap


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Source:
    phantom = CTPhantom(slices=6, rows=32, columns=32, pixel_spacing=(10.0, 10.0), slice_spacing=10.0)
    volume = load_volume(phantom.write(tmp_path_factory.mktemp("ct")))
    return Source(volume, BuiltinCTModel().predict(volume))


def write_results(source: Source, folder: Path) -> dict[str, Path]:
    """A SEG, its SR and a LABELMAP SEG with fresh UIDs, so each test adds new instances to Orthanc."""
    folder.mkdir(parents=True, exist_ok=True)
    common = {"manufacturer": "dicom-ai-node-test", "software_version": "0"}
    seg = build_seg(
        source.volume,
        source.segmentation,
        series_number=901,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        **common,
    )
    sr = build_sr(
        source.volume,
        source.segmentation,
        seg,
        series_number=902,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        device_name="AI_NODE",
        model_name="builtin",
        **common,
    )
    segments = [replace(segment, number=n) for n, segment in enumerate(source.segmentation.segments[1:], start=1)]
    no_overlap = Segmentation(
        source.segmentation.masks[1:],
        segments,
        source.segmentation.algorithm_name,
        source.segmentation.algorithm_version,
    )
    labelmap = build_seg(
        source.volume,
        no_overlap,
        series_number=903,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        labelmap=True,
        **common,
    )
    paths = {"seg": folder / "seg.dcm", "sr": folder / "sr.dcm", "labelmap": folder / "labelmap.dcm"}
    for dataset, name in ((seg, "seg"), (sr, "sr"), (labelmap, "labelmap")):
        dataset.save_as(paths[name], enforce_file_format=True)
    return paths


@pytest.fixture
def results(source, tmp_path) -> dict[str, Path]:
    return write_results(source, tmp_path / "results")


def sop_instance_uid(path: Path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def dataset_part(data: bytes) -> bytes:
    """A Part 10 file without preamble and File Meta (the receiver writes its own File Meta)."""
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) comes first
    return data[144 + int.from_bytes(data[140:144], "little") :]


# --- destinations -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Iterator[OrthancProcess]:
    """The shared Orthanc: HTTP basic auth, checks the called AE title, takes C-STORE only from the
    AE titles in DicomModalities (ours is AI_NODE), accepts unknown SOP classes (Orthanc 1.10 does not
    know Label Map Segmentation Storage and refuses it otherwise)."""
    with orthanc_servers(tmp_path_factory.mktemp("pacs")) as make:
        yield make(
            users={USER: PASSWORD},
            check_called_aet=True,
            modalities={"ai-node": ("AI_NODE", "127.0.0.1", 11112)},
            settings={"UnknownSopClassAccepted": True, "DicomAlwaysAllowStore": False},
        )


@pytest.fixture
def orthanc_factory(tmp_path) -> Iterator:
    """Orthancs of a test's own, for configurations the shared one must not have."""
    with orthanc_servers(tmp_path) as make:
        yield make


@pytest.fixture(autouse=True)
def _password(monkeypatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)


def destination(kind: str, orthanc: OrthancProcess, **overrides) -> DestinationConfig:
    settings: dict = {"kind": kind, "timeout_seconds": 10}
    if kind == "dimse":
        settings |= {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    else:
        settings["url"] = orthanc.dicomweb_url if kind == "dicomweb" else orthanc.url
        if orthanc.users:
            settings |= {"username": USER, "password_env": PASSWORD_ENV}
    return destination_from(settings | overrides)


def send(config: DestinationConfig, files: list[Path]) -> DeliveryOutcome:
    return make_sender("test", config, "AI_NODE").send(files)


# --- delivered intact ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_seg_sr_and_labelmap_arrive_intact(kind, pacs, results, tmp_path):
    before = pacs.count_instances()
    files = [results["seg"], results["sr"], results["labelmap"]]
    outcome = send(destination(kind, pacs), files)
    assert outcome.delivered and not outcome.permanent, outcome
    assert "3 object(s)" in outcome.reason
    assert pacs.count_instances() == before + 3
    for path in files:
        instance = pacs.instance_id(sop_instance_uid(path))
        assert instance is not None, f"{path.name} not in Orthanc"
        copy = tmp_path / f"copy-{path.name}"
        copy.write_bytes(pacs.instance_file(instance))
        assert dataset_part(copy.read_bytes()) == dataset_part(path.read_bytes()), f"{path.name} changed on the way"
        assert dciodvfy_errors(copy) == [], path.name


# --- DIMSE: one association, exact contexts, C-STORE statuses (pynetdicom SCP) ------------------


class StoreSCP:
    """A C-STORE SCP that records associations and objects and answers with a chosen status."""

    def __init__(self, sop_classes: list[str], status: int = 0x0000, maximum_associations: int = 10) -> None:
        self.status = status
        self.established: list[list[tuple[str, list[str]]]] = []  # per association: proposed (SOP class, syntaxes)
        self.stored: list[tuple[str, str]] = []  # (SOP class, SOP instance)
        ae = AE("STORE_SCP")
        ae.maximum_associations = maximum_associations
        for uid in [*sop_classes, Verification]:
            ae.add_supported_context(uid)
        self.server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[(evt.EVT_ESTABLISHED, self._established), (evt.EVT_C_STORE, self._store)],
        )
        self.port = self.server.server_address[1]

    def _established(self, event) -> None:
        proposed = [(cx.abstract_syntax, list(cx.transfer_syntax)) for cx in event.assoc.requestor.requested_contexts]
        self.established.append(proposed)

    def _store(self, event) -> int:
        self.stored.append((event.request.AffectedSOPClassUID, event.request.AffectedSOPInstanceUID))
        return self.status

    def destination(self) -> DestinationConfig:
        return DimseDestination(ae_title="STORE_SCP", host="127.0.0.1", port=self.port, timeout_seconds=5)


@pytest.fixture
def store_scp() -> Iterator:
    servers: list[StoreSCP] = []

    def make(*args, **kwargs) -> StoreSCP:
        servers.append(StoreSCP(*args, **kwargs))
        return servers[-1]

    yield make
    for scp in servers:
        scp.server.shutdown()


def test_dimse_sends_everything_in_one_association_with_exactly_the_files_sop_classes(store_scp, results):
    scp = store_scp([SEG, LABELMAP_SEG, COMPREHENSIVE_3D_SR])
    files = [results["seg"], results["sr"], results["labelmap"]]
    outcome = send(scp.destination(), files)
    assert outcome.delivered and outcome.remote_status == "0x0000", outcome
    assert len(scp.established) == 1
    proposed = scp.established[0]
    assert sorted(sop for sop, _ in proposed) == sorted([SEG, LABELMAP_SEG, COMPREHENSIVE_3D_SR])
    assert all(ExplicitVRLittleEndian in syntaxes for _, syntaxes in proposed)
    assert scp.stored == [(pydicom.dcmread(p).SOPClassUID, sop_instance_uid(p)) for p in files]


@pytest.mark.parametrize(
    ("status", "delivered", "permanent"),
    [(0xB000, True, False), (0xA700, False, False), (0xA900, False, True), (0xC000, False, True)],
)
def test_dimse_c_store_status_is_classified(store_scp, results, status, delivered, permanent):
    scp = store_scp([SEG, COMPREHENSIVE_3D_SR], status=status)
    outcome = send(scp.destination(), [results["seg"], results["sr"]])
    assert (outcome.delivered, outcome.permanent) == (delivered, permanent), outcome
    assert outcome.remote_status == f"0x{status:04X}"
    if delivered:
        assert "with warnings" in outcome.reason and len(scp.stored) == 2
    else:
        assert "seg.dcm" in outcome.reason and len(scp.stored) == 1  # stops at the first failure
    assert len(scp.established) == 1


def test_dimse_sop_class_unknown_to_orthanc_is_permanent(orthanc_factory, results):
    orthanc = orthanc_factory()  # Orthanc 1.10's defaults refuse Label Map Segmentation Storage
    outcome = send(destination("dimse", orthanc), [results["sr"], results["labelmap"]])
    if outcome.delivered:
        pytest.skip(f"Orthanc {orthanc.version} accepts Label Map Segmentation Storage")
    assert outcome.permanent, outcome
    assert "Label Map Segmentation Storage" in outcome.reason and "not supported" in outcome.reason
    assert orthanc.count_instances() == 0  # nothing sent when one SOP class cannot go


def test_dimse_sop_class_refused_by_ct_only_scp_is_permanent(store_scp, results):
    scp = store_scp([CTImageStorage])
    outcome = send(scp.destination(), [results["seg"]])
    assert not outcome.delivered and outcome.permanent, outcome
    assert f"Segmentation Storage ({SEG}) not supported by the destination" in outcome.reason
    assert scp.stored == []


def test_dimse_wrong_called_ae_title_is_permanent(pacs, results):
    outcome = send(destination("dimse", pacs, ae_title="NOT_ORTHANC"), [results["seg"]])
    assert not outcome.delivered and outcome.permanent, outcome
    assert outcome.remote_status == "A-ASSOCIATE-RJ 1/1/7"  # rejected permanent, service user, called AE unknown
    assert "called ae title not recognised" in outcome.reason.lower()


def test_dimse_calling_ae_title_unknown_to_orthanc_is_transient(pacs, results):
    """Orthanc accepts the association, then drops the C-STORE of a caller missing from DicomModalities
    without a status: nothing says the refusal is final, so it counts as an abort."""
    outcome = make_sender("test", destination("dimse", pacs), "STRANGER").send([results["seg"]])
    assert not outcome.delivered and not outcome.permanent, outcome
    assert "no C-STORE response" in outcome.reason and "0 of 1 object(s) stored" in outcome.reason


def test_dimse_busy_peer_rejection_is_transient(store_scp, results):
    scp = store_scp([SEG], maximum_associations=1)
    holder = AE("HOLDER")
    holder.add_requested_context(Verification)
    held = holder.associate("127.0.0.1", scp.port, ae_title="STORE_SCP")
    assert held.is_established
    try:
        outcome = send(scp.destination(), [results["seg"]])
    finally:
        held.release()
    assert not outcome.delivered and not outcome.permanent, outcome
    assert outcome.remote_status == "A-ASSOCIATE-RJ 2/3/2"  # rejected transient, provider (presentation), local limit


def test_dimse_over_tls(orthanc_factory, results, tmp_path):
    certificates = {}
    for name in ("server", "stranger"):
        key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
        subprocess.run(
            [
                "/usr/bin/openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        certificates[name] = (key, cert)
    key, cert = certificates["server"]
    orthanc = orthanc_factory(
        settings={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(cert),
            "DicomTlsPrivateKey": str(key),
            "DicomTlsTrustedCertificates": str(cert),
            "DicomTlsRemoteCertificateRequired": False,
        }
    )
    outcome = send(destination("dimse", orthanc, tls=True, tls_ca_file=cert), [results["seg"], results["sr"]])
    assert outcome.delivered, outcome
    assert orthanc.count_instances() == 2
    untrusted = send(destination("dimse", orthanc, tls=True, tls_ca_file=certificates["stranger"][1]), [results["seg"]])
    assert not untrusted.delivered and not untrusted.permanent, untrusted
    assert "TLS handshake failed" in untrusted.reason and "certificate verify failed" in untrusted.reason


# --- all kinds: PACS down, credentials ----------------------------------------------------------


def test_orthanc_down_is_transient_for_every_kind_and_delivery_resumes(orthanc_factory, results):
    orthanc = orthanc_factory(users={USER: PASSWORD})
    assert send(destination("orthanc", orthanc), [results["seg"]]).delivered
    orthanc.stop()
    for kind in KINDS:
        outcome = send(destination(kind, orthanc), [results["sr"]])
        assert not outcome.delivered and not outcome.permanent, (kind, outcome)
        assert "connection refused" in outcome.reason, (kind, outcome)
    orthanc.start()
    assert orthanc.count_instances() == 1  # its storage survived the restart
    assert send(destination("dimse", orthanc), [results["sr"]]).delivered
    assert orthanc.count_instances() == 2


@pytest.mark.parametrize("kind", ["dicomweb", "orthanc"])
def test_wrong_password_is_permanent_401(kind, pacs, results, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    before = pacs.count_instances()
    outcome = send(destination(kind, pacs), [results["seg"]])
    assert not outcome.delivered and outcome.permanent, outcome
    assert outcome.remote_status == "HTTP 401"
    assert pacs.count_instances() == before


@pytest.mark.parametrize("kind", ["dicomweb", "orthanc"])
def test_missing_secret_environment_variable_is_permanent(kind, pacs, results, monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV)
    outcome = send(destination(kind, pacs), [results["seg"]])
    assert not outcome.delivered and outcome.permanent, outcome
    assert f"environment variable {PASSWORD_ENV} (password_env) is not set" in outcome.reason


def test_orthanc_labels_need_orthanc_1_12(pacs, results):
    before = pacs.count_instances()
    outcome = send(destination("orthanc", pacs, labels=["ai-result"]), [results["seg"], results["sr"]])
    version = tuple(int(part) for part in pacs.version.split(".")[:2])
    if version >= (1, 12):
        assert outcome.delivered, outcome
        study = pacs.get(f"/instances/{pacs.instance_id(sop_instance_uid(results['seg']))}/study")
        assert "ai-result" in study.get("Labels", [])
    else:
        assert not outcome.delivered and outcome.permanent, outcome
        assert f"version {pacs.version}" in outcome.reason and "1.12.0 or newer" in outcome.reason
        assert pacs.count_instances() == before  # refused before anything was uploaded


# --- HTTP answers Orthanc does not give on demand (a tiny local server) -------------------------


class FakeHttp:
    """Answers every request with one status and body, and keeps what it received."""

    def __init__(self, status: int, answer: dict | None = None) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.requests.append(("POST", self.path, dict(self.headers), body))
                payload = json.dumps(answer).encode() if answer is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def fake_http() -> Iterator:
    servers: list[FakeHttp] = []

    def make(status: int, answer: dict | None = None) -> FakeHttp:
        servers.append(FakeHttp(status, answer))
        return servers[-1]

    yield make
    for server in servers:
        server.server.shutdown()
        server.server.server_close()


@pytest.mark.parametrize("kind", ["dicomweb", "orthanc"])
@pytest.mark.parametrize(("status", "permanent"), [(503, False), (429, False), (408, False), (400, True), (404, True)])
def test_http_status_is_classified(fake_http, results, kind, status, permanent):
    server = fake_http(status)
    config = destination_from({"kind": kind, "url": server.url, "timeout_seconds": 5})
    outcome = send(config, [results["seg"]])
    assert not outcome.delivered and outcome.permanent == permanent, outcome
    assert outcome.remote_status == f"HTTP {status}"
    assert len(server.requests) == 1  # no retries of our own: the delivery queue schedules them


def _sop_item(path: Path, **extra) -> dict:
    return {"00081155": {"vr": "UI", "Value": [sop_instance_uid(path)]}} | {
        tag: {"vr": "US", "Value": [value]} for tag, value in extra.items()
    }


def test_stow_rs_sends_one_multipart_request_with_a_bearer_token(fake_http, results, monkeypatch):
    seg, sr = results["seg"], results["sr"]
    server = fake_http(200, {"00081199": {"vr": "SQ", "Value": [_sop_item(seg), _sop_item(sr)]}})
    monkeypatch.setenv("TEST_TOKEN", "t0ken")
    outcome = send(DicomwebDestination(url=server.url + "/", token_env="TEST_TOKEN"), [seg, sr])
    assert outcome.delivered and outcome.remote_status == "HTTP 200", outcome
    [(method, path, headers, body)] = server.requests
    assert (method, path) == ("POST", "/studies")
    assert headers["Authorization"] == "Bearer t0ken"
    content_type = headers["Content-Type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    boundary = content_type.rsplit("=", 1)[1].encode()
    parts = body.split(b"--" + boundary)
    assert parts[-1] == b"--\r\n" and len(parts) == 4
    assert parts[1] == b"\r\nContent-Type: application/dicom\r\n\r\n" + seg.read_bytes() + b"\r\n"


@pytest.mark.parametrize(
    ("status", "failure_reason", "permanent"),
    [(200, 0xA700, False), (202, 0xA700, False), (202, 0x0122, True), (409, 0xC000, True), (400, 0x0110, True)],
)
def test_stow_rs_failed_sop_sequence_decides(fake_http, results, status, failure_reason, permanent):
    seg, sr = results["seg"], results["sr"]
    answer = {
        "00081199": {"vr": "SQ", "Value": [_sop_item(sr)]},
        "00081198": {"vr": "SQ", "Value": [_sop_item(seg, **{"00081197": failure_reason})]},
    }
    outcome = send(DicomwebDestination(url=fake_http(status, answer).url), [seg, sr])
    assert not outcome.delivered and outcome.permanent == permanent, outcome
    assert f"{sop_instance_uid(seg)} (Failure Reason 0x{failure_reason:04X})" in outcome.reason


def test_stow_rs_instance_missing_from_the_answer_is_not_delivered(fake_http, results):
    seg, sr = results["seg"], results["sr"]
    server = fake_http(200, {"00081199": {"vr": "SQ", "Value": [_sop_item(sr)]}})
    outcome = send(DicomwebDestination(url=server.url), [seg, sr])
    assert not outcome.delivered and outcome.permanent, outcome
    assert sop_instance_uid(seg) in outcome.reason


def test_stow_rs_warning_is_delivered_with_the_warning_in_the_reason(fake_http, results):
    seg = results["seg"]
    server = fake_http(202, {"00081199": {"vr": "SQ", "Value": [_sop_item(seg, **{"00081196": 0xB000})]}})
    outcome = send(DicomwebDestination(url=server.url), [seg])
    assert outcome.delivered and "0xB000" in outcome.reason, outcome

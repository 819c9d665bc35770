"""Hostile and faulty DICOMweb input against a real node subprocess (issue 15, web input and HTTPS).

Every case measures the serving process: its peak RSS (VmHWM, reset through /proc/PID/clear_refs
before the attack) must grow by far less than the attack's size; an authorised client is served right
after; and no acknowledged instance is lost or changed (index rows equal files, bytes identical).
"""

from __future__ import annotations

import hashlib
import secrets
import select
import shutil
import socket
import ssl
import subprocess
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from conftest import NodeProcess
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text
from test_web import AUTH, READ_ONLY_TOKEN, dicomweb, multipart, parts_of, root, small_ct, stow, web_settings

from dicom_ai_node.phantoms import CTPhantom

MiB = 2**20
FRAMES, SIDE = 160, 512  # an 80 MB multi-frame instance of 512 KiB frames


# --- the serving process's memory, the client served after, the archive intact ------------------------


def _status_mib(node: NodeProcess, field: str) -> float:
    for line in Path(f"/proc/{node.process.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"{field} missing from /proc/{node.process.pid}/status")


def reset_peak(node: NodeProcess) -> float:
    """Restart the kernel's peak-RSS record (VmHWM) of the node; returns its RSS now, MiB."""
    Path(f"/proc/{node.process.pid}/clear_refs").write_text("5")
    return _status_mib(node, "VmRSS")


def peak_growth(node: NodeProcess, baseline: float) -> float:
    """How far the node's RSS rose above `baseline` at its peak since `reset_peak`, MiB."""
    return _status_mib(node, "VmHWM") - baseline


def assert_served(node: NodeProcess, folder: Path, base: str | None = None, **request_options) -> dict[str, bytes]:
    """An authorised client stores a small series and reads it back unchanged; returns it by SOP UID."""
    base = base or dicomweb(node)
    files = small_ct(folder)
    blobs = {pydicom.dcmread(path).SOPInstanceUID: path.read_bytes() for path in files}
    body, content_type = multipart(list(blobs.values()))
    stored = requests.post(base + "/studies", data=body, headers={**AUTH, "Content-Type": content_type},
                           timeout=60, **request_options)
    assert stored.status_code == 200, stored.text
    ds = pydicom.dcmread(files[0])
    series = requests.get(f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}",
                          headers=AUTH, timeout=60, **request_options)
    assert sorted(parts_of(series)) == sorted(blobs.values())
    return blobs


def assert_archive_intact(node: NodeProcess, acknowledged: dict[str, bytes]) -> None:
    """Index rows and stored files are the same set, every acknowledged instance is byte-identical, no spool
    is left open and no request ended in an unhandled exception."""
    engine = create_engine(node.database_url)
    try:
        with engine.connect() as connection:
            rows = dict(connection.execute(text("SELECT sop_instance_uid, file_path FROM instances")).all())
    finally:
        engine.dispose()
    files = {path.relative_to(node.storage).as_posix() for path in node.storage.rglob("*") if path.is_file()}
    assert files == set(rows.values()), "files and index rows differ (a spooled body left behind?)"
    for sop_uid, blob in acknowledged.items():
        assert (node.storage / rows[sop_uid]).read_bytes() == blob, f"instance {sop_uid} changed"
    spooled = [target for fd in Path(f"/proc/{node.process.pid}/fd").iterdir()
               if (target := _link(fd)).startswith(str(node.storage))]
    assert not spooled, f"the node still holds files in its storage open: {spooled}"
    assert "Traceback" not in node.log(), "an exception escaped a handler (a 500)"


def _link(fd: Path) -> str:
    try:
        return str(fd.readlink())
    except FileNotFoundError:  # closed meanwhile
        return ""


# --- data -------------------------------------------------------------------------------------------------


def multiframe_instance() -> bytes:
    """An Enhanced CT instance of FRAMES native frames of SIDE x SIDE; every pixel of frame n is n."""
    ds = CTPhantom(slices=2, rows=SIDE, columns=SIDE).enhanced_dataset()
    ds.NumberOfFrames = FRAMES
    frames = np.arange(1, FRAMES + 1, dtype="<u2")[:, None, None]
    ds.PixelData = np.broadcast_to(frames, (FRAMES, SIDE, SIDE)).tobytes()
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def frame(number: int) -> bytes:
    return np.full((SIDE, SIDE), number, dtype="<u2").tobytes()


def ct_instances(count: int, header_bytes: int = 0) -> dict[str, bytes]:
    """`count` 512 x 512 CT slices of one series (512 KiB of pixels each), by SOP Instance UID;
    `header_bytes` more in a private UT element: text, which DICOM JSON metadata carries inline (binary values
    over 1 KiB go as BulkDataURI)."""
    phantom = CTPhantom(slices=1, rows=SIDE, columns=SIDE)
    ds = phantom.dataset(0)
    if header_bytes:
        ds.private_block(0x0009, "DICOM-AI-NODE TEST", create=True).add_new(0x10, "UT", "Z" * header_bytes)
    blobs = {}
    for number in range(1, count + 1):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        blobs[ds.SOPInstanceUID] = buffer.getvalue()
    return blobs


def answer_status(port: int, head: bytes, chunks=(), timeout: float = 15) -> int:
    """Send a raw request head and body chunks until the node answers; the answer's status code."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # answered before the body was complete
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = sock.recv(4096)
    return int(answer.split()[1])


def stow_head(length: int | None) -> bytes:
    """The head of an authorised STOW-RS request announcing `length` bytes, or a chunked one."""
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {AUTH['Authorization']}\r\n"
        f'Content-Type: multipart/related; type="application/dicom"; boundary=b\r\n{framing}\r\n\r\n'
    ).encode()


def web_port(node: NodeProcess) -> int:
    return node.settings["web"]["port"]


# --- WADO-RS: frames ----------------------------------------------------------------------------------------


def test_frame_lists_cannot_multiply_memory_and_frames_stream(node_factory, tmp_path: Path):
    node = node_factory(web=web_settings())
    node.start()
    blob = multiframe_instance()
    ds = pydicom.dcmread(BytesIO(blob), stop_before_pixels=True)
    assert stow(node, [blob]).status_code == 200
    url = (f"{dicomweb(node)}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
           f"/instances/{ds.SOPInstanceUID}/frames/")

    # 400 copies of frame 1 were 200 MB built in memory; PS3.18 frame lists hold non-duplicate numbers.
    baseline = reset_peak(node)
    repeated = requests.get(url + ",".join(["1"] * 400), headers=AUTH, timeout=60)
    assert repeated.status_code == 400 and "more than once" in repeated.json()["error"]
    for bad, status in (("0", 400), ("-1", 400), ("+1", 400), ("1_0", 400), ("1,,2", 400), ("x", 400),
                        ("1" + "0" * 20, 400), (str(FRAMES + 1), 404), (f"1,{FRAMES + 1}", 404)):
        assert requests.get(url + bad, headers=AUTH, timeout=30).status_code == status, bad
    # A URL past the limit never reaches the application (h11 refuses some, the app the rest).
    long_list = ",".join(str(n) for n in range(1, 6000))
    assert requests.get(url + long_list, headers=AUTH, timeout=30).status_code in (400, 414)
    assert requests.get(url + long_list[:9000], headers=AUTH, timeout=30).status_code == 414

    # Every frame, in a chosen order: 80 MB streamed frame by frame from the file, not held.
    wanted = [FRAMES, *range(1, FRAMES)]
    response = requests.get(url + ",".join(map(str, wanted)), headers=AUTH, timeout=60)
    assert response.status_code == 200
    parts = parts_of(response)
    assert len(parts) == FRAMES
    assert (parts[0], parts[1], parts[-1]) == (frame(FRAMES), frame(1), frame(FRAMES - 1))
    growth = peak_growth(node, baseline)
    assert growth < 30, f"the node's RSS rose by {growth:.0f} MiB serving frames of an 80 MB instance"

    served = assert_served(node, tmp_path / "after")
    assert_archive_intact(node, {ds.SOPInstanceUID: blob, **served})


def test_retrieving_a_large_study_streams_files_and_metadata(node_factory, tmp_path: Path):
    node = node_factory(web=web_settings())
    node.start()
    blobs = ct_instances(60, header_bytes=MiB)  # 90 MB, and 63 MB of DICOM JSON metadata
    assert stow(node, list(blobs.values())).status_code == 200
    ds = pydicom.dcmread(BytesIO(next(iter(blobs.values()))), stop_before_pixels=True)
    study = f"{dicomweb(node)}/studies/{ds.StudyInstanceUID}"

    baseline = reset_peak(node)
    with requests.get(study, headers=AUTH, timeout=60, stream=True) as response:
        assert response.status_code == 200
        received = sum(len(chunk) for chunk in response.iter_content(MiB))
    assert received > 90 * 10**6
    with requests.get(study + "/metadata", headers=AUTH, timeout=60, stream=True) as response:
        assert response.status_code == 200
        received = sum(len(chunk) for chunk in response.iter_content(MiB))
    assert received > 60 * 10**6
    growth = peak_growth(node, baseline)
    assert growth < 30, f"the node's RSS rose by {growth:.0f} MiB serving a 90 MB study and its metadata"

    assert requests.get(f"{dicomweb(node)}/studies/1.2%01x", headers=AUTH, timeout=30).status_code == 400
    served = assert_served(node, tmp_path / "after")
    assert_archive_intact(node, {**blobs, **served})


def test_transcoding_and_rendering_stream_and_malformed_negotiation_is_400(node_factory, tmp_path: Path):
    """A study transcoded on retrieve, or rendered, is produced an instance (a frame) at a time; an Accept
    header, frame list or bulk data path that cannot be parsed is a 400 with the reason, never a 500."""
    node = node_factory(web=web_settings())
    node.start()
    blobs = ct_instances(30)  # 15 MB of 512 x 512 slices
    assert stow(node, list(blobs.values())).status_code == 200
    ds = pydicom.dcmread(BytesIO(next(iter(blobs.values()))), stop_before_pixels=True)
    study = f"{dicomweb(node)}/studies/{ds.StudyInstanceUID}"
    instance = f"{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"

    baseline = reset_peak(node)
    rle = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.5'
    with requests.get(study, headers={**AUTH, "Accept": rle}, timeout=120, stream=True) as response:
        assert response.status_code == 200, response.text
        parts = parts_of(response)
    assert len(parts) == 30
    assert {pydicom.dcmread(BytesIO(part)).file_meta.TransferSyntaxUID for part in parts} == {"1.2.840.10008.1.2.5"}
    with requests.get(f"{study}/rendered", headers={**AUTH, "Accept": 'multipart/related; type="image/png"'},
                      timeout=120, stream=True) as response:
        assert response.status_code == 200, response.text
        assert sum(len(chunk) for chunk in response.iter_content(MiB)) > 30 * 1000
    growth = peak_growth(node, baseline)
    assert growth < 40, f"the node's RSS rose by {growth:.0f} MiB transcoding and rendering a 15 MB study"

    for url, accept in (
        (instance, 'multipart/related; type="application/dicom"; q=high'),
        (f"{instance}/frames/1", 'multipart/related; type="application/octet-stream"; q=2x'),
        (f"{instance}/frames/0", None),
        (f"{instance}/frames/1,1", None),
        (f"{instance}/frames/1;2", None),
        (f"{instance}/bulkdata/7FE0001", None),
        (f"{instance}/bulkdata/00081111/x/00081150", None),
        (f"{instance}/bulkdata/00081111/0", None),
        (f"{instance}/rendered?window=40", "image/png"),
        (f"{instance}/rendered?viewport=0,0", "image/png"),
        (f"{instance}/thumbnail?viewport=64,64,0,0,32,32", "image/jpeg"),
        (f"{instance}/rendered?quality=101", "image/jpeg"),
    ):
        headers = {**AUTH, **({"Accept": accept} if accept else {})}
        answer = requests.get(url, headers=headers, timeout=30)
        assert answer.status_code == 400, (url, accept, answer.status_code, answer.text[:200])
        assert answer.json()["error"], (url, accept)
    deep = f"{instance}/bulkdata/" + "00081111/0/" * 800 + "00081150"
    assert requests.get(deep, headers=AUTH, timeout=30).status_code == 414
    served = assert_served(node, tmp_path / "after")
    assert_archive_intact(node, {**blobs, **served})


# --- QIDO-RS: numbers out of range ---------------------------------------------------------------------------


def test_qido_numbers_out_of_range_are_400_not_500(node_factory, tmp_path: Path):
    node = node_factory(web=web_settings())
    node.start()
    baseline = reset_peak(node)
    acknowledged = assert_served(node, tmp_path / "ct")
    huge = str(10**20)
    for path, params in (
        ("/studies", {"offset": huge}),
        ("/studies", {"limit": huge}),
        ("/studies", {"offset": str(2**63)}),
        ("/studies", {"offset": "-1"}),
        ("/studies", {"offset": "²"}),  # str.isdigit() says yes, int() says no
        ("/instances", {"InstanceNumber": huge}),
        ("/instances", {"InstanceNumber": str(2**31)}),  # IS holds -2^31 .. 2^31-1
        ("/instances", {"InstanceNumber": "1.5"}),
        ("/instances", {"00200013": huge}),
        ("/series", {"SeriesNumber": huge}),
        ("/instances", {"NumberOfFrames": huge}),
        ("/instances", {"Rows": "65536"}),  # US
        ("/studies", {"PatientID": "a\x00b"}),  # PostgreSQL refuses NUL in text: was a 500 there
        ("/studies", {"StudyInstanceUID": "1.2\x003"}),
        ("/studies", {"a\r\nb": "1"}),  # would be echoed in the Warning header
    ):
        response = requests.get(dicomweb(node) + path, params=params, headers=AUTH, timeout=30)
        assert response.status_code == 400, (path, params, response.status_code, response.text)
        assert response.json()["error"], (path, params)
    for path, params, count in (
        ("/instances", {"InstanceNumber": "-5"}, 0),  # IS may be negative
        ("/instances", {"InstanceNumber": " 3 "}, 1),  # and padded
        ("/instances", {"offset": str(2**63 - 1)}, 0),
        ("/studies", {"limit": str(2**63 - 1)}, 1),
    ):
        response = requests.get(dicomweb(node) + path, params=params, headers=AUTH, timeout=30)
        assert response.status_code == 200 and len(response.json()) == count, (path, params, response.text)
    assert requests.get(f"{dicomweb(node)}/studies/1.2.%003/series", headers=AUTH, timeout=30).status_code == 400
    unknown = requests.get(dicomweb(node) + "/studies", params={"\u20ac": "1"}, headers=AUTH, timeout=30)
    assert unknown.status_code == 400 and "\\u20ac" in unknown.json()["error"]  # was a 500 in a header: not latin-1

    assert peak_growth(node, baseline) < 30
    served = assert_served(node, tmp_path / "after")
    assert_archive_intact(node, {**acknowledged, **served})


# --- STOW-RS: bodies spooled to disk -------------------------------------------------------------------------


def test_stow_body_is_spooled_to_disk_and_bounded(node_factory, tmp_path: Path):
    node = node_factory(web=web_settings(max_request_mb=120))
    node.start()
    blobs = ct_instances(200)  # 100 MB in one request
    body, content_type = multipart(list(blobs.values()))

    baseline = reset_peak(node)
    response = requests.post(dicomweb(node) + "/studies", data=body, headers={**AUTH, "Content-Type": content_type},
                             timeout=120)
    assert response.status_code == 200, response.text
    assert len(response.json()["00081199"]["Value"]) == 200
    growth = peak_growth(node, baseline)
    assert growth < 40, f"the node's RSS rose by {growth:.0f} MiB storing a 100 MB STOW-RS body"

    # Past max_request_mb: refused before reading when announced, while streaming when chunked.
    baseline = reset_peak(node)
    assert answer_status(web_port(node), stow_head(10 * 2**30)) == 413
    junk = b"x" * MiB
    chunk = f"{len(junk):x}\r\n".encode() + junk + b"\r\n"
    assert answer_status(web_port(node), stow_head(None), [chunk] * 200) == 413
    growth = peak_growth(node, baseline)
    assert growth < 40, f"the node's RSS rose by {growth:.0f} MiB refusing a 200 MB chunked body"

    # A client that goes away mid-body, and a truncated body, store nothing; their spools are gone.
    with socket.create_connection(("127.0.0.1", web_port(node)), timeout=10) as sock:
        sock.sendall(stow_head(50 * MiB) + body[: 10 * MiB])
    truncated = requests.post(dicomweb(node) + "/studies", data=body[: len(body) // 2],
                              headers={**AUTH, "Content-Type": content_type}, timeout=60)
    assert truncated.status_code == 400
    # Each part costs a scan of the spool: 300 000 empty parts took 25 s and 116 MiB; more than 20 000 are refused.
    empty_parts, empty_type = multipart([b""] * 20001)
    started = time.monotonic()
    too_many = requests.post(dicomweb(node) + "/studies", data=empty_parts,
                             headers={**AUTH, "Content-Type": empty_type}, timeout=60)
    assert too_many.status_code == 400 and "more than 20000 parts" in too_many.text
    assert time.monotonic() - started < 20
    served = assert_served(node, tmp_path / "after")
    assert_archive_intact(node, {**blobs, **served})


def test_stow_refused_when_the_disk_cannot_hold_it(node_factory, tmp_path: Path):
    free_mb = shutil.disk_usage(tmp_path).free // MiB
    node = node_factory(web=web_settings(), storage={"min_free_mb": free_mb - 400})
    node.start()
    baseline = reset_peak(node)
    # 500 MB announced: the instances it holds need that much above storage.min_free_mb.
    assert answer_status(web_port(node), stow_head(500 * MiB)) == 507
    assert peak_growth(node, baseline) < 30
    served = assert_served(node, tmp_path / "after")
    assert_archive_intact(node, served)


# --- /metrics ------------------------------------------------------------------------------------------------


def test_metrics_need_a_client(node_factory, tmp_path: Path):
    metrics_token = secrets.token_urlsafe(24)
    settings = web_settings()
    settings["clients"].append(
        {"name": "prometheus", "token_sha256": hashlib.sha256(metrics_token.encode()).hexdigest(), "read": False,
         "write": False}
    )
    node = node_factory(web=settings)
    node.start()
    baseline = reset_peak(node)
    acknowledged = assert_served(node, tmp_path / "ct")

    anonymous = requests.get(root(node) + "/metrics", timeout=30)
    assert anonymous.status_code == 401 and "ohif" not in anonymous.text
    assert requests.get(root(node) + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    for token in (READ_ONLY_TOKEN, metrics_token):
        metrics = requests.get(root(node) + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert metrics.status_code == 200 and 'client="ohif"' in metrics.text
    scraper = {"Authorization": f"Bearer {metrics_token}"}
    assert requests.get(dicomweb(node) + "/studies", headers=scraper, timeout=30).status_code == 403
    assert requests.get(root(node) + "/healthz", timeout=30).status_code == 200  # probes stay open
    assert requests.get(root(node) + "/readyz", timeout=30).status_code == 200

    assert peak_growth(node, baseline) < 30
    served = assert_served(node, tmp_path / "after")
    assert_archive_intact(node, {**acknowledged, **served})


def test_anonymous_metrics_only_when_allowed(node_factory):
    node = node_factory(web=web_settings(allow_anonymous_metrics=True))
    node.start()
    assert requests.get(root(node) + "/metrics", timeout=30).status_code == 200
    assert requests.get(dicomweb(node) + "/studies", timeout=30).status_code == 401


# --- HTTPS ---------------------------------------------------------------------------------------------------


def self_signed(folder: Path, name: str, host: str | None = None) -> tuple[Path, Path]:
    """A self-signed certificate and its key (P-256), from the system's openssl."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    names = ["-addext", f"subjectAltName=IP:{host}"] if host else []
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", f"/CN={host or name}", *names, "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


def https(node: NodeProcess) -> str:
    return dicomweb(node).replace("http://", "https://")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_https_with_certificate_from_the_config(node_factory, tmp_path: Path):
    cert, key = self_signed(tmp_path / "tls", "server", "127.0.0.1")
    node = node_factory(web=web_settings(tls_cert_file="tls/server.crt", tls_key_file=str(key)))
    shutil.copytree(tmp_path / "tls", tmp_path / "node0" / "tls")  # relative paths: next to the config file
    node.start()
    baseline = reset_peak(node)

    session = requests.Session()
    session.trust_env = False  # else REQUESTS_CA_BUNDLE, when set, replaces session.verify
    session.verify = str(cert)
    session.headers.update(AUTH)
    client = DICOMwebClient(https(node), session=session)
    files = small_ct(tmp_path / "ct", patient_id="TLS-1")
    datasets = [pydicom.dcmread(path) for path in files]
    assert len(client.store_instances(datasets).ReferencedSOPSequence) == 6
    (study,) = client.search_for_studies(search_filters={"PatientID": "TLS-1"})
    assert study["00081190"]["Value"][0].startswith("https://")
    retrieved = client.retrieve_series(datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID)
    assert len(retrieved) == 6

    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(dicomweb(node) + "/studies", headers=AUTH, timeout=10)  # plain HTTP to the TLS port
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(https(node) + "/studies", headers=AUTH, timeout=10)  # a certificate nobody vouched for
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(cert)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", web_port(node)), timeout=10) as sock:
        with pytest.raises(ssl.SSLError):
            old.wrap_socket(sock, server_hostname="127.0.0.1")  # BCP 195: TLS 1.2 or later only

    assert peak_growth(node, baseline) < 30
    served = assert_served(node, tmp_path / "after", https(node), verify=str(cert))
    acknowledged = {ds.SOPInstanceUID: path.read_bytes() for ds, path in zip(datasets, files)}
    assert_archive_intact(node, {**acknowledged, **served})


def test_https_requiring_a_client_certificate(node_factory, tmp_path: Path):
    cert, key = self_signed(tmp_path / "tls", "server", "127.0.0.1")
    client_cert, client_key = self_signed(tmp_path / "tls", "ris")
    node = node_factory(web=web_settings(tls_cert_file=str(cert), tls_key_file=str(key),
                                         tls_ca_file=str(client_cert), tls_require_client_certificate=True))
    node.start()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(https(node) + "/studies", headers=AUTH, verify=str(cert), timeout=10)
    stranger = self_signed(tmp_path / "tls", "stranger")
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(https(node) + "/studies", headers=AUTH, verify=str(cert), cert=stranger, timeout=10)
    served = assert_served(node, tmp_path / "after", https(node), verify=str(cert),
                           cert=(str(client_cert), str(client_key)))
    assert_archive_intact(node, served)

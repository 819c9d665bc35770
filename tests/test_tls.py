"""DICOM TLS for incoming associations (PS3.15 Annex B, BCP 195): dcmtk and Orthanc as TLS senders.

Certificates are made for each test session with the system's openssl: a CA, the
node's server certificate and client certificates for the senders.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from conftest import free_port, run_dcmtk, storescu
from orthanc import orthanc_servers

from dicom_ai_node.phantoms import CTPhantom


@dataclass(frozen=True)
class Certificates:
    folder: Path

    def path(self, name: str) -> str:
        return str(self.folder / name)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Certificates:
    """ca.pem; node.pem/node.key (localhost, 127.0.0.1); ct1, orthanc, stranger and twin client certificates.

    The stranger's certificate is signed by another CA, which the node does not trust; the twin's has
    ct1's subject plus a second common name.
    """
    folder = tmp_path_factory.mktemp("tls")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                 "-days", "2", "-subj", f"/CN=Test {ca}", cwd=folder)
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    signed = {"node": ("/CN=localhost", "ca"), "ct1": ("/CN=ct1.hospital.local/O=Hospital", "ca"),
              "orthanc": ("/CN=orthanc.hospital.local/O=Hospital", "ca"),
              "stranger": ("/CN=ct1.hospital.local/O=Hospital", "other-ca"),
              "twin": ("/CN=ct1.hospital.local/CN=evil.example/O=Hospital", "ca")}
    for name, (subject, ca) in signed.items():
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subject, cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=folder)
    return Certificates(folder)


def _tls_node(node_factory, certificates: Certificates, **dimse):
    node = node_factory(dimse={
        "allowed_callers": [
            {"ae_title": "CT1", "tls_subject": "CN=ct1.hospital.local,O=Hospital"},
            {"ae_title": "ORTHANC", "tls_subject": "CN=orthanc.hospital.local"},
        ],
        "tls": {"port": free_port(), "cert_file": certificates.path("node.pem"), "key_file": certificates.path("node.key"),
                "ca_file": certificates.path("ca.pem"), "require_client_certificate": True},
        **dimse,
    })
    node.start()
    return node


def _tls_storescu(node, certificates: Certificates, calling: str, client: str | None, *files: Path):
    identity = ["+tls", certificates.path(f"{client}.key"), certificates.path(f"{client}.pem")] if client else ["+tla"]
    return run_dcmtk("storescu", *identity, "+cf", certificates.path("ca.pem"), "-aet", calling, "-aec", "AI_NODE",
                     "127.0.0.1", str(node.settings["dimse"]["tls"]["port"]), *map(str, files))


def _instances(node) -> int:
    return sum(row["NumberOfStudyRelatedInstances"] for row in node.json("studies"))


@pytest.fixture
def database_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/node.sqlite"


def test_dcmtk_sends_over_tls_with_a_client_certificate_bound_to_its_ae_title(node_factory, certificates, tmp_path):
    node = _tls_node(node_factory, certificates, plain=False)
    phantom = CTPhantom(slices=3, rows=32, columns=32)
    paths = phantom.write(tmp_path / "ct")

    sent = _tls_storescu(node, certificates, "CT1", "ct1", *paths)
    assert sent.returncode == 0, sent.stderr
    assert _instances(node) == 3
    assert "association from CT1@127.0.0.1: TLS client certificate commonName=ct1.hospital.local" in node.log()

    # A certificate the CA signed, but for another AE title's subject: rejected with the reason.
    other = CTPhantom(slices=1, rows=32, columns=32).write(tmp_path / "other")
    wrong_subject = _tls_storescu(node, certificates, "ORTHANC", "ct1", *other)
    assert wrong_subject.returncode != 0
    node.wait_for(lambda: "must present a client certificate with subject CN=orthanc.hospital.local" in node.log(),
                  timeout=5, what="the rejection's reason in the log")
    # A second common name beside the bound one is another subject, not the same with extras.
    assert _tls_storescu(node, certificates, "CT1", "twin", *other).returncode != 0
    node.wait_for(lambda: "commonName=evil.example" in node.log(), timeout=5, what="the twin's rejection")
    # No client certificate, or one from a CA the node does not trust: no TLS session at all.
    assert _tls_storescu(node, certificates, "CT1", None, *other).returncode != 0
    assert _tls_storescu(node, certificates, "CT1", "stranger", *other).returncode != 0
    assert _instances(node) == 3
    kinds = [row["kind"] for row in node.json("events")]
    assert "tls-handshake-failed" in kinds and "association-rejected" in kinds

    # plain = false: nothing listens on the plain port.
    assert storescu(node.port, *other, calling="CT1").returncode != 0


def test_tls_below_1_2_and_a_silent_handshake_do_not_get_in_the_way(node_factory, certificates, tmp_path):
    """BCP 195: TLS 1.2 at least.  A client that connects and never speaks TLS must not stall the others
    (pynetdicom does the handshake in its accept loop)."""
    node = _tls_node(node_factory, certificates, acse_timeout_seconds=30)
    port = node.settings["dimse"]["tls"]["port"]
    silent = socket.create_connection(("127.0.0.1", port))
    time.sleep(0.3)

    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", port)) as raw, pytest.raises(ssl.SSLError):
        old.wrap_socket(raw).do_handshake()
    node.wait_for(lambda: "TLS handshake with 127.0.0.1 failed: [SSL: UNSUPPORTED_PROTOCOL]" in node.log(),
                  timeout=5, what="the node to refuse TLS 1.1")

    started = time.monotonic()
    paths = CTPhantom(slices=2, rows=32, columns=32).write(tmp_path / "ct")
    sent = _tls_storescu(node, certificates, "CT1", "ct1", *paths)
    assert sent.returncode == 0, sent.stderr
    assert time.monotonic() - started < 10, "served while the silent client waits for its timeout"
    assert _instances(node) == 2
    silent.close()
    assert storescu(node.port, *CTPhantom(slices=1, rows=32, columns=32).write(tmp_path / "plain"),
                    calling="CT1").returncode != 0, "CT1 is bound to a certificate: not over the plain port"


def test_orthanc_forwards_to_the_node_over_dicom_tls(node_factory, certificates, tmp_path):
    node = _tls_node(node_factory, certificates)
    tls_port = node.settings["dimse"]["tls"]["port"]
    with orthanc_servers(tmp_path / "orthanc") as make:
        orthanc = make(
            aet="ORTHANC",
            settings={
                "DicomTlsEnabled": True,
                "DicomTlsCertificate": certificates.path("orthanc.pem"),
                "DicomTlsPrivateKey": certificates.path("orthanc.key"),
                "DicomTlsTrustedCertificates": certificates.path("ca.pem"),
                "DicomModalities": {"node": {"AET": "AI_NODE", "Host": "127.0.0.1", "Port": tls_port,
                                             "UseDicomTls": True}},
            },
        )
        (path,) = CTPhantom(slices=1, rows=32, columns=32).write(tmp_path / "ct")
        uploaded = requests.post(f"{orthanc.url}/instances", data=path.read_bytes(), timeout=30)
        uploaded.raise_for_status()
        sent = requests.post(f"{orthanc.url}/modalities/node/store", data=uploaded.json()["ID"], timeout=60)
        assert sent.ok, sent.text + orthanc.log()[-2000:]

    assert _instances(node) == 1
    stored = next(node.storage.rglob("*.dcm"))
    assert stored.stem == pydicom.dcmread(path).SOPInstanceUID
    assert "association from ORTHANC@127.0.0.1: TLS client certificate commonName=orthanc.hospital.local" in node.log()

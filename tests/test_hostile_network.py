"""Hostile and faulty peers on the DICOM port, and shutdown while they are connected.

Each case is what a few lines of raw-socket Python did to the node before it was
hardened (issue 15): it stays on loopback, is bounded in count and time, and checks
that the serving process's memory stays bounded, that an authorised sender is served
right after, and that what was acknowledged is stored whole.  These cases concern the
network layer, so they run on SQLite only.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import struct
import threading
import time
import zlib
from pathlib import Path

import pydicom
import pynetdicom
import pytest
import requests
from conftest import free_port, storescu
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_ai_node.phantoms import CTPhantom

GIB = 1 << 30
MIB = 1 << 20
A_ABORT = 0x07


@pytest.fixture
def database_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/node.sqlite"


def peak_rss(node) -> int:
    """The serving process's peak resident memory so far (VmHWM), in bytes."""
    return _status_kib(node, "VmHWM") * 1024


def _status_kib(node, field: str) -> int:
    for line in Path(f"/proc/{node.process.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{node.process.pid}/status")


def connect(node, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=10, source_address=(host, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the node sends until it closes the connection; fails if it keeps it open past `timeout`."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the node kept the connection open for more than {timeout} s")
    except ConnectionResetError:
        pass
    return received


def served_right_after(node, tmp_path: Path) -> None:
    """An authorised scanner sends a small series at once, and every instance is indexed and stored."""
    phantom = CTPhantom(slices=4, rows=32, columns=32, pixel_spacing=(8.0, 8.0), slice_spacing=8.0)
    paths = phantom.write(tmp_path / f"after-{phantom.series_uid[-8:]}")
    result = storescu(node.port, *paths)
    assert result.returncode == 0, result.stderr
    studies = {row["StudyInstanceUID"]: row["NumberOfStudyRelatedInstances"] for row in node.json("studies")}
    assert studies[phantom.study_uid] == 4
    stored = {path.stem for path in node.storage.rglob("*.dcm")}
    assert {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in paths} <= stored


def associate(node, calling: str = "SCU", host: str = "127.0.0.1", contexts=(CTImageStorage,)):
    ae = AE(ae_title=calling)
    for context in contexts:
        ae.add_requested_context(context)
    return ae.associate("127.0.0.1", node.port, ae_title="AI_NODE", bind_address=(host, 0))


def test_huge_pdu_length_claims_cost_no_memory(node_factory, tmp_path):
    """Issue 15.1: a 6-byte header claiming 1 GiB added 1 GiB of RSS per connection, held until the client left."""
    node = node_factory(dimse={"acse_timeout_seconds": 2, "network_timeout_seconds": 2})
    node.start()
    before = peak_rss(node)

    # Before any association: an A-ASSOCIATE-RQ claiming 1 GiB is answered with an A-ABORT.
    claims = [connect(node) for _ in range(3)]
    for sock in claims:
        sock.sendall(struct.pack(">BBL", 0x01, 0, GIB))
    for sock in claims:
        answer = read_until_closed(sock, timeout=10)
        assert answer[:1] == bytes([A_ABORT]) and len(answer) == 10
        sock.close()

    # Within an association: a P-DATA-TF longer than the negotiated maximum (1 MiB by default) too.
    association = associate(node)
    assert association.is_established
    raw = association.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 0x04, 0, 4 * GIB - 1))
    deadline = time.monotonic() + 10
    while not association.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert association.is_aborted

    # A PDU that starts and then stalls: cut off after the request timeout, not held for ever.
    stalled = connect(node)
    stalled.sendall(struct.pack(">BBL", 0x01, 0, 64 * 1024) + b"\x00" * 100)
    started = time.monotonic()
    assert read_until_closed(stalled, timeout=15) == b""
    assert time.monotonic() - started < 6
    stalled.close()

    assert peak_rss(node) - before < 64 * MIB, "the claims cost memory"
    assert "claiming 1073741824 bytes, more than any association request" in node.log()
    served_right_after(node, tmp_path)


def test_idle_and_garbage_connections_do_not_lock_out_scanners(node_factory, tmp_path):
    """Issue 15.2: 20 idle connections (or 30 of random bytes) took every slot for 30-60 s, unlogged."""
    web_port = free_port()
    node = node_factory(dimse={"max_pending_connections": 8},
                        web={"enabled": True, "port": web_port, "allow_anonymous_metrics": True})
    node.start()
    before = peak_rss(node)
    idle = [connect(node) for _ in range(20)]
    noise = random.Random(15)
    garbage = []
    for _ in range(30):
        sock = connect(node)
        sock.sendall(bytes([0x01, 0]) + noise.randbytes(3000))  # looks like a request, is not one
        garbage.append(sock)
    time.sleep(0.5)

    started = time.monotonic()
    served_right_after(node, tmp_path)
    assert time.monotonic() - started < 10  # served now, not once the idle ones time out
    for sock in idle + garbage:
        sock.close()

    assert peak_rss(node) - before < 64 * MIB
    assert "without an association request: 8 connections were waiting" in node.log()
    evicted = [row for row in node.json("events") if row["kind"] == "connection-evicted"]
    assert len(evicted) == 1, "a flood is recorded once a minute per host, not once per connection"
    assert evicted[0]["message"].startswith("connection from 127.0.0.1 closed after")
    metrics = requests.get(f"http://127.0.0.1:{web_port}/metrics", timeout=10).text
    refusals = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("dicom_ai_node_dicom_refusals_total{")}
    assert refusals["connection-evicted"] + refusals.get("pdu-too-long", 0) + refusals.get("pdu-invalid", 0) >= 42


def test_association_slots_are_exact_logged_and_per_host(node_factory, tmp_path):
    """Issue 15.2: only 8-9 of 10 slots were usable in a burst, and limit rejections were neither logged
    nor in `events`.  A host over dimse.max_associations_per_host is turned away while another is served."""
    node = node_factory(dimse={"max_associations": 10, "max_associations_per_host": 8})
    node.start()
    open_associations = []
    burst = [threading.Thread(target=lambda: open_associations.append(associate(node))) for _ in range(8)]
    for thread in burst:
        thread.start()
    for thread in burst:
        thread.join()
    assert all(association.is_established for association in open_associations)

    over_host_limit = associate(node, calling="BUSY")
    assert over_host_limit.is_rejected
    other_host = [associate(node, calling="OTHER", host="127.0.0.2") for _ in range(2)]
    assert all(association.is_established for association in other_host)  # slots 9 and 10
    full = associate(node, calling="LATE", host="127.0.0.3")
    assert full.is_rejected

    for association in open_associations + other_host:
        association.release()
    assert associate(node, calling="AFTER").is_established or pytest.fail("a released slot is free at once")
    log = node.log()
    assert "association from 'BUSY'@127.0.0.1 rejected: 127.0.0.1 already has 8 associations open" in log
    assert "association from 'LATE'@127.0.0.3 rejected: all 10 association slots are in use" in log
    kinds = [row["kind"] for row in node.json("events")]
    assert kinds.count("association-limit") == 2  # one per host
    served_right_after(node, tmp_path)


def _deflated_bomb(source: Path) -> bytes:
    """A CT slice's header, then a Pixel Data element claiming 2 GiB of zeros: 2 MB deflated."""
    ds = pydicom.dcmread(source)
    del ds.PixelData
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(buffer.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 2 * GIB))]
    zeros = bytes(MIB)
    parts += [deflater.compress(zeros) for _ in range(2048)]
    parts.append(deflater.flush())
    return b"".join(parts)


def test_deflate_bomb_is_refused_with_bounded_memory(node, tmp_path, monkeypatch):
    """Issue 15.3: 1.04 MB of Deflated Explicit VR Little Endian on the wire became a 2.17 GB RSS peak."""
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes as they are
    phantom = CTPhantom(slices=1, rows=512, columns=512)
    (source,) = phantom.write(tmp_path / "source")
    meta = pydicom.dcmread(source).file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    bomb = tmp_path / "bomb.dcm"
    with bomb.open("wb") as file:
        file.write(b"\x00" * 128 + b"DICM")
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        pydicom.filewriter.write_file_meta_info(buffer, meta)
        file.write(buffer.getvalue() + _deflated_bomb(source))

    before = peak_rss(node)
    ae = AE(ae_title="BOMBER")
    ae.add_requested_context(CTImageStorage, DeflatedExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", node.port, ae_title="AI_NODE")
    status = association.send_c_store(bomb)
    association.release()

    assert status.Status == 0xC210  # the dataset contradicts its own description: not worth re-sending
    assert "deflated dataset inflates past 64 MiB, far more than the image it describes" in node.log()
    assert peak_rss(node) - before < 160 * MIB
    assert not list(node.storage.rglob("*.dcm"))
    served_right_after(node, tmp_path)


def test_uid_with_a_trailing_line_feed_is_refused(node, tmp_path, monkeypatch):
    """Issue 15.4: a StudyInstanceUID ending in a line feed was stored and indexed ("$" matches before it)."""
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes as they are
    phantom = CTPhantom(slices=1, rows=32, columns=32)
    (path,) = phantom.write(tmp_path / "lf")
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1447.15"  # 30 characters: written without a pad byte
    ds.save_as(path)
    encoded = path.read_bytes()
    assert encoded.count(b"1.2.826.0.1.3680043.10.1447.15") == 1
    path.write_bytes(encoded.replace(b"1.2.826.0.1.3680043.10.1447.15", b"1.2.826.0.1.3680043.10.1447.1\n"))
    association = associate(node)
    status = association.send_c_store(path)
    association.release()
    assert status.Status == 0xA900
    assert "is not a valid UID" in status.ErrorComment
    assert node.json("studies") == []
    served_right_after(node, tmp_path)


def _sending_when_sigterm(node, tmp_path: Path, stores: int, pause: float) -> tuple[list[int | str], float]:
    """Send `stores` instances on one association, a SIGTERM after the third; statuses and the node's exit time.

    A second connection, opened before the SIGTERM, asks for its association after it: turned away (transient).
    """
    phantom = CTPhantom(slices=stores, rows=32, columns=32, pixel_spacing=(8.0, 8.0), slice_spacing=8.0)
    association = associate(node)
    latecomer = connect(node)
    statuses: list[int | str] = []
    terminated_at = 0.0
    for number, dataset in enumerate(phantom.datasets()):
        if number == 3:
            node.process.send_signal(signal.SIGTERM)
            terminated_at = time.monotonic()
            node.wait_for(lambda: "stopping: no new associations" in node.log(), timeout=5, what="the SIGTERM")
            late = AE(ae_title="LATE")
            late.add_requested_context(CTImageStorage)
            turned_away = late.associate("127.0.0.1", node.port, ae_title="AI_NODE")
            assert not turned_away.is_established  # the listener is closed: refused, or rejected if it got in
            latecomer.sendall(_association_request("LATE"))
            answer = read_until_closed(latecomer, timeout=10)
            assert answer[:1] in (b"\x03", b""), answer[:16]  # A-ASSOCIATE-RJ, or closed while draining
        if not association.is_established:
            statuses.append("aborted")
            break
        status = association.send_c_store(dataset)
        statuses.append(status.Status if "Status" in status else "no answer")
        time.sleep(pause)
    if association.is_established:
        association.release()
    node.process.wait(timeout=30)
    return statuses, time.monotonic() - terminated_at


def _association_request(calling: str) -> bytes:
    """An A-ASSOCIATE-RQ for CT Image Storage in Implicit VR Little Endian, as pynetdicom encodes it."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, "AI_NODE"
    context = build_context(CTImageStorage, "1.2.840.10008.1.2")
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    primitive.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def test_sigterm_lets_open_associations_finish_within_the_grace_period(node_factory, tmp_path):
    """Issue 15.9: after "stopped" the node kept serving, answering each C-STORE 0xC211 with a traceback."""
    node = node_factory(node={"shutdown_grace_seconds": 10})
    node.start()
    statuses, exit_after = _sending_when_sigterm(node, tmp_path, stores=12, pause=0.1)
    assert statuses == [0x0000] * 12, "the association finishes within the grace period"
    assert exit_after < 10
    log = node.log()
    assert "Traceback" not in log and "0xC211" not in log
    assert log.index("released after") < log.index("dicom_ai_node.node: stopped")


def test_sigterm_aborts_associations_still_open_after_the_grace_period(node_factory, tmp_path):
    node = node_factory(node={"shutdown_grace_seconds": 2})
    node.start()
    statuses, exit_after = _sending_when_sigterm(node, tmp_path, stores=40, pause=0.2)
    acknowledged = statuses.index("no answer") if "no answer" in statuses else statuses.index("aborted")
    assert set(statuses[:acknowledged]) == {0x0000}  # then the store in flight, if any, got no answer
    assert set(statuses[acknowledged:]) <= {"no answer", "aborted"} and len(statuses) < 40
    assert exit_after < 2 + 2.5
    log = node.log()
    assert "1 association(s) still open after the grace period: aborted" in log and "Traceback" not in log

    node.start()  # what was acknowledged is there, whole
    (study,) = node.json("studies")
    assert study["NumberOfStudyRelatedInstances"] >= acknowledged
    assert len(list(node.storage.rglob("*.dcm"))) == study["NumberOfStudyRelatedInstances"]
    served_right_after(node, tmp_path)


def test_shutdown_is_bounded_by_the_grace_period_with_a_hung_destination(node_factory, tmp_path):
    """Issue 15.10: a destination that never answers held the node 21.4 s with a grace of 5 s."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # accepts connections (the kernel does) and never says a word
    node = node_factory(
        node={"shutdown_grace_seconds": 3},
        workers={"processes": 1},
        destinations={"hung": {"kind": "dimse", "ae_title": "HUNG", "host": "127.0.0.1",
                               "port": hung.getsockname()[1], "timeout_seconds": 60}},
        routes=[{"name": "ct", "modality": "CT", "min_slices": 3, "models": ["ct-tissue"], "destinations": ["hung"]}],
    )
    node.start()
    phantom = CTPhantom(slices=6, rows=48, columns=48, pixel_spacing=(8.0, 8.0), slice_spacing=8.0)
    assert storescu(node.port, *phantom.write(tmp_path / "ct")).returncode == 0
    node.wait_for(lambda: node.json("deliveries", "--state", "sending"), timeout=90, what="a delivery sending")

    started = time.monotonic()
    node.process.send_signal(signal.SIGTERM)
    node.process.wait(timeout=30)
    assert time.monotonic() - started < 3 + 2.0
    assert "still sending at the end of the grace period" in node.log()
    node.process = None
    hung.close()

    node.start()  # the cut-off delivery is sent again, with the same objects
    (delivery,) = node.json("deliveries")
    assert delivery["state"] in ("pending", "sending", "failed")


def _threads(node) -> int:
    return _status_kib(node, "Threads")


def _cpu_seconds(node) -> float:
    fields = Path(f"/proc/{node.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _pdata(fragment: bytes, control: int, context_id: int = 1) -> bytes:
    """A P-DATA-TF PDU with one PDV: `control` is the message control header (bit 0: command, bit 1: last)."""
    item = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBL", 0x04, 0, len(item)) + item


def test_a_dimse_message_cannot_grow_without_bound(node_factory, tmp_path):
    """A sender that associates can still not pile up memory: command fragments that never end, or a
    dataset past dimse.max_dataset_mb, end the association (the review found +300 MB from 300 fragments)."""
    node = node_factory(dimse={"max_dataset_mb": 4})
    node.start()
    before = peak_rss(node)
    for control, what in ((0x01, "command set longer than"), (0x00, "dataset longer than 4 MiB")):
        association = associate(node)
        context_id = association.accepted_contexts[0].context_id
        raw = association.dul.socket.socket
        try:
            for _ in range(100):
                raw.sendall(_pdata(bytes((1 << 20) - 1024), control, context_id))
        except OSError:  # the node has hung up
            pass
        deadline = time.monotonic() + 10
        while not association.is_aborted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert association.is_aborted
        node.wait_for(lambda: what in node.log(), timeout=5, what=f"the refusal: {what}")
    assert peak_rss(node) - before < 64 * MIB
    served_right_after(node, tmp_path)


def test_a_trickle_in_the_middle_of_a_pdu_ends_the_association(node_factory, tmp_path):
    """One byte every (network_timeout - 1) s kept a thread and a connection for ever, past max_associations."""
    node = node_factory(dimse={"network_timeout_seconds": 2, "max_associations": 2})
    node.start()
    tricklers = [associate(node, calling=f"TRICKLE{n}") for n in range(2)]
    for association in tricklers:
        association.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\x00")
    started = time.monotonic()
    for _ in range(4):  # a byte every 1.5 s: each recv makes progress, the PDU never ends
        time.sleep(1.5)
        for association in tricklers:
            try:
                association.dul.socket.socket.sendall(b"\x00")
            except OSError:
                pass
    assert all(association.is_aborted or not association.is_established for association in tricklers)
    assert time.monotonic() - started < 8
    assert node.log().count("did not send a PDU in time: connection closed") == 2
    served_right_after(node, tmp_path)


def test_connection_floods_and_idle_connections_cost_bounded_threads_and_cpu(node_factory, tmp_path):
    """Connect-and-close floods left a thread per connection for acse_timeout; idle connections were polled
    every millisecond (32 of them took half a core)."""
    node = node_factory(dimse={"max_pending_connections": 8})
    node.start()
    idle_threads = _threads(node)
    for _ in range(300):
        connect(node).close()
    time.sleep(1)
    assert _threads(node) - idle_threads < 20, "threads of closed connections linger"

    idle = [associate(node, calling=f"IDLE{n}", contexts=(CTImageStorage,)) for n in range(6)]
    idle += [connect(node) for _ in range(8)]
    time.sleep(1.5)  # past the second after which a quiet connection is polled slowly
    cpu_before, wall_before = _cpu_seconds(node), time.monotonic()
    time.sleep(3)
    share = (_cpu_seconds(node) - cpu_before) / (time.monotonic() - wall_before)
    assert share < 0.25, f"14 idle connections took {share:.0%} of a core"
    for connection in idle:
        connection.release() if hasattr(connection, "release") else connection.close()
    served_right_after(node, tmp_path)


def test_large_pdus_are_read_up_to_the_negotiated_maximum_from_the_first(node_factory, tmp_path):
    """The first P-DATA can arrive before the association thread marks the association established: it is
    held to the negotiated maximum (4 MiB here), not to the size limit of association requests."""
    node = node_factory(dimse={"max_pdu_size": 4 << 20})
    node.start()
    phantom = CTPhantom(slices=5, rows=1024, columns=1024)  # 2 MiB per slice: one PDU each
    for dataset in phantom.datasets():
        association = associate(node)
        assert association.acceptor.maximum_length == 4 << 20
        assert association.send_c_store(dataset).Status == 0x0000
        association.release()
    assert "A-ABORT" not in node.log()
    (study,) = node.json("studies")
    assert study["NumberOfStudyRelatedInstances"] == 5


def test_a_caller_not_allowed_is_rejected_even_when_the_audit_trail_cannot_be_written(node_factory, tmp_path):
    """Issue 9.4: the rejection was sent after its audit row; with the database locked, writing the row
    failed inside pynetdicom's handler, which swallowed the error and accepted the association."""
    node = node_factory(dimse={"allowed_callers": [{"ae_title": "CT_SCANNER"}]})
    node.start()
    (path,) = CTPhantom(slices=1, rows=32, columns=32).write(tmp_path / "ct")
    database = sqlite3.connect(node.database_url.removeprefix("sqlite:///"), isolation_level=None, timeout=5)
    database.execute("BEGIN EXCLUSIVE")  # no one else writes (or reads) until this ends
    try:
        started = time.monotonic()
        intruder = storescu(node.port, path, calling="INTRUDER")
        assert intruder.returncode != 0 and "Association Rejected" in intruder.stderr, intruder.stderr
        assert time.monotonic() - started < 10, "the rejection waited for the audit trail"
    finally:
        database.execute("ROLLBACK")
        database.close()
    node.wait_for(lambda: any(row["kind"] == "association-rejected" for row in node.json("events")), timeout=40,
                  what="the rejection in the audit trail once the database is free")
    assert not list(node.storage.rglob("*.dcm"))
    assert storescu(node.port, path, calling="CT_SCANNER").returncode == 0

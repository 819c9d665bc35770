"""`serve` that cannot start: it says why in one sentence, exits 2, and leaves nothing running.

Expected failures (a port in use, a certificate that cannot be loaded, a secret
missing from the environment) are `NodeError`s: one plain line, status 2, no
traceback, so systemd's `Restart=on-failure` sees the failure. Anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import typer
from conftest import PEER_ENV, free_port

from dicom_ai_node import cli
from dicom_ai_node.config import ConfigError, load_config
from dicom_ai_node.errors import NodeError, StartupError
from dicom_ai_node.store.db import DatabaseNotReady
from dicom_ai_node.web.app import AuthError

_MARK = "DICOM_AI_NODE_TEST_MARK"
# Start-up takes 2-3 s on an idle machine; the bug this guards against never exits at all.
_EXIT_SECONDS = 20


def _marked(mark: str) -> list[int]:
    """Processes whose environment carries `mark`: the serve process and anything it started, reparented or not."""
    needle = f"{_MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _serve_failing(node, env: dict[str, str] | None = None) -> tuple[int, str, list[int]]:
    """Run `serve`, which should fail: (status, stderr, processes of its still running after it exited)."""
    node.write_config()
    node.cli("db", "upgrade")
    mark = uuid.uuid4().hex
    stderr_path = node.workdir / "serve.stderr"
    started = time.monotonic()
    with stderr_path.open("w") as stderr:
        # Files, not pipes: a worker left behind would hold a pipe open and hide that serve itself exited.
        process = subprocess.Popen(
            [sys.executable, "-m", "dicom_ai_node", "serve", "--config", str(node.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**PEER_ENV, "COLUMNS": "200", **(env or {}), _MARK: mark},
        )
    try:
        status = process.wait(timeout=_EXIT_SECONDS)  # TimeoutExpired: serve did not exit
        print(f"serve exited {status} after {time.monotonic() - started:.1f} s")
        deadline = time.monotonic() + 3  # a child may take a moment to notice its parent is gone
        while (left := _marked(mark)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return status, stderr_path.read_text(), left
    finally:
        for pid in _marked(mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if process.poll() is None:
            process.wait()


def _one_plain_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


class _Listening:
    """Another program on a port: a bound, listening socket."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.socket = socket.socket()
        self.socket.bind((host, port))
        self.socket.listen()

    def __enter__(self) -> socket.socket:
        return self.socket

    def __exit__(self, *exc) -> None:
        self.socket.close()


def test_serve_exits_when_the_dicom_port_is_taken(node_factory):
    node = node_factory(workers={"processes": 1})
    with _Listening(node.port):
        status, stderr, left = _serve_failing(node)
    assert status == 2, stderr
    line = _one_plain_error(stderr)
    assert f"127.0.0.1:{node.port}" in line and "dimse.port" in line and "in use" in line, line
    assert not left


def test_serve_exits_when_the_web_port_is_taken(node_factory):
    web_port = free_port()
    node = node_factory(workers={"processes": 1}, web={"enabled": True, "bind": "127.0.0.1", "port": web_port})
    with _Listening(web_port):
        status, stderr, left = _serve_failing(node)
    assert status == 2, stderr
    line = _one_plain_error(stderr)
    assert f"127.0.0.1:{web_port}" in line and "web.port" in line and "in use" in line, line
    assert not left


def test_serve_exits_when_the_tls_certificate_is_missing(node_factory):
    node = node_factory(workers={"processes": 1})
    cert = node.workdir / "missing" / "node.pem"
    node.settings["dimse"] = {"tls": {"port": free_port(), "cert_file": str(cert),
                                      "key_file": str(cert.with_suffix(".key"))}}
    status, stderr, left = _serve_failing(node)
    assert status == 2, stderr
    line = _one_plain_error(stderr)
    assert "dimse.tls" in line and str(cert) in line, line
    assert not left


def test_serve_exits_when_the_web_tls_certificate_is_missing(node_factory):
    node = node_factory(workers={"processes": 1})
    cert = node.workdir / "missing" / "web.pem"
    node.settings["web"] = {"enabled": True, "bind": "127.0.0.1", "port": free_port(),
                            "tls_cert_file": str(cert), "tls_key_file": str(cert.with_suffix(".key"))}
    status, stderr, left = _serve_failing(node)
    assert status == 2, stderr
    line = _one_plain_error(stderr)
    assert "web" in line and str(cert) in line, line
    assert not left


def test_serve_exits_when_the_tls_port_is_taken_and_frees_the_plain_one(node_factory):
    """The plain DICOM port binds first; when the TLS port cannot, the plain one is closed again."""
    node = node_factory(workers={"processes": 1})
    certs = node.workdir / "certs"
    certs.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out",
                    "node.pem", "-days", "1", "-subj", "/CN=node"], cwd=certs, check=True, capture_output=True)
    tls_port = free_port()
    node.settings["dimse"] = {"tls": {"port": tls_port, "cert_file": str(certs / "node.pem"),
                                      "key_file": str(certs / "node.key")}}
    with _Listening(tls_port):
        status, stderr, left = _serve_failing(node)
    assert status == 2, stderr
    line = _one_plain_error(stderr)
    assert f"127.0.0.1:{tls_port}" in line and "dimse.tls.port" in line, line
    assert not left


def test_a_web_client_without_its_token_variable_stops_serve(node_factory):
    variable = f"DAIN_TEST_TOKEN_{uuid.uuid4().hex[:8].upper()}"
    node = node_factory(
        workers={"processes": 1},
        web={"enabled": True, "bind": "127.0.0.1", "port": free_port(),
             "clients": [{"name": "script", "token_env": variable, "write": True, "read": True}]},
    )
    env = {key: value for key, value in PEER_ENV.items() if key != variable}
    status, stderr, left = _serve_failing(node, env)
    assert status == 2, stderr
    line = _one_plain_error(stderr)
    assert "'script'" in line and variable in line, line
    assert not left


def test_a_failed_start_stops_what_it_started(node_factory):
    """In-process: the DICOM listener bound before the web port failed is closed, its thread gone."""
    from dicom_ai_node.node import Node

    web_port = free_port()
    node = node_factory(web={"enabled": True, "bind": "127.0.0.1", "port": web_port})
    node.write_config()
    node.cli("db", "upgrade")
    running = Node(load_config(node.config_path))
    with _Listening(web_port), pytest.raises(StartupError, match=rf"127\.0\.0\.1:{web_port} .*\(web\.port\)"):
        running.start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", node.port))  # the DICOM port is free again
    deadline = time.monotonic() + 5
    while (names := [t.name for t in threading.enumerate() if t.is_alive()
                     and t.name.startswith(("dicom-scp:", "web", "series-stages", "delivery-dispatch"))]) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not names


def test_every_expected_failure_is_a_node_error():
    for kind in (ConfigError, DatabaseNotReady, AuthError, StartupError):
        assert issubclass(kind, NodeError), kind
    assert cli.NodeError is NodeError  # `from dicom_ai_node.cli import NodeError` keeps working


def test_plain_errors_prints_the_sentence_as_is_and_exits_2(capsys):
    @cli._plain_errors
    def fails() -> None:
        raise StartupError("no peer named 'x' in [peers] (known: [bold]a[/bold])")

    with pytest.raises(typer.Exit) as raised:
        fails()
    assert raised.value.exit_code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: no peer named 'x' in [peers] (known: [bold]a[/bold])"


def test_plain_errors_lets_a_bug_through():
    @cli._plain_errors
    def bug() -> None:
        raise RuntimeError("a bug")

    @cli._plain_errors
    def os_error() -> None:
        raise OSError("not caught here either")

    with pytest.raises(RuntimeError, match="a bug"):
        bug()
    with pytest.raises(OSError):
        os_error()

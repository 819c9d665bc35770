"""Runs the DICOMweb app with uvicorn in a thread of the node process.

One process keeps one SQLite writer lock (the node's Index) for C-STORE and
STOW-RS alike, and the web server starts and drains with the node.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import uvicorn
from sqlalchemy import Engine
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dicom_ai_node.config import Config
from dicom_ai_node.errors import StartupError
from dicom_ai_node.store.files import InstanceStore
from dicom_ai_node.store.index import Index
from dicom_ai_node.tls import apply_bcp195
from dicom_ai_node.web.metrics import DicomRefusals

log = logging.getLogger(__name__)

_START_TIMEOUT_SECONDS = 15.0
MAX_REQUEST_HEAD_BYTES = 16 * 1024  # h11's bound on a request head


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with h11's bound on a request head.

    httptools parses a large body in C (a 100 MB STOW-RS body took 0.5-1.0 s with h11 against
    0.2-0.5 s here, on a loaded 2-CPU VM), but it buffers a request head without bound.  A
    client whose head is not complete after MAX_REQUEST_HEAD_BYTES gets 431 and is
    disconnected, as with h11 (which answers 400).
    """

    _in_head = True  # the next bytes belong to a request head
    _head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > MAX_REQUEST_HEAD_BYTES and not self.transport.is_closing():
            log.warning("HTTP request head from %s longer than %d bytes: refused", self.client, MAX_REQUEST_HEAD_BYTES)
            message = b"request head too large"
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(message), message)
            )
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes = True, 0
        super().on_message_complete()


class WebServer:
    """`bind()` listens, `start()` serves (binding first unless `bind` did); no-op unless `web.enabled`."""

    def __init__(
        self, config: Config, engine: Engine, index: Index, store: InstanceStore, dicom_refusals: DicomRefusals
    ) -> None:
        self.settings = config.web
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        if self.settings.enabled:
            from dicom_ai_node.web.app import create_app  # starlette & co. load only when the server runs

            app = create_app(config, engine, index, store, dicom_refusals)
            web = self.settings
            server_config = uvicorn.Config(
                app,
                host=web.bind,
                port=web.port,
                log_config=None,  # the node's logging setup applies
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=10,
                http=BoundedHttpToolsProtocol,
                loop="uvloop",  # libuv's event loop: fewer CPU cycles per received block than asyncio's
                ws="none",
                ssl_certfile=web.tls_cert_file,
                ssl_keyfile=web.tls_key_file,
                ssl_ca_certs=web.tls_ca_file,
                ssl_cert_reqs=(ssl.CERT_REQUIRED if web.tls_require_client_certificate
                               else ssl.CERT_OPTIONAL if web.tls_ca_file else ssl.CERT_NONE),
            )
            try:
                server_config.load()  # builds the TLS context now, so a bad file stops start-up here
            except (OSError, ssl.SSLError) as exc:
                given = ", ".join(f"{key} {path}" for key in ("tls_cert_file", "tls_key_file", "tls_ca_file")
                                  if (path := getattr(web, key)))
                raise StartupError(f"cannot start: web: cannot load {given}: {exc}") from None
            if server_config.ssl is not None:
                apply_bcp195(server_config.ssl)
            self._server = uvicorn.Server(server_config)

    def bind(self) -> None:
        """Bind and listen; requests wait in the kernel until `start`.  StartupError naming the port if it cannot."""
        if self._server is None or self._socket is not None or self._thread is not None:
            return
        web = self.settings
        # As uvicorn binds (Config.bind_socket), but an error is raised here instead of ending the process.
        sock = socket.socket(socket.AF_INET6 if ":" in web.bind else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((web.bind, web.port))
            sock.listen(self._server.config.backlog)
        except OSError as exc:
            sock.close()
            raise StartupError.cannot_listen("DICOMweb", web.bind, web.port, "web.port", "web.bind", exc) from exc
        self._socket = sock

    def start(self) -> None:
        if self._server is None:
            return
        self.bind()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, name="web",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"DICOMweb server on {self.settings.bind}:{self.settings.port} did not start (see the log above)"
                )
            time.sleep(0.02)
        scheme = "https" if self.settings.tls_cert_file else "http"
        log.info("DICOMweb server on %s://%s:%d%s", scheme, self.settings.bind, self.settings.port,
                 self.settings.base_path)

    def stop(self, deadline: float) -> None:
        """Stop accepting; requests in flight may finish until `deadline` (time.monotonic())."""
        if self._server is None:
            return
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                self._server.force_exit = True  # cuts the requests still running; the thread is a daemon
            self._thread = None
        if self._socket is not None:  # uvicorn closes it too once it stops; bound but never served, only here
            self._socket.close()
            self._socket = None

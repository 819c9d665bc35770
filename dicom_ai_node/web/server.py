"""Runs the DICOMweb app with uvicorn in a thread of the node process.

One process keeps one SQLite writer lock (the node's Index) for C-STORE and
STOW-RS alike, and the web server starts and drains with the node.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn
from sqlalchemy import Engine

from dicom_ai_node.config import Config
from dicom_ai_node.store.files import InstanceStore
from dicom_ai_node.store.index import Index

log = logging.getLogger(__name__)

_START_TIMEOUT_SECONDS = 15.0


class WebServer:
    """`start()` returns once the port is listening (raises if it cannot); no-op unless `web.enabled`."""

    def __init__(self, config: Config, engine: Engine, index: Index, store: InstanceStore) -> None:
        self.settings = config.web
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        if self.settings.enabled:
            from dicom_ai_node.web.app import create_app  # starlette & co. load only when the server runs

            app = create_app(config, engine, index, store)
            self._server = uvicorn.Server(
                uvicorn.Config(
                    app,
                    host=self.settings.bind,
                    port=self.settings.port,
                    log_config=None,  # the node's logging setup applies
                    access_log=False,
                    lifespan="off",
                    timeout_graceful_shutdown=10,
                )
            )

    def start(self) -> None:
        if self._server is None:
            return
        self._thread = threading.Thread(target=self._server.run, name="web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"DICOMweb server could not listen on {self.settings.bind}:{self.settings.port} (see the log above)"
                )
            time.sleep(0.02)
        log.info("DICOMweb server on http://%s:%d%s", self.settings.bind, self.settings.port, self.settings.base_path)

    def stop(self) -> None:
        """Stop accepting; requests in flight get uvicorn's graceful timeout."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._thread = None

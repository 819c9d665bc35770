"""The running node: wires the stages together and owns start-up and shutdown."""

from __future__ import annotations

import logging
import signal
import threading

from dicom_ai_node.config import Config
from dicom_ai_node.ingest.scp import StorageSCP
from dicom_ai_node.series.completion import CompletionMonitor
from dicom_ai_node.store.db import make_engine, require_current_schema
from dicom_ai_node.store.files import InstanceStore
from dicom_ai_node.store.index import Index

log = logging.getLogger(__name__)


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.engine = make_engine(config.database.url)
        require_current_schema(self.engine)
        self.index = Index(self.engine)
        self.store = InstanceStore(config.storage.path, config.storage.min_free_mb * 2**20)
        self.scp = StorageSCP(config, self.index, self.store)
        self.completion = CompletionMonitor(
            self.index, config.series.stable_seconds, config.series.check_interval_seconds
        )

    def start(self) -> None:
        self.completion.check_once()  # series left waiting by a previous run
        self.completion.start()
        self.scp.start()

    def stop(self) -> None:
        log.info("stopping: no new associations")
        self.scp.stop()
        self.completion.stop()
        self.engine.dispose()
        log.info("stopped")


def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT."""
    node = Node(config)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    node.start()
    log.info(
        "dicom-ai-node ready: AE %s on port %d, storage %s, database %s",
        config.node.ae_title,
        config.dimse.port,
        config.storage.path,
        node.engine.url.render_as_string(hide_password=True),
    )
    stop.wait()
    node.stop()

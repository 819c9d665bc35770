"""The notification runner: one thread in the node that owes and makes webhook calls.

Calls are quick and few (one per job and event), so one thread makes them one after another; a webhook that
hangs holds the others up for at most its `timeout_seconds` per attempt.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from dicom_ai_node.config import Config
from dicom_ai_node.errors import StartupError
from dicom_ai_node.notify.queue import NotificationQueue
from dicom_ai_node.notify.webhook import call

log = logging.getLogger(__name__)

_BATCH = 16  # calls claimed at a time; the rest wait for the next pass


class NotificationRunner:
    def __init__(self, config: Config, queue: NotificationQueue, interval_seconds: float = 0.5) -> None:
        self.config = config
        self.queue = queue
        self.interval_seconds = interval_seconds
        self.wanted = {name: set(webhook.on) for name, webhook in config.webhooks.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="notifications", daemon=True)

    def start(self) -> None:
        """Start the thread, if there are webhooks; a webhook without its secret stops the node from starting, as
        every call it is owed would be unsigned (and so refused)."""
        for name, webhook in self.config.webhooks.items():
            if not os.environ.get(webhook.secret_env):
                raise StartupError(f"cannot start: webhook {name!r} signs its calls with the secret in the environment "
                                   f"variable {webhook.secret_env} (webhooks.{name}.secret_env), which is not set or "
                                   "empty; set it for the node or remove the webhook")
        if self.config.webhooks:  # nothing to notify without webhooks: no thread, no queries
            self._thread.start()

    def stop(self, deadline: float) -> None:
        """Stop after the call under way (a call cut off is made again after the next start)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def run_once(self) -> int:
        """Owe what jobs and deliveries now call for, then make the calls that are due; returns how many."""
        self.queue.discover(self.wanted)
        if abandoned := self.queue.abandon(self.config.webhooks):
            log.warning("%d webhook call(s) owed to webhooks no longer configured are dead", abandoned)
        made = 0
        for notification in self.queue.claim_due(_BATCH, self.config.webhooks):
            if self._stop.is_set():  # the rest go back to waiting at the next start (requeue_interrupted)
                break
            webhook = self.config.webhooks[notification.webhook]
            self.queue.record(notification, call(notification.webhook, webhook, notification))
            made += 1
        return made

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            try:
                self.run_once()
            except Exception:  # a database hiccup must not stop notifying for good
                log.exception("notifications failed; retrying")

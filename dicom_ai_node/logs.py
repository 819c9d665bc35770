"""Log lines an admin can grep at 3 a.m.: UTC timestamp, level, stage, plain words.

Logs go to stderr and, with `logging.file`, to a file that rotates by size (`logging.max_mb`,
`logging.backups`). The node and its worker processes append to the same file, so rotation is
shared between processes (SharedRotatingFileHandler) rather than done by each on its own.
"""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import time
from pathlib import Path

MIB = 1024 * 1024


class SharedRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Size-based rotation of one log file that several processes append to.

    Python's RotatingFileHandler measures only its own stream and renames the file whenever that
    looks full, so processes sharing a file rotate it over each other. Here the size is the file's
    own; one process at a time rotates, holding an exclusive flock on the file it moves away; and
    before each line a process checks that its open file is still the one at `filename` (device
    and inode, like WatchedFileHandler) and reopens it if another process (or logrotate) moved it.
    `max_bytes` 0: never rotated here, only followed (an external logrotate without copytruncate).
    """

    def __init__(self, filename: str | os.PathLike[str], max_bytes: int, backups: int) -> None:
        if max_bytes > 0 and backups < 1:
            raise ValueError("backups must be at least 1 when the file is rotated")
        super().__init__(filename, mode="a", maxBytes=max_bytes, backupCount=backups, encoding="utf-8")

    def _regular(self) -> bool:
        """False for /dev/stderr, a FIFO and the like: never rotated or reopened."""
        return not os.path.exists(self.baseFilename) or os.path.isfile(self.baseFilename)

    def _is_current(self) -> bool:
        """Whether the open stream is still the file named `baseFilename`."""
        try:
            named = os.stat(self.baseFilename)
        except FileNotFoundError:
            return False
        held = os.fstat(self.stream.fileno())
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def _reopen(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.close()
        self.stream = self._open()

    def shouldRollover(self, record: logging.LogRecord) -> bool:  # noqa: N802 (logging's name)
        if not self._regular():
            return False
        if self.stream is None:
            self.stream = self._open()
        if not self._is_current():
            self._reopen()
        if self.maxBytes <= 0:
            return False
        size = os.fstat(self.stream.fileno()).st_size
        return size > 0 and size + len(self.format(record)) + 1 >= self.maxBytes

    def doRollover(self) -> None:  # noqa: N802
        # The lock is taken on a duplicate of the stream's descriptor: it outlives the stream, which
        # the base class closes before renaming, and goes with the last descriptor in `finally`.
        lock = os.dup(self.stream.fileno())
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._is_current():
                super().doRollover()
            else:  # another process rotated it while this one waited for the lock
                self._reopen()
        finally:
            os.close(lock)


def setup_logging(level: str, file: Path | None = None, max_mb: float = 100, backups: int = 5) -> None:
    formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(SharedRotatingFileHandler(file, int(max_mb * MIB), backups))
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=handlers, force=True)
    # pynetdicom narrates every PDU and highdicom every copied module at INFO; our own log says what matters.
    for chatty in ("pynetdicom", "highdicom"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)

"""The log file rotates by size (logging.max_mb, logging.backups), also when the node and its worker
processes write it at once, and follows a file moved away by logrotate."""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path

import pytest

from dicom_ai_node.config import ConfigError, load_config
from dicom_ai_node.logs import SharedRotatingFileHandler, setup_logging


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def _files(log: Path) -> list[Path]:
    return sorted(log.parent.glob(log.name + "*"))


def test_file_rotates_past_max_mb_and_keeps_backups(tmp_path):
    log = tmp_path / "log" / "dicom-ai-node.log"
    setup_logging("INFO", log, max_mb=10_000 / (1024 * 1024), backups=2)  # 10 kB
    logger = logging.getLogger("dicom_ai_node.test")
    for number in range(1000):  # ~80 kB: several rotations
        logger.info("line %04d %s", number, "x" * 40)
    names = sorted(path.name for path in _files(log))
    assert names == ["dicom-ai-node.log", "dicom-ai-node.log.1", "dicom-ai-node.log.2"]
    for path in _files(log):
        assert path.stat().st_size <= 10_000, path
    newest = log.read_text().splitlines()
    assert newest and newest[-1].endswith(f"line 0999 {'x' * 40}")
    # The backups are the lines just before, in order: nothing between them was lost.
    kept = [line.split("line ")[1][:4] for path in (log.with_name(log.name + ".2"), log.with_name(log.name + ".1"), log)
            for line in path.read_text().splitlines()]
    assert kept == [f"{n:04d}" for n in range(1000 - len(kept), 1000)]


def test_logging_keys_reach_the_handler(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[logging]\nfile = "node.log"\nmax_mb = 7\nbackups = 3\n')
    config = load_config(path)
    assert (config.logging.file, config.logging.max_mb, config.logging.backups) == (tmp_path / "node.log", 7, 3)
    setup_logging(config.logging.level, config.logging.file, config.logging.max_mb, config.logging.backups)
    (handler,) = [h for h in logging.getLogger().handlers if isinstance(h, SharedRotatingFileHandler)]
    assert (handler.maxBytes, handler.backupCount) == (7 * 1024 * 1024, 3)
    defaults = load_config(_write(tmp_path / "empty.toml", "")).logging
    assert (defaults.max_mb, defaults.backups) == (100, 5)
    for text, named in (("[logging]\nbackups = 0\n", "logging.backups"), ("[logging]\nmax_mb = -1\n", "logging.max_mb")):
        with pytest.raises(ConfigError, match=named):
            load_config(_write(tmp_path / "bad.toml", text))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_max_mb_zero_follows_a_file_moved_away_by_logrotate(tmp_path):
    log = tmp_path / "node.log"
    setup_logging("INFO", log, max_mb=0, backups=1)
    logger = logging.getLogger("dicom_ai_node.test")
    logger.info("before")
    log.rename(tmp_path / "node.log.1")  # what logrotate does (no copytruncate)
    logger.info("after")
    assert "before" in (tmp_path / "node.log.1").read_text() and "after" not in (tmp_path / "node.log.1").read_text()
    assert "after" in log.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.log", "node.log.1"]  # never rotated by the node


def _write_lines(log: str, writer: int, count: int, start) -> None:
    handler = SharedRotatingFileHandler(log, max_bytes=20_000, backups=200)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"writer{writer}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    start.wait()
    for number in range(count):
        logger.info("writer %d line %05d %s", writer, number, "y" * 60)
    handler.close()


def test_processes_sharing_the_file_rotate_it_without_losing_or_mixing_lines(tmp_path):
    """The node and its workers (spawned processes) append to one file: each line is kept exactly once,
    whole, and no file grows far past max_bytes (one process rotates; the others reopen the new file)."""
    log = tmp_path / "shared.log"
    context = multiprocessing.get_context("spawn")  # as node.py starts its workers
    start = context.Event()
    writers, count = 3, 1500  # ~100 bytes a line: ~450 kB over 20 kB files, about 22 rotations
    processes = [context.Process(target=_write_lines, args=(str(log), w, count, start)) for w in range(writers)]
    for process in processes:
        process.start()
    start.set()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    files = _files(log)
    assert 15 <= len(files) <= 201, [p.name for p in files]
    lines = [line for path in files for line in path.read_text().splitlines()]
    expected = {f"writer {w} line {n:05d} {'y' * 60}" for w in range(writers) for n in range(count)}
    assert len(lines) == len(expected) and set(lines) == expected
    # Rotated only when full (never a file another process had just started), each at most a few
    # lines over: a process may add its line to a file another has just moved to .1.
    for path in files:
        size = path.stat().st_size
        assert size <= 20_000 + writers * 200, (path.name, size)
        assert path == log or size >= 20_000 - 200, (path.name, size)

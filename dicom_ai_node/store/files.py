"""Durable instance files: study/series/instance layout, atomic and fsynced.

A C-STORE is answered Success only after `write_instance` returns, so the bytes
must survive a power cut at that point: write to a temporary name, fsync the
file, rename (or link) it to the final name, fsync the directory.  A crash at
any step leaves either nothing or a stray `.tmp` file, never a half-written
instance.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

_LENIENT_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # used with fullmatch: "$" would allow a final "\n"
# The folder or file name of a UID that cannot be one: a valid UID has no letters, so no valid UID's name
# ever collides with these.
DIGEST_PREFIX = "sha256-"


INCOMING = ".incoming"  # the folder, under the storage root, of instances still arriving (STOW-RS parts)


@dataclass(frozen=True)
class FileRange:
    """`size` bytes at `offset` of a file (a STOW-RS part received into a file of its own): read from there,
    or copied by the kernel (copy_file_range), so an instance's bytes never pass through Python memory."""

    path: Path
    offset: int
    size: int

    def __len__(self) -> int:
        return self.size


@dataclass(frozen=True)
class Prepared:
    """An instance file written and fsynced under a temporary name beside its final one (`InstanceStore.prepare`)."""

    relative: str
    temporary: Path
    size: int
    created: bool  # its folder was made for it
    owned: bool = True  # False for an incoming file (`adopt`), whose name its receiver removes

    def discard(self) -> None:
        if self.owned:
            self.temporary.unlink(missing_ok=True)


_temporary_numbers = itertools.count()


class DiskFull(OSError):
    """Free space is below the configured threshold, or the disk ran out mid-write.

    `needed_free_bytes` is the free space the write would have needed: a job waiting
    for room is taken up again only once the disk has that much.
    """

    def __init__(self, code: int, message: str, needed_free_bytes: int) -> None:
        super().__init__(code, message)
        self.needed_free_bytes = needed_free_bytes


def is_valid_uid(uid: str) -> bool:
    """Whether `uid` is a UID (PS3.5 §9.1: digits and dots, at most 64 characters), and so safe as a path component.

    Leading zeros in a component break PS3.5 §9.1 but occur in the wild; they are
    harmless in a path, so they are accepted.
    """
    return bool(uid) and len(uid) <= 64 and _LENIENT_UID.fullmatch(uid) is not None


def path_component(uid: str) -> str:
    """The folder or file name for `uid`: the UID itself when it is valid, else `sha256-<hex digest of it>`.

    Real archives hold UIDs that are not UIDs (64 hex characters after some
    anonymisers, letters, slashes); such a value never becomes a path, whatever
    it contains ("..", "/", NUL), while the index keeps it exactly as sent.
    """
    if is_valid_uid(uid):
        return uid
    return DIGEST_PREFIX + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()


class InstanceStore:
    """Files under `root/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm` (see `path_component` for invalid UIDs).

    Received instances stop at `min_free_bytes`; results (SEG, SR) may go down to
    `results_min_free_bytes`, so a disk filled by arrivals still has room for the
    results of what was already received.
    """

    def __init__(self, root: Path, min_free_bytes: int, results_min_free_bytes: int | None = None) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.results_min_free_bytes = min_free_bytes if results_min_free_bytes is None else results_min_free_bytes
        root.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """`<study>/<series>/<instance>.dcm`, each part a UID or the digest of a value that is not one."""
        return f"{path_component(study_uid)}/{path_component(series_uid)}/{path_component(sop_uid)}.dcm"

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming: int, results: bool = False) -> None:
        """Raise DiskFull unless `incoming` bytes leave the floor (received instances' or results') free."""
        floor, key = (
            (self.results_min_free_bytes, "storage.results_min_free_mb") if results
            else (self.min_free_bytes, "storage.min_free_mb")
        )
        free = self.free_bytes()
        if free - incoming < floor:
            raise DiskFull(
                errno.ENOSPC,
                f"free disk space {free // 2**20} MiB is below the configured minimum {key} = {floor // 2**20} MiB",
                incoming + floor,
            )

    def write_instance(
        self, relative: str, data: bytes | memoryview | FileRange, replace: bool = True, results: bool = False
    ) -> bool:
        """Durably write `data` at `relative`; raises DiskFull on ENOSPC.

        With `replace=False` a file already at `relative` is kept (the first copy
        of an instance wins) and False is returned; True means `data` is there now.
        `results` applies the results' floor instead of the received instances'.
        """
        return self.place(self.prepare(relative, data, results), replace, results)

    def prepare(self, relative: str, data: bytes | memoryview | FileRange, results: bool = False) -> Prepared:
        """Write `data` beside `relative` under a temporary name of its own, and fsync it; `place` names it.

        Needs no lock: two arrivals of one instance each write their own temporary file.
        """
        self.check_space(len(data), results)
        final = self.root / relative
        created = _make_folder(final.parent)
        temporary = final.with_name(f"{final.name}.{threading.get_ident()}.{next(_temporary_numbers)}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            self._raise_if_disk_full(exc, relative, len(data), results)
            raise
        return Prepared(relative, temporary, len(data), created)

    def incoming(self) -> tuple[Path, int]:
        """A new file, open for writing, for an instance still arriving; `adopt` makes it durable without a copy.

        Its receiver removes it (the stored instance is a second link to it); `reconcile` empties the folder
        at start-up, after a crash.
        """
        path = self.root / INCOMING / f"{os.getpid()}.{threading.get_ident()}.{next(_temporary_numbers)}.tmp"
        try:
            try:
                return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            except FileNotFoundError:  # the first part this storage receives
                path.parent.mkdir(exist_ok=True)
                return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            self._raise_if_disk_full(exc, INCOMING, 0, False)
            raise

    def adopt(self, relative: str, source: FileRange) -> Prepared:
        """`prepare` for an instance received whole into an `incoming` file: fsynced there, not copied."""
        created = _make_folder((self.root / relative).parent)
        fd = os.open(source.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return Prepared(relative, source.path, source.size, created, owned=False)

    def place(
        self, prepared: Prepared, replace: bool = True, results: bool = False,
        unsynced_directories: set[Path] | None = None,
    ) -> bool:
        """Give a prepared file its name (see `write_instance` for `replace` and the result) and fsync its folder.

        With `unsynced_directories`, the folders whose entries changed are added to it instead of being
        fsynced here: a caller placing many files fsyncs each folder once (`sync_directories`) before it
        counts any of them as stored.
        """
        final = self.root / prepared.relative
        try:
            if replace:
                os.replace(prepared.temporary, final)
                placed = True
            else:
                placed = _link_unless_present(prepared.temporary, final, keep=not prepared.owned)
        except OSError as exc:
            prepared.discard()
            self._raise_if_disk_full(exc, prepared.relative, prepared.size, results)
            raise
        directory = final.parent
        # The new series (and maybe study) folder must survive too.
        changed = [directory, directory.parent, directory.parent.parent] if prepared.created else [directory]
        if unsynced_directories is not None:
            unsynced_directories.update(changed)
        else:
            for path in changed:
                _fsync_directory(path)
        return placed

    def _raise_if_disk_full(self, exc: OSError, relative: str, size: int, results: bool) -> None:
        """DiskFull for ENOSPC: the floor looked clear but the disk disagreed, so wait for more than there is now."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            floor = self.results_min_free_bytes if results else self.min_free_bytes
            needed = max(self.free_bytes(), floor) + size
            raise DiskFull(exc.errno, f"disk full while writing {relative}", needed) from exc

    def sync_directories(self, directories: set[Path]) -> dict[Path, OSError]:
        """fsync each folder once; the folders that could not be, with their error (their new files are not durable)."""
        failed: dict[Path, OSError] = {}
        for path in directories:
            try:
                _fsync_directory(path)
            except OSError as exc:
                failed[path] = exc
        return failed


def _make_folder(folder: Path) -> bool:
    """Make an instance's folder (and its parents) unless it exists; whether it was made (its entry needs an fsync)."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _write_all(fd: int, data: bytes | memoryview | FileRange) -> None:
    if isinstance(data, FileRange):
        _copy_range(data, fd)
        return
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _copy_range(source: FileRange, fd: int) -> None:
    """Copy `source` to the end of `fd` in the kernel; by reads and writes where the filesystem cannot."""
    source_fd = os.open(source.path, os.O_RDONLY)
    try:
        copied = 0
        try:
            while copied < source.size:
                count = os.copy_file_range(source_fd, fd, source.size - copied, source.offset + copied)
                if not count:
                    raise OSError(errno.EIO, f"{source.path} ends {source.size - copied} bytes early")
                copied += count
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        while copied < source.size:
            block = os.pread(source_fd, min(1 << 20, source.size - copied), source.offset + copied)
            if not block:
                raise OSError(errno.EIO, f"{source.path} ends {source.size - copied} bytes early")
            _write_all(fd, block)
            copied += len(block)
    finally:
        os.close(source_fd)


def _link_unless_present(temporary: Path, final: Path, keep: bool = False) -> bool:
    """Give `temporary` the name `final` unless that exists (False); the temporary name goes unless `keep`
    (an incoming file, which its receiver removes; then a filesystem without hard links refuses)."""
    placed = True
    try:
        os.link(temporary, final)  # atomic, and refuses to replace
    except FileExistsError:
        placed = False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP) or keep:
            raise
        if not final.exists():  # a filesystem without hard links
            os.replace(temporary, final)
            return True
        placed = False
    if not keep:
        os.unlink(temporary)
    return placed


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

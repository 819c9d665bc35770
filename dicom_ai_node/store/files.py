"""Durable instance files: study/series/instance layout, atomic and fsynced.

A C-STORE is answered Success only after `write_instance` returns, so the bytes
must survive a power cut at that point: write to a temporary name, fsync the
file, rename (or link) it to the final name, fsync the directory.  A crash at
any step leaves either nothing or a stray `.tmp` file, never a half-written
instance.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import threading
from pathlib import Path

_LENIENT_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class InvalidUID(ValueError):
    """A UID that is not digits and dots (at most 64 characters) cannot name a file."""


class DiskFull(OSError):
    """Free space is below the configured threshold, or the disk ran out mid-write."""


def validate_uid(uid: str, what: str) -> str:
    """Return `uid` if it is safe as a path component, else raise InvalidUID.

    Leading zeros in a component break PS3.5 §9.1 but occur in the wild; they are
    harmless in a path, so they are accepted.
    """
    if not uid or len(uid) > 64 or not _LENIENT_UID.match(uid):
        raise InvalidUID(f"{what} {uid!r} is not a valid UID (digits and dots, at most 64 characters)")
    return uid


class InstanceStore:
    """Files under `root/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`."""

    def __init__(self, root: Path, min_free_bytes: int) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        root.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        validate_uid(study_uid, "StudyInstanceUID")
        validate_uid(series_uid, "SeriesInstanceUID")
        validate_uid(sop_uid, "SOPInstanceUID")
        return f"{study_uid}/{series_uid}/{sop_uid}.dcm"

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming: int) -> None:
        free = self.free_bytes()
        if free - incoming < self.min_free_bytes:
            raise DiskFull(
                errno.ENOSPC,
                f"free disk space {free // 2**20} MiB is below the configured minimum "
                f"storage.min_free_mb = {self.min_free_bytes // 2**20} MiB",
            )

    def write_instance(self, relative: str, data: bytes | memoryview, replace: bool = True) -> None:
        """Durably write `data` at `relative`; raises DiskFull on ENOSPC.

        With `replace=False` a file already at `relative` is kept: the first copy
        of an instance wins.
        """
        self.check_space(len(data))
        final = self.root / relative
        directory = final.parent
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        # Unique per thread: two associations may deliver the same instance at once.
        temporary = final.with_name(f"{final.name}.{threading.get_ident()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                os.replace(temporary, final)
            else:
                _link_unless_present(temporary, final)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(exc.errno, f"disk full while writing {relative}") from exc
            raise
        _fsync_directory(directory)
        if created:  # the new series (and maybe study) folder must survive too
            _fsync_directory(directory.parent)
            _fsync_directory(directory.parent.parent)


def _link_unless_present(temporary: Path, final: Path) -> None:
    """Give `temporary` the name `final` unless that exists; the temporary name goes either way."""
    try:
        os.link(temporary, final)  # atomic, and refuses to replace
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        if not final.exists():  # a filesystem without hard links
            os.replace(temporary, final)
            return
    os.unlink(temporary)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

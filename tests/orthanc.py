"""A real Orthanc for tests: /usr/sbin/Orthanc as a subprocess with its own JSON config,
storage and free loopback ports, DICOMweb plugin loaded.

Used as a destination for the delivery senders.  `stop()` then `start()` keeps the
ports and the storage, so a test can take the PACS down and bring it back.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
# Without it Orthanc's DCMTK waits ~40 ms per message on delayed ACKs on Linux loopback.
ORTHANC_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OrthancProcess:
    """One Orthanc server in `workdir`; `settings` override or extend the generated config."""

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        users: dict[str, str] | None = None,
        check_called_aet: bool = False,
        modalities: dict[str, tuple[str, str, int]] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        for path in (ORTHANC, DICOMWEB_PLUGIN):
            if not path.exists():
                pytest.fail(f"{path} is missing: apt-get install -y orthanc orthanc-dicomweb")
        self.workdir = workdir
        self.aet = aet
        self.users = users or {}
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.log_path = workdir / "orthanc.log"
        self.process: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": f"test-{workdir.name}",
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomCheckCalledAet": check_called_aet,
            "DicomModalities": {name: list(peer) for name, peer in (modalities or {}).items()},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 60,
            **(settings or {}),
        }
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def version(self) -> str:
        return self.get("/system")["Version"]

    def start(self, timeout: float = 30) -> OrthancProcess:
        assert self.process is None, "already running"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(ORTHANC), str(self.config_path)],
                cwd=self.workdir,
                env=ORTHANC_ENV,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in pytest must not reach Orthanc before teardown does
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                raise AssertionError(f"Orthanc exited with {code}:\n{self.log()[-4000:]}")
            if self._http_ready() and self._dicom_ready():
                return self
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"Orthanc not ready after {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        """Terminate politely (Orthanc flushes its index), kill if it hangs."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str) -> Any:
        response = requests.get(self.url + path, auth=self._auth(), timeout=10)
        response.raise_for_status()
        return response.json()

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def instance_id(self, sop_instance_uid: str) -> str | None:
        """Orthanc's ID of the instance with this SOP Instance UID, None if it does not hold it."""
        response = requests.post(self.url + "/tools/lookup", data=sop_instance_uid, auth=self._auth(), timeout=10)
        response.raise_for_status()
        found = [item["ID"] for item in response.json() if item["Type"] == "Instance"]
        return found[0] if found else None

    def instance_file(self, instance_id: str) -> bytes:
        response = requests.get(f"{self.url}/instances/{instance_id}/file", auth=self._auth(), timeout=30)
        response.raise_for_status()
        return response.content

    def _auth(self) -> tuple[str, str] | None:
        return next(iter(self.users.items()), None)

    def _http_ready(self) -> bool:
        try:
            return requests.get(self.url + "/system", auth=self._auth(), timeout=2).ok
        except requests.RequestException:
            return False

    def _dicom_ready(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.dicom_port), timeout=2).close()
            return True
        except OSError:
            return False


@contextmanager
def orthanc_servers(folder: Path) -> Iterator[Callable[..., OrthancProcess]]:
    """make(**kwargs) -> a started OrthancProcess under `folder`; all are killed on exit.

    A context manager rather than a fixture, so fixtures of any scope can use it.
    """
    started: list[OrthancProcess] = []

    def make(**kwargs: Any) -> OrthancProcess:
        orthanc = OrthancProcess(folder / f"orthanc{len(started)}", **kwargs)
        started.append(orthanc)
        return orthanc.start()

    try:
        yield make
    finally:
        for orthanc in started:
            orthanc.kill()

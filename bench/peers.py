"""Receivers the benchmarks start side by side on loopback: dcmtk storescp, Orthanc, the node.

Shared by bench/ingest and bench/e2e (a script's own folder is first on sys.path).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

import pydicom
from pydicom.uid import generate_uid

from dicom_ai_node.phantoms import CTPhantom

REPO = Path(__file__).resolve().parent.parent

# Absolute paths: the venv's pynetdicom console scripts shadow the dcmtk names.
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"

# Without TCP_NODELAY dcmtk waits ~40 ms per instance on delayed ACKs on Linux loopback.
TOOL_ENV = {**os.environ, "TCP_NODELAY": "1"}

START_TIMEOUT_S = 60.0
SEND_TIMEOUT_S = 600.0


class BenchError(RuntimeError):
    """The benchmark cannot give a trustworthy number (a receiver failed or lost data)."""


def free_ports(n: int) -> list[int]:
    """Ports the kernel says are free now (held open together, so they are distinct)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def tail(path: Path, lines: int = 20) -> str:
    """The end of a receiver's log, so a failure says what the receiver said."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, name: str, log: Path) -> None:
    """Poll `ready` until it holds; fail early if the process died instead."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode} while starting:\n{tail(log)}")
        if ready():
            return
        time.sleep(0.1)
    raise BenchError(f"{name} not ready after {START_TIMEOUT_S:.0f} s:\n{tail(log)}")


def echo_ok(aet: str, port: int) -> bool:
    """C-ECHO succeeds: the receiver accepts associations, not just TCP connections."""
    cmd = [ECHOSCU, "-aec", aet, "-to", "2", "127.0.0.1", str(port)]
    return subprocess.run(cmd, env=TOOL_ENV, capture_output=True).returncode == 0


class Receiver:
    """A C-STORE SCP under test, started on loopback in its own folder."""

    name: str
    aet: str

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.log = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self._log_file: IO[bytes] | None = None
        workdir.mkdir(parents=True)

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start the receiver in its own session: Ctrl-C reaches only this script, which stops it in order."""
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self.proc

    def start(self) -> None:
        raise NotImplementedError

    def count(self) -> int:
        """Instances the receiver holds now."""
        raise NotImplementedError

    def stop(self) -> None:
        """Terminate politely, then kill: no receiver may outlive the benchmark."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()


class StoreSCP(Receiver):
    name, aet = "storescp", "STORESCP"

    def start(self) -> None:
        self.out = self.workdir / "out"
        self.out.mkdir()
        proc = self._spawn([STORESCP, "-od", str(self.out), "-aet", self.aet, str(self.port)], env=TOOL_ENV)
        wait_until(lambda: echo_ok(self.aet, self.port), proc, self.name, self.log)

    def count(self) -> int:
        return sum(1 for _ in self.out.iterdir())


class Orthanc(Receiver):
    name, aet = "orthanc", "ORTHANC"

    def __init__(self, workdir: Path, port: int, http_port: int) -> None:
        super().__init__(workdir, port)
        self.http_port = http_port

    def start(self) -> None:
        config = {
            "Name": "bench-ingest",
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "StableAge": 60,
            "SyncStorageArea": True,  # the default since 1.7.4, spelt out: Orthanc fsyncs each file too
            "Plugins": [],
        }
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        proc = self._spawn([ORTHANC, str(config_path)], env=TOOL_ENV)
        wait_until(lambda: self._http_ok() and echo_ok(self.aet, self.port), proc, self.name, self.log)

    def _get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            return json.load(response)

    def _http_ok(self) -> bool:
        try:
            self._get("/system")
            return True
        except OSError:
            return False

    def count(self) -> int:
        return int(self._get("/statistics")["CountInstances"])


class Node(Receiver):
    name, aet = "node", "AI_NODE"

    def __init__(self, workdir: Path, port: int, stable_seconds: float = 60, extra_config: str = "") -> None:
        """`extra_config` is appended TOML (workers, routes, destinations); the default runs no worker."""
        super().__init__(workdir, port)
        self.stable_seconds = stable_seconds
        self.extra_config = extra_config or "[workers]\nprocesses = 0\n"

    def start(self) -> None:
        self.config = self.workdir / "config.toml"
        self.config.write_text(
            f"""\
[node]
ae_title = "{self.aet}"
[dimse]
bind = "127.0.0.1"
port = {self.port}
[storage]
path = "{self.workdir / 'storage'}"
min_free_mb = 1
[database]
url = "sqlite:///{self.workdir / 'node.sqlite'}"
[series]
stable_seconds = {self.stable_seconds}
[logging]
level = "WARNING"
{self.extra_config}"""
        )
        self._cli("db", "upgrade")
        proc = self._spawn([sys.executable, "-m", "dicom_ai_node", "serve", "--config", str(self.config)])
        wait_until(lambda: echo_ok(self.aet, self.port), proc, self.name, self.log)

    def _cli(self, *args: str) -> str:
        cmd = [sys.executable, "-m", "dicom_ai_node", *args, "--config", str(self.config)]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0:
            raise BenchError(f"`{' '.join(cmd)}` failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result.stdout

    def count(self) -> int:
        studies = json.loads(self._cli("studies", "--json", "--limit", "100000"))
        return sum(int(study["NumberOfStudyRelatedInstances"]) for study in studies)


@dataclass(frozen=True)
class Batch:
    """One series to send: its files all carry UIDs no receiver has seen yet."""

    files: list[Path]

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def prepare_batches(root: Path, rounds: int, warmup_slices: int = 5) -> tuple[Batch, list[Batch]]:
    """Write the phantom once, then one copy per round with fresh UIDs (pixels unchanged).

    The phantom's own files are never sent whole, so their first slices make
    the warm-up batch without clashing with any round.
    """
    template = CTPhantom().write(root / "phantom")
    batches = []
    for r in range(rounds):
        folder = root / f"round{r + 1}"
        folder.mkdir()
        study_uid, series_uid = generate_uid(), generate_uid()
        files = []
        for src in template:
            ds = pydicom.dcmread(src)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(folder / src.name, enforce_file_format=True)
            files.append(folder / src.name)
        batches.append(Batch(files))
    return Batch(template[:warmup_slices]), batches


def send(receiver: Receiver, batch: Batch) -> float:
    """storescu the batch over one association; return its wall time after checking delivery."""
    before = receiver.count()
    # Flush earlier writes (ours and other receivers') so no receiver pays for another's write-back.
    os.sync()
    cmd = [STORESCU, "-aec", receiver.aet, "127.0.0.1", str(receiver.port), *map(str, batch.files)]
    start = time.perf_counter()
    result = subprocess.run(cmd, env=TOOL_ENV, capture_output=True, text=True, timeout=SEND_TIMEOUT_S)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise BenchError(
            f"storescu to {receiver.name} exited with {result.returncode}:\n{result.stdout}{result.stderr}\n"
            f"{receiver.name} log:\n{tail(receiver.log)}"
        )
    got = receiver.count() - before
    if got != len(batch.files):
        raise BenchError(
            f"{receiver.name} acknowledged the send but holds {got} new instance(s), expected {len(batch.files)}\n"
            f"storescu said:\n{result.stdout}{result.stderr}\n{receiver.name} log:\n{tail(receiver.log)}"
        )
    return elapsed

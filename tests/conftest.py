"""Fixtures that run the real thing: a `dicom-ai-node serve` subprocess on a free
loopback port, dcmtk's programs as the scanner, SQLite or PostgreSQL underneath."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from dicom_ai_node.phantoms import CTPhantom

DCMTK_BIN = Path("/usr/bin")  # Debian's dcmtk; pynetdicom's console scripts shadow these names in a venv
POSTGRES_ADMIN_URL = os.environ.get("DICOM_AI_NODE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
# dcmtk on Linux loopback waits ~40 ms per message on delayed ACKs without it.
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(program: str) -> str:
    path = DCMTK_BIN / program
    if not path.exists():
        pytest.fail(f"dcmtk's {program} is missing at {path}: install the Debian package dcmtk")
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_dcmtk(program: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk(program), *args], capture_output=True, text=True, timeout=timeout, env=PEER_ENV)


def storescu(port: int, *files: Path | str, called: str = "AI_NODE", calling: str = "STORESCU", extra=()):
    return run_dcmtk("storescu", "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port), *map(str, files))


@dataclass
class NodeProcess:
    """A `dicom-ai-node serve` subprocess with its own config, storage and database."""

    workdir: Path
    database_url: str
    settings: dict[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "node.log"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    def write_config(self) -> None:
        sections: dict[str, Any] = {
            "node": {"ae_title": "AI_NODE"},
            "dimse": {"bind": "127.0.0.1", "port": self.port},
            "storage": {"path": str(self.storage), "min_free_mb": 1},
            "database": {"url": self.database_url},
            "series": {"stable_seconds": 2, "check_interval_seconds": 0.2},
            "workers": {"processes": 0},  # tests that run models ask for a worker
            "logging": {"level": "INFO"},
        }
        for key, value in self.settings.items():
            if isinstance(value, dict):
                sections.setdefault(key, {}).update(value)
            else:  # a top-level array such as routes
                sections[key] = value
        self.config_path.write_text(_toml(sections))

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "dicom_ai_node", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
        if check and result.returncode != 0:
            raise AssertionError(f"dicom-ai-node {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def start(self, timeout: float = 30) -> None:
        self.write_config()
        self.cli("db", "upgrade")
        log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicom_ai_node", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=PEER_ENV,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"node exited with {self.process.returncode}:\n{self.log()}")
            if self.log().count("dicom_ai_node.node: dicom-ai-node ready") > self.starts:
                self.starts += 1
                return
            time.sleep(0.1)
        raise AssertionError(f"node did not start within {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout=30)
        self.process = None
        return code

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_for(self, predicate, timeout: float = 30, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{self.log()[-4000:]}")


def _toml(sections: dict[str, Any]) -> str:
    lines = [f"{key} = {_toml_value(value)}" for key, value in sections.items() if not isinstance(value, dict)]
    for name, values in sections.items():
        if not isinstance(values, dict):
            continue
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + " }"
    return json.dumps(str(value))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path) -> Iterator[str]:
    """Each test that asks for it runs once on SQLite and once on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/node.sqlite"
        return
    import psycopg

    name = f"dain_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def node_factory(tmp_path, database_url) -> Iterator:
    nodes: list[NodeProcess] = []

    def make(**settings: dict[str, Any]) -> NodeProcess:
        workdir = tmp_path / f"node{len(nodes)}"
        workdir.mkdir()
        node = NodeProcess(workdir, database_url, settings)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        if node.process is not None:
            node.process.kill()
            node.process.wait()


@pytest.fixture
def engine(database_url) -> Iterator:
    """An engine on the test's database, migrated to the current schema."""
    from dicom_ai_node.store.db import make_engine, upgrade

    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def node(node_factory) -> NodeProcess:
    started = node_factory()
    started.start()
    return started


@pytest.fixture(scope="session")
def ct_200(tmp_path_factory) -> tuple[CTPhantom, list[Path]]:
    """The reference series: 200 slices of 512x512 CT, 100 MB."""
    phantom = CTPhantom()
    return phantom, phantom.write(tmp_path_factory.mktemp("ct200"))


@pytest.fixture
def small_ct(tmp_path) -> tuple[CTPhantom, list[Path]]:
    phantom = CTPhantom(slices=8, rows=64, columns=64, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)
    return phantom, phantom.write(tmp_path / "small_ct")


@pytest.fixture(scope="session", autouse=True)
def _dcmtk_present() -> None:
    for program in ("storescu", "echoscu"):
        dcmtk(program)


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines dciodvfy (David Clunie's IOD validator) reports as errors for the file."""
    result = subprocess.run([venv_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def venv_tool(program: str) -> str:
    """A console script installed beside this Python (dciodvfy, segimage2itkimage, ...), venv active or not."""
    beside = Path(sys.executable).parent / program
    found = str(beside) if beside.exists() else shutil.which(program)
    if found is None:
        pytest.fail(f"{program} is missing: install the test extras (scripts/install.sh test)")
    return found

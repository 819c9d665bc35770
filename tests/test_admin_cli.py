"""The CLI as an admin uses it (issue 9, items 11 and 12).

UIDs whole at 80 columns and typed by their start; square brackets kept in help, errors and
listings; `--json` keyed by DICOM keywords; unknown states refused; the database hint that names
the config; the demo's commands runnable as printed; an audit trail that says a study was sent
again, delivered or purged; `echo` for a DICOM destination as well as a peer.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from conftest import free_port, storescu
from rich.console import Console
from sqlalchemy import update
from test_web import stow, web_settings

from dicom_ai_node import demo
from dicom_ai_node.phantoms import CTPhantom
from dicom_ai_node.store import db
from dicom_ai_node.store.index import Index
from dicom_ai_node.store.models import Delivery, Job, ResultObject, Series, Study, utcnow
from dicom_ai_node.values import InstanceHeader, Sender

ROOT = "1.2.826.0.1.3680043.8.498."


def uid64(middle: str) -> str:
    """A UID of the full 64 characters: the hardest to keep whole at 80 columns."""
    return (ROOT + middle).ljust(64, "7")


# Two studies whose UIDs share 27 characters; a prefix of 32 tells them apart.
STUDY_A, STUDY_B = uid64("12345"), uid64("12346")
SERIES_A, SERIES_B1, SERIES_B2 = uid64("22345"), uid64("32345"), uid64("42345")
STATES = "queued", "running", "done", "failed", "skipped", "cancelled"


@dataclass
class AdminNode:
    """A node's config and database with studies, jobs and deliveries in them, and no node running."""

    workdir: Path
    config_path: Path
    engine: object

    def cli(self, *args: str, columns: int = 80) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dicom_ai_node", *args, "--config", str(self.config_path)],
            capture_output=True, text=True, timeout=60, check=False, env={**os.environ, "COLUMNS": str(columns)},
        )

    def json(self, *args: str):
        result = self.cli(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


def _write_config(workdir: Path, database_url: str, extra: str = "") -> Path:
    path = workdir / "config.toml"
    path.write_text(
        f'[node]\nae_title = "AI_NODE"\n[dimse]\nbind = "127.0.0.1"\nport = {free_port()}\n'
        f'[storage]\npath = "{workdir / "storage"}"\nmin_free_mb = 1\n[database]\nurl = "{database_url}"\n'
        '[workers]\nprocesses = 0\n[logging]\nlevel = "INFO"\n'
        '[destinations.pacs]\nkind = "dimse"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n' + extra
    )
    return path


def _store(index: Index, study: str, series: str, instances: int, description: str) -> None:
    for number in range(instances):
        header = InstanceHeader(
            study, series, f"{series[:50]}.{number + 1}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
            patient_id="P-1", patient_name="Doe^Jane", accession_number="ACC1", study_date="20260101",
            modality="CT", series_description=description, series_number=1, instance_number=number + 1,
        )
        index.record_instance(header, Sender("CT1", "127.0.0.1"), f"{study}/{series}/{number}.dcm", 1000)


def _job(connection, study_uid: str, series_uid: str, deliveries: list[tuple[str, str | None]]) -> int:
    """A done job of the series with its SEG and SR on record, and its deliveries in these (state, error)."""
    series_id = connection.execute(Series.__table__.select().where(Series.series_instance_uid == series_uid)).first().id
    connection.execute(update(Series).where(Series.id == series_id).values(state="routed"))
    job_id = connection.execute(Job.__table__.insert().values(
        series_id=series_id, route="ct", model="ct-tissue", state="done", attempts=1, created_at=utcnow(),
    )).inserted_primary_key[0]
    for kind in ("SEG", "SR"):
        connection.execute(ResultObject.__table__.insert().values(
            job_id=job_id, kind=kind, sop_class_uid="1.2", sop_instance_uid=uid64(f"9{job_id}{len(kind)}"),
            series_instance_uid=uid64(f"8{job_id}{len(kind)}"), study_instance_uid=study_uid,
            file_path=f"results/{job_id}/{kind}.dcm", file_size=100, created_at=utcnow(),
        ))
    for state, error in deliveries:
        connection.execute(Delivery.__table__.insert().values(
            job_id=job_id, destination="pacs", state=state, attempts=1, last_error=error, created_at=utcnow(),
            next_attempt_at=utcnow() + dt.timedelta(minutes=5),
        ))
    return job_id


@pytest.fixture
def admin(tmp_path, database_url) -> AdminNode:
    """Study A: one series, its results delivered. Study B: one series delivered to one of two
    destinations (the other failing with an error that names [destinations]), one without deliveries."""
    workdir = tmp_path / "admin node"  # a space, as a folder an admin picks may have
    workdir.mkdir()
    config = _write_config(workdir, database_url)
    engine = db.make_engine(database_url)
    db.upgrade(engine)
    index = Index(engine)
    _store(index, STUDY_A, SERIES_A, 3, "Chest [contrast]")
    _store(index, STUDY_B, SERIES_B1, 2, "Abdomen")
    _store(index, STUDY_B, SERIES_B2, 2, "Scout")
    with engine.begin() as connection:
        connection.execute(update(Study).values(created_at=utcnow() - dt.timedelta(days=2)))
        _job(connection, STUDY_A, SERIES_A, [("delivered", None)])
        _job(connection, STUDY_B, SERIES_B1,
             [("delivered", None), ("failed", "destination 'old' is no longer in [destinations]")])
        _job(connection, STUDY_B, SERIES_B2, [])
    yield AdminNode(workdir, config, engine)
    engine.dispose()


def _whole_on_a_line(uid: str, output: str) -> bool:
    return any(uid in line for line in output.splitlines())


# --- 11. UIDs at 80 columns, typed by their start ---------------------------------------------------------

def test_listings_show_whole_uids_at_80_columns(admin):
    for args, uids in (
        (("studies",), (STUDY_A, STUDY_B)),
        (("series", STUDY_B), (SERIES_B1, SERIES_B2)),
        (("jobs",), (STUDY_A, STUDY_B, SERIES_A, SERIES_B1, SERIES_B2)),
        (("deliveries",), (STUDY_A, STUDY_B)),
    ):
        result = admin.cli(*args, columns=80)
        assert result.returncode == 0, result.stderr
        assert max(len(line) for line in result.stdout.splitlines()) <= 80, result.stdout
        for uid in uids:
            assert _whole_on_a_line(uid, result.stdout), f"{args}: {uid} cut\n{result.stdout}"
        assert "…" not in result.stdout, result.stdout
    wide = admin.cli("studies", columns=200).stdout  # a wide terminal keeps the table
    assert "┃ Patient" in wide and _whole_on_a_line(STUDY_A, wide)
    shown = admin.cli("job", "show", "1", columns=80).stdout
    assert _whole_on_a_line(STUDY_A, shown) and _whole_on_a_line(SERIES_A, shown), shown


def test_a_unique_start_of_a_uid_is_enough(admin):
    prefix_a, common = STUDY_A[:32], STUDY_A[:30]
    series = admin.cli("series", prefix_a)
    assert series.returncode == 0 and _whole_on_a_line(SERIES_A, series.stdout), series.stderr
    events = admin.json("events", "--study", prefix_a)
    assert events and {event["StudyInstanceUID"] for event in events} == {STUDY_A}
    resent = admin.cli("resend", prefix_a, "--to", "pacs")
    assert resent.returncode == 0 and "queued for pacs" in resent.stdout, resent.stderr
    assert _whole_on_a_line(STUDY_A, resent.stdout), resent.stdout  # the whole UID it stands for

    ambiguous = admin.cli("series", common, columns=200)
    assert ambiguous.returncode == 2 and "Traceback" not in ambiguous.stderr
    assert f"several studies start with {common}" in ambiguous.stderr
    assert _whole_on_a_line(STUDY_A, ambiguous.stderr) and _whole_on_a_line(STUDY_B, ambiguous.stderr)
    for args in (("series", "9.9"), ("events", "--study", "9.9"), ("resend", "9.9", "--to", "pacs")):
        unknown = admin.cli(*args, columns=200)
        assert unknown.returncode == 2, unknown.stderr
        assert "no study 9.9 on this node, nor one whose UID starts with it" in unknown.stderr


# --- 11. square brackets, --json keys, states, flags -----------------------------------------------------

def test_square_brackets_are_kept_in_help_and_listings(admin):
    echo_help = admin.cli("echo", "--help", columns=80).stdout
    assert "[peers]" in echo_help and "[destinations]" in echo_help, echo_help
    assert "[destinations]" in admin.cli("resend", "--help").stdout
    series = admin.cli("series", STUDY_A, columns=200).stdout
    assert "Chest [contrast]" in series, series
    deliveries = admin.cli("deliveries", columns=200).stdout
    assert "no longer in [destinations]" in deliveries, deliveries


def test_square_brackets_are_kept_in_errors(admin):
    """The sentence itself is printed by the CLI's error handler (cli._plain_errors)."""
    unknown = admin.cli("echo", "nobody", columns=200)
    assert unknown.returncode == 2
    assert "in [peers], nor a destination of kind dimse in [destinations] (known: pacs)" in unknown.stderr


def test_flags_help_shows_no_bool_type(admin):
    for command in (("status",), ("purge",), ("demo",), ("retry",), ("jobs",)):
        text = admin.cli(*command, "--help").stdout
        assert "--help" in text and "<bool>" not in text, text
    assert "--dry-run" in admin.cli("purge", "--help").stdout


def test_unknown_state_is_an_error_naming_the_states(admin):
    jobs = admin.cli("jobs", "--state", "finished", columns=200)
    assert jobs.returncode == 2 and all(f"'{state}'" in jobs.stderr for state in STATES), jobs.stderr
    deliveries = admin.cli("deliveries", "--state", "sent", columns=200)
    assert deliveries.returncode == 2 and "'dead'" in deliveries.stderr, deliveries.stderr
    assert [job["state"] for job in admin.json("jobs", "--state", "done")] == ["done"] * 3


def test_purge_json_is_keyed_by_dicom_keywords(admin):
    (record,) = admin.json("purge", "--older-than", "1", "--dry-run")
    assert record == {"StudyInstanceUID": STUDY_A, "instances": 3, "results": 2, "bytes": 3 * 1000 + 2 * 100}


# --- 11. the database hint, nothing created --------------------------------------------------------------

def test_not_migrated_hint_names_the_config_and_nothing_is_created(tmp_path, database_url):
    sqlite = database_url.startswith("sqlite")
    url = f"sqlite:///{tmp_path}/var/node.sqlite" if sqlite else database_url
    config = _write_config(tmp_path, url)
    for command in (("status",), ("studies",), ("serve",)):
        result = subprocess.run(
            [sys.executable, "-m", "dicom_ai_node", *command, "--config", str(config)],
            capture_output=True, text=True, timeout=60, check=False, env={**os.environ, "COLUMNS": "200"},
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"run: dicom-ai-node db upgrade --config {config}" in result.stderr, result.stderr
        if sqlite:
            assert not (tmp_path / "var").exists(), command  # neither an empty database file nor its folder
    upgraded = subprocess.run([sys.executable, "-m", "dicom_ai_node", "db", "upgrade", "--config", str(config)],
                              capture_output=True, text=True, timeout=60, check=False)
    assert upgraded.returncode == 0, upgraded.stderr
    if sqlite:
        assert (tmp_path / "var" / "node.sqlite").is_file()


# --- 11. the demo's commands run as printed --------------------------------------------------------------

def test_demo_look_further_commands_run_as_printed(admin):
    """The summary's commands pasted into a shell, as the demo prints them (a folder with a space included)."""
    output = io.StringIO()
    job = demo.JobResult(1, "ct-tissue", Path("seg.dcm"), Path("sr.dcm"), [], "Lungs 1.0 mL")
    summary = demo.DemoSummary(admin.workdir, admin.config_path, admin.workdir / "node.log", STUDY_A, [job], {},
                               kept=True)
    demo._print_summary(Console(file=output, width=80), summary)
    commands = [line.strip() for line in output.getvalue().splitlines() if "--config" in line]
    assert len(commands) == 6, output.getvalue()
    env = {**os.environ, "COLUMNS": "200"}
    for command in commands[:-1]:
        result = subprocess.run(command, shell=True, executable="/bin/bash", capture_output=True, text=True,
                                check=False, timeout=60, env=env)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        assert result.stdout.strip() and "error" not in result.stderr, command
    serve = commands[-1]
    assert " serve --config " in serve
    log = admin.workdir / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(serve, shell=True, executable="/bin/bash", stdout=sink, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "dicom-ai-node ready" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "dicom-ai-node ready" in log.read_text(), f"{serve}\n{log.read_text()}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def test_demo_names_this_installation():
    program = demo.cli_program()
    beside = Path(sys.executable).parent / "dicom-ai-node"
    found = shutil.which("dicom-ai-node")
    if found and Path(found).resolve() == beside.resolve():
        assert program == "dicom-ai-node"
    else:
        assert program in (str(beside), f"{sys.executable} -m dicom_ai_node")


# --- 12. delivered, partly delivered, purged ------------------------------------------------------------

def test_studies_and_series_show_delivered_and_purged(admin):
    states = {row["StudyInstanceUID"]: row["state"] for row in admin.json("studies")}
    assert states == {STUDY_A: "delivered", STUDY_B: "partly delivered"}
    series = {row["SeriesInstanceUID"]: row["state"] for row in admin.json("series", STUDY_B)}
    assert series == {SERIES_B1: "partly delivered", SERIES_B2: "routed"}  # B2's job has no destination
    assert "partly delivered" in admin.cli("studies", columns=200).stdout

    removed = admin.cli("purge", "--older-than", "1")
    assert f"removed study {STUDY_A}" in removed.stdout, removed.stderr
    states = {row["StudyInstanceUID"]: row["state"] for row in admin.json("studies")}
    assert states == {STUDY_A: "purged", STUDY_B: "partly delivered"}
    assert [row["state"] for row in admin.json("series", STUDY_A)] == ["purged"]
    assert "purged" in admin.cli("studies", columns=80).stdout


# --- 12. a study sent again is an event -----------------------------------------------------------------

def test_a_study_sent_again_is_one_event_per_series(node_factory, tmp_path):
    node = node_factory(web=web_settings())
    node.start()
    phantom = CTPhantom(slices=6, rows=32, columns=32, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)
    paths = phantom.write(tmp_path / "ct")

    def resent() -> list[dict]:
        return [e for e in node.json("events", "--study", phantom.study_uid) if e["kind"] == "resent"]

    assert storescu(node.port, *paths[:4]).returncode == 0
    assert storescu(node.port, *paths).returncode == 0  # two of them new: not a re-send
    assert storescu(node.port, *paths).returncode == 0  # all of them again
    (event,) = node.wait_for(resent, what="the re-send in the audit trail")
    assert event["SeriesInstanceUID"] == phantom.series_uid and event["calling_ae_title"] == "STORESCU"
    assert "all 6 instance(s) were stored already" in event["message"]

    response = stow(node, [path.read_bytes() for path in paths[:3]])  # STOW-RS: the same, by request
    assert response.status_code == 202, response.text  # stored before: each with a warning (PS3.18 10.5.3)
    events = node.wait_for(lambda: len(found := resent()) == 2 and found, what="the STOW-RS re-send")
    assert "all 3 instance(s)" in events[1]["message"]
    (series,) = node.json("series", phantom.study_uid)
    assert series["duplicates_received"] == 4 + 6 + 3


# --- 12. echo a destination ------------------------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def test_echo_a_destination_with_its_tls_settings(node_factory, tmp_path):
    certs = tmp_path / "tls"
    certs.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=Test CA", cwd=certs)
    (certs / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr",
             "-subj", "/CN=localhost", cwd=certs)
    _openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
             "node.pem", "-days", "2", "-extfile", "san.ext", cwd=certs)
    tls_port = free_port()
    node = node_factory(dimse={"tls": {"port": tls_port, "cert_file": str(certs / "node.pem"),
                                       "key_file": str(certs / "node.key")}})
    node.start()
    config = node.config_path.read_text()
    config += f'\n[destinations.pacs]\nkind = "dimse"\nae_title = "AI_NODE"\nhost = "127.0.0.1"\nport = {node.port}\n'
    config += (f'\n[destinations.pacs_tls]\nkind = "dimse"\nae_title = "AI_NODE"\nhost = "127.0.0.1"\n'
               f'port = {tls_port}\ntls = true\ntls_ca_file = "{certs / "ca.pem"}"\n')
    config += (f'\n[destinations.untrusted]\nkind = "dimse"\nae_title = "AI_NODE"\nhost = "127.0.0.1"\n'
               f'port = {tls_port}\ntls = true\n')  # the system's CAs do not know the test CA
    config += '\n[destinations.web]\nkind = "dicomweb"\nurl = "http://127.0.0.1:1/dicom-web"\n'
    config += f'\n[peers.pacs]\nae_title = "NOT_US"\nhost = "127.0.0.1"\nport = {node.port}\n'  # a peer goes first
    node.config_path.write_text(config)

    peer_first = node.cli("echo", "pacs", check=False)
    assert peer_first.returncode == 2 and "pacs (peer, NOT_US@" in peer_first.stderr, peer_first.stderr
    node.config_path.write_text(config.split("\n[peers.pacs]")[0])
    plain = node.cli("echo", "pacs")
    assert f"pacs (destination, AI_NODE@127.0.0.1:{node.port}): C-ECHO OK" in plain.stdout, plain.stdout
    tls = node.cli("echo", "pacs_tls")
    assert f"pacs_tls (destination, AI_NODE@127.0.0.1:{tls_port} over TLS): C-ECHO OK" in tls.stdout, tls.stdout
    untrusted = node.cli("echo", "untrusted", check=False)
    assert untrusted.returncode == 2 and "TLS handshake" in untrusted.stderr, untrusted.stderr
    web = node.cli("echo", "web", check=False)
    assert web.returncode == 2 and "of kind dicomweb" in web.stderr, web.stderr
    unknown = node.cli("echo", "nobody", check=False)
    assert unknown.returncode == 2 and "(known: pacs, pacs_tls, untrusted)" in unknown.stderr, unknown.stderr


def test_series_and_resend_still_take_the_whole_uid(admin):
    assert pydicom.uid.UID(STUDY_A).is_valid and len(STUDY_A) == 64
    assert admin.cli("series", STUDY_B).returncode == 0
    resent = admin.cli("resend", STUDY_A, "--to", "pacs", columns=200)
    assert re.search(rf"of study {re.escape(STUDY_A)} queued for pacs", resent.stdout), resent.stderr

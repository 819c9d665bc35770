"""`dicom-ai-node`: run the node and watch it from a terminal.

Expected failures (bad config, peer down, database not migrated) print one
plain sentence and exit with status 2; only a bug shows a traceback.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Annotated, Any, Callable

import typer
from rich.console import Console
from rich.table import Table

from dicom_ai_node.config import CONFIG_ENV, Config, ConfigError, load_config
from dicom_ai_node.logs import setup_logging
from dicom_ai_node.store import db, queries
from dicom_ai_node.store.db import DatabaseNotReady

app = typer.Typer(
    help="dicom-ai-node: a PACS AI node. Receives DICOM, runs models, sends results back.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)
app.add_typer(db_app, name="db")
job_app = typer.Typer(help="One job in detail.", no_args_is_help=True)
app.add_typer(job_app, name="job")

console = Console()
errors = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help=f"Configuration file (default: ${CONFIG_ENV} or ./config.toml)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class NodeError(Exception):
    """An expected failure, told to the admin in one sentence."""


def _plain_errors(command: Callable) -> Callable:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ConfigError, DatabaseNotReady, NodeError) as exc:
            errors.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _engine(config: Config):
    engine = db.make_engine(config.database.url)
    db.require_current_schema(engine)
    return engine


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if num_bytes < 1000 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return ""


_STATE_STYLE = {
    "receiving": "yellow",
    "complete": "green",
    "routed": "green",
    "not-routed": "dim",
    "queued": "yellow",
    "running": "cyan",
    "done": "green",
    "failed": "bold red",
    "skipped": "magenta",
}


def _state(state: str) -> str:
    return f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]"


@app.command()
@_plain_errors
def serve(config: ConfigOption = None) -> None:
    """Run the node: the DICOM SCP and series completion, until SIGTERM or Ctrl-C."""
    from dicom_ai_node.node import serve as run

    settings = load_config(config)
    setup_logging(settings.logging.level, settings.logging.file)
    try:
        run(settings)
    except OSError as exc:
        raise NodeError(f"cannot start: {exc}") from None


@db_app.command("upgrade")
@_plain_errors
def db_upgrade(config: ConfigOption = None) -> None:
    """Create or migrate the database schema to the version this node needs."""
    settings = load_config(config)
    engine = db.make_engine(settings.database.url)
    before, after = db.upgrade(engine)
    where = engine.url.render_as_string(hide_password=True)
    if before == after:
        console.print(f"database {where} is up to date (migration {after})")
    else:
        console.print(f"database {where} upgraded: {before or 'empty'} -> {after}")


@app.command()
@_plain_errors
def status(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Counts by state, disk use and the oldest series still waiting."""
    import shutil

    settings = load_config(config)
    report = queries.node_status(_engine(settings))
    usage = shutil.disk_usage(settings.storage.path) if settings.storage.path.exists() else None
    report["disk_free_bytes"] = usage.free if usage else None
    report["disk_min_free_bytes"] = settings.storage.min_free_mb * 2**20
    if as_json:
        _print_json(report)
        return
    table = Table(show_header=False, box=None)
    table.add_row("studies", str(report["studies"]))
    table.add_row("instances", f"{report['instances']} ({_size(report['stored_bytes'])})")
    for state, count in report["series_by_state"].items():
        table.add_row(f"series {_state(state)}", str(count))
    if usage:
        low = usage.free < report["disk_min_free_bytes"]
        free = f"{_size(usage.free)} free of {_size(usage.total)}"
        table.add_row("disk", f"[bold red]{free} - below storage.min_free_mb, refusing stores[/]" if low else free)
    oldest = report["oldest_waiting_series"]
    table.add_row(
        "oldest waiting",
        f"{oldest['SeriesInstanceUID']} (receiving for {oldest['waiting_seconds']} s)" if oldest else "none",
    )
    jobs = report["jobs"]
    waiting = f", oldest queued {jobs['oldest_queued_seconds']} s" if jobs["oldest_queued_seconds"] is not None else ""
    table.add_row(
        "jobs",
        ", ".join(f"{_state(state)} {count}" for state, count in jobs.items() if state != "oldest_queued_seconds")
        + waiting,
    )
    failures = report["failures_last_24h"]
    table.add_row("failures (24 h)", f"[red]{failures}[/] (see: dicom-ai-node events)" if failures else "0")
    console.print(table)


@app.command()
@_plain_errors
def studies(
    config: ConfigOption = None,
    as_json: JsonOption = False,
    limit: Annotated[int, typer.Option(help="Newest N studies.")] = 200,
) -> None:
    """One line per study: patient, accession, date, modalities, counts, state."""
    rows = queries.list_studies(_engine(load_config(config)), limit=limit)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        console.print("no studies received yet")
        return
    table = Table("Patient", "Accession", "Date", "Mod", "Series", "Inst", "State", "Study Instance UID")
    for row in rows:
        table.add_row(
            f"{row['PatientName'] or ''} ({row['PatientID'] or '?'})",
            row["AccessionNumber"] or "",
            row["StudyDate"] or "",
            ",".join(row["ModalitiesInStudy"]),
            str(row["NumberOfStudyRelatedSeries"]),
            str(row["NumberOfStudyRelatedInstances"]),
            _state(row["state"]),
            row["StudyInstanceUID"],
        )
    console.print(table)


@app.command()
@_plain_errors
def series(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID (see: dicom-ai-node studies).")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """The series of one study, and what happened to the study."""
    engine = _engine(load_config(config))
    rows = queries.list_series(engine, study_uid)
    if rows is None:
        raise NodeError(f"no study {study_uid} on this node (see: dicom-ai-node studies)")
    if as_json:
        _print_json(rows)
        return
    table = Table("#", "Mod", "Description", "Inst", "Size", "From", "State", "Series Instance UID")
    for row in rows:
        state = _state(row["state"])
        if row["reprocess_requested"]:
            state += f" [yellow](re-process: {row['late_instances']} late)[/]"
        if row["state_reason"]:
            state += f"\n[dim]{row['state_reason']}[/]"
        table.add_row(
            str(row["SeriesNumber"] or ""),
            row["Modality"] or "",
            row["SeriesDescription"] or "",
            str(row["NumberOfSeriesRelatedInstances"]),
            _size(row["bytes"]),
            row["calling_ae_title"] or "",
            state,
            row["SeriesInstanceUID"],
        )
    console.print(table)
    _print_events(queries.list_events(engine, study_uid, limit=20))


@app.command()
@_plain_errors
def events(
    config: ConfigOption = None,
    study: Annotated[str | None, typer.Option(help="Only this Study Instance UID.")] = None,
    limit: Annotated[int, typer.Option(help="Newest N events.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """The audit trail: what happened to each study and why (failures in red)."""
    rows = queries.list_events(_engine(load_config(config)), study, limit=limit)
    if as_json:
        _print_json(rows)
        return
    _print_events(rows)


def _print_events(rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print("no events")
        return
    table = Table("When (UTC)", "What", "Message", box=None)
    style = {"error": "red", "warning": "yellow"}
    for row in rows:
        color = style.get(row["level"], "white")
        table.add_row(row["at"], f"[{color}]{row['kind']}[/]", row["message"])
    console.print(table)


@app.command()
@_plain_errors
def echo(
    peer: Annotated[str, typer.Argument(help="A peer named in the config's [peers] table.")],
    config: ConfigOption = None,
) -> None:
    """C-ECHO a configured peer: is it up and does it accept us?"""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    settings = load_config(config)
    target = settings.peers.get(peer)
    if target is None:
        known = ", ".join(sorted(settings.peers)) or "none configured"
        raise NodeError(f"no peer named {peer!r} in [peers] (known: {known})")
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    where = f"{target.ae_title}@{target.host}:{target.port}"
    started = time.monotonic()
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
    if assoc.is_rejected:
        raise NodeError(f"{peer} ({where}) rejected the association (check AE titles on both sides)")
    if not assoc.is_established:
        raise NodeError(f"{peer} ({where}) is unreachable or did not answer")
    try:
        answer = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(answer, "Status", None)
    if code != 0x0000:
        raise NodeError(f"{peer} ({where}) answered C-ECHO with status {code}")
    console.print(f"{peer} ({where}): [green]C-ECHO OK[/] in {1000 * (time.monotonic() - started):.0f} ms")


@app.command()
@_plain_errors
def jobs(
    config: ConfigOption = None,
    state: Annotated[str | None, typer.Option(help="queued, running, done, failed or skipped.")] = None,
    limit: Annotated[int, typer.Option(help="Newest N jobs.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """Model jobs: one per (series, model), newest first, with stage timings."""
    rows = queries.list_jobs(_engine(load_config(config)), state, limit)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        console.print("no jobs" + (f" in state {state}" if state else ""))
        return
    table = Table("ID", "State", "Model", "Mod", "Load s", "Infer s", "Write s", "Series Instance UID / error")
    for row in rows:
        detail = row["SeriesInstanceUID"] + (f"\n[red]{row['error']}[/]" if row["error"] else "")
        table.add_row(
            str(row["id"]),
            _state(row["state"]),
            row["model"],
            row["Modality"] or "",
            _seconds(row["load_seconds"]),
            _seconds(row["inference_seconds"]),
            _seconds(row["write_seconds"]),
            detail,
        )
    console.print(table)


def _seconds(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else ""


@job_app.command("show")
@_plain_errors
def job_show(
    job_id: Annotated[int, typer.Argument(help="Job ID (see: dicom-ai-node jobs).")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stages, timings, error and result objects of one job."""
    detail = queries.job_detail(_engine(load_config(config)), job_id)
    if detail is None:
        raise NodeError(f"no job {job_id} (see: dicom-ai-node jobs)")
    if as_json:
        _print_json(detail)
        return
    table = Table(show_header=False, box=None)
    for key in ("state", "model", "model_version", "device", "route", "StudyInstanceUID", "SeriesInstanceUID",
                "attempts", "created_at", "started_at", "finished_at"):
        value = detail[key]
        table.add_row(key, _state(value) if key == "state" else str(value if value is not None else ""))
    for stage in ("load", "inference", "write"):
        table.add_row(f"{stage} (s)", _seconds(detail[f"{stage}_seconds"]))
    if detail["error"]:
        table.add_row("error", f"[red]{detail['error']}[/]")
    console.print(table)
    for result in detail["results"]:
        console.print(f"  {result['kind']:3s} {result['SOPInstanceUID']}  {result['file_path']}")


@app.command()
@_plain_errors
def models(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Configured models, their kind and device, and the routes that use them."""
    from dicom_ai_node.inference.registry import ModelUnavailable, resolve_device

    settings = load_config(config)
    rows = []
    for name, model in settings.models.items():
        try:
            device = str(resolve_device(model.device))
        except ModelUnavailable as exc:
            device = f"unavailable: {exc}"
        rows.append(
            {
                "name": name,
                "kind": model.kind,
                "path": str(model.path) if model.path else None,
                "device": device,
                "routes": [route.name for route in settings.routes if name in route.models],
            }
        )
    if as_json:
        _print_json(rows)
        return
    table = Table("Model", "Kind", "Device", "Routes", "Path")
    for row in rows:
        table.add_row(row["name"], row["kind"], row["device"], ", ".join(row["routes"]), row["path"] or "(built in)")
    console.print(table)


@app.command()
@_plain_errors
def worker(config: ConfigOption = None) -> None:
    """Run one job worker alone (e.g. on a GPU host sharing the PostgreSQL database and storage)."""
    from dicom_ai_node.inference.worker import worker_main

    load_config(config)  # report a bad config here, in plain words
    worker_main(config)


def main() -> None:
    app()

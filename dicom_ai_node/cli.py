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
from dicom_ai_node.store.models import Delivery, Job

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
    "cancelled": "dim",
    "pending": "yellow",
    "sending": "cyan",
    "delivered": "green",
    "dead": "bold red",
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
    """Counts by state, disk use, the oldest series still waiting, what waits and why, the last start-up's repairs."""
    import shutil

    from dicom_ai_node.store.index import refused_waiting
    from dicom_ai_node.store.jobs import JobQueue
    from dicom_ai_node.store.reconcile import last_check

    settings = load_config(config)
    engine = _engine(settings)
    report = queries.node_status(engine)
    usage = shutil.disk_usage(settings.storage.path) if settings.storage.path.exists() else None
    report["disk_free_bytes"] = usage.free if usage else None
    report["disk_min_free_bytes"] = settings.storage.min_free_mb * 2**20
    report["disk_results_min_free_bytes"] = settings.storage.results_floor_mb * 2**20
    report["jobs_waiting_for_disk_space"] = JobQueue(engine, settings.storage.path).waiting_for_space()
    refused, refused_series = refused_waiting(engine)
    report["refused_instances_waiting"] = {"instances": refused, "series": refused_series}
    report["last_start_up"] = last_check(engine)
    if as_json:
        _print_json(report)
        return
    table = Table(show_header=False, box=None)
    table.add_row("studies", str(report["studies"]))
    table.add_row("instances", f"{report['instances']} ({_size(report['stored_bytes'])})")
    for state, count in report["series_by_state"].items():
        table.add_row(f"series {_state(state)}", str(count))
    if usage:
        free = f"{_size(usage.free)} free of {_size(usage.total)}"
        if usage.free < report["disk_results_min_free_bytes"]:
            free = (f"[bold red]{free} - below storage.min_free_mb, refusing stores; "
                    "below results_min_free_mb, results wait[/]")
        elif usage.free < report["disk_min_free_bytes"]:
            free = f"[bold red]{free} - below storage.min_free_mb, refusing stores[/] (results use their reserve)"
        table.add_row("disk", free)
    oldest = report["oldest_waiting_series"]
    table.add_row(
        "oldest waiting",
        f"{oldest['SeriesInstanceUID']} (receiving for {oldest['waiting_seconds']} s)" if oldest else "none",
    )
    jobs = report["jobs"]
    waiting = f", oldest queued {jobs['oldest_queued_seconds']} s" if jobs["oldest_queued_seconds"] is not None else ""
    if report["jobs_waiting_for_disk_space"]:
        waiting += f" ([red]{report['jobs_waiting_for_disk_space']} waiting for disk space[/])"
    table.add_row(
        "jobs",
        ", ".join(f"{_state(state)} {count}" for state, count in jobs.items() if state != "oldest_queued_seconds")
        + waiting,
    )
    deliveries = report["deliveries"]
    stuck = deliveries["oldest_undelivered_seconds"]
    table.add_row(
        "deliveries",
        ", ".join(f"{_state(k)} {v}" for k, v in deliveries.items() if k != "oldest_undelivered_seconds")
        + (f", oldest undelivered {stuck} s" if stuck is not None else ""),
    )
    if refused:
        table.add_row("refused", f"[yellow]{refused} refused instance(s) waiting to be re-sent[/] "
                                 f"({refused_series} series; see: dicom-ai-node series STUDY_UID)")
    failures = report["failures_last_24h"]
    table.add_row("failures (24 h)", f"[red]{failures}[/] (see: dicom-ai-node events)" if failures else "0")
    start_up = report["last_start_up"]
    if start_up:
        color = "yellow" if start_up["level"] == "warning" else "white"
        table.add_row("last start-up", f"{start_up['at']}: [{color}]{start_up['message']}[/]")
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
            f"J{row['id']}",
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
    job: Annotated[str, typer.Argument(help="J<id> or <id> (see: dicom-ai-node jobs).")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stages, timings, error and result objects of one job."""
    _, job_id = _parse_id(job if job[:1].isalpha() else f"J{job}")
    settings = load_config(config)
    detail = queries.job_detail(_engine(settings), job_id)
    if detail is None:
        raise NodeError(f"no job {job_id} (see: dicom-ai-node jobs)")
    for result in detail["results"]:
        result["path"] = str(settings.storage.path / result["file_path"])
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
        console.print(f"{result['kind']:3s} {result['SOPInstanceUID']}", highlight=False)
        console.print(f"    {result['path']}", highlight=False, soft_wrap=True)


@app.command()
@_plain_errors
def models(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Configured models: kind, device, whether a worker holds them loaded, and the routes that use them."""
    from dicom_ai_node.inference.registry import ModelUnavailable, resolve_device
    from dicom_ai_node.inference.worker import loaded_models

    settings = load_config(config)
    held = loaded_models(settings)
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
                "loaded": bool(held.get(name)),
                "loaded_in": held.get(name, []),
            }
        )
    if as_json:
        _print_json(rows)
        return
    table = Table("Model", "Kind", "Device", "Loaded", "Routes", "Path")
    for row in rows:
        loaded = "\n".join(row["loaded_in"]) if row["loaded"] else "[dim]no (loads on its first job)[/]"
        table.add_row(
            row["name"], row["kind"], row["device"], loaded, ", ".join(row["routes"]), row["path"] or "(built in)"
        )
    console.print(table)


@app.command()
@_plain_errors
def worker(config: ConfigOption = None) -> None:
    """Run one job worker alone (e.g. on a GPU host sharing the PostgreSQL database and storage)."""
    from dicom_ai_node.inference.worker import worker_main

    load_config(config)  # report a bad config here, in plain words
    worker_main(config)


@app.command()
@_plain_errors
def deliveries(
    config: ConfigOption = None,
    state: Annotated[str | None, typer.Option(help="pending, sending, delivered, failed or dead.")] = None,
    limit: Annotated[int, typer.Option(help="Newest N deliveries.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """Result sets on their way to destinations: attempts, last error, remote status."""
    rows = queries.list_deliveries(_engine(load_config(config)), state, limit)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        console.print("no deliveries" + (f" in state {state}" if state else ""))
        return
    table = Table("ID", "State", "Destination", "Job", "Tries", "Remote", "Study Instance UID / last error")
    for row in rows:
        detail = row["StudyInstanceUID"]
        if row["last_error"]:
            detail += f"\n[red]{row['last_error']}[/]"
        if row["next_attempt_at"] and row["state"] == "failed":
            detail += f"\n[dim]next attempt {row['next_attempt_at']}[/]"
        table.add_row(
            f"D{row['id']}", _state(row["state"]), row["destination"], f"J{row['job_id']}", str(row["attempts"]),
            row["remote_status"] or "", detail,
        )
    console.print(table)


def _parse_id(text: str) -> tuple[str, int]:
    """`J12` is job 12, `D7` is delivery 7 (as the listings show them)."""
    kind, number = text[:1].upper(), text[1:]
    if kind not in ("J", "D") or not number.isdigit():
        raise NodeError(f"{text!r}: give a job as J<id> or a delivery as D<id> (see: jobs, deliveries)")
    return ("job" if kind == "J" else "delivery"), int(number)


@app.command()
@_plain_errors
def retry(
    target: Annotated[str | None, typer.Argument(help="J<id> (a job) or D<id> (a delivery).")] = None,
    all_failed: Annotated[bool, typer.Option("--all-failed", help="Every failed job and failed or dead delivery.")] = False,
    config: ConfigOption = None,
) -> None:
    """Run a failed job again, or send a failed or dead delivery again now."""
    from dicom_ai_node.store.deliveries import DeliveryQueue
    from dicom_ai_node.store.jobs import JobQueue

    settings = load_config(config)
    engine = _engine(settings)
    jobs_queue = JobQueue(engine, settings.storage.path)
    delivery_queue = DeliveryQueue(engine, settings.storage.path, settings.delivery)
    if all_failed:
        jobs_n, deliveries_n = jobs_queue.retry(), delivery_queue.retry_all_failed()
        console.print(f"queued again: {jobs_n} failed job(s), {deliveries_n} failed or dead delivery(ies)")
        return
    if target is None:
        raise NodeError("say what to retry: J<id>, D<id> or --all-failed")
    kind, number = _parse_id(target)
    if kind == "job":
        if not jobs_queue.retry(number):
            if not _exists(engine, Job, number):
                raise NodeError(f"no job {number} (see: dicom-ai-node jobs)")
            raise NodeError(f"job {number} is not failed, skipped or cancelled (see: dicom-ai-node job show {number})")
        console.print(f"job {number} queued again")
    else:
        if not delivery_queue.retry(number):
            if not _exists(engine, Delivery, number):
                raise NodeError(f"no delivery {number} (see: dicom-ai-node deliveries)")
            raise NodeError(f"delivery {number} is not failed or dead (see: dicom-ai-node deliveries)")
        console.print(f"delivery {number} will be sent again now")


def _exists(engine, table: type[Job] | type[Delivery], row_id: int) -> bool:
    """Tells "there is no such job/delivery" apart from "it is in a state that cannot be retried"."""
    from sqlalchemy import select

    with engine.connect() as connection:
        return connection.execute(select(table.id).where(table.id == row_id)).first() is not None


@app.command()
@_plain_errors
def cancel(
    job_id: Annotated[str, typer.Argument(help="J<id> of a queued or failed job.")],
    config: ConfigOption = None,
) -> None:
    """Cancel a job that has not run (a running job finishes; its results can be left undelivered)."""
    from dicom_ai_node.store.jobs import JobQueue

    kind, number = _parse_id(job_id if job_id[:1].isalpha() else f"J{job_id}")
    if kind != "job":
        raise NodeError("cancel takes a job (J<id>)")
    settings = load_config(config)
    blocking = JobQueue(_engine(settings), settings.storage.path).cancel(number)
    if blocking is not None:
        raise NodeError(f"job {number} is {blocking}; only queued or failed jobs can be cancelled")
    console.print(f"job {number} cancelled")


@app.command()
@_plain_errors
def resend(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID.")],
    to: Annotated[str, typer.Option("--to", help="A destination from [destinations], or origin.")],
    config: ConfigOption = None,
) -> None:
    """Send every result of a study to a destination again, even if it was delivered before."""
    from dicom_ai_node.store.deliveries import DeliveryQueue

    settings = load_config(config)
    if to != "origin" and to not in settings.destinations:
        known = ", ".join(["origin", *sorted(settings.destinations)])
        raise NodeError(f"no destination named {to!r} (known: {known})")
    count = DeliveryQueue(_engine(settings), settings.storage.path, settings.delivery).resend(study_uid, to)
    if not count:
        raise NodeError(f"study {study_uid} has no finished results to send (see: dicom-ai-node jobs)")
    console.print(f"{count} result set(s) of study {study_uid} queued for {to}")


@app.command()
@_plain_errors
def purge(
    older_than: Annotated[float, typer.Option("--older-than", help="Age in days (since the study arrived).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be removed.")] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove stored instances and results of studies that are fully delivered, and say what went."""
    from dicom_ai_node.store.retention import purge_older_than

    settings = load_config(config)
    removed = purge_older_than(_engine(settings), settings.storage.path, older_than, dry_run)
    if as_json:
        _print_json([vars(r) for r in removed])
        return
    verb = "would remove" if dry_run else "removed"
    for record in removed:
        console.print(f"{verb} study {record.study_instance_uid}: {record.instances} instance(s), "
                      f"{record.results} result(s), {_size(record.bytes)}", highlight=False)
    total = sum(record.bytes for record in removed)
    console.print(f"{len(removed)} study(ies), {_size(total)} {verb}; studies not fully delivered are kept")


@app.command()
@_plain_errors
def demo(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Run this config's models and routes (default: the built-in CT model)."),
    ] = None,
    workdir: Annotated[
        Path | None,
        typer.Option(help="A new or empty folder for the demo node (default: a new temporary folder)."),
    ] = None,
    keep: Annotated[
        bool,
        typer.Option("--keep/--clean", help="Keep the demo folder (CT, SEG, SR, database, log) or delete it."),
    ] = True,
) -> None:
    """Try the node in one command: a synthetic CT through a demo node of its own to SEG and SR."""
    from dicom_ai_node.demo import run_demo  # imports cli's NodeError: keep it here

    run_demo(config, workdir, keep, console)


def main() -> None:
    app()

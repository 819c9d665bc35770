"""`dicom-ai-node`: run the node and watch it from a terminal.

Expected failures (`NodeError`: bad config, peer down, database not migrated,
a port in use) print one plain sentence and exit with status 2; only a bug
shows a traceback.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import json
import re
import time
from pathlib import Path
from typing import Annotated, Any, Callable

import typer
from rich.columns import Columns
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Column, Table
from rich.text import Text

from dicom_ai_node.config import CONFIG_ENV, Config, DimseDestination, MonaiBundleConfig, TorchScriptConfig, load_config
from dicom_ai_node.errors import NodeError, StartupError
from dicom_ai_node.logs import setup_logging
from dicom_ai_node.store import db, queries
from dicom_ai_node.store.models import (
    Delivery,
    DeliveryState,
    Fetch,
    Job,
    JobState,
    Notification,
    Priority,
    utcnow,
)

# Help is plain text: Rich markup would eat `[peers]`, `[destinations]`, ..., and flags show no `<bool>`.
_PLAIN_HELP = {"rich_markup_mode": None}
app = typer.Typer(
    help="dicom-ai-node: a PACS AI node. Receives DICOM, runs models, sends results back.",
    no_args_is_help=True,
    add_completion=False,
    **_PLAIN_HELP,
)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True, **_PLAIN_HELP)
app.add_typer(db_app, name="db")
job_app = typer.Typer(help="One job in detail.", no_args_is_help=True, **_PLAIN_HELP)
app.add_typer(job_app, name="job")

console = Console()
errors = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help=f"Configuration file (default: ${CONFIG_ENV} or ./config.toml)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _plain_errors(command: Callable) -> Callable:
    """A NodeError (an expected failure) becomes its sentence on stderr and exit status 2; anything else propagates."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except NodeError as exc:
            # A Text, not markup: "[peers]" and the like in the sentence must show as written.
            errors.print(Text.assemble(("error:", "bold red"), " ", str(exc)), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _engine(config: Config):
    engine = db.make_engine(config.database.url)
    db.require_current_schema(engine, config.source)
    return engine


def _study_uid(engine, text: str) -> str:
    """The Study Instance UID `text` names: the whole UID, or the start of only one study's UID."""
    found = queries.find_study_uids(engine, text, limit=6)
    if len(found) == 1:
        return found[0]
    if not found:
        raise NodeError(f"no study {text} on this node, nor one whose UID starts with it (see: dicom-ai-node studies)")
    more = ", and more" if len(found) > 5 else ""
    raise NodeError(f"several studies start with {text}{more}; give more of the UID:\n  " + "\n  ".join(found[:5]))


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
    "partly delivered": "yellow",
    "purged": "dim",
    "dead": "bold red",
}


def _state(state: str) -> str:
    return f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]"


def _text(value: Any, style: str = "") -> Text:
    """A table cell from data (names, descriptions, errors): shown as is, square brackets included."""
    return Text("" if value is None else str(value), style=style)


def _state_text(state: str) -> Text:
    return Text(state, style=_STATE_STYLE.get(state, "white"))


# Wider than any terminal: measures the table's least width without squeezing it.
_UNBOUNDED = 100_000


def _print_with_uids(
    headers: list[str], rows: list[tuple[list[Text], list[tuple[str, str]], list[Text]]], uid_header: str
) -> None:
    """A listing whose UIDs are never cut, so they can be copied into the next command at any terminal width.

    A row is (cells, UIDs as (label, UID), notes such as an error). The UIDs make the last column, the notes
    go under them. When the table with whole UIDs is wider than the terminal (80 columns cannot hold a
    64-character UID beside seven columns), each row becomes a record instead: its columns as `name: value`
    and each UID on a line of its own.
    """
    width = max((len(uid) for _, uids, _ in rows for _, uid in uids), default=0)
    table = Table(*headers, Column(uid_header, no_wrap=True, min_width=width, max_width=width))
    for cells, uids, notes in rows:
        lines = [Text(uid) for _, uid in uids] + [note.copy() for note in notes]
        for note in lines[len(uids):]:
            note.no_wrap, note.overflow = False, "fold"  # a long error wraps under the UIDs, never widens them
        table.add_row(*cells, Text("\n").join(lines))
    if Measurement.get(console, console.options.update_width(_UNBOUNDED), table).minimum <= console.width:
        console.print(table)
        return
    label_width = max((len(label) for _, uids, _ in rows for label, _ in uids), default=0)
    for number, (cells, uids, notes) in enumerate(rows):
        fields = [
            Text.assemble((f"{header}: ", "dim"), Text(" / ").join(cell.split()) if "\n" in cell.plain else cell)
            for header, cell in zip(headers, cells)
            if cell.plain
        ]
        if number:
            console.print()
        console.print(Columns(fields, padding=(0, 2)))  # a field is never split across lines
        for label, uid in uids:  # never wrapped by Rich: one line to copy
            console.print(f"  {label:<{label_width}} {uid}", markup=False, highlight=False, soft_wrap=True)
        for note in notes:
            console.print(Padding(note, (0, 0, 0, 2)))


@app.command()
@_plain_errors
def serve(config: ConfigOption = None) -> None:
    """Run the node: the DICOM SCP and series completion, until SIGTERM or Ctrl-C."""
    from dicom_ai_node.node import serve as run

    settings = load_config(config)
    try:
        setup_logging(settings.logging.level, settings.logging.file, settings.logging.max_mb, settings.logging.backups)
    except OSError as exc:
        raise StartupError(f"cannot start: logging.file {settings.logging.file}: {exc}") from None
    run(settings)  # a node that cannot start raises a NodeError (StartupError & co.), nothing left running


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

    from dicom_ai_node.inference.queue import JobQueue
    from dicom_ai_node.series.completion import refused_waiting
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
    for priority, waits in report["jobs_by_priority"].items():
        if waits["queued"] or waits["started_last_hour"]:
            oldest = f" (oldest {waits['oldest_queued_seconds']} s)" if waits["queued"] else ""
            started = (f", {waits['started_last_hour']} started in the last hour after "
                       f"{waits['mean_wait_seconds_last_hour']} s on average" if waits["started_last_hour"] else "")
            table.add_row(f"  {priority}", f"{waits['queued']} queued{oldest}{started}")
    deliveries = report["deliveries"]
    stuck = deliveries["oldest_undelivered_seconds"]
    table.add_row(
        "deliveries",
        ", ".join(f"{_state(k)} {v}" for k, v in deliveries.items() if k != "oldest_undelivered_seconds")
        + (f", oldest undelivered {stuck} s" if stuck is not None else ""),
    )
    fetching = {state: count for state, count in report["fetches"].items() if count}
    if fetching:
        from dicom_ai_node.fetch.queue import FetchQueue
        from dicom_ai_node.fetch.runner import waiting_reason

        line = ", ".join(f"{_state(state)} {count}" for state, count in fetching.items())
        if fetching.get("queued"):
            started = FetchQueue(engine).started_since(utcnow() - dt.timedelta(hours=1))
            reason = waiting_reason(settings.fetch, dt.datetime.now(), started)
            line += f" (waiting: {reason})" if reason else ""
        table.add_row("fetches", line)
    called = {state: count for state, count in report["notifications"].items() if count}
    if called:
        failing = called.get(DeliveryState.FAILED.value, 0) + called.get(DeliveryState.DEAD.value, 0)
        line = ", ".join(f"{_state(state)} {count}" for state, count in called.items())
        table.add_row("webhook calls", line + (" (see: dicom-ai-node notifications)" if failing else ""))
    if refused:
        table.add_row("refused", f"[yellow]{refused} refused instance(s) waiting to be re-sent[/] "
                                 f"({refused_series} series; see: dicom-ai-node series STUDY_UID)")
    failures = report["failures_last_24h"]
    table.add_row("failures (24 h)", f"[red]{failures}[/] (see: dicom-ai-node events)" if failures else "0")
    start_up = report["last_start_up"]
    if start_up:
        color = "yellow" if start_up["level"] == "warning" else "white"
        table.add_row("last start-up", f"{start_up['at']}: [{color}]{escape(start_up['message'])}[/]")
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
    listing = [
        (
            [
                _text(f"{row['PatientName'] or ''} ({row['PatientID'] or '?'})"),
                _text(row["AccessionNumber"]),
                _text(row["StudyDate"]),
                _text(",".join(row["ModalitiesInStudy"])),
                _text(row["NumberOfStudyRelatedSeries"]),
                _text(row["NumberOfStudyRelatedInstances"]),
                _state_text(row["state"]),
            ],
            [("study", row["StudyInstanceUID"])],
            [],
        )
        for row in rows
    ]
    _print_with_uids(["Patient", "Accession", "Date", "Mod", "Series", "Inst", "State"], listing, "Study Instance UID")


@app.command()
@_plain_errors
def series(
    study_uid: Annotated[
        str, typer.Argument(help="Study Instance UID, or its start if no other study's starts alike (see: studies).")
    ],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """The series of one study, and what happened to the study."""
    engine = _engine(load_config(config))
    study_uid = _study_uid(engine, study_uid)
    rows = queries.list_series(engine, study_uid)
    if rows is None:  # known only from its events: refused before anything of it was stored
        rows = []
    if as_json:
        _print_json(rows)
        return
    listing = []
    for row in rows:
        state = _state_text(row["state"])
        if row["reprocess_requested"]:
            state.append(f" (re-process: {row['late_instances']} late)", style="yellow")
        if row["state_reason"]:
            state.append(f"\n{row['state_reason']}", style="dim")
        cells = [
            _text(row["SeriesNumber"]),
            _text(row["Modality"]),
            _text(row["SeriesDescription"]),
            _text(row["NumberOfSeriesRelatedInstances"]),
            _text(_size(row["bytes"])),
            _text(row["calling_ae_title"]),
            state,
        ]
        listing.append((cells, [("series", row["SeriesInstanceUID"])], []))
    console.print(f"study {study_uid}", markup=False, highlight=False, soft_wrap=True)
    if listing:
        _print_with_uids(["#", "Mod", "Description", "Inst", "Size", "From", "State"], listing, "Series Instance UID")
    _print_events(queries.list_events(engine, study_uid, limit=20))


@app.command()
@_plain_errors
def roles(
    study_uid: Annotated[
        str, typer.Argument(help="Study Instance UID, or its start if no other study's starts alike (see: studies).")
    ],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """A study on each study route: the series that fill its roles, the roles missing and why each series does
    not fill them, and what was decided."""
    from dicom_ai_node.routing.study import StudyRouter, study_roles

    settings = load_config(config)
    engine = _engine(settings)
    study_uid = _study_uid(engine, study_uid)
    shown = study_roles(StudyRouter(engine, settings.storage.path), settings, study_uid)
    if as_json:
        _print_json(shown)
        return
    if not shown:
        console.print('no study routes are configured (routes with unit = "study" and inputs)')
        return
    for route in shown:
        console.print(Text.assemble(("route ", "bold"), (route["route"], "bold"), ": ",
                                    _state_text(route["state"]), f" (run {route['runs']} time(s))"))
        if route["reason"]:
            console.print(Padding(_text(route["reason"], "dim"), (0, 0, 0, 2)))
        if route["arriving"]:
            console.print(Padding(_text(f"{len(route['arriving'])} series of the study still arriving", "yellow"),
                                  (0, 0, 0, 2)))
        for role in route["roles"]:
            if role["series"]:
                line = Text.assemble((f"  {role['role']}: ", "green"), role["series"])
                if role["other_candidates"]:
                    line.append(f" (preferred over {len(role['other_candidates'])} other(s))", style="dim")
                if role["ran_on"] and role["ran_on"] != role["SeriesInstanceUID"]:
                    line.append(f" (its jobs ran on {role['ran_on']})", style="yellow")
                console.print(line, soft_wrap=True)
                continue
            console.print(Text.assemble((f"  {role['role']}: missing", "bold red")))
            for series_words, why in role["why_not"].items():
                console.print(Text(f"    {series_words}: {why}", style="dim"), soft_wrap=True)


@app.command()
@_plain_errors
def events(
    config: ConfigOption = None,
    study: Annotated[
        str | None, typer.Option(help="Only this Study Instance UID (or its start, if no other study's starts alike).")
    ] = None,
    limit: Annotated[int, typer.Option(help="Newest N events.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """The audit trail: what happened to each study and why (failures in red)."""
    engine = _engine(load_config(config))
    rows = queries.list_events(engine, _study_uid(engine, study) if study else None, limit=limit)
    if as_json:
        _print_json(rows)
        return
    _print_events(rows)


def _print_events(rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print("no events")
        return
    # A UID in a message is folded at the edge, never cut short.
    table = Table("When (UTC)", "What", Column("Message", overflow="fold"), box=None)
    style = {"error": "red", "warning": "yellow"}
    for row in rows:
        table.add_row(row["at"], _text(row["kind"], style.get(row["level"], "white")), _text(row["message"]))
    console.print(table)


@app.command()
@_plain_errors
def echo(
    name: Annotated[
        str,
        typer.Argument(help="A peer from the config's [peers], or a destination of kind dimse from [destinations]."),
    ],
    config: ConfigOption = None,
) -> None:
    """C-ECHO a configured peer or DICOM destination: is it up and does it accept us?

    A name is looked up in [peers] first, then in [destinations]; a destination is called as deliveries
    call it (its AE title, host, port and TLS settings), so a PACS need not be configured twice.
    """
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    settings = load_config(config)
    host, port, ae_title, tls, what = _echo_target(settings, name)
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = ae.connection_timeout = 10
    where = f"{what}, {ae_title}@{host}:{port}" + (" over TLS" if tls else "")
    started = time.monotonic()
    try:
        assoc = ae.associate(host, port, ae_title=ae_title, tls_args=(tls, host) if tls else None)
    except OSError as exc:  # pynetdicom resolves the host name before it connects
        raise NodeError(f"{name} ({where}) is unreachable: {exc}") from None
    if assoc.is_rejected:
        raise NodeError(f"{name} ({where}) rejected the association (check AE titles on both sides)")
    if not assoc.is_established:
        handshake = " (or the TLS handshake failed)" if tls else ""
        raise NodeError(f"{name} ({where}) is unreachable or did not answer{handshake}")
    try:
        answer = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(answer, "Status", None)
    if code != 0x0000:
        raise NodeError(f"{name} ({where}) answered C-ECHO with status {code}")
    elapsed = f"{1000 * (time.monotonic() - started):.0f} ms"
    console.print(Text.assemble(f"{name} ({where}): ", ("C-ECHO OK", "green"), f" in {elapsed}"))


def _echo_target(settings: Config, name: str) -> tuple[str, int, str, Any, str]:
    """(host, port, AE title, TLS context or None, "peer" or "destination") of `name`: [peers] first."""
    peer = settings.peers.get(name)
    if peer is not None:
        return peer.host, peer.port, peer.ae_title, None, "peer"
    destination = settings.destinations.get(name)
    if destination is None:
        dimse = [key for key, value in settings.destinations.items() if isinstance(value, DimseDestination)]
        known = ", ".join(sorted({*settings.peers, *dimse})) or "none configured"
        raise NodeError(f"no peer named {name!r} in [peers], nor a destination of kind dimse in [destinations] "
                        f"(known: {known})")
    if not isinstance(destination, DimseDestination):
        raise NodeError(f"destination {name!r} is of kind {destination.kind}: echo speaks DICOM (C-ECHO) only")
    tls = None
    if destination.tls:
        from dicom_ai_node.delivery.dimse import _tls_context, _Unusable  # the context deliveries use

        try:
            tls = _tls_context(destination)
        except _Unusable as exc:
            raise NodeError(f"destination {name!r}: {exc}") from None
    return destination.host, destination.port, destination.ae_title, tls, "destination"


@app.command()
@_plain_errors
def jobs(
    config: ConfigOption = None,
    state: Annotated[JobState | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(help="Newest N jobs.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """Model jobs: one per (series, model), newest first, with stage timings and what the model found."""
    wanted = state.value if state else None
    rows = queries.list_jobs(_engine(load_config(config)), wanted, limit)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        console.print("no jobs" + (f" in state {wanted}" if wanted else ""))
        return
    listing = [
        (
            [
                _text(f"J{row['id']}"),
                _state_text(row["state"]),
                _text(row["priority"], "bold red" if row["priority"] == Priority.STAT.label else ""),
                _text(row["model"]),
                _text(row["Modality"]),
                _text(_seconds(row["load_seconds"])),
                _text(_seconds(row["inference_seconds"])),
                _text(_seconds(row["write_seconds"])),
            ],
            [("study", row["StudyInstanceUID"]), ("series", row["SeriesInstanceUID"])],
            [_text(row["error"], "red")] if row["error"] else [_text(row["summary"])] if row["summary"] else [],
        )
        for row in rows
    ]
    headers = ["ID", "State", "Priority", "Model", "Mod", "Load s", "Infer s", "Write s"]
    _print_with_uids(headers, listing, "Study / Series Instance UID, what was found or the error")


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
    # Labels of at most 13 characters and no outer padding: a 64-character UID fits whole in 80 columns.
    table = Table(Column(), Column(no_wrap=True), show_header=False, box=None, pad_edge=False)
    labels = {"StudyInstanceUID": "study UID", "SeriesInstanceUID": "series UID"}
    for key in ("state", "priority", "model", "model_version", "device", "route", "StudyInstanceUID",
                "SeriesInstanceUID", "summary", "attempts", "created_at", "started_at", "finished_at"):
        value = detail[key]
        table.add_row(labels.get(key, key), _state_text(value) if key == "state" else _text(value))
    for stage in ("load", "inference", "write"):
        table.add_row(f"{stage} (s)", _seconds(detail[f"{stage}_seconds"]))
    console.print(table)
    if detail["error"]:
        console.print(Text.assemble(("error", "red"), " ", _text(detail["error"])))
    for result in detail["results"]:
        console.print(f"{result['kind']:3s} {result['SOPInstanceUID']}", markup=False, highlight=False)
        console.print(f"    {result['path']}", markup=False, highlight=False, soft_wrap=True)


@app.command()
@_plain_errors
def models(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Configured models: kind, device, whether a worker holds them loaded, and the routes that use them."""
    from dicom_ai_node.inference.model import ModelUnavailable, resolve_device
    from dicom_ai_node.worker import loaded_models

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
                "path": str(model.path) if isinstance(model, MonaiBundleConfig | TorchScriptConfig) else None,
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
        loaded = _text("\n".join(row["loaded_in"])) if row["loaded"] else _text("no (loads on its first job)", "dim")
        table.add_row(
            _text(row["name"]), _text(row["kind"]), _text(row["device"]), loaded, _text(", ".join(row["routes"])),
            _text(row["path"] or "(built in)"),
        )
    console.print(table)


@app.command()
@_plain_errors
def worker(config: ConfigOption = None) -> None:
    """Run one job worker alone (e.g. on a GPU host sharing the PostgreSQL database and storage)."""
    from dicom_ai_node.worker import worker_main

    load_config(config)  # report a bad config here, in plain words
    worker_main(config)


@app.command()
@_plain_errors
def deliveries(
    config: ConfigOption = None,
    state: Annotated[DeliveryState | None, typer.Option(help="Only deliveries in this state.")] = None,
    limit: Annotated[int, typer.Option(help="Newest N deliveries.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """Result sets on their way to destinations: attempts, last error, remote status."""
    wanted = state.value if state else None
    rows = queries.list_deliveries(_engine(load_config(config)), wanted, limit)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        console.print("no deliveries" + (f" in state {wanted}" if wanted else ""))
        return
    listing = []
    for row in rows:
        cells = [
            _text(f"D{row['id']}"), _state_text(row["state"]), _text(row["destination"]), _text(f"J{row['job_id']}"),
            _text(row["attempts"]), _text(row["remote_status"]),
        ]
        listing.append((cells, [("study", row["StudyInstanceUID"])], _attempt_notes(row)))
    headers = ["ID", "State", "Destination", "Job", "Tries", "Remote"]
    _print_with_uids(headers, listing, "Study Instance UID / last error")


@app.command()
@_plain_errors
def fetch(
    peer: Annotated[str, typer.Argument(help="A peer from [peers] that answers C-FIND and C-MOVE.")],
    study: Annotated[list[str] | None, typer.Option(help="StudyInstanceUID (repeat for several).")] = None,
    accession: Annotated[str, typer.Option(help="AccessionNumber.")] = "",
    patient_id: Annotated[str, typer.Option(help="PatientID.")] = "",
    dates: Annotated[str, typer.Option(help="StudyDate or a range, YYYYMMDD-YYYYMMDD.")] = "",
    modality: Annotated[str, typer.Option(help="Only studies with this modality (ModalitiesInStudy).")] = "",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what matches; queue nothing.")] = False,
    again: Annotated[bool, typer.Option("--again", help="Fetch studies fetched before again.")] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Find studies on a PACS (C-FIND) and queue them to be pulled (C-MOVE to this node), for retrospective runs
    and backfills; the running node retrieves them one at a time within fetch.window and fetch.max_studies_per_hour,
    and they are routed as pushed studies are."""
    from dicom_ai_node.fetch.dimse import StudyQuery, find_studies
    from dicom_ai_node.fetch.queue import FetchQueue

    settings = load_config(config)
    if peer not in settings.peers:
        raise NodeError(f"no peer named {peer!r} in [peers] (known: {', '.join(sorted(settings.peers)) or 'none'})")
    if not (study or accession or patient_id or dates):
        raise NodeError("say which studies: --study, --accession, --patient-id or --dates (a backfill of every "
                        "study on a PACS is not asked for by accident)")
    if dates and not re.fullmatch(r"\d{8}|\d{8}-|-\d{8}|\d{8}-\d{8}", dates):
        raise NodeError(f"--dates {dates!r}: give YYYYMMDD or a range YYYYMMDD-YYYYMMDD (either end may be left out)")
    query = StudyQuery(tuple(study or ()), accession, patient_id, dates, modality)
    found = find_studies(settings.node.ae_title, peer, settings.peers[peer], query)
    queued = skipped = 0
    if not dry_run:
        queued, skipped = FetchQueue(_engine(settings)).request(peer, found, query.describe(), again)
    if as_json:
        _print_json({"found": [vars(s) for s in found], "queued": queued, "already": skipped})
        return
    table = Table("Study Instance UID", "Accession", "Date", "Modalities", "Instances")
    for item in found:
        table.add_row(_text(item.study_instance_uid), _text(item.accession_number), _text(item.study_date),
                      _text(item.modalities), _text(item.instances))
    console.print(table)
    what = "nothing queued (--dry-run)" if dry_run else f"{queued} queued" + (
        f", {skipped} already queued or fetched (--again fetches those again)" if skipped else "")
    console.print(f"{len(found)} study(ies) on {peer} match {query.describe()}: {what}", markup=False,
                  highlight=False)


@app.command()
@_plain_errors
def fetches(config: ConfigOption = None, limit: Annotated[int, typer.Option(help="Newest N.")] = 100,
            as_json: JsonOption = False) -> None:
    """Studies asked for with `fetch`: state, instances moved, error."""
    rows = queries.list_fetches(_engine(load_config(config)), limit)
    if _said_plainly(rows, as_json, "no fetches"):
        return
    listing = []
    for row in rows:
        moved = "" if row["completed"] is None else f"{row['completed']}/{row['NumberOfStudyRelatedInstances'] or '?'}"
        cells = [_text(f"F{row['id']}"), _state_text(row["state"]), _text(row["peer"]), _text(row["AccessionNumber"]),
                 _text(row["StudyDate"]), _text(moved)]
        notes = [_text(row["error"], "red" if row["state"] == "failed" else "yellow")] if row["error"] else []
        listing.append((cells, [("study", row["StudyInstanceUID"])], notes))
    _print_with_uids(["ID", "State", "Peer", "Accession", "Date", "Moved"], listing, "Study Instance UID / error")


@app.command()
@_plain_errors
def notifications(
    config: ConfigOption = None,
    limit: Annotated[int, typer.Option(help="Newest N calls.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """Webhook calls ([webhooks], routes' `notify`): event, attempts, last error."""
    rows = queries.list_notifications(_engine(load_config(config)), limit)
    if _said_plainly(rows, as_json, "no webhook calls"):
        return
    listing = []
    for row in rows:
        cells = [_text(f"N{row['id']}"), _state_text(row["state"]), _text(row["webhook"]), _text(row["event"]),
                 _text(f"J{row['job_id']}"), _text(row["attempts"])]
        listing.append((cells, [("study", row["StudyInstanceUID"])], _attempt_notes(row)))
    _print_with_uids(["ID", "State", "Webhook", "Event", "Job", "Tries"], listing, "Study Instance UID / last error")


def _said_plainly(rows: list[dict[str, Any]], as_json: bool, nothing: str) -> bool:
    """Print the rows as JSON, or `nothing` when there are none; True when that said it all."""
    if as_json:
        _print_json(rows)
        return True
    if not rows:
        console.print(nothing)
        return True
    return False


def _attempt_notes(row: dict[str, Any]) -> list[Text]:
    """Under a delivery or webhook call: its last error, and when it is tried next."""
    notes = [_text(row["last_error"], "red")] if row["last_error"] else []
    if row["next_attempt_at"] and row["state"] == "failed":
        notes.append(_text(f"next attempt {row['next_attempt_at']}", "dim"))
    return notes


_ID_KINDS = {"J": "job", "D": "delivery", "N": "notification", "F": "fetch"}


def _parse_id(text: str) -> tuple[str, int]:
    """`J12` is job 12, `D7` is delivery 7, `N3` is webhook call 3, `F2` is fetch 2 (as the listings show them)."""
    kind, number = text[:1].upper(), text[1:]
    if kind not in _ID_KINDS or not number.isdigit():
        raise NodeError(f"{text!r}: give a job as J<id>, a delivery as D<id>, a webhook call as N<id> or a fetch "
                        "as F<id> (see: jobs, deliveries, notifications, fetches)")
    return _ID_KINDS[kind], int(number)


@app.command()
@_plain_errors
def retry(
    target: Annotated[str | None, typer.Argument(
        help="J<id> (a job), D<id> (a delivery), N<id> (a webhook call), F<id> (a fetch).")] = None,
    all_failed: Annotated[bool, typer.Option(
        "--all-failed", help="Every failed job and fetch, and failed or dead delivery and webhook call.")] = False,
    config: ConfigOption = None,
) -> None:
    """Run a failed job again, send a failed or dead delivery (or webhook call) again now, or queue a failed
    fetch again."""
    from dicom_ai_node.delivery.queue import DeliveryQueue
    from dicom_ai_node.fetch.queue import FetchQueue
    from dicom_ai_node.inference.queue import JobQueue
    from dicom_ai_node.notify.queue import NotificationQueue

    settings = load_config(config)
    engine = _engine(settings)
    jobs_queue = JobQueue(engine, settings.storage.path)
    delivery_queue = DeliveryQueue(engine, settings.storage.path, settings.delivery, settings.outputs_of)
    calls = NotificationQueue(engine, settings.delivery, settings.node.ae_title)
    if all_failed:
        jobs_n, deliveries_n, calls_n = jobs_queue.retry(), delivery_queue.retry_all_failed(), calls.retry()
        fetches_n = FetchQueue(engine).retry()
        console.print(f"queued again: {jobs_n} failed job(s), {deliveries_n} failed or dead delivery(ies), "
                      f"{calls_n} failed or dead webhook call(s), {fetches_n} failed fetch(es)")
        return
    if target is None:
        raise NodeError("say what to retry: J<id>, D<id>, N<id>, F<id> or --all-failed")
    kind, number = _parse_id(target)
    # kind -> (retry it, its table, what it is called, its listing, where to look at one, which states can be
    # retried, what happens now)
    retryable = {
        "job": (jobs_queue.retry, Job, "job", "jobs", f"job show {number}", "failed, skipped or cancelled",
                "queued again"),
        "delivery": (delivery_queue.retry, Delivery, "delivery", "deliveries", "deliveries", "failed or dead",
                     "will be sent again now"),
        "notification": (calls.retry, Notification, "webhook call", "notifications", "notifications",
                         "failed or dead", "will be made again now"),
        "fetch": (FetchQueue(engine).retry, Fetch, "fetch", "fetches", "fetches", "failed", "queued again"),
    }
    retry_one, table, what, listing, look, states, done = retryable[kind]
    if not retry_one(number):
        if not _exists(engine, table, number):
            raise NodeError(f"no {what} {number} (see: dicom-ai-node {listing})")
        raise NodeError(f"{what} {number} is not {states} (see: dicom-ai-node {look})")
    console.print(f"{what} {number} {done}")


def _exists(engine, table: type[Job] | type[Delivery] | type[Notification] | type[Fetch], row_id: int) -> bool:
    """Tells "there is no such job/delivery/call" apart from "it is in a state that cannot be retried"."""
    from sqlalchemy import select

    with engine.connect() as connection:
        return connection.execute(select(table.id).where(table.id == row_id)).first() is not None


# The priorities by name, most urgent first, as the command line takes them.
PriorityChoice = enum.StrEnum("PriorityChoice", [p.label for p in sorted(Priority, reverse=True)])


@app.command()
@_plain_errors
def prioritize(
    study: Annotated[str, typer.Argument(help="StudyInstanceUID, or a unique prefix of one.")],
    priority: Annotated[PriorityChoice, typer.Option(help="How urgent.")] = PriorityChoice.stat,
    config: ConfigOption = None,
) -> None:
    """Run a study's jobs (queued now, or queued later by series still to come) and send its results at this
    priority, whatever its routes say (`--priority routine` included)."""
    from dicom_ai_node.inference.queue import JobQueue

    settings = load_config(config)
    engine = _engine(settings)
    uid = _study_uid(engine, study)
    queued = JobQueue(engine, settings.storage.path).prioritize(uid, Priority[priority.name.upper()])
    if queued is None:
        raise NodeError(f"no study {uid} (see: dicom-ai-node studies)")
    console.print(f"study {uid}: {priority}; {queued} queued job(s)", markup=False, highlight=False)


@app.command()
@_plain_errors
def cancel(
    job_id: Annotated[str, typer.Argument(help="J<id> of a queued or failed job.")],
    config: ConfigOption = None,
) -> None:
    """Cancel a job that has not run (a running job finishes; its results can be left undelivered)."""
    from dicom_ai_node.inference.queue import JobQueue

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
    study_uid: Annotated[
        str, typer.Argument(help="Study Instance UID, or its start if no other study's starts alike.")
    ],
    to: Annotated[str, typer.Option("--to", help="A destination from [destinations], or origin.")],
    config: ConfigOption = None,
) -> None:
    """Send every result of a study to a destination again, even if it was delivered before."""
    from dicom_ai_node.delivery.queue import DeliveryQueue, ResendRefused

    settings = load_config(config)
    if to != "origin" and to not in settings.destinations:
        known = ", ".join(["origin", *sorted(settings.destinations)])
        raise NodeError(f"no destination named {to!r} (known: {known})")
    engine = _engine(settings)
    study_uid = _study_uid(engine, study_uid)
    try:
        deliveries = DeliveryQueue(engine, settings.storage.path, settings.delivery, settings.outputs_of)
        count = deliveries.resend(study_uid, to)
    except ResendRefused as exc:  # e.g. the study's results were purged: nothing is queued
        raise NodeError(str(exc)) from None
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
    if as_json:  # keyed like every listing: StudyInstanceUID
        _print_json([{"StudyInstanceUID": r.study_instance_uid, "instances": r.instances, "results": r.results,
                      "bytes": r.bytes} for r in removed])
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
    from dicom_ai_node.demo import run_demo  # ~1 s of imports (phantom, DICOM) that only `demo` should pay

    run_demo(config, workdir, keep, console)


def main() -> None:
    app()

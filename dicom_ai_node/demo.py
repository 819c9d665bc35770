"""`dicom-ai-node demo`: the whole path of a study in one command, on a fresh machine.

A newcomer should watch a CT arrive over real DICOM, the series complete, the built-in
model run and SEG + SR land in the store, without configuring or downloading anything
and without disturbing a node already running here: the demo node gets a folder,
database and loopback port of its own, and is stopped (SIGTERM) when the tour ends.
The folder is kept so the images, the results and the database can be opened afterwards.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import highdicom as hd
import tomli_w
from pydicom.sr.codedict import codes
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text
from sqlalchemy import Engine

from dicom_ai_node.config import Config, load_config
from dicom_ai_node.errors import NodeError
from dicom_ai_node.phantoms import CTPhantom
from dicom_ai_node.phantoms.ct import PhantomGeometry
from dicom_ai_node.store import db, queries

# dcmtk's sender; the venv's pynetdicom console script of the same name takes other options.
STORESCU = Path("/usr/bin/storescu")
CALLING_AE = "DEMO_SCU"
READY_LINE = "dicom_ai_node.node: dicom-ai-node ready"
STABLE_SECONDS = 3
# How long each stage may take before the demo gives up and shows the node's log.
TIMEOUT_SECONDS = {"start": 60, "receive": 120, "complete": STABLE_SECONDS + 30, "inference": 300}
_POLL_SECONDS = 0.2
_FINAL_JOB_STATES = {"done", "failed", "skipped", "cancelled"}
# A routed series shows how far its results got (a demo has no destinations, so "routed" stays).
_ROUTED_STATES = {"routed", queries.PARTLY_DELIVERED, queries.DELIVERED}

# Only what differs from the embedded defaults: a node of its own in the demo folder.
_CONFIG = """\
# dicom-ai-node demo node, written by `dicom-ai-node demo`.
# The embedded defaults (SQLite, local storage, the built-in CT models), except: everything
# lives in this folder, the node listens on loopback only, on a port that was free when
# the demo started, and a series is complete after {stable} s of quiet instead of 60 s.

[dimse]
bind = "127.0.0.1"
port = {port}

[storage]
path = "storage"
# The demo writes ~40 MB; a small /tmp must not make the node refuse it.
min_free_mb = 64

[database]
url = "sqlite:///dicom-ai-node.sqlite"

[series]
stable_seconds = {stable}
check_interval_seconds = 0.5
"""


@dataclass(frozen=True)
class SegmentVolume:
    label: str
    measured_ml: float  # from the SR
    expected_ml: float | None  # the phantom's analytic volume; None for a label it does not define


# The demo's own models and route when no config is given: one built-in model per task.
_MODELS_AND_ROUTE = """
[models.ct-tissue]
kind = "builtin"

[models.ct-lung-nodules]
kind = "builtin"
model = "ct-lung-nodules"

[models.ct-contrast]
kind = "builtin"
model = "ct-contrast"

[[routes]]
name = "ct"
modality = "CT"
min_slices = 3
models = ["ct-tissue", "ct-lung-nodules", "ct-contrast"]
"""


@dataclass(frozen=True)
class JobResult:
    job_id: int
    model: str
    seg_path: Path | None  # a segmentation's SEG; None for a detector or a classifier
    sr_path: Path
    segments: list[SegmentVolume]  # a segmentation's volumes, from the SR
    summary: str  # what the model found, as the job records it


@dataclass(frozen=True)
class DemoSummary:
    workdir: Path
    config_path: Path
    log_path: Path
    study_uid: str
    jobs: list[JobResult]
    timings: dict[str, float]  # seconds per stage
    kept: bool


# Two solid nodules in the demo phantom's lungs, for the nodule detector: (x, y, z, radius) in mm.
DEMO_NODULES = ((-70.0, -5.0, 10.0, 6.0), (75.0, 10.0, -30.0, 4.0))


def demo_phantom() -> CTPhantom:
    """A chest-like CT: the 384 mm field of view holds the 320x220 mm body, the 300 mm scan the 160 mm lungs; two
    nodules in the lungs and contrast in the aorta, for the demo detector and classifier."""
    return CTPhantom(
        slices=120,
        rows=256,
        columns=256,
        pixel_spacing=(1.5, 1.5),
        slice_spacing=2.5,
        noise_hu=10,
        patient_id="DEMO-001",
        patient_name="Demo^Phantom",
        accession_number="DEMO0001",
        geometry=PhantomGeometry(nodules=DEMO_NODULES, contrast=True),
    )


def write_demo_config(workdir: Path, base: Path | None) -> Config:
    """Write and load `workdir/config.toml`; with `base`, the demo runs that config's models and routes."""
    text = _CONFIG.format(port=_free_port(), stable=STABLE_SECONDS)
    if base is None:
        text += _MODELS_AND_ROUTE
    else:
        text += f"\n# The models and routes of {base.resolve()} (nothing else of it).\n"
        text += _models_and_routes(load_config(base))
    path = workdir / "config.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def run_demo(config_path: Path | None, workdir: Path | None, keep: bool, console: Console) -> DemoSummary:
    """Start a demo node, send it a synthetic CT, wait for its results, show what they say, stop it."""
    workdir = _prepare_workdir(workdir)
    settings = write_demo_config(workdir, config_path)
    assert settings.source is not None  # load_config records the file it read
    console.print(
        f"dicom-ai-node demo in {workdir}: a synthetic CT goes over DICOM to a node of its own, "
        "through its models, to DICOM SEG and TID 1500 SR.",
        markup=False,
        highlight=False,
    )
    engine = db.make_engine(settings.database.url)
    db.upgrade(engine)
    phantom = demo_phantom()
    node = _DemoNode(settings.source, workdir / "node.log")
    previous_handler = _interrupt_on_sigterm()
    finished = False
    try:
        jobs, timings = _tour(node, settings, engine, phantom, workdir, console)
        finished = True
    except NodeError:
        _print_log_tail(console, node.log_path)
        raise
    finally:
        code = node.stop()
        engine.dispose()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if code not in (None, 0):
            console.print(f"The demo node exited with status {code}; see {node.log_path}", style="yellow", markup=False)
        if not finished:
            console.print(f"The demo node is stopped; {workdir} is kept (node log: {node.log_path}).", markup=False)
    summary = DemoSummary(workdir, settings.source, node.log_path, phantom.study_uid, jobs, timings, keep)
    _print_summary(console, summary)
    if not keep:
        shutil.rmtree(workdir)
        console.print(f"Removed the demo folder {workdir} (--clean).", markup=False, highlight=False)
    return summary


class _Stages:
    """The progress display, one line per stage, and how long each stage took."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.timings: dict[str, float] = {}
        self._name = ""
        self._task = TaskID(0)
        self._total: float | None = None
        self._started = 0.0

    def begin(self, name: str, description: str, detail: str = "", total: float | None = None) -> None:
        self._name, self._total, self._started = name, total, time.monotonic()
        self._task = self.progress.add_task(description, total=total, detail=detail)

    def update(self, **fields: Any) -> None:
        self.progress.update(self._task, **fields)

    def end(self, detail: str) -> None:
        total = self._total or 1  # a stage without a count shows a full bar when done
        self.progress.update(self._task, total=total, completed=total, detail=detail)
        self.timings[self._name] = time.monotonic() - self._started


def _tour(
    node: _DemoNode, settings: Config, engine: Engine, phantom: CTPhantom, workdir: Path, console: Console
) -> tuple[list[JobResult], dict[str, float]]:
    """receive -> complete -> inference -> results, each stage watched in the node's database."""
    ae_title, port = settings.node.ae_title, settings.dimse.port
    columns = (
        SpinnerColumn(finished_text="[green]✓[/]"),
        TextColumn("{task.description}", table_column=Column(min_width=18, no_wrap=True)),
        BarColumn(bar_width=20),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}", markup=False, table_column=Column(no_wrap=True, overflow="ellipsis")),
    )
    with Progress(*columns, console=console) as progress:
        stages = _Stages(progress)
        stages.begin("start", "Start the node", f"dicom-ai-node serve --config {settings.source}")
        node.start()
        _wait(node, "start", node.ready)
        stages.end(f"AE {ae_title} on 127.0.0.1:{port}")

        stages.begin("write", "Write a CT phantom", f"{phantom.slices} slices of {phantom.rows}x{phantom.columns}")
        files = phantom.write(workdir / "phantom")
        stages.end(f"{len(files)} slices of {phantom.rows}x{phantom.columns} in phantom/")

        sender = _Sender(files, ae_title, port)
        stages.begin("receive", "Receive (C-STORE)", f"sending with {sender.tool}", total=len(files))
        sender.start()

        def received() -> int | None:
            sending = sender.is_alive()  # before counting: once the sender is done, the count is final
            row = _series_row(engine, phantom)
            count = row["NumberOfSeriesRelatedInstances"] if row else 0
            stages.update(completed=count, detail=f"{count}/{len(files)} stored, sent by {sender.tool}")
            if sending:
                return None
            if sender.error:
                raise NodeError(f"sending the phantom failed: {sender.error}")
            if count < len(files):
                raise NodeError(f"the node stored {count} of {len(files)} instances (see its events)")
            return count

        _wait(node, "receive", received)
        stages.end(f"{len(files)}/{len(files)} stored, sent by {sender.tool}")

        stages.begin("complete", "Series complete", f"waiting for {settings.series.stable_seconds:g} s of quiet")

        def routed() -> dict[str, Any] | None:
            row = _series_row(engine, phantom)
            if row and row["state"] == "not-routed":
                raise NodeError(f"the series was not routed: {row['state_reason']}")
            return row if row and row["state"] in _ROUTED_STATES else None

        _wait(node, "complete", routed)
        stages.end("complete, routed to the model")

        stages.begin("inference", "Inference", "queued")

        def inferred() -> list[dict[str, Any]] | None:
            jobs = [job for job in queries.list_jobs(engine) if job["SeriesInstanceUID"] == phantom.series_uid]
            stages.update(detail=", ".join(f"job {job['id']} {job['model']}: {job['state']}" for job in jobs))
            return jobs if jobs and all(job["state"] in _FINAL_JOB_STATES for job in jobs) else None

        jobs = _wait(node, "inference", inferred)
        for job in jobs:
            if job["state"] != "done":
                raise NodeError(f"job {job['id']} ({job['model']}) ended {job['state']}: {job['error']}")
        stages.end(
            ", ".join(f"{job['model']} on {job['device']}, inference {job['inference_seconds']:.1f} s" for job in jobs)
        )

        stages.begin("results", "Results", "reading the results")
        results = [_job_result(engine, settings, phantom, job) for job in sorted(jobs, key=lambda job: job["id"])]
        stages.end(", ".join(f"{job.model}: {'SEG + SR' if job.seg_path else 'SR'}" for job in results))
    return results, stages.timings


_T = TypeVar("_T")


def _wait(node: _DemoNode, stage: str, poll: Callable[[], _T | None]) -> _T:
    """Poll until `poll` returns a value; a dead node or the stage's timeout ends the demo."""
    timeout = TIMEOUT_SECONDS[stage]
    deadline = time.monotonic() + timeout
    while (value := poll()) is None:
        node.check_running(stage)
        if time.monotonic() > deadline:
            raise NodeError(f"stage '{stage}' did not finish within {timeout} s (the node's log is above)")
        time.sleep(_POLL_SECONDS)
    return value


def _series_row(engine: Engine, phantom: CTPhantom) -> dict[str, Any] | None:
    rows = queries.list_series(engine, phantom.study_uid) or []
    return next((row for row in rows if row["SeriesInstanceUID"] == phantom.series_uid), None)


def _job_result(engine: Engine, settings: Config, phantom: CTPhantom, job: dict[str, Any]) -> JobResult:
    detail = queries.job_detail(engine, job["id"])
    results = detail["results"] if detail else []
    paths = {result["kind"]: settings.storage.path / result["file_path"] for result in results}
    if "SR" not in paths:
        raise NodeError(f"job {job['id']} is done but did not record an SR")
    expected = phantom.geometry.analytic_volumes_ml(phantom.scan_length_mm)
    segments = [
        SegmentVolume(label, measured, expected.get(label.lower()))
        for label, measured in _sr_volumes(paths["SR"]).items()
    ]
    return JobResult(job["id"], job["model"], paths.get("SEG"), paths["SR"], segments, detail["summary"] or "")


def _sr_volumes(path: Path) -> dict[str, float]:
    """Tracking identifier -> Volume (mL) of each segment in the SR: its volumetric group, or for a segment left out
    of the SEG (the body), its measurement group."""
    report = hd.sr.srread(path).content
    groups = [*report.get_volumetric_roi_measurement_groups(), *report.get_image_measurement_groups()]
    volumes = {group.tracking_uid: (group.tracking_identifier, float(volume.value))
               for group in groups for volume in group.get_measurements(name=codes.SCT.Volume)}
    in_model_order = [group.tracking_uid for group in report.get_image_measurement_groups()]  # outlines come first
    return dict(volumes[uid] for uid in sorted(volumes, key=lambda uid: in_model_order.index(uid)
                                               if uid in in_model_order else len(in_model_order)))


class _DemoNode:
    """The demo's `dicom-ai-node serve`, in a session of its own: only the demo stops it, in order."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dicom_ai_node", "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TCP_NODELAY": "1"},
                start_new_session=True,
            )

    def ready(self) -> bool | None:
        return True if READY_LINE in self.log_path.read_text(errors="replace") else None

    def check_running(self, stage: str) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise NodeError(f"the demo node exited with status {self.process.returncode} (stage '{stage}')")

    def stop(self) -> int | None:
        """SIGTERM, as an admin would; its whole process group is killed only if it hangs."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


class _Sender(threading.Thread):
    """Sends the phantom as a scanner would, while the display watches the node's database."""

    def __init__(self, files: list[Path], called_ae: str, port: int) -> None:
        super().__init__(name="demo-sender", daemon=True)
        self.files = files
        self.called_ae = called_ae
        self.port = port
        # A fresh machine after scripts/install.sh may lack dcmtk; pynetdicom is always installed.
        self.tool = "dcmtk storescu" if STORESCU.exists() else "pynetdicom"
        self.error: str | None = None

    def run(self) -> None:
        try:
            if self.tool == "pynetdicom":
                self._pynetdicom()
            else:
                self._storescu()
        except Exception as exc:  # reported by the display loop, which owns the console
            self.error = f"{type(exc).__name__}: {exc}"

    def _storescu(self) -> None:
        command = [str(STORESCU), "-aet", CALLING_AE, "-aec", self.called_ae, "127.0.0.1", str(self.port)]
        result = subprocess.run(
            [*command, *map(str, self.files)],
            check=False,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_SECONDS["receive"],
            env={**os.environ, "TCP_NODELAY": "1"},  # ~30x faster on Linux loopback
        )
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise RuntimeError(f"storescu exited with status {result.returncode}: {last}")

    def _pynetdicom(self) -> None:
        from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
        from pynetdicom import AE

        ae = AE(ae_title=CALLING_AE)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.called_ae)
        if not assoc.is_established:
            raise RuntimeError("the node did not accept the association")
        try:
            for path in self.files:
                code = getattr(assoc.send_c_store(path), "Status", None)
                if code != 0x0000:
                    status = f"0x{code:04X}" if isinstance(code, int) else "none (connection lost)"
                    raise RuntimeError(f"C-STORE of {path.name} answered with status {status}")
        finally:
            assoc.release()


def _print_summary(console: Console, summary: DemoSummary) -> None:
    def line(text: str) -> None:  # paths and commands: never wrapped, so they can be copied
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    for job in summary.jobs:
        if not job.segments:  # a detector or a classifier: what it found, as its job records it
            console.print(f"\n{job.model} (job {job.job_id}): {job.summary}", markup=False, highlight=False)
        else:
            console.print(
                f"\n{job.model} (job {job.job_id}): the volumes in its SR, next to the phantom's exact volumes",
                markup=False,
                highlight=False,
            )
            table = Table("Segment", "SR volume (mL)", "Phantom (mL)", "Difference", box=box.SIMPLE_HEAD,
                          show_edge=False)
            for segment in job.segments:
                expected = segment.expected_ml
                table.add_row(
                    Text(segment.label),
                    f"{segment.measured_ml:.1f}",
                    "-" if expected is None else f"{expected:.1f}",
                    "" if expected is None else f"{100 * (segment.measured_ml / expected - 1):+.1f} %",
                )
            console.print(table)
        if job.seg_path is not None:
            line(f"SEG {job.seg_path}")
        line(f"SR  {job.sr_path}")
    times = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in summary.timings.items())
    console.print(f"\nStage times: {times}. The demo node is stopped.", highlight=False)
    if not summary.kept:
        return
    console.print("\nLook further (these read the demo node's database and storage):")
    program, config = cli_program(), shlex.quote(str(summary.config_path))
    jobs = [f"job show {job.job_id}" for job in summary.jobs]
    for command in ["studies", f"series {summary.study_uid}", "jobs", *jobs, "events"]:
        line(f"  {program} {command} --config {config}")
    line(f"  {program} serve --config {config}   # runs the demo node again")
    console.print(
        f"\nThe demo folder {summary.workdir} is kept: phantom/ (the CT sent), storage/ (what the node stored, "
        "with the results), the SQLite database and node.log. Delete it when you are done.",
        markup=False,
        highlight=False,
    )


def cli_program() -> str:
    """This CLI as a shell runs it: `dicom-ai-node` if that name finds this installation, else a full path."""
    beside = Path(sys.executable).parent / "dicom-ai-node"  # the console script of this Python's installation
    found = shutil.which("dicom-ai-node")
    if beside.exists():
        return "dicom-ai-node" if found and Path(found).resolve() == beside.resolve() else shlex.quote(str(beside))
    return f"{shlex.quote(sys.executable)} -m dicom_ai_node"


def _print_log_tail(console: Console, log_path: Path, lines: int = 40) -> None:
    tail = log_path.read_text(errors="replace").splitlines()[-lines:] if log_path.exists() else []
    console.print(f"--- last {len(tail)} lines of {log_path} ---", markup=False, highlight=False)
    console.print("\n".join(tail), style="dim", markup=False, highlight=False, soft_wrap=True)


def _prepare_workdir(workdir: Path | None) -> Path:
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="dicom-ai-node-demo-"))
    workdir = workdir.resolve()  # absolute, so the printed commands work from any folder
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise NodeError(f"{workdir} is not an empty folder; give --workdir a new or empty one")
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _interrupt_on_sigterm() -> Any:
    """Let SIGTERM unwind like Ctrl-C, so the demo node is stopped rather than orphaned; returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _models_and_routes(config: Config) -> str:
    """The [models] and [[routes]] of an admin's config as TOML; nothing else of it reaches the demo."""
    # `kind` has a default (its class's own), which exclude_defaults would leave out.
    models = {
        name: {"kind": model.kind, **model.model_dump(mode="json", exclude_defaults=True)}
        for name, model in config.models.items()
    }
    # Without destinations: the demo never sends anything anywhere.
    routes = [route.model_dump(mode="json", exclude_defaults=True, exclude={"destinations"}) for route in config.routes]
    # An empty table is left out, as if the admin had not written it: the demo's defaults apply.
    return tomli_w.dumps({key: value for key, value in (("models", models), ("routes", routes)) if value})

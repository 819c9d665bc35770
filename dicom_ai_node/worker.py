"""The worker: claims jobs, builds the volume, runs the model, stores its results (SEG, SR).

Like node.py it wires stages together (inference, then results), so it sits beside it,
above both: the results stage builds on inference's volumes and segmentations.

Runs in its own process (started by `serve`, or alone with `dicom-ai-node worker`),
so a long inference never slows the DICOM receiver.  A job that cannot succeed
ends `skipped` (the series cannot form a volume for this model) or `failed`
(anything else), always with a reason an admin can act on.  A job whose results
find no disk space is neither: it waits, queued, until the disk has room again.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from dicom_ai_node import __version__
from dicom_ai_node.config import OUTPUT_KINDS, Config, load_config
from dicom_ai_node.inference.queue import ClaimedJob, JobQueue
from dicom_ai_node.inference.model import Model, ModelUnavailable, Prediction, result_identity
from dicom_ai_node.inference.registry import ModelRegistry
from dicom_ai_node.inference.volume import Volume, VolumeError, load_volume, with_roles
from dicom_ai_node.logs import setup_logging
from dicom_ai_node.results.objects import Authorship, result_objects
from dicom_ai_node.results.store import store_result
from dicom_ai_node.results.uids import derive_uid
from dicom_ai_node.store.db import make_engine
from dicom_ai_node.store.files import DiskFull, InstanceStore
from dicom_ai_node.store.models import JobState
from dicom_ai_node.values import Found, StageTimes, StoredResult

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.engine = make_engine(config.database.url)
        self.store = InstanceStore(
            config.storage.path, config.storage.min_free_mb * 2**20, config.storage.results_floor_mb * 2**20
        )
        self.queue = JobQueue(self.engine, config.storage.path)
        self.models = ModelRegistry(config.models)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def run_once(self) -> ClaimedJob | None:
        """Claim and run one job; None when the queue is empty."""
        job = self.queue.claim(self.name, list(self.config.models), self.store.free_bytes())
        if job is not None:
            self.run(job)
        return job

    def run(self, job: ClaimedJob) -> None:
        times: dict[str, float] = {}
        device = None
        try:
            model = self.models.get(job.model)
            device = str(model.device)
            destinations = self._destinations(job)
            started = time.perf_counter()
            volume, sources = self._volume(job)
            times["load"] = time.perf_counter() - started
            started = time.perf_counter()
            prediction = model.predict(volume)
            times["inference"] = time.perf_counter() - started
            started = time.perf_counter()
            results, found, left_out = self._write_results(job, volume, sources, prediction, model, destinations)
            times["write"] = time.perf_counter() - started
        except VolumeError as exc:
            log.warning("job %d (%s) skipped: %s", job.id, job.model, exc)
            self.queue.fail(job, JobState.SKIPPED, f"series cannot form a volume: {exc}", StageTimes(**times), device)
            return
        except DiskFull as exc:
            log.warning("job %d (%s) waits for disk space: %s", job.id, job.model, exc.strerror)
            self.queue.wait_for_space(job, exc.strerror or str(exc), exc.needed_free_bytes, StageTimes(**times), device)
            return
        except ModelUnavailable as exc:
            log.error("job %d failed: %s", job.id, exc)
            self.queue.fail(job, JobState.FAILED, str(exc), StageTimes(**times), device)
            return
        except Exception as exc:  # a model or writer bug must fail this job, not the worker
            log.exception("job %d (%s) failed", job.id, job.model)
            self.queue.fail(job, JobState.FAILED, f"{type(exc).__name__}: {exc}", StageTimes(**times), device)
            return
        # A destination none of whose outputs this job made gets no delivery (e.g. "gsps" for a classification).
        made = {result.kind for result in results}
        receiving = [name for name in destinations
                     if made & {OUTPUT_KINDS[output] for output in self.config.outputs_of(name)}]
        self.queue.finish(job, results, StageTimes(**times), device, model.version, receiving, found, left_out)
        log.info(
            "job %d (%s) done: %s; load %.2f s, inference %.2f s, write %.2f s",
            job.id, job.model, found.summary, times["load"], times["inference"], times["write"],
        )

    def _volume(self, job: ClaimedJob) -> tuple[Volume, list[str]]:
        """The job's series; for a study route's job, with a channel per role its model reads, on that grid.  With
        the SOP Instance UIDs of every instance it read, which its results' UIDs derive from: a study's job run
        again on other series makes new objects."""
        reference = load_volume(job.paths)
        sources = [frame.sop_instance_uid for frame in reference.frames]
        if not job.inputs:
            return reference, sources
        roles = getattr(self.config.models[job.model], "inputs", [])
        loaded: dict[str, Volume | None] = {}
        for role in roles:
            paths = job.inputs.get(role)
            try:
                loaded[role] = None if paths is None else (reference if paths == job.paths else load_volume(paths))
            except VolumeError as exc:
                raise VolumeError(f"its {role} series: {exc}") from exc
        sources += sorted(frame.sop_instance_uid for volume in loaded.values()
                          if volume is not None and volume is not reference
                          for frame in volume.frames)
        return with_roles(reference, loaded), sources  # a role missing (processed without it): zeros

    def _destinations(self, job: ClaimedJob) -> list[str]:
        """Where the job's results go: as decided when its series was routed.

        A job queued before jobs stored their destinations has none: it takes its route's current ones.
        """
        if job.destinations is not None:
            return list(job.destinations)
        route = self.config.route(job.route)
        if route is None:
            log.warning("job %d (%s) was queued before jobs stored their destinations, and its route %r is no "
                        "longer configured: its results are not delivered (send them with: dicom-ai-node resend %s "
                        "--to DESTINATION)", job.id, job.model, job.route, job.study_instance_uid)
            return []
        return list(route.destinations)

    def _write_results(
        self, job: ClaimedJob, volume: Volume, sources: list[str], prediction: Prediction, model: Model,
        destinations: list[str],
    ) -> tuple[list[StoredResult], Found, list[str]]:
        """Make the result objects of the prediction (results/objects.py) for what the job's destinations
        receive, and store them; with what the model found, and what was left out and why."""
        settings = self.config.models[job.model]
        identity = result_identity(model, settings)
        authorship = Authorship(
            uid=lambda kind: derive_uid(kind, model.name, identity, sources),
            model_name=f"{model.name} {model.version}",
            software_version=f"{__version__} {model.name} {model.version}",
            device_serial_number=self.config.node.ae_title,
        )
        outputs = {output for name in destinations for output in self.config.outputs_of(name)}
        made = result_objects(volume, prediction, authorship, outputs, labelmap=settings.seg_type == "labelmap",
                              seg_when_empty=settings.seg_when_empty)
        stored = [store_result(self.store, kind, dataset) for kind, dataset in made.objects]
        return stored, made.found, made.left_out

    def run_forever(self, stop: threading.Event, parent_pid: int | None = None) -> None:
        """Work until `stop`, or until the parent node died (e.g. kill -9): an orphan must not keep working."""
        log.info("worker %s ready (models: %s)", self.name, ", ".join(self.config.models))
        while not stop.is_set():
            self._report_loaded_models()
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("worker %s: the node process is gone; exiting", self.name)
                break
            try:
                busy = self.run_once() is not None
            except Exception:  # database unreachable: wait and try again, never exit
                log.exception("worker %s: could not claim a job", self.name)
                busy = False
            if not busy:
                stop.wait(self.config.workers.poll_seconds)
        self._status_path.unlink(missing_ok=True)
        self.engine.dispose()

    @property
    def _status_path(self) -> Path:
        return worker_status_folder(self.config) / f"{self.name.replace(':', '-')}.json"

    def _report_loaded_models(self) -> None:
        """Tell `dicom-ai-node models` which models this worker holds warm (a file beside the storage)."""
        status = {"worker": self.name, "models": self.models.loaded(), "updated_at": time.time()}
        try:
            self._status_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self._status_path.with_suffix(".tmp")
            temporary.write_text(json.dumps(status))
            temporary.replace(self._status_path)
        except OSError:  # informational only: never stop a worker over it
            log.debug("could not write %s", self._status_path, exc_info=True)


def worker_status_folder(config: Config) -> Path:
    return config.storage.path / ".workers"


def loaded_models(config: Config, fresh_seconds: float = 60.0) -> dict[str, list[str]]:
    """Model name -> ["host:pid (device)", ...] over the workers that reported recently."""
    held: dict[str, list[str]] = {}
    for path in sorted(worker_status_folder(config).glob("*.json")):
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if time.time() - status.get("updated_at", 0) > fresh_seconds:
            continue  # a worker that stopped or died
        for name, device in status.get("models", {}).items():
            held.setdefault(name, []).append(f"{status['worker']} ({device})")
    return held


def worker_main(config_path: Path | None, parent_pid: int | None = None) -> None:
    """Entry point of a worker process; `parent_pid` is the node that started it, if any."""
    config = load_config(config_path)
    setup_logging(config.logging.level, config.logging.file, config.logging.max_mb, config.logging.backups)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    Worker(config).run_forever(stop, parent_pid)

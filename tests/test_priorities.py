"""Priorities (issue 12, item 3): a stroke CT does not wait behind routine work.

Routes give their jobs a priority and an admin can raise (or lower) one study's with `prioritize`; workers take
the most urgent queued job first, then the oldest, and deliveries of urgent results go first too.  The queue is
filled while no worker runs, so which job a real worker process takes first is not a matter of timing.
"""

from __future__ import annotations

import subprocess
import sys

import pydicom
import requests
from conftest import PEER_ENV, storescu
from sqlalchemy import update
from test_delivery_window import _job_of_series
from test_web import root, web_settings

from dicom_ai_node.config import DeliverySection
from dicom_ai_node.delivery.queue import DeliveryQueue, _queue
from dicom_ai_node.phantoms import CTPhantom
from dicom_ai_node.store.models import Job, Priority

ROUTES = [
    {"name": "stroke", "modality": "CT", "series_description": "stroke", "priority": "stat", "models": ["ct-tissue"]},
    {"name": "ct", "modality": "CT", "min_slices": 3, "models": ["ct-tissue"]},
]


def _send(node, tmp_path, name: str, description: str | None = None) -> str:
    phantom = CTPhantom(slices=12, rows=64, columns=64, pixel_spacing=(6.0, 6.0), slice_spacing=10.0)
    paths = phantom.write(tmp_path / name)
    for path in paths if description else ():
        dataset = pydicom.dcmread(path)
        dataset.SeriesDescription = description
        dataset.save_as(path)
    assert storescu(node.port, *paths).returncode == 0
    return phantom.study_uid


def test_the_most_urgent_queued_job_runs_first_then_the_oldest(node_factory, tmp_path):
    node = node_factory(routes=ROUTES, web=web_settings(allow_anonymous_metrics=True))  # no worker: jobs queue up
    node.start()
    routine = [_send(node, tmp_path, f"routine{n}") for n in range(4)]
    node.wait_for(lambda: len(node.json("jobs", "--state", "queued")) == 4, timeout=60, what="4 routine jobs")
    stroke = _send(node, tmp_path, "stroke", description="CT HEAD STROKE PROTOCOL")
    node.wait_for(lambda: len(node.json("jobs", "--state", "queued")) == 5, timeout=60, what="the stroke job")
    assert "study" in node.cli("prioritize", routine[2][:-2], "--priority", "high").stdout  # a unique UID prefix

    queued = {job["StudyInstanceUID"]: job for job in node.json("jobs")}
    assert queued[stroke]["priority"] == "stat" and queued[routine[2]]["priority"] == "high"
    assert {queued[uid]["priority"] for uid in (routine[0], routine[1], routine[3])} == {"routine"}
    waits = node.json("status")["jobs_by_priority"]
    assert [(name, waits[name]["queued"]) for name in waits] == [("stat", 1), ("high", 1), ("routine", 3), ("low", 0)]
    (prioritized,) = [e for e in node.json("events", "--study", routine[2]) if e["kind"] == "prioritized"]
    assert "high" in prioritized["message"] and "1 queued job" in prioritized["message"]
    metrics = requests.get(root(node) + "/metrics", timeout=10).text
    for name, count in (("stat", 1), ("high", 1), ("routine", 3), ("low", 0)):
        assert f'dicom_ai_node_jobs_queued{{priority="{name}"}} {count}.0' in metrics

    worker = subprocess.Popen([sys.executable, "-m", "dicom_ai_node", "worker", "--config", str(node.config_path)],
                              env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        done = node.wait_for(lambda: (jobs := node.json("jobs", "--state", "done")) and len(jobs) == 5 and jobs,
                             timeout=180, what="5 jobs done")
    finally:
        worker.kill()
        worker.wait()
    started = [job["StudyInstanceUID"] for job in sorted(done, key=lambda job: job["started_at"])]
    assert started == [stroke, routine[2], routine[0], routine[1], routine[3]]
    waits = node.json("status")["jobs_by_priority"]
    assert waits["stat"]["started_last_hour"] == 1 and waits["routine"]["started_last_hour"] == 3
    assert waits["stat"]["mean_wait_seconds_last_hour"] < waits["routine"]["mean_wait_seconds_last_hour"]


def test_a_study_prioritized_before_its_series_arrive_is_urgent_when_they_do(node_factory, tmp_path):
    """Jobs routed after `prioritize` take the study's priority, not the route's; `--priority routine` puts the
    study back in line for what comes next."""
    node = node_factory(routes=ROUTES)
    node.start()
    phantom = CTPhantom(slices=12, rows=64, columns=64, pixel_spacing=(6.0, 6.0), slice_spacing=10.0)
    paths = phantom.write(tmp_path / "first")
    assert storescu(node.port, *paths[:1]).returncode == 0  # the study exists as soon as an instance arrives
    node.wait_for(lambda: node.json("studies"), what="the study")
    node.cli("prioritize", phantom.study_uid)
    assert storescu(node.port, *paths[1:]).returncode == 0
    (job,) = node.wait_for(lambda: node.json("jobs", "--state", "queued"), timeout=60, what="its job")
    assert job["priority"] == "stat"
    node.cli("prioritize", phantom.study_uid, "--priority", "low")
    (job,) = node.json("jobs")
    assert job["priority"] == "low"
    missing = node.cli("prioritize", "9.9.9", check=False)
    assert missing.returncode != 0 and "no study 9.9.9" in missing.stderr


def test_deliveries_of_urgent_results_go_first(engine, tmp_path):
    """Of the deliveries due, those of the most urgent jobs are claimed first, though they were queued last."""
    queue = DeliveryQueue(engine, tmp_path, DeliverySection())
    with engine.begin() as connection:
        jobs = [_job_of_series(connection, f"1.2.3.{n}", "CT1") for n in range(4)]
        connection.execute(update(Job).where(Job.id == jobs[3]).values(priority=Priority.STAT.value))
        connection.execute(update(Job).where(Job.id == jobs[1]).values(priority=Priority.LOW.value))
        for job in jobs:
            _queue(connection, job, "pacs")
    claimed = [queue.claim_due(1)[0].study_instance_uid for _ in jobs]
    assert claimed == ["1.2.3.3", "1.2.3.0", "1.2.3.2", "1.2.3.1"]

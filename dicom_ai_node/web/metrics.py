"""Prometheus metrics, read from the database at scrape time.

The database already holds what an admin wants to graph (instances per sender,
series states, job timings, delivery attempts), whichever process or way in
produced it, and it survives restarts; so most metrics are computed per scrape
instead of counted in this process.  Only HTTP-side events (STOW-RS outcomes)
are in-process counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, case, func, select

from dicom_ai_node.store.models import Delivery, DeliveryState, Instance, Job, JobState, Series, SeriesState
from dicom_ai_node.store.queries import job_waits
from dicom_ai_node.values import Sender

_WAITING = (DeliveryState.PENDING.value, DeliveryState.FAILED.value)
JOB_SECONDS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


# Refusals on the DICOM port since the node started, by kind (ingest/admission.py counts them).
DicomRefusals = Callable[[], Mapping[str, int]]


class Metrics:
    """The registry served at /metrics: database collector, DICOM port refusals and STOW-RS counters."""

    def __init__(self, engine: Engine, dicom_refusals: DicomRefusals = dict) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(DatabaseCollector(engine))
        self.registry.register(RefusalCollector(dicom_refusals))
        self._stow_instances = Counter(
            "dicom_ai_node_stow_instances",
            "Instances in STOW-RS requests since the node started, by client and outcome",
            ["client", "outcome"],
            registry=self.registry,
        )
        self._stow_bytes = Counter(
            "dicom_ai_node_stow_bytes",
            "Bytes of instances newly stored through STOW-RS since the node started, by client",
            ["client"],
            registry=self.registry,
        )

    def stow_instance(self, sender: Sender, outcome: str, size: int) -> None:
        client = sender.ae_title or "anonymous"
        self._stow_instances.labels(client, outcome).inc()
        if size:
            self._stow_bytes.labels(client).inc(size)


class RefusalCollector(Collector):
    def __init__(self, refusals: DicomRefusals) -> None:
        self.refusals = refusals

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "dicom_ai_node_dicom_refusals",
            "Connections and associations refused on the DICOM port since the node started, by kind "
            "(association-limit, connection-evicted, tls-handshake-failed)",
            labels=["kind"],
        )
        for kind, count in sorted(self.refusals().items()):
            family.add_metric([kind], count)
        yield family


class DatabaseCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        with self.engine.connect() as connection:
            received = connection.execute(
                select(
                    Instance.calling_ae_title,
                    Instance.source,
                    func.count(),
                    func.coalesce(func.sum(Instance.file_size), 0),
                ).group_by(Instance.calling_ae_title, Instance.source)
            ).all()
            series = dict(connection.execute(select(Series.state, func.count()).group_by(Series.state)).all())
            jobs = dict(connection.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            deliveries = connection.execute(
                select(
                    Delivery.destination,
                    func.coalesce(func.sum(Delivery.attempts), 0),
                    func.sum(case((Delivery.state == DeliveryState.DELIVERED.value, 1), else_=0)),
                    func.sum(case((Delivery.state == DeliveryState.SENDING.value, 1), else_=0)),
                    func.sum(case((Delivery.state == DeliveryState.DEAD.value, 1), else_=0)),
                    func.sum(case((Delivery.state.in_(_WAITING), 1), else_=0)),
                ).group_by(Delivery.destination)
            ).all()
            histograms = {stage: connection.execute(_histogram_query(column)).all() for stage, column in _stages()}
        waiting = job_waits(self.engine)

        instances = GaugeMetricFamily(
            "dicom_ai_node_instances_stored", "Instances stored, by calling AE title (or web client) and way in",
            labels=["calling_ae_title", "source"],
        )
        stored_bytes = GaugeMetricFamily(
            "dicom_ai_node_bytes_stored", "Bytes of instances stored, by calling AE title (or web client) and way in",
            labels=["calling_ae_title", "source"],
        )
        for calling, source, count, size in received:
            instances.add_metric([calling or "", source], count)
            stored_bytes.add_metric([calling or "", source], int(size))
        yield instances
        yield stored_bytes

        by_state = GaugeMetricFamily("dicom_ai_node_series", "Series by state", labels=["state"])
        for state in SeriesState:
            by_state.add_metric([state.value], series.get(state.value, 0))
        yield by_state

        job_states = GaugeMetricFamily("dicom_ai_node_jobs", "Jobs by state", labels=["state"])
        for state in JobState:
            job_states.add_metric([state.value], jobs.get(state.value, 0))
        yield job_states
        yield GaugeMetricFamily(
            "dicom_ai_node_job_queue_depth", "Jobs waiting for a worker", value=jobs.get(JobState.QUEUED.value, 0)
        )
        depth = GaugeMetricFamily("dicom_ai_node_jobs_queued", "Jobs waiting for a worker, by priority",
                                  labels=["priority"])
        oldest = GaugeMetricFamily("dicom_ai_node_job_oldest_wait_seconds",
                                   "How long the oldest queued job of each priority has waited", labels=["priority"])
        for priority, waits in waiting.items():
            depth.add_metric([priority], waits["queued"])
            oldest.add_metric([priority], waits["oldest_queued_seconds"] or 0)
        yield depth
        yield oldest

        attempts = GaugeMetricFamily(
            "dicom_ai_node_delivery_attempts", "Send attempts of current deliveries, by destination",
            labels=["destination"],
        )
        failures = GaugeMetricFamily(
            "dicom_ai_node_delivery_failed_attempts", "Send attempts that failed, by destination",
            labels=["destination"],
        )
        dead = GaugeMetricFamily(
            "dicom_ai_node_deliveries_dead", "Deliveries given up (need `retry`), by destination",
            labels=["destination"],
        )
        waiting = GaugeMetricFamily(
            "dicom_ai_node_delivery_queue_depth", "Deliveries waiting for their next attempt, by destination",
            labels=["destination"],
        )
        for destination, total, delivered, sending, gave_up, queued in deliveries:
            attempts.add_metric([destination], total)
            failures.add_metric([destination], max(0, total - delivered - sending))
            dead.add_metric([destination], gave_up)
            waiting.add_metric([destination], queued)
        yield from (attempts, failures, dead, waiting)

        durations = HistogramMetricFamily(
            "dicom_ai_node_job_seconds", "Durations of finished jobs, by model and stage", labels=["model", "stage"]
        )
        for stage, rows in histograms.items():
            for model, count, total, *cumulative in rows:
                buckets = [(str(bound), n) for bound, n in zip(JOB_SECONDS_BUCKETS, cumulative)]
                durations.add_metric([model, stage], buckets + [("+Inf", count)], sum_value=float(total or 0))
        yield durations


def _stages():
    total = func.coalesce(Job.load_seconds, 0) + Job.inference_seconds + func.coalesce(Job.write_seconds, 0)
    return (
        ("load", Job.load_seconds),
        ("inference", Job.inference_seconds),
        ("write", Job.write_seconds),
        ("total", total),
    )


def _histogram_query(column):
    """Per model: count, sum and the cumulative count per bucket, computed by the database."""
    return (
        select(
            Job.model,
            func.count(),
            func.sum(column),
            *(func.sum(case((column <= bound, 1), else_=0)) for bound in JOB_SECONDS_BUCKETS),
        )
        .where(Job.state == JobState.DONE.value, column.is_not(None))
        .group_by(Job.model)
    )

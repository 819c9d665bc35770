"""The catalogue of audit events: every kind the node writes, declared once, with its level.

As pynetdicom declares its events in one `events.py`, every stage takes its
words from here: the `events` table, `dicom-ai-node events`, the log and
`/metrics` (refusals by kind) all use these names, so a kind cannot be misspelt
in one place and an admin can look each one up.  Writing goes through
`store.index.insert_event` (inside the transaction of the state change it
records) or `Index.report` (the log line and the audit row with the same words;
it never raises, since the decision it records was already acted on).

This module imports nothing of the node's.
"""

from __future__ import annotations

import enum
import logging


class Level(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def logging_level(self) -> int:
        return {Level.INFO: logging.INFO, Level.WARNING: logging.WARNING, Level.ERROR: logging.ERROR}[self]


class EventKind(enum.StrEnum):
    # DICOM connections and associations refused (also /metrics' dicom_ai_node_dicom_refusals_total{kind})
    ASSOCIATION_REJECTED = "association-rejected"  # called AE title wrong, caller not in dimse.allowed_callers
    ASSOCIATION_LIMIT = "association-limit"  # dimse.max_associations or max_associations_per_host reached
    CONNECTION_EVICTED = "connection-evicted"  # idle without an A-ASSOCIATE-RQ while others waited
    PDU_INVALID = "pdu-invalid"  # an unknown PDU type, or one that cannot be decoded
    PDU_TOO_LONG = "pdu-too-long"  # longer than negotiated (or than 128 KiB before association)
    MESSAGE_TOO_LONG = "message-too-long"  # a DIMSE command or dataset over its limit
    STALLED = "stalled"  # a PDU did not arrive in time
    REQUEST_TIMEOUT = "request-timeout"  # no A-ASSOCIATE-RQ within dimse.acse_timeout_seconds
    TLS_HANDSHAKE_FAILED = "tls-handshake-failed"
    UNSUPPORTED_SOP_CLASS = "unsupported-sop-class"  # refused at negotiation
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported-transfer-syntax"

    # Instances (C-STORE, STOW-RS, Orthanc pull)
    RECEIVING = "receiving"  # the first instance of a new series
    STORE_FAILED = "store-failed"  # an instance refused with a failure status
    LATE_INSTANCE = "late-instance"  # arrived after its series completed: re-processing
    INSTANCE_RESTORED = "instance-restored"  # a re-sent copy replaced a lost file
    RESENT = "resent"  # a whole series sent again, nothing new
    SOURCE_STARTED = "source-started"  # an Orthanc change feed followed for the first time
    SOURCE_FAILED = "source-failed"
    NONSTANDARD_SOP_CLASS = "nonstandard-sop-class"  # a retired or private/unknown storage class stored
    INVALID_UID = "invalid-uid"  # stored with a UID that is not a valid UID: its file has a digest name

    # Studies pulled from a peer (`fetch`)
    FETCH_REQUESTED = "fetch-requested"  # an admin asked; how many studies were found and queued
    FETCH_DONE = "fetch-done"  # the peer moved the study (warning: some instances failed)
    FETCH_FAILED = "fetch-failed"

    # Series completion
    COMPLETE = "complete"
    SERIES_WAITING = "series-waiting"  # waits for refused instances to be re-sent
    SERIES_INCOMPLETE = "series-incomplete"  # completed without them after series.refused_wait_seconds
    RECEIVING_INTERRUPTED = "receiving-interrupted"  # the node stopped while a series arrived

    # Routing
    ROUTED = "routed"
    NOT_ROUTED = "not-routed"
    # Study routes: a study whose series fill a route's roles (the message names the signal and the series)
    STUDY_COMPLETE = "study-complete"  # every role arrived and went quiet, or processed without the missing ones
    STUDY_SKIPPED = "study-skipped"  # roles still missing at the route's deadline
    STUDY_WAITING = "study-waiting"  # roles still missing at the route's deadline; the route waits for them
    STUDY_REOPENED = "study-reopened"  # a series filled a role after the study was decided: decided again

    # Jobs (one per state a job ends in, as `job-<state>`)
    JOB_DONE = "job-done"
    JOB_FAILED = "job-failed"
    JOB_SKIPPED = "job-skipped"
    JOB_WAITING = "job-waiting"  # results wait for disk space
    JOB_INCOMPLETE = "job-incomplete"  # done, but a result a destination asked for could not be made (the reason)
    PRIORITIZED = "prioritized"  # an admin set a study's priority (`prioritize`)

    # Deliveries (one per state an attempt leaves, as `delivery-<state>`)
    DELIVERY_DELIVERED = "delivery-delivered"
    DELIVERY_FAILED = "delivery-failed"
    DELIVERY_DEAD = "delivery-dead"
    DELIVERY_RESUMED = "delivery-resumed"  # the destination answers again: waiting deliveries go now

    # Webhook calls ([webhooks], routes' `notify`)
    NOTIFICATION_SENT = "notification-sent"
    NOTIFICATION_FAILED = "notification-failed"  # retried with backoff
    NOTIFICATION_DEAD = "notification-dead"  # refused, or still failing after delivery.give_up_after_hours

    # Start-up repair and retention
    START_UP_CHECK = "start-up-check"
    INSTANCE_LOST = "instance-lost"  # a row whose file was never completed, removed at start-up
    PURGED = "purged"

    @classmethod
    def of_job(cls, state: str) -> EventKind:
        """The event a job ending in `state` writes."""
        return cls(f"job-{state}")

    @classmethod
    def of_delivery(cls, state: str) -> EventKind:
        """The event a delivery attempt leaving `state` writes."""
        return cls(f"delivery-{state}")

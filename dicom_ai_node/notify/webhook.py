"""One webhook call: the JSON body, signed with HMAC-SHA256, POSTed once; what the answer means for a retry.

The signature covers "<timestamp>.<body>" (as GitHub and Stripe sign theirs): a receiver recomputes it with the
shared secret, compares in constant time, and refuses a timestamp far from its clock, so a recorded call cannot
be replayed later.  The call's id (`X-DICOM-AI-Node-Notification`, also in the body) is the same on every retry:
a receiver that saw it already answers 2xx and does nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from urllib.parse import urlsplit

import requests

from dicom_ai_node.config import WebhookConfig
from dicom_ai_node.delivery.dicomweb import connection_problem, transient_http_status
from dicom_ai_node.notify.queue import ClaimedNotification
from dicom_ai_node.values import DeliveryOutcome

SIGNATURE_HEADER = "X-DICOM-AI-Node-Signature"
TIMESTAMP_HEADER = "X-DICOM-AI-Node-Timestamp"
EVENT_HEADER = "X-DICOM-AI-Node-Event"
ID_HEADER = "X-DICOM-AI-Node-Notification"


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """"sha256=" and the hex HMAC-SHA256 of "<timestamp>.<body>" under `secret`."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def call(name: str, webhook: WebhookConfig, notification: ClaimedNotification) -> DeliveryOutcome:
    """POST the notification to the webhook: 2xx is done; 408, 429, 5xx and no connection are retried; any other
    answer, or no secret to sign with, is permanent (retrying cannot change it)."""
    url = str(webhook.url)
    # Messages name the site only: a chat bridge's URL carries its token in the path or the query.
    parts = urlsplit(url)
    site = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    secret = os.environ.get(webhook.secret_env)
    if not secret:
        return DeliveryOutcome(False, True, f"webhooks.{name}: environment variable {webhook.secret_env} "
                                            "(secret_env) is not set, so the call cannot be signed")
    body = json.dumps(notification.payload, sort_keys=True, separators=(",", ":")).encode()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: signature(secret.encode(), timestamp, body),
        TIMESTAMP_HEADER: timestamp,
        EVENT_HEADER: notification.event.value,
        ID_HEADER: notification.payload["id"],
    }
    try:
        response = requests.post(url, data=body, headers=headers, timeout=webhook.timeout_seconds,
                                 allow_redirects=False)
    except requests.RequestException as exc:
        return DeliveryOutcome(False, False, f"POST {site}: {connection_problem(exc)}")
    status = f"HTTP {response.status_code}"
    response.close()
    if 200 <= response.status_code < 300:
        return DeliveryOutcome(True, False, "", status)
    return DeliveryOutcome(False, not transient_http_status(response.status_code),
                           f"POST {site}: {status} {response.reason or ''}".rstrip(), status)

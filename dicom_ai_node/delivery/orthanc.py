"""Orthanc's REST API (orthanc_api_client): POST each file to /instances in one HTTP session,
then put the configured labels on the studies they landed in.

Labels exist from Orthanc 1.12.0 on (Debian 12 ships 1.10.1, without them).  When
labels are configured the server's version is checked first, and an older Orthanc
is a permanent failure before anything is uploaded: delivering the objects without
the labels a workflow relies on would look like success and route nothing.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from pathlib import Path
from typing import Any

import requests
from orthanc_api_client import OrthancApiClient
from orthanc_api_client import exceptions as orthanc_errors
from requests.adapters import HTTPAdapter

from ..config import OrthancDestination
from ..values import DeliveryOutcome as Outcome
from .dicomweb import CredentialsError, connection_problem, http_credentials, http_probe, transient_http_status

log = logging.getLogger(__name__)

LABELS_SINCE = (1, 12, 0)


class _NoAnswer(Exception):
    """orthanc_api_client returned None (it does for failures it cannot translate) or not a JSON object."""


class _NoRetryAdapter(HTTPAdapter):
    """orthanc_api_client mounts an adapter that retries connection errors and HTTP 502/503 itself (and,
    once those retries run out, returns None instead of raising), and it sets no timeout.  The delivery
    queue owns retries and backoff, and a hung Orthanc must not hold a delivery thread forever."""

    def __init__(self, timeout: float) -> None:
        super().__init__(max_retries=0)
        self.timeout = timeout

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        return super().send(request, **kwargs)


class OrthancRestSender:
    def __init__(self, name: str, destination: OrthancDestination) -> None:
        self.name = name
        self.destination = destination
        self.url = destination.url.rstrip("/")

    def send(self, files: list[Path]) -> Outcome:
        try:
            auth, token = http_credentials(self.destination)
        except CredentialsError as exc:
            return Outcome(False, True, f"Orthanc at {self.url}: {exc}")
        user, password = auth or (None, None)
        client = OrthancApiClient(self.url, user=user, pwd=password, api_token=token)
        adapter = _NoRetryAdapter(self.destination.timeout_seconds)
        client._http_session.mount("http://", adapter)  # the client offers no public way to set these
        client._http_session.mount("https://", adapter)
        try:
            return self._send(client, files)
        except orthanc_errors.HttpError as exc:
            return self._http_error(exc)
        except orthanc_errors.TimeoutError:
            return Outcome(False, False, f"no answer from {self.url} within {self.destination.timeout_seconds:g} s")
        except orthanc_errors.ConnectionError as exc:
            return Outcome(False, False, f"cannot connect to {self.url}: {connection_problem(exc)}")
        except _NoAnswer as exc:
            return Outcome(False, False, f"Orthanc at {self.url}: {exc}")
        finally:
            client.close()

    def probe(self, timeout: float) -> bool | None:
        """GET /system, the cheapest call Orthanc answers with its own status: see http_probe."""
        return http_probe(self.url + "/system", self.destination, timeout, method="GET")

    def _send(self, client: OrthancApiClient, files: list[Path]) -> Outcome:
        if self.destination.labels:
            system = _answer(client.get("system"), "GET /system")
            version = str(system.get("Version", "?"))
            if not _at_least(version, LABELS_SINCE):
                return Outcome(
                    False,
                    True,
                    f"Orthanc at {self.url} is version {version}; labels ({', '.join(self.destination.labels)}) "
                    f"need Orthanc {'.'.join(map(str, LABELS_SINCE))} or newer: remove `labels` from the "
                    "destination or upgrade Orthanc",
                )
        studies: list[str] = []
        already = 0
        for path in files:
            try:
                data = path.read_bytes()
            except OSError as exc:
                return Outcome(False, True, f"cannot read {path}: {exc}")
            stored = _answer(client.post("instances", data=data), f"POST /instances ({path.name})")
            log.debug("%s: POST /instances %s -> %s", self.name, path.name, stored.get("Status"))
            if stored.get("Status") not in ("Success", "AlreadyStored"):
                return Outcome(
                    False,
                    True,
                    f"Orthanc at {self.url} did not store {path.name}: status {stored.get('Status')!r}"
                    " (a Lua or plugin filter may refuse it)",
                )
            already += stored["Status"] == "AlreadyStored"
            if stored.get("ParentStudy") and stored["ParentStudy"] not in studies:
                studies.append(stored["ParentStudy"])
        for study in studies:
            client.studies.add_labels(study, self.destination.labels)
        reason = f"{len(files)} object(s) stored on Orthanc at {self.url}"
        if already:
            reason += f" ({already} already there)"
        if self.destination.labels:
            reason += f", labelled {', '.join(self.destination.labels)}"
        return Outcome(True, False, reason, "HTTP 200")

    def _http_error(self, exc: orthanc_errors.HttpError) -> Outcome:
        status = int(exc.http_status_code or 0)
        transient = transient_http_status(status)
        detail = f"HTTP {status} {_phrase(status)}"
        if status in (401, 403):
            detail += " (check username + password_env or token_env)"
        elif isinstance(exc.msg, str) and exc.msg != str(status):  # the client puts the status code in msg for 404
            detail += f": {exc.msg}"
        return Outcome(
            False,
            not transient,
            f"Orthanc at {self.url} refused the request ({'transient' if transient else 'permanent'}): {detail}",
            f"HTTP {status}",
        )


def _answer(response: requests.Response | None, what: str) -> dict[str, Any]:
    if response is None:
        raise _NoAnswer(f"no usable answer to {what}")
    try:
        answer = response.json()
    except ValueError:
        raise _NoAnswer(f"the answer to {what} is not JSON") from None
    if not isinstance(answer, dict):
        raise _NoAnswer(f"unexpected answer to {what}: {answer!r:.200}")
    return answer


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _at_least(version: str, minimum: tuple[int, ...]) -> bool:
    """`mainline` builds are newer than any release."""
    if version.startswith("mainline"):
        return True
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    return numbers >= minimum

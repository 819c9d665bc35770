"""STOW-RS: all files of one send() in ONE multipart/related POST to {url}/studies.

A plain `requests` call rather than dicomweb-client's store_instances(): that one
takes pydicom datasets and re-encodes them (we send the stored files byte for byte),
retries on its own (the delivery queue owns retries and backoff), and raises on the
HTTP status before we could read the per-instance Failure Reasons that decide
whether a refusal is worth retrying.

The HTTP helpers here (credentials, connection-error wording, status classes) are
shared with the Orthanc REST sender.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import requests
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from ..config import DicomwebDestination, HttpDestination
from ..values import DeliveryOutcome as Outcome

log = logging.getLogger(__name__)

_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"
_RESOURCE_LIMITATION = 0x0213  # general status: the server is busy, like Out of Resources


class CredentialsError(Exception):
    """The destination names a secret that is not in the environment, or names it ambiguously."""


def http_credentials(destination: HttpDestination) -> tuple[tuple[str, str] | None, str | None]:
    """(basic auth, bearer token) from the environment variables the config names; never from the config itself."""
    if destination.token_env and destination.username:
        raise CredentialsError("set either username + password_env or token_env, not both")
    if destination.token_env:
        token = os.environ.get(destination.token_env)
        if not token:
            raise CredentialsError(f"environment variable {destination.token_env} (token_env) is not set")
        return None, token
    if destination.username:
        if not destination.password_env:
            raise CredentialsError("username is set but password_env is not")
        password = os.environ.get(destination.password_env)
        if password is None:
            raise CredentialsError(f"environment variable {destination.password_env} (password_env) is not set")
        return (destination.username, password), None
    return None, None


def connection_problem(exc: BaseException) -> str:
    """The innermost cause ("connection refused"), not urllib3's wrapper chain around it."""
    cause, seen = exc, {id(exc)}
    while True:
        reason = getattr(cause, "reason", None)
        inner = reason if isinstance(reason, BaseException) else cause.__cause__ or cause.__context__
        if inner is None and cause.args and isinstance(cause.args[0], BaseException):
            inner = cause.args[0]
        if inner is None or id(inner) in seen:
            break
        cause = inner
        seen.add(id(cause))
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return str(cause) or type(cause).__name__


def http_probe(url: str, destination: HttpDestination, timeout: float, method: str = "HEAD") -> bool | None:
    """Does the server at `url` answer, with the destination's credentials and TLS?  Any HTTP status below
    500 counts (401 and 404 too: the server is up, the send will tell the rest); 5xx (a proxy in front
    of a server that is down, or a server starting) and no connection do not.  None: cannot probe."""
    try:
        auth, token = http_credentials(destination)
    except CredentialsError:
        return None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = requests.request(method, url, auth=auth, headers=headers, timeout=timeout, allow_redirects=False)
    except requests.RequestException:
        return False
    response.close()
    return response.status_code < 500


def transient_http_status(status: int) -> bool:
    """Request timeout, rate limiting and server-side errors pass; other 4xx say the request itself is wrong."""
    return status in (408, 429) or status >= 500


def transient_failure_reason(code: int) -> bool:
    """Out of Resources (0xA7xx) or Resource Limitation may pass; any other Failure Reason will recur."""
    return 0xA700 <= code <= 0xA7FF or code == _RESOURCE_LIMITATION


class StowRsSender:
    def __init__(self, name: str, destination: DicomwebDestination) -> None:
        self.name = name
        self.destination = destination
        self.url = destination.url.rstrip("/") + "/studies"

    def send(self, files: list[Path]) -> Outcome:
        try:
            auth, token = http_credentials(self.destination)
        except CredentialsError as exc:
            return Outcome(False, True, f"STOW-RS to {self.url}: {exc}")
        try:
            uids = [_sop_instance_uid(path) for path in files]
            parts = [path.read_bytes() for path in files]
        except (OSError, InvalidDicomError, KeyError) as exc:
            return Outcome(False, True, f"cannot read a file to send: {exc}")
        if not files:
            return Outcome(True, False, "nothing to send")

        boundary = uuid.uuid4().hex
        body = (
            b"".join(
                b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), part) for part in parts
            )
            + b"--%s--\r\n" % boundary.encode()
        )
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            response = requests.post(
                self.url,
                data=body,
                headers=headers,
                auth=auth,
                timeout=self.destination.timeout_seconds,
                allow_redirects=False,  # a redirected POST turns into a GET; report the moved URL instead
            )
        except requests.Timeout:
            return Outcome(False, False, f"no answer from {self.url} within {self.destination.timeout_seconds:g} s")
        except requests.RequestException as exc:
            return Outcome(False, False, f"cannot connect to {self.url}: {connection_problem(exc)}")
        log.debug("%s: STOW-RS of %d object(s) -> HTTP %d", self.name, len(files), response.status_code)
        return self._outcome(response, uids)

    def probe(self, timeout: float) -> bool | None:
        """HEAD of the DICOMweb root: see http_probe."""
        return http_probe(self.destination.url, self.destination, timeout)

    def _outcome(self, response: requests.Response, uids: list[str]) -> Outcome:
        status = response.status_code
        remote = f"HTTP {status}"
        answer = _json(response)
        failed = _items(answer, _FAILED_SOP_SEQUENCE)
        if failed:  # the per-instance reasons decide, whatever the HTTP status (200, 202, 400, 409)
            codes = [_code(item, _FAILURE_REASON) for item in failed]
            permanent = not all(code is not None and transient_failure_reason(code) for code in codes)
            listed = ", ".join(
                f"{_uid(item)} (Failure Reason {'unknown' if code is None else f'0x{code:04X}'})"
                for item, code in zip(failed, codes)
            )
            return Outcome(
                False,
                permanent,
                f"STOW-RS to {self.url}: {len(failed)} of {len(uids)} object(s) refused "
                f"({'permanent' if permanent else 'transient'}): {listed}",
                remote,
            )
        if 200 <= status < 300:
            listed = answer is not None and _REFERENCED_SOP_SEQUENCE in answer
            stored = {_uid(item) for item in _items(answer, _REFERENCED_SOP_SEQUENCE)}
            missing = [uid for uid in uids if uid not in stored]
            if listed and missing:
                # Some servers (older Orthanc DICOMweb plugins among them) drop a part they cannot parse.
                return Outcome(
                    False,
                    True,
                    f"STOW-RS to {self.url}: HTTP {status} but the answer does not list {', '.join(missing)}",
                    remote,
                )
            warnings = [
                f"{_uid(item)}: 0x{code:04X}"
                for item in _items(answer, _REFERENCED_SOP_SEQUENCE)
                if (code := _code(item, _WARNING_REASON)) is not None
            ]
            reason = f"{len(uids)} object(s) stored on {self.url} in one request"
            if not listed:
                reason += " (the server did not list the stored instances)"
            if warnings:
                reason += " with warnings: " + "; ".join(warnings)
            return Outcome(True, False, reason, remote)
        transient = transient_http_status(status)
        detail = f"{status} {response.reason}".strip()
        if 300 <= status < 400:
            detail += f" to {response.headers.get('Location', '?')}"
        elif status in (401, 403):
            detail += " (check username + password_env or token_env)"
        elif answer is None and response.text.strip():
            detail += f": {' '.join(response.text.split())[:200]}"
        return Outcome(
            False,
            not transient,
            f"STOW-RS to {self.url} failed ({'transient' if transient else 'permanent'}): HTTP {detail}",
            remote,
        )


def _sop_instance_uid(path: Path) -> str:
    return str(read_file_meta_info(path)["MediaStorageSOPInstanceUID"].value)


def _json(response: requests.Response) -> dict[str, Any] | None:
    """The DICOM JSON response dataset, None if the server sent none (or XML, which we do not ask for)."""
    try:
        answer = response.json()
    except ValueError:
        return None
    if isinstance(answer, list) and len(answer) == 1:  # some servers wrap the dataset in an array
        answer = answer[0]
    return answer if isinstance(answer, dict) else None


def _items(answer: dict[str, Any] | None, tag: str) -> list[dict[str, Any]]:
    if answer is None:
        return []
    return [item for item in answer.get(tag, {}).get("Value", []) if isinstance(item, dict)]


def _uid(item: dict[str, Any]) -> str:
    return str(item.get(_REFERENCED_SOP_INSTANCE_UID, {}).get("Value", ["?"])[0])


def _code(item: dict[str, Any], tag: str) -> int | None:
    """A US value; some servers send it as a numeric string."""
    try:
        return int(item[tag]["Value"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None

"""The ASGI application: DICOMweb under `web.base_path`, probes and metrics at the root."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine, text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dicom_ai_node.config import Config, WebSection
from dicom_ai_node.errors import NodeError
from dicom_ai_node.ingest.contexts import StoragePolicy
from dicom_ai_node.ingest.parse import MAX_UID_LENGTH
from dicom_ai_node.store.files import InstanceStore
from dicom_ai_node.store.index import Index
from dicom_ai_node.values import Sender
from dicom_ai_node.web.bulkdata import parse_bulk_path
from dicom_ai_node.web.dicom_json import DICOM_JSON
from dicom_ai_node.web.metrics import DicomRefusals, Metrics
from dicom_ai_node.web.problem import HTTPProblem, problem_response
from dicom_ai_node.web.qido import LEVEL_NAMES, Qido, Query
from dicom_ai_node.web.rendered import (
    RenderOptions,
    acceptable,
    negotiate,
    rendered_frames,
    rendered_response,
    thumbnail_frame,
)
from dicom_ai_node.web.stow import Stow, check_stow_content_type, stow_response
from dicom_ai_node.web.transcode import stored_pixels
from dicom_ai_node.web.wado import (
    Archive,
    bulkdata_response,
    frame_numbers,
    frames_response,
    metadata_response,
    retrieve_response,
)

log = logging.getLogger(__name__)

# Longest URL served, bytes: a QIDO query listing a hundred UIDs fits, and so does a frame list of 1500 frames.
# A UID in a URL: printable ASCII without '/' and '\\' (never control characters), as long as a UID may be.
_URL_UID = re.compile(rf"(?:(?![/\\])[!-~]){{1,{MAX_UID_LENGTH}}}")
_MAX_URL = 8192


class AuthError(NodeError):
    """A client's credential cannot be loaded (its environment variable is unset): the node does not start."""


@dataclass(frozen=True)
class Caller:
    name: str | None  # None: anonymous
    read: bool
    write: bool


class Authenticator:
    """Bearer tokens and basic users from `web.clients`; compared in constant time."""

    def __init__(self, settings: WebSection, environ: dict[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.settings = settings
        self._tokens: list[tuple[bytes, Caller]] = []  # sha256 digests
        self._passwords: dict[str, tuple[bytes, Caller]] = {}
        for client in settings.clients:
            caller = Caller(client.name, client.read, client.write)
            env = client.token_env or client.password_env
            secret = environ.get(env) if env else None
            if env and not secret:
                kind = "token_env" if client.token_env else "password_env"
                raise AuthError(
                    f"cannot start: web client {client.name!r} takes its secret from the environment variable {env} "
                    f"(web.clients {kind}), which is not set or empty; set it for the node or remove the client"
                )
            if client.token_sha256:
                self._tokens.append((bytes.fromhex(client.token_sha256), caller))
            elif client.token_env:
                self._tokens.append((_sha256(secret or ""), caller))
            else:
                self._passwords[client.name] = (_sha256(secret or ""), caller)

    def caller(self, request: Request, write: bool) -> Caller:
        """Who is calling; raises 401 (no or bad credential) or 403 (a client storing or reading without leave)."""
        allowed = self.settings.allow_anonymous_write if write else self.settings.allow_anonymous_read
        caller = self.identify(request, anonymous=allowed)
        if write and not caller.write:
            raise HTTPProblem(403, f"client {caller.name!r} may not store")
        if not write and not caller.read:
            raise HTTPProblem(403, f"client {caller.name!r} may not search or retrieve")
        return caller

    def identify(self, request: Request, anonymous: bool) -> Caller:
        """The client whose credential the request carries; without one, anonymous if allowed; else 401."""
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        scheme = scheme.lower()
        if not header:
            if anonymous:
                return Caller(None, True, True)
            raise HTTPProblem(401, "authentication required (Bearer token or Basic user)")
        caller = None
        if scheme == "bearer":
            digest = _sha256(credential.strip())
            for known, candidate in self._tokens:
                if hmac.compare_digest(known, digest):
                    caller = candidate
        elif scheme == "basic":
            caller = self._basic(credential.strip())
        if caller is None:
            raise HTTPProblem(401, "invalid credentials")
        return caller

    def _basic(self, credential: str) -> Caller | None:
        try:
            user, _, password = base64.b64decode(credential, validate=True).decode().partition(":")
        except ValueError:
            return None
        known = self._passwords.get(user)
        if known is None:
            hmac.compare_digest(_sha256(password), _sha256(""))  # same work whether the user exists or not
            return None
        return known[1] if hmac.compare_digest(known[0], _sha256(password)) else None


def _sha256(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def create_app(
    config: Config,
    engine: Engine,
    index: Index | None = None,
    store: InstanceStore | None = None,
    dicom_refusals: DicomRefusals = dict,
) -> Starlette:
    """The app; pass the node's Index so STOW-RS and C-STORE share its SQLite write lock."""
    settings: WebSection = config.web
    index = index or Index(engine)
    store = store or InstanceStore(config.storage.path, config.storage.min_free_mb * 2**20)
    auth = Authenticator(settings)
    metrics = Metrics(engine, dicom_refusals)
    policy = StoragePolicy(config.storage.accept_retired_sop_classes, config.storage.accept_unknown_sop_classes)
    stow = Stow(index, store, metrics, config.storage.max_inflated_mb * 2**20, policy)
    qido = Qido(engine, store.root)
    archive = Archive(engine, store.root)

    def base_url(request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}{settings.base_path}"

    def uids(request: Request) -> dict[str, str]:
        """The study, series and instance UIDs of the URL, as stored; 400 for one no stored instance can have.

        Instances whose UIDs are not valid UIDs are stored and indexed as sent, so
        a URL may name them (percent-decoded by Starlette); they are only looked
        up in the index, never turned into a path.
        """
        params = {key: value for key, value in request.path_params.items() if key in ("study", "series", "instance")}
        for key, value in params.items():
            if not _URL_UID.fullmatch(value):
                raise HTTPProblem(
                    400,
                    f"the {key} UID in the URL is not a UID as the node stores them (at most {MAX_UID_LENGTH} "
                    f"printable characters, no '/' or '\\'): {value[:80]!r}",
                )
        return params

    def sender(request: Request, caller: Caller) -> Sender:
        return Sender(ae_title=caller.name, host=request.client.host if request.client else None, source="stow")

    async def store_instances(request: Request) -> Response:
        caller = auth.caller(request, write=True)
        study_uid = uids(request).get("study")
        boundary = check_stow_content_type(request.headers.get("content-type"))
        with stow.upload(boundary, sender(request, caller), study_uid) as upload:
            try:
                await upload.receive(request, settings.max_request_mb * 2**20)
            except ClientDisconnect:
                log.warning("STOW-RS from %s: the client went away before the body was complete; nothing stored",
                            sender(request, caller))
                raise HTTPProblem(400, "the body ended early (client disconnected); nothing stored") from None
            result = await run_in_threadpool(stow.store, upload, base_url(request))
        log.info("STOW-RS from %s: %d stored, %d failed", sender(request, caller), len(result.stored),
                 len(result.failed))
        return stow_response(result, base_url(request), study_uid)

    def search(level: str):
        search_level = {name: number for number, name in LEVEL_NAMES.items()}[level]

        async def endpoint(request: Request) -> Response:
            auth.caller(request, write=False)
            query = Query.from_request(request, settings.qido_max_results, search_level)
            params = uids(request)
            if level == "studies":
                found = await run_in_threadpool(qido.search_studies, query, base_url(request))
            elif level == "series":
                found = await run_in_threadpool(qido.search_series, query, base_url(request), params.get("study"))
            else:
                found = await run_in_threadpool(
                    qido.search_instances, query, base_url(request), params.get("study"), params.get("series")
                )
            warning = query.warning(base_url(request))
            return JSONResponse(found, media_type=DICOM_JSON, headers={"Warning": warning} if warning else None)

        return endpoint

    async def retrieve(request: Request) -> Response:
        auth.caller(request, write=False)
        params = uids(request)
        paths = await run_in_threadpool(archive.files, params["study"], params.get("series"), params.get("instance"))
        return await run_in_threadpool(retrieve_response, request, paths)

    async def metadata(request: Request) -> Response:
        auth.caller(request, write=False)
        params = uids(request)
        found = await run_in_threadpool(archive.instances, params["study"], params.get("series"),
                                        params.get("instance"))
        if not found:
            raise HTTPProblem(404, "no such study, series or instance")
        urls = [f"{base_url(request)}/studies/{study}/series/{series}/instances/{sop}" for study, series, sop, _ in found]
        return metadata_response([path for *_, path in found], urls)

    async def instance_file(request: Request) -> Path:
        """The stored file of the instance the URL names, for a reader allowed to retrieve; 404 if unknown."""
        auth.caller(request, write=False)
        params = uids(request)
        paths = await run_in_threadpool(archive.files, params["study"], params["series"], params["instance"])
        if not paths:
            raise HTTPProblem(404, "no such instance")
        return paths[0]

    async def retrieve_frames(request: Request) -> Response:
        path = await instance_file(request)
        numbers = frame_numbers(request.path_params["frames"])
        pixels = await run_in_threadpool(stored_pixels, path)
        return await run_in_threadpool(frames_response, request, pixels, numbers)

    async def retrieve_bulkdata(request: Request) -> Response:
        path = await instance_file(request)
        steps = parse_bulk_path(request.path_params["path"])
        return await run_in_threadpool(bulkdata_response, request, path, steps, str(request.url))

    def rendering(thumbnail: bool):
        """Retrieve Rendered (PS3.18 §10.4.1.1.3) or Thumbnail (§10.4.1.1.4) of a study, series, instance or frames."""

        async def endpoint(request: Request) -> Response:
            auth.caller(request, write=False)
            params = uids(request)
            options = RenderOptions.from_query(request.query_params, thumbnail=thumbnail)
            numbers = frame_numbers(request.path_params["frames"]) if "frames" in request.path_params else None
            accept = acceptable(request.query_params, request.headers.get("accept"))
            target = (archive.files, params["study"], params.get("series"), params.get("instance"), numbers)
            if thumbnail:
                refs = [await run_in_threadpool(thumbnail_frame, *target)]
            else:
                refs = await run_in_threadpool(rendered_frames, *target)
            return await run_in_threadpool(rendered_response, refs, options, negotiate(accept, len(refs)))

        return endpoint

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        checks = await run_in_threadpool(_readiness, engine, store)
        ready = all(value == "ok" for value in checks.values())
        return JSONResponse(checks, status_code=200 if ready else 503)

    async def prometheus(request: Request) -> Response:
        # Metrics name calling AE titles and web clients: a client's credential is needed, as for DICOMweb.
        auth.identify(request, anonymous=settings.allow_anonymous_metrics)
        return Response(await run_in_threadpool(generate_latest, metrics.registry), media_type=CONTENT_TYPE_LATEST)

    base = settings.base_path
    study, series, instance = "/studies/{study}", "/studies/{study}/series/{series}", (
        "/studies/{study}/series/{series}/instances/{instance}")
    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", prometheus),
        Route(f"{base}/studies", store_instances, methods=["POST"]),
        Route(f"{base}{study}", store_instances, methods=["POST"]),
        Route(f"{base}/studies", search("studies"), methods=["GET"]),
        Route(f"{base}/series", search("series"), methods=["GET"]),
        Route(f"{base}/instances", search("instances"), methods=["GET"]),
        Route(f"{base}{study}/series", search("series"), methods=["GET"]),
        Route(f"{base}{study}/instances", search("instances"), methods=["GET"]),
        Route(f"{base}{series}/instances", search("instances"), methods=["GET"]),
        Route(f"{base}{study}", retrieve, methods=["GET"]),
        Route(f"{base}{series}", retrieve, methods=["GET"]),
        Route(f"{base}{instance}", retrieve, methods=["GET"]),
        Route(f"{base}{study}/metadata", metadata, methods=["GET"]),
        Route(f"{base}{series}/metadata", metadata, methods=["GET"]),
        Route(f"{base}{instance}/metadata", metadata, methods=["GET"]),
        Route(f"{base}{instance}/frames/{{frames}}", retrieve_frames, methods=["GET"]),
        Route(f"{base}{instance}/bulkdata/{{path:path}}", retrieve_bulkdata, methods=["GET"]),
        *(
            Route(f"{base}{resource}/{kind}", rendering(thumbnail=kind == "thumbnail"), methods=["GET"])
            for resource in (study, series, instance, f"{instance}/frames/{{frames}}")
            for kind in ("rendered", "thumbnail")
        ),
    ]
    middleware = [Middleware(_BoundedURL)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", "Accept"],
                expose_headers=["Content-Type", "Content-Length"],
            )
        )

    async def problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPProblem)
        if exc.status == 413 or exc.status >= 500:  # a sender's series did not arrive: the admin should know
            client = request.client.host if request.client else "?"
            log.warning("%s %s from %s refused with %d: %s", request.method, request.url.path, client, exc.status, exc)
        response = problem_response(exc)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="dicom-ai-node", Basic realm="dicom-ai-node"'
        return response

    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPProblem: problem})


class _BoundedURL:
    """414 for a URL (path and query) over _MAX_URL bytes, before any endpoint parses it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and len(scope.get("raw_path") or b"") + len(scope["query_string"]) > _MAX_URL:
            response = problem_response(HTTPProblem(414, f"the URL is longer than {_MAX_URL} bytes"))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _readiness(engine: Engine, store: InstanceStore) -> dict[str, Any]:
    """Database answers, storage folder writable and above its free-space floor."""
    checks: dict[str, Any] = {}
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means not ready
        checks["database"] = f"unreachable: {exc}"
    try:
        if not os.access(store.root, os.W_OK):
            raise OSError(f"{store.root} is not writable")
        store.check_space(0)
        checks["storage"] = "ok"
    except OSError as exc:
        checks["storage"] = f"not writable: {exc.strerror or exc}"
    return checks

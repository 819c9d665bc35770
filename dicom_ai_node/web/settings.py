"""The `[web]` section: the DICOMweb server (STOW-RS, QIDO-RS, WADO-RS) and its probes.

Secrets never sit in the config file in clear: a client's bearer token is given
as its SHA-256 (safe to keep in a file, since tokens are long and random) or as
the name of an environment variable holding it; a basic-auth password only
through an environment variable.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,16}")  # recorded as the sender's "AE title" of STOW-RS instances
_SHA256 = re.compile(r"[0-9a-f]{64}")  # patterns here are used with fullmatch


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WebClient(_Section):
    """One caller: a bearer token (OHIF, a script) or a basic-auth user named `name`."""

    name: str
    token_sha256: str | None = None  # hex SHA-256 of the bearer token
    token_env: str | None = None  # environment variable holding the bearer token
    password_env: str | None = None  # environment variable holding the basic-auth password of `name`
    write: bool = True  # may store (STOW-RS); read-only clients get 403 there
    # May search and retrieve (QIDO-RS, WADO-RS); false for a sender that only stores, or a Prometheus
    # scraper that only reads /metrics (which any client may).
    read: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("1 to 16 characters: letters, digits, '_', '.', '@', '-'")
        return value

    @field_validator("token_sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.fullmatch(value.lower()):
            raise ValueError("must be 64 hex digits (sha256sum of the token)")
        return value and value.lower()

    @model_validator(mode="after")
    def _one_credential(self) -> WebClient:
        given = [key for key in ("token_sha256", "token_env", "password_env") if getattr(self, key)]
        if len(given) != 1:
            raise ValueError("give exactly one of token_sha256, token_env, password_env")
        return self


class WebSection(_Section):
    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # DICOMweb root: OHIF's qidoRoot / wadoRoot / stowRoot is http://host:port{base_path}.
    base_path: str = "/dicom-web"
    clients: list[WebClient] = []
    # Without credentials: reads (QIDO/WADO) and writes (STOW) are refused unless allowed here.
    allow_anonymous_read: bool = False
    allow_anonymous_write: bool = False
    # /metrics names calling AE titles and web clients, so it needs a client's credential unless this is set.
    allow_anonymous_metrics: bool = False
    cors_origins: list[str] = []  # e.g. ["http://localhost:3000"] for an OHIF dev server; "*" = any
    # Largest STOW-RS body, MiB.  It is spooled to a temporary file in storage.path and stored one instance at
    # a time, so this bounds disk, not memory: 2 GiB holds a 4000-slice CT series in one request.
    max_request_mb: int = Field(2048, ge=1)
    qido_max_results: int = Field(1000, ge=1, le=100000)  # also the default `limit`
    # HTTPS (TLS 1.2 or newer, BCP 195): the server's certificate (PEM, chain included) and its private key.
    # Relative paths are resolved against the folder of the config file.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # CAs (PEM) that sign client certificates: a client presenting a certificate must have one they signed;
    # with tls_require_client_certificate every client must present one, besides its token or password.
    tls_ca_file: Path | None = None
    tls_require_client_certificate: bool = False

    @field_validator("base_path")
    @classmethod
    def _base(cls, value: str) -> str:
        value = "/" + value.strip("/")
        if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)*/?", value):
            raise ValueError("a URL path such as /dicom-web")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _unique(self) -> WebSection:
        names = [client.name for client in self.clients]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"clients: duplicate name(s) {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _tls(self) -> WebSection:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_ca_file needs tls_cert_file and tls_key_file (HTTPS)")
        if self.tls_require_client_certificate and self.tls_ca_file is None:
            raise ValueError("tls_require_client_certificate needs tls_ca_file (the CA signing client certificates)")
        return self

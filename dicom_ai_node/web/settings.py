"""The `[web]` section: the DICOMweb server (STOW-RS, QIDO-RS, WADO-RS) and its probes.

Secrets never sit in the config file in clear: a client's bearer token is given
as its SHA-256 (safe to keep in a file, since tokens are long and random) or as
the name of an environment variable holding it; a basic-auth password only
through an environment variable.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,16}$")  # recorded as the sender's "AE title" of STOW-RS instances
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WebClient(_Section):
    """One caller: a bearer token (OHIF, a script) or a basic-auth user named `name`."""

    name: str
    token_sha256: str | None = None  # hex SHA-256 of the bearer token
    token_env: str | None = None  # environment variable holding the bearer token
    password_env: str | None = None  # environment variable holding the basic-auth password of `name`
    write: bool = True  # may store (STOW-RS); read-only clients get 403 there

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("1 to 16 characters: letters, digits, '_', '.', '@', '-'")
        return value

    @field_validator("token_sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.match(value.lower()):
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
    cors_origins: list[str] = []  # e.g. ["http://localhost:3000"] for an OHIF dev server; "*" = any
    max_request_mb: int = Field(4096, ge=1)  # largest STOW-RS body; the whole body is held before storing
    qido_max_results: int = Field(1000, ge=1, le=100000)  # also the default `limit`

    @field_validator("base_path")
    @classmethod
    def _base(cls, value: str) -> str:
        value = "/" + value.strip("/")
        if not re.match(r"^(/[A-Za-z0-9._~-]+)*/?$", value):
            raise ValueError("a URL path such as /dicom-web")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _unique(self) -> WebSection:
        names = [client.name for client in self.clients]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"clients: duplicate name(s) {', '.join(duplicates)}")
        return self

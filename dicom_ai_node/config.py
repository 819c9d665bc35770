"""Configuration: one TOML file, loaded once and validated at start-up.

Unknown keys and bad values stop start-up with a message that names the key
(`dimse.port: Input should be less than or equal to 65535`), because a typo in
a hospital's config must not silently fall back to a default.
Relative paths are resolved against the folder of the config file, so the node
behaves the same whatever directory it is started from.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_ENV = "DICOM_AI_NODE_CONFIG"
DEFAULT_CONFIG = Path("config.toml")

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


def _check_ae_title(value: str) -> str:
    value = value.strip()
    if not _AE_TITLE.match(value):
        raise ValueError("an AE title is 1 to 16 printable ASCII characters, no backslash")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Section):
    ae_title: AETitle = "AI_NODE"


class AllowedCaller(_Section):
    """A sender allowed to open associations; `host` pins it to one address."""

    ae_title: AETitle
    host: str | None = None


class DimseSection(_Section):
    bind: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(10, ge=1, le=1000)
    max_pdu_size: int = Field(0, ge=0, description="0 means unlimited")
    require_called_ae_title: bool = True
    allowed_callers: list[AllowedCaller] = []
    acse_timeout_seconds: float = Field(30.0, gt=0)
    dimse_timeout_seconds: float = Field(60.0, gt=0)
    network_timeout_seconds: float = Field(60.0, gt=0)

    @field_validator("max_pdu_size")
    @classmethod
    def _pdu(cls, value: int) -> int:
        if value and value < 4096:
            raise ValueError("must be 0 (unlimited) or at least 4096 bytes")
        return value


class StorageSection(_Section):
    path: Path = Path("var/storage")
    min_free_mb: int = Field(1024, ge=0)


class DatabaseSection(_Section):
    url: str = "sqlite:///var/dicom-ai-node.sqlite"

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql")):
            raise ValueError("must start with sqlite:/// or postgresql:// (postgresql+psycopg://)")
        return value


class SeriesSection(_Section):
    stable_seconds: float = Field(60.0, gt=0)
    check_interval_seconds: float = Field(1.0, gt=0, le=60)


class Peer(_Section):
    """A DICOM node we talk to (echo now; delivery destinations later)."""

    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)


class LoggingSection(_Section):
    level: str = "INFO"
    file: Path | None = None

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return value


class Config(_Section):
    node: NodeSection = NodeSection()
    dimse: DimseSection = DimseSection()
    storage: StorageSection = StorageSection()
    database: DatabaseSection = DatabaseSection()
    series: SeriesSection = SeriesSection()
    peers: dict[str, Peer] = {}
    logging: LoggingSection = LoggingSection()
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _names(self) -> Config:
        for name in self.peers:
            if not re.match(r"^[A-Za-z0-9_-]+$", name):
                raise ValueError(f"peers.{name}: peer names use letters, digits, '-' and '_'")
        return self


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid; the message says where."""


def config_path(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG


def load_config(explicit: Path | None = None) -> Config:
    path = config_path(explicit)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path} (use --config or {CONFIG_ENV})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid configuration:\n{_describe(exc)}") from None
    return _resolve_paths(config, path.resolve().parent).model_copy(update={"source": path.resolve()})


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def _resolve_paths(config: Config, base: Path) -> Config:
    storage = config.storage.model_copy(update={"path": _absolute(config.storage.path, base)})
    url = config.database.url
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        url = "sqlite:///" + str(_absolute(Path(url.removeprefix("sqlite:///")), base))
    database = config.database.model_copy(update={"url": url})
    log_file = config.logging.file and _absolute(config.logging.file, base)
    logging = config.logging.model_copy(update={"file": log_file})
    return config.model_copy(update={"storage": storage, "database": database, "logging": logging})


def _absolute(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else base / path

"""Server settings: environment variables with the SCRIBEFARM_ prefix (DATABASE_URL too).

Every setting is documented in docs/configuration.md; keep the two in step.
"""

from __future__ import annotations

import os
import secrets
from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "scribefarm"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCRIBEFARM_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "SCRIBEFARM_DATABASE_URL"),
    )
    public_url: str | None = Field(
        default=None,
        description="Base URL workers use to reach this server (signed media links).",
    )
    signing_key: str | None = Field(
        default=None,
        description="Secret for signed URLs; generated into the data directory when unset.",
    )

    log_format: str = Field(default="auto", pattern="^(auto|text|json)$")
    log_level: str = "INFO"

    default_model: str = "tiny.en"
    default_chunk_seconds: float = 60.0
    max_chunk_seconds: float = 120.0
    max_upload_bytes: int = 2 * 1024**3

    lease_seconds: float = 30.0
    max_attempts: int = 5
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 600.0
    poll_seconds: float = 1.0
    signed_url_seconds: float = 6 * 3600.0
    db_pool_size: int = 20

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"

    @property
    def postgres_dir(self) -> Path:
        return self.data_dir / "postgres"

    @cached_property
    def signing_secret(self) -> bytes:
        if self.signing_key:
            return self.signing_key.encode()
        path = self.data_dir / "signing.key"
        if not path.exists():
            # Write then rename, so a concurrent process never reads a half-written key.
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
            try:
                os.link(tmp, path)  # atomic: the first process to get here wins
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return path.read_text().strip().encode()

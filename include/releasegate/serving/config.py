"""Gateway tuning knobs, read from the environment (RELEASEGATE_GATEWAY_*)."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewayConfig(BaseSettings):
    """Timings and bounds of the gateway (RELEASEGATE_GATEWAY_*)."""

    model_config = SettingsConfigDict(env_prefix="RELEASEGATE_GATEWAY_", env_ignore_empty=True, extra="ignore")

    poll_interval: float = Field(default=1.0, gt=0, description="Seconds between reads of routes and API keys.")
    candidate_timeout: float = Field(
        default=1.0, gt=0, description="Seconds a candidate may take before the champion answers."
    )
    batch_max_rows: int = Field(default=64, ge=1, description="Most rows one predict call answers.")
    batch_max_wait_ms: float = Field(default=2.0, ge=0, description="Milliseconds a micro-batch collects requests.")
    shadow_queue: int = Field(
        default=1000, ge=1, description="Mirrored requests waiting for the candidate; more are dropped."
    )
    shadow_workers: int = Field(
        default=64,
        ge=1,
        description="Batches of mirrored calls in flight at once for a candidate "
        "that predicts through its batcher (a compiled one answers "
        "each batch inline).",
    )
    log_flush_interval: float = Field(default=0.2, gt=0, description="Seconds between shipments to the log writer.")
    log_batch_rows: int = Field(default=500, ge=1, description="Rows per insert of the log writer.")
    log_buffer: int = Field(
        default=20_000, ge=1, description="Log entries held in memory; more are dropped and counted."
    )
    max_body_bytes: int = Field(default=1 << 20, ge=1, description="Largest request body (413 beyond).")
    max_rows: int = Field(default=1000, ge=1, description="Most rows in one request (413 beyond).")
    retry_failed_load_seconds: float = Field(
        default=30.0, ge=0, description="Seconds before a version that failed to load is tried again."
    )
    load_concurrency: int = Field(
        default=4,
        ge=1,
        description="Models whose stored routes load at once (start-up and "
        "polling); each route serves as soon as its own versions "
        "are loaded.",
    )
    tls_cert: str | None = Field(
        default=None, description="Server certificate (PEM); with tls_key, the gateway speaks HTTPS."
    )
    tls_key: str | None = Field(default=None, description="Private key of tls_cert (PEM).")
    tls_client_ca: str | None = Field(
        default=None, description="CA bundle (PEM) for mutual TLS: clients must present a certificate it signed."
    )

    @classmethod
    def from_env(cls) -> GatewayConfig:
        return cls()

    @model_validator(mode="after")
    def _tls_complete(self) -> GatewayConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together (RELEASEGATE_GATEWAY_TLS_CERT / _TLS_KEY)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self

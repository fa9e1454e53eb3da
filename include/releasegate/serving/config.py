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
    champion_timeout: float = Field(
        default=5.0, gt=0, description="Seconds the champion may take before the request is answered 504."
    )
    breaker_failures: int = Field(
        default=5,
        ge=1,
        description="Candidate failures or timeouts within `breaker_window` that open its circuit: the champion "
        "answers alone and each skipped candidate call is logged `skipped`.",
    )
    breaker_window: float = Field(
        default=10.0, gt=0, description="Seconds over which the candidate's failures are counted."
    )
    breaker_cooldown: float = Field(
        default=30.0,
        gt=0,
        description="Seconds an open circuit skips the candidate; then one trial call decides whether it closes.",
    )
    slot_queue_rows: int = Field(
        default=4096,
        ge=1,
        description="Rows waiting for one model version; a request that would exceed it fails at once "
        "(503 for the champion, a failure for the candidate). A lone request of any size is taken.",
    )
    max_in_flight: int = Field(
        default=256,
        ge=1,
        description="Inference and feedback requests handled at once; more are answered 503 with Retry-After.",
    )
    max_json_depth: int = Field(
        default=32,
        ge=4,
        le=200,
        description="Deepest nesting of arrays and objects in a request body (400 beyond).",
    )
    metrics_key_file: str | None = Field(
        default=None,
        description="File holding a key of role `metrics` (a scraper's: `/metrics` only), besides those in "
        "the database; Prometheus reads the same file (`credentials_file`).",
    )
    alerts_key_file: str | None = Field(
        default=None,
        description="File holding a key of role `alerts` (Alertmanager's: `POST /alerts` only), besides those "
        "in the database; Alertmanager reads the same file (`credentials_file`).",
    )
    batch_max_rows: int = Field(default=64, ge=1, description="Most rows one predict call answers.")
    batch_max_wait_ms: float = Field(default=2.0, ge=0, description="Milliseconds a micro-batch collects requests.")
    feature_timeout: float = Field(
        default=0.1,
        gt=0,
        description="Seconds a request waits for its features from the feature store; then the model's "
        "`on_missing` applies (docs/features.md).",
    )
    feature_batch_rows: int = Field(
        default=256, ge=1, description="Most entity rows one feature-store lookup reads (requests waiting share one)."
    )
    shadow_queue: int = Field(
        default=1000, ge=1, description="Mirrored requests waiting for the candidate; more are dropped."
    )
    shadow_max_wait_ms: float = Field(
        default=20.0,
        ge=0,
        description="Milliseconds mirrored requests collect before the candidate's call (fewer than "
        "`batch_max_rows` waiting): nobody waits for a mirrored answer, and fewer, larger calls interrupt the "
        "callers' requests less often.",
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
    workers: int | None = Field(
        default=None,
        ge=1,
        description="Gateway processes behind the one port, each with its own models and log writer; "
        "default: one per core the gateway may use.",
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

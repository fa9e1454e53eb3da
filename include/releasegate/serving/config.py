"""Gateway tuning knobs, read from the environment (RELEASEGATE_GATEWAY_*)."""

from __future__ import annotations

import os

from pydantic import BaseModel, Field


class GatewayConfig(BaseModel):
    """Timings and bounds of the gateway; `GatewayConfig.from_env()` reads overrides."""

    poll_interval: float = Field(1.0, gt=0, description="Seconds between reads of routes and API keys.")
    candidate_timeout: float = Field(1.0, gt=0, description="Seconds a candidate may take before the champion answers.")
    batch_max_rows: int = Field(64, ge=1)
    batch_max_wait_ms: float = Field(2.0, ge=0)
    shadow_queue: int = Field(1000, ge=1, description="Mirrored requests waiting for the candidate; more are dropped.")
    shadow_workers: int = Field(4, ge=1)
    log_flush_interval: float = Field(0.2, gt=0)
    log_batch_rows: int = Field(500, ge=1)
    log_buffer: int = Field(20_000, ge=1, description="Log entries held in memory; more are dropped and counted.")
    max_body_bytes: int = Field(1 << 20, ge=1)
    max_rows: int = Field(1000, ge=1)
    retry_failed_load_seconds: float = Field(30.0, ge=0)

    @classmethod
    def from_env(cls) -> "GatewayConfig":
        values = {}
        for name in cls.model_fields:
            raw = os.environ.get(f"RELEASEGATE_GATEWAY_{name.upper()}")
            if raw not in (None, ""):
                values[name] = raw
        return cls(**values)

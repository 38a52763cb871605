"""Server settings from `HEST_*` environment variables (pydantic-settings). The runtime's own
variables (threads, compile, nominal watts, calibration, cache directory, native kernels) are
read by `hest_core.config.RuntimeConfig.from_env()`; `Settings.runtime_config()` builds it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hest_core.config import RuntimeConfig
from hest_core.runtime.engine import DEFAULT_BUDGET_RATIO, DEFAULT_MAX_NEW_TOKENS
from hest_core.runtime.scheduler import DECODE_STEPS_PER_CHUNK, DEFAULT_PREFILL_TOKENS


class Settings(BaseSettings):
    """Every field reads the env var `HEST_<FIELD>` (case-insensitive), e.g. `HEST_PORT=8080`."""

    model_config = SettingsConfigDict(env_prefix="HEST_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    model: str = Field("default", description="'default', a local dir, a hub id or 'tiny:llama'")
    adapter: str = Field("default", description="'default', a path, or 'none' (pure fp16 policy)")
    device: str = Field("cpu", description="'cpu', 'cuda' or 'cuda:N'")
    policy: Literal["hest", "fp16", "int8"] = Field("hest", description="path policy")
    meter: Literal["auto", "nvml", "rapl", "estimate"] = Field(
        "auto",
        description="energy meter: 'auto' picks the best readable one (NVML on CUDA, RAPL on "
        "CPU, else the estimate); an explicit 'nvml' or 'rapl' that cannot be read stops the "
        "server at start with the fix",
    )
    queue_size: int = Field(64, ge=1, description="requests that may wait; more get 429")
    max_batch_size: int = Field(
        16,
        ge=1,
        description="the most requests in the running batch (rows prefilled or decoded at once, "
        "continuous batching); more wait in the queue and join as rows free. 16: as many as the "
        "fused native decode layer takes in one step",
    )
    batching: Literal["continuous", "static"] = Field(
        "continuous",
        description="'continuous': requests join the running batch between decode steps; "
        "'static': a batch runs to completion before the next starts (the baseline the load "
        "test compares with)",
    )
    prefill_tokens: int = Field(
        DEFAULT_PREFILL_TOKENS,
        ge=0,
        description="the most prompt tokens prefilled in one scheduler round while other requests "
        "decode or wait, shortest remaining prompt first, so a long prompt delays the others by "
        "one round of this many tokens (a request alone prefills 1,024 a round); 0: no limit",
    )
    decode_steps_per_chunk: int = Field(
        DECODE_STEPS_PER_CHUNK,
        ge=0,
        description="while requests decode, a prompt longer than 1,024 tokens gets its next "
        "prefill chunk only every this many scheduler steps, so the decoding requests get this "
        "many tokens per chunk; 0 or 1: a chunk every step",
    )
    max_wait_ms: float = Field(
        10.0,
        ge=0,
        description="on an idle server, how long the first request waits for others to share "
        "its first prefill round (a busy server adds requests at the next step)",
    )
    default_budget_ratio: float = Field(
        DEFAULT_BUDGET_RATIO, gt=0, description="budget ratio of requests that give no budget"
    )
    slo_s: float = Field(
        5.0,
        gt=0,
        description=(
            "end-to-end latency SLO in s; brownout starts when the predicted latency passes "
            "HEST_BROWNOUT_START x this. The same 5 s as the p99 alert, the HPA target and "
            "`loadtest --slo`: change them together"
        ),
    )
    brownout_floor_ratio: float = Field(
        0.3, gt=0, description="the budget ratio brownout tightens towards (never below)"
    )
    brownout_start: float = Field(
        0.5, gt=0, lt=1, description="fraction of the SLO where brownout starts"
    )
    grid_intensity_g_per_kwh: float | None = Field(
        None,
        ge=0,
        description="grid carbon intensity in g CO2e per kWh; set it and responses carry co2e_g "
        "(an estimate) and Prometheus hest_co2e_grams_total",
    )
    max_new_tokens: int = Field(
        DEFAULT_MAX_NEW_TOKENS, ge=1, description="default max_new_tokens of a request"
    )
    warmup: bool = Field(True, description="run a short generation before turning ready")
    drain_timeout_s: float = Field(
        120.0, gt=0, description="SIGTERM: how long in-flight requests may take to finish"
    )
    retry_after_s: int = Field(
        2, ge=1, description="minimum Retry-After seconds on 429/503 responses"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = Field(True, description="uvicorn access log")

    @field_validator("log_level", "meter", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.brownout_floor_ratio > self.default_budget_ratio:
            raise ValueError(
                f"HEST_BROWNOUT_FLOOR_RATIO={self.brownout_floor_ratio} is above "
                f"HEST_DEFAULT_BUDGET_RATIO={self.default_budget_ratio}; set the floor lower"
            )
        return self

    def runtime_config(self) -> RuntimeConfig:
        """The runtime's configuration: `RuntimeConfig.from_env()` (HEST_THREADS, HEST_COMPILE,
        HEST_NOMINAL_WATTS, HEST_CALIBRATION, HEST_CACHE_DIR, ...; hest_core/config.py) with this
        server's meter. Raises hest_core.config.ConfigError naming a bad variable."""
        return RuntimeConfig.from_env(meter=self.meter)

    @property
    def adapter_arg(self) -> str | None:
        """The `adapter` argument of `Engine.from_pretrained` ('none' -> None)."""
        return None if self.adapter.lower() in ("none", "") else self.adapter

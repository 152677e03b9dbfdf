"""Service settings: every knob in one pydantic-settings class (env prefix ``VDIB_``, ``.env`` file).

Injected into the app by :func:`service.app.create_app`; routes read them through
:data:`service.deps.SettingsDep`, never from the environment directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The shipped checkpoints: ``<repo>/checkpoints`` (next to this package).
DEFAULT_CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


class Settings(BaseSettings):
    """Configuration of one service process. Environment: ``VDIB_<FIELD>`` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="VDIB_", env_file=".env", extra="ignore")

    # --- models and engines ---------------------------------------------------------------
    checkpoints_dir: Path = Field(
        DEFAULT_CHECKPOINTS, description="each sub-directory with a config.json is a model"
    )
    default_model: str | None = Field(
        None,
        description="model for every request that names none; unset: by the recording's sensor (the model "
        "whose checkpoint declares that sensor, e.g. mnist-dvs for 128x128, else the scene model 'scenes')",
    )
    engine: Literal["torch", "onnx"] = "torch"
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu' or 'cuda[:n]'")
    torch_threads: int = Field(0, description="torch intra-op threads; 0 keeps torch's default")
    decoder_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="torch engine: the decoder's dtype (bfloat16: ~4x faster MLP decoders on CPU)"
    )

    # --- security ------------------------------------------------------------------------
    api_keys: str = Field("", description="comma-separated API keys; empty = no authentication")

    # --- upload limits (each checked before the work it bounds; over a limit: 413) -----------
    max_upload_bytes: int = 256 * 1024 * 1024
    max_events: int = 20_000_000
    max_decompressed_bytes: int = Field(
        512 * 1024 * 1024, description="bytes one upload may decompress to (AEDAT 4 LZ4/ZSTD packets)"
    )
    max_duration_s: float = 3600.0
    max_frames: int = 5000  # frames returned by one upload in json/gif (npz is not limited)
    max_upload_bins: int = Field(
        1_000_000,
        description="bins one upload may step, counted from the event times before any binning "
        "(silences longer than max_gap_us are not stepped and not counted)",
    )
    max_upload_cpu_s: float = Field(
        120.0, description="CPU seconds one upload may use to decode, bin and run"
    )
    max_output_pixels: int = Field(
        1 << 26,
        description="pixels of all frames of one upload's answer (frames x H x W; scene models answer "
        "at the sensor's resolution)",
    )
    max_timestamps: int = Field(1000, ge=1, description="timestamps one upload may name (timestamps=...)")
    max_sensor_pixels: int = Field(
        1280 * 720,
        description="sensor (or ROI) area a scene model runs at, per upload or stream (422 / 1003)",
    )
    max_scene_pixels: int = Field(
        1 << 23, description="sensor pixels of all open scene-model streams together (1013 beyond)"
    )
    max_concurrent_uploads: int = Field(
        2, ge=1, description="uploads read and run at the same time; more are answered 503 with Retry-After"
    )
    body_timeout_s: float = Field(60.0, description="time to receive a whole request body (408 after it)")
    header_timeout_s: float = Field(
        10.0,
        description="time for a request's headers (websocket handshakes too) to arrive; the connection "
        "is closed after it (slowloris)",
    )
    max_connections: int = Field(
        0,
        ge=0,
        description="open connections of the process (uvicorn's limit_concurrency: 503 beyond); "
        "0: max_sessions + 512",
    )
    max_connections_per_client: int = Field(
        256, ge=1, description="open connections from one client address; more are closed at once"
    )

    # --- stream limits ---------------------------------------------------------------------
    max_sessions: int = 512
    max_message_bytes: int = 4 * 1024 * 1024
    max_gap_us: int = 1_000_000  # a longer silence resets the stream state
    min_dt_us: int = Field(1000, ge=1, description="smallest dt_us a stream or upload may ask for")
    idle_timeout_s: float = 60.0
    start_timeout_s: float = Field(10.0, description="time from the websocket accept to the start message")
    max_message_events: int = Field(
        1_000_000, description="events one websocket message may decode to (AEDAT 4 packets: 1009 beyond)"
    )
    max_message_decoded_bytes: int = Field(
        64 * 1024 * 1024, description="bytes the AEDAT 4 packets of one websocket message may decompress to"
    )
    control_rate_per_s: float = Field(
        20.0, description="text messages (ping, flush) per second a stream may send on average (1008 beyond)"
    )
    control_burst: int = Field(200, description="text messages a stream may send at once above that rate")
    message_rate_per_s: float = Field(
        2000.0, description="messages of any kind per second a stream may send on average (1008 beyond)"
    )
    message_burst: int = Field(4000, description="messages a stream may send at once above that rate")
    ingest_cpu_per_s: float = Field(
        0.25,
        description="CPU seconds per second a stream may spend decoding and binning its messages, on "
        "average (1008 beyond; a 10 ms packet of a DVS128 takes ~5 us)",
    )
    ingest_cpu_burst_s: float = Field(
        2.0, description="CPU seconds of decoding and binning a stream may spend at once"
    )
    offload_bytes: int = Field(
        16 * 1024,
        description="binary messages at least this large (~1200 events; a 10 ms DVS128 packet is "
        "~1 kB), and every AEDAT 4 message, are decoded and binned in a worker thread, not on the event loop",
    )
    out_queue_frames: int = 32  # per-stream outgoing queue; beyond it frames are dropped
    max_pending_bins: int = 20_000  # complete bins waiting for the scheduler, per stream
    max_pending_bytes: int = Field(
        32 * 1024 * 1024,
        description="bytes of the complete bins waiting per stream: a stream's max_pending_bins is "
        "at most this over one bin's frame (a 346x260 scene stream: 186 bins; a 26x26 one keeps max_pending_bins)",
    )
    stats_interval_s: float = 1.0
    ws_fast_path: bool = Field(
        True,
        description="parse the streams' binary websocket frames in service.wsfast instead of the websockets "
        "library's generator parser (vdib serve and the live tests; other frames still go to the library)",
    )
    stream_png_level: int = Field(
        0,
        ge=0,
        le=9,
        description="zlib level of streamed frame PNGs: 0 stores them (~0.8 KB for 28x28, "
        "~14 us less CPU per frame than level 1 at ~0.6 KB); uploads always use 1",
    )

    # --- scheduler -------------------------------------------------------------------------
    max_batch: int = 1024  # streams stepped in one tensor op
    warmup: bool = True  # run each engine at a few batch sizes at load time (no slow first ticks)
    tick_interval_s: float = 0.004  # least time between ticks: complete bins wait at most this long to batch

    @field_validator("api_keys")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.strip()

    @property
    def connection_limit(self) -> int:
        """uvicorn's ``limit_concurrency``: ``max_connections``, or ``max_sessions + 512`` when 0."""
        return self.max_connections or self.max_sessions + 512

    def public_limits(self) -> dict[str, int | float]:
        """The per-stream limits a client can plan with (the ``limits`` of the ``ready`` message)."""
        return {
            "max_message_bytes": self.max_message_bytes,
            "idle_timeout_s": self.idle_timeout_s,
            "max_gap_us": self.max_gap_us,
            "out_queue_frames": self.out_queue_frames,
            "max_pending_bins": self.max_pending_bins,
            "min_dt_us": self.min_dt_us,
            "max_message_events": self.max_message_events,
            "max_message_decoded_bytes": self.max_message_decoded_bytes,
            "control_rate_per_s": self.control_rate_per_s,
            "control_burst": self.control_burst,
            "message_rate_per_s": self.message_rate_per_s,
            "message_burst": self.message_burst,
            "ingest_cpu_per_s": self.ingest_cpu_per_s,
            "ingest_cpu_burst_s": self.ingest_cpu_burst_s,
        }

    @property
    def api_key_set(self) -> frozenset[str]:
        """The accepted API keys (empty: authentication off)."""
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

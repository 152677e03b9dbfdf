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
    checkpoints_dir: Path = Field(DEFAULT_CHECKPOINTS, description="each sub-directory with a config.json is a model")
    default_model: str | None = Field(None, description="model used when a request names none (default: 'mnist-dvs' if present, else the first by name)")
    engine: Literal["torch", "onnx"] = "torch"
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu' or 'cuda[:n]'")
    torch_threads: int = Field(0, description="torch intra-op threads; 0 keeps torch's default")
    decoder_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="torch engine: the decoder's dtype (bfloat16: ~4x faster MLP decoders on CPU)"
    )

    # --- security ------------------------------------------------------------------------
    api_keys: str = Field("", description="comma-separated API keys; empty = no authentication")

    # --- upload limits ---------------------------------------------------------------------
    max_upload_bytes: int = 256 * 1024 * 1024
    max_events: int = 50_000_000
    max_duration_s: float = 3600.0
    max_frames: int = 5000  # frames returned by one upload in json/gif (npz is not limited)

    # --- stream limits ---------------------------------------------------------------------
    max_sessions: int = 512
    max_message_bytes: int = 4 * 1024 * 1024
    max_gap_us: int = 1_000_000  # a longer silence resets the stream state
    idle_timeout_s: float = 60.0
    out_queue_frames: int = 32  # per-stream outgoing queue; beyond it frames are dropped
    max_pending_bins: int = 20_000  # complete bins waiting for the scheduler, per stream
    stats_interval_s: float = 1.0
    ws_fast_path: bool = Field(
        True, description="parse the streams' binary websocket frames in service.wsfast instead of the websockets "
        "library's generator parser (vdib serve and the live tests; other frames still go to the library)",
    )
    stream_png_level: int = Field(
        0, ge=0, le=9, description="zlib level of streamed frame PNGs: 0 stores them (~0.8 KB for 28x28, "
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
    def api_key_set(self) -> frozenset[str]:
        """The accepted API keys (empty: authentication off)."""
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

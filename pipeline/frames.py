"""The ``gameplay_frames`` params: how the gameplay videos are decoded (frame rate, crop, size, decoder
threads) and how many at once. The stage ``gameplay_frames`` (``stages/gameplay_frames.py``) decodes
with them; ``bench/bench_decode.py`` measures that path.
"""
from __future__ import annotations

from pydantic import Field, field_validator

from pipeline.config import StrictModel


class Config(StrictModel):
    fps: float | None = Field(10, gt=0, description="output frame rate; null keeps every frame")
    width: int = Field(64, gt=0)
    height: int = Field(64, gt=0)
    crop: tuple[int, int, int, int] | None = Field(None, description="[top, bottom, left, right] pixels")
    threads: int = Field(2, ge=0, description="decoder threads per video (0: FFmpeg's choice)")
    concurrency: int = Field(2, gt=0)
    retries: int = Field(1, ge=0)
    max_failed_fraction: float = Field(0.5, ge=0, le=1)

    @field_validator("crop")
    @classmethod
    def _crop(cls, crop):
        if crop is not None and min(crop) < 0:
            raise ValueError(f"crop values must be >= 0, got {list(crop)}")
        return crop

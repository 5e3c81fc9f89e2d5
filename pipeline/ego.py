"""Ego-centric action extraction: the one definition the ``actions`` stage labels the data with
and imagination (the ``policy`` stage) checks imagined videos with.

- gameplay (a camera locked on the player): the camera's own motion, the opposite of the shift of
  the play area's content between consecutive frames, and its class (none, left, right, up, down);
- Moving MNIST: the motion ``[dx, dy]`` of one tracked digit.

Actions are normalised by (W/2, H/2); +x right, +y down. The configs are the ``actions.<dataset>``
sections of params.yaml.
"""
from __future__ import annotations

import logging
import math
import numbers
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from pipeline import motion
from pipeline.config import StrictModel

log = logging.getLogger(__name__)


class MnistActionsConfig(StrictModel):
    """``actions.mnist`` of params.yaml."""

    tracked_digit: int = Field(0, ge=0, description="which digit of each sequence is the ego")
    method: Literal["auto", "truth", "tracker"] = "auto"
    tracker_search: int = Field(8, gt=0, le=32, description="tracker search radius in pixels")


class GameplayActionsConfig(StrictModel):
    """``actions.gameplay`` of params.yaml."""

    method: Literal["block_matching", "phase_correlation"] = "block_matching"
    play_area: tuple[float, float, float, float] = (0.0, 0.78, 0.0, 1.0)
    mask_centre: bool = Field(True, description="leave the player's centre tile out of the estimate")
    max_shift: int = Field(8, gt=0, description="largest shift searched, pixels")
    window: bool = Field(False, description="phase correlation: Hann window")
    subpixel: bool = Field(True, description="parabolic sub-pixel refinement of the best shift")
    move_threshold: float = Field(0.5, gt=0, description="|shift| in tiles that counts as a move")
    tile_px: float | Literal["auto"] = Field(
        "auto", description="pixels per tile in the frames; auto: the recorded tile size after the resize, "
                            "else max_shift (frames without tiles)")
    ambiguous_tol: float = Field(0.5, ge=0, description="grey levels under which the scene is unchanged")

    @field_validator("tile_px")
    @classmethod
    def _tile(cls, v):
        if v != "auto" and v <= 0:
            raise ValueError(f"must be 'auto' or a positive number of pixels, got {v}")
        return v

    @field_validator("play_area")
    @classmethod
    def _area(cls, area: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        top, bottom, left, right = area
        if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1):
            raise ValueError(f"needs 0 <= top < bottom <= 1 and 0 <= left < right <= 1, got {list(area)}")
        return area


def transition_actions(delta: np.ndarray, width: int, height: int) -> np.ndarray:
    """Per-frame pixel motions ``(T-1, 2)`` of one episode → ``actions`` ``(T, 2)`` float32,
    normalised by (W/2, H/2), 0 at the last frame."""
    out = np.zeros((len(delta) + 1, 2), np.float32)
    out[:-1] = np.asarray(delta, np.float64) / (width / 2, height / 2)
    return out


TILE_TOLERANCE = 0.05  # a tile_px given in pixels may differ this much (relative) from the recorded one


def resolve_tile_px(cfg: GameplayActionsConfig, frame_attrs: dict, where: str, store: str) -> GameplayActionsConfig:
    """``cfg`` with ``tile_px`` in pixels: the unit of ``move_threshold`` and the side of the square
    ``mask_centre`` leaves out. ``auto`` takes the frames store's ``tile_px`` attribute (the recorded
    tile size times the resize, written by the gameplay_frames stage for Crafter episodes); a number
    given is checked against it. Frames without tiles (downloaded videos) record none: ``auto`` then
    takes ``max_shift``, the largest per-frame shift the estimator is set to see, the one scale of
    motion such frames come with (Crafter's is sized to one move, a tile: both give the same
    classes there). A move is then a shift of at least ``move_threshold`` of it: a camera turning
    pans the view, while walking forward expands it about its centre with little net shift (none);
    the centre square leaves out what is fixed to the camera there (an avatar, a crosshair).
    Raises ValueError naming the key, or the store and its bad attribute."""
    recorded = frame_attrs.get("tile_px")
    number = isinstance(recorded, numbers.Real) and not isinstance(recorded, bool)
    if recorded is not None and not (number and math.isfinite(recorded) and recorded > 0):
        raise ValueError(f"{store} records tile_px = {recorded!r}, not a positive number of pixels; "
                         "rerun gameplay_frames")
    if cfg.tile_px == "auto":
        if recorded is None:
            log.info("%s.tile_px is 'auto' and %s records no tile size: moves are counted in max_shift = %d px",
                     where, store, cfg.max_shift)
            return cfg.model_copy(update={"tile_px": float(cfg.max_shift)})
        return cfg.model_copy(update={"tile_px": float(recorded)})
    if recorded is not None and abs(cfg.tile_px - recorded) > TILE_TOLERANCE * recorded:
        raise ValueError(f"{where}.tile_px is {cfg.tile_px} but the tiles of {store} are {recorded:.3f} pixels "
                         f"(recorded tile size and resize: {frame_attrs.get('tile_source', '?')}); set it to auto")
    return cfg


def play_area(cfg: GameplayActionsConfig, height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel bounds (top, bottom, left, right) of the play area; a max_shift it cannot hold is an error."""
    top, bottom, left, right = motion.area_bounds(height, width, cfg.play_area)
    if min(bottom - top, right - left) // 2 <= cfg.max_shift:
        raise ValueError(
            f"actions.gameplay.max_shift = {cfg.max_shift} is too large for the {bottom - top}x{right - left} play area"
        )
    return top, bottom, left, right


def estimate_shifts(cfg: GameplayActionsConfig, area: np.ndarray) -> np.ndarray:
    """Content shifts ``(T-1, 2)`` pixels between consecutive play-area crops ``(T, h, w, 3)``."""
    gray = motion.to_gray(area)
    h, w = gray.shape[1:]
    mask = motion.centre_mask(h, w, cfg.tile_px) if cfg.mask_centre else None
    if cfg.method == "block_matching":
        return motion.block_matching(gray[:-1], gray[1:], max_shift=cfg.max_shift, mask=mask, subpixel=cfg.subpixel)
    return motion.phase_correlation(
        gray[:-1], gray[1:], max_shift=cfg.max_shift, mask=mask, window=cfg.window, subpixel=cfg.subpixel
    )


def camera_motion(cfg: GameplayActionsConfig, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera motion of consecutive frames ``(T, H, W, 3)`` uint8: shifts ``(T-1, 2)`` in pixels
    (the opposite of the content's shift) and their classes ``(T-1,)`` int8 (0 none, 1 left,
    2 right, 3 up, 4 down) by ``move_threshold`` tiles of ``tile_px`` pixels."""
    h, w = frames.shape[1:3]
    top, bottom, left, right = play_area(cfg, h, w)
    if len(frames) < 2:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.int8)
    camera = -estimate_shifts(cfg, frames[:, top:bottom, left:right])
    return camera, motion.shift_classes(camera, cfg.move_threshold * cfg.tile_px)


def digit_motion(frames: np.ndarray, start_xy: np.ndarray, size: int, search: int) -> np.ndarray:
    """Motion ``(N, T-1, 2)`` pixels of one digit tracked through ``(N, T, H, W[, 1])`` frames
    (uint8, or float in [0, 1]) from its box of side ``size`` at integer top-left ``start_xy``
    ``(N, 2)`` in frame 0 (its template: frame 0 inside that box)."""
    gray = motion.to_gray(frames) if frames.dtype == np.uint8 else np.asarray(frames, np.float32)
    if gray.ndim == 5:
        gray = gray[..., 0]
    h, w = gray.shape[2:]
    xy = np.clip(np.rint(start_xy).astype(np.int64), 0, [w - size, h - size])
    templates = np.stack([seq[0, y : y + size, x : x + size] for seq, (x, y) in zip(gray, xy)])
    tracked = motion.track_templates(gray, xy, templates, search=search)
    return np.diff(tracked, axis=1)

"""Stage ``moving_mnist``: Moving MNIST sequences → ``data/mnist/frames.zarr``.

Sources:
- ``generate`` (default): sequences drawn from ``data/mnist/digits.zarr`` the way OpenSTL's
  standard Moving MNIST is: each digit starts uniformly in [0, canvas - 28]², moves in a direction
  uniform in [0, 2π) at ``speed`` × (canvas - 28) pixels per frame, bounces by flipping the velocity
  component at an edge (the position clamped inside), and digits are combined by pixel-wise
  maximum. Each digit is drawn at its rounded position, and that drawn position is what
  ``data/positions`` stores, so motion computed from positions is exactly the drawn motion.
  Without ``bounce`` digits move on and leave the canvas (drawn clipped).
- ``download``: the standard Moving MNIST test file (uint8 [T, N, 64, 64]), fetched with its
  sha256; no positions. Its sequences keep the file's length; ``num_sequences``, ``seq_len`` and
  the motion params apply to ``generate`` only.

One episode per sequence: ``data/frames`` (T, H, W, 1) uint8 and, when generated,
``data/positions`` (T, D, 2) float32, each digit's (x, y) top-left in pixels.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator
from tqdm import tqdm

from pipeline.atomic import write_json
from pipeline.cli import run_stage
from pipeline.config import StrictModel, load_section
from pipeline.download import fetch
from pipeline.paths import MNIST_DIGITS, frames_store, metrics_path
from pipeline.store import EpisodeStore, EpisodeStoreWriter, StoreConfig
from pipeline.tracking import stage_run

log = logging.getLogger(__name__)

DIGITS = MNIST_DIGITS
OUT = frames_store("mnist")
DOWNLOAD_SOURCE = "download: standard Moving MNIST test set (mnist_test_seq.npy)"


class DownloadConfig(StrictModel):
    url: str = "https://www.cs.toronto.edu/~nitish/unsupervised_video/mnist_test_seq.npy"
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    allowed_schemes: list[str] = ["https"]
    allowed_hosts: list[str] = ["www.cs.toronto.edu"]
    max_sequences: int = Field(10000, gt=0)


class Config(StrictModel):
    """The ``moving_mnist`` section of params.yaml."""

    source: Literal["generate", "download"] = "generate"
    num_sequences: int = Field(1000, gt=0)
    seq_len: int = Field(20, gt=0)
    canvas: int = Field(64, gt=0)
    digits_per_sequence: int = Field(2, gt=0)
    speed: float = Field(0.1, ge=0, le=1, description="fraction of the free range (canvas - digit) per frame")
    bounce: bool = True
    seed: int = Field(0, ge=0)
    download: DownloadConfig = DownloadConfig()

    @model_validator(mode="after")
    def _download_needs_digest(self) -> "Config":
        if self.source == "download" and self.download.sha256 is None:
            raise ValueError("source 'download' needs moving_mnist.download.sha256 (the file's sha256); it is null")
        return self


def trajectories(n: int, t: int, d: int, free: int, step: float, bounce: bool, rng: np.random.Generator) -> np.ndarray:
    """Continuous top-left positions (n, t, d, 2) as (x, y) in pixels, OpenSTL's motion model."""
    pos = rng.uniform(0.0, free, size=(n, d, 2))
    theta = rng.uniform(0.0, 2 * np.pi, size=(n, d))
    vel = step * np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    out = np.empty((n, t, d, 2))
    for i in range(t):
        out[:, i] = pos
        pos = pos + vel
        if bounce:
            hit = ((pos <= 0) & (vel < 0)) | ((pos >= free) & (vel > 0))
            vel = np.where(hit, -vel, vel)
            pos = np.clip(pos, 0.0, free)
    return out


def paste_max(canvas: np.ndarray, digit: np.ndarray, x: int, y: int) -> None:
    """Combine ``digit`` into ``canvas`` at top-left (x, y) by pixel-wise maximum, clipped at the edges."""
    h, w = digit.shape
    ch, cw = canvas.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, cw), min(y + h, ch)
    if x0 < x1 and y0 < y1:
        region = canvas[y0:y1, x0:x1]
        np.maximum(region, digit[y0 - y : y1 - y, x0 - x : x1 - x], out=region)


def generate_sequences(digits: np.ndarray, cfg: Config, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Moving MNIST from digit images (K, s, s) uint8.

    Returns frames (N, T, H, W) uint8 and positions (N, T, D, 2) float32: the (x, y) top-left at
    which each digit was drawn (whole pixels).
    """
    if digits.ndim != 3 or digits.shape[1] != digits.shape[2]:
        raise ValueError(f"digit images must be (K, s, s), got {digits.shape}")
    size = digits.shape[1]
    free = cfg.canvas - size
    if free <= 0:
        raise ValueError(f"moving_mnist.canvas ({cfg.canvas}) must be larger than the digits ({size} px)")
    n, t, d = cfg.num_sequences, cfg.seq_len, cfg.digits_per_sequence
    chosen = rng.integers(0, len(digits), size=(n, d))
    drawn = np.rint(trajectories(n, t, d, free, cfg.speed * free, cfg.bounce, rng)).astype(np.int64)
    frames = np.zeros((n, t, cfg.canvas, cfg.canvas), dtype=np.uint8)
    for s in tqdm(range(n), desc="moving mnist", unit="seq"):
        for i in range(t):
            for j in range(d):
                paste_max(frames[s, i], digits[chosen[s, j]], *drawn[s, i, j])
    return frames, drawn.astype(np.float32)


def load_test_file(path: Path, canvas: int, max_sequences: int, name: str | None = None) -> np.ndarray:
    """The standard test file ([T, N, H, W] uint8) as (N, T, H, W), at most ``max_sequences``.

    Errors name ``name`` (default: the path).
    """
    name = name or str(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{name}: not a readable .npy array: {exc}") from exc
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[2:] != (canvas, canvas):
        raise ValueError(
            f"{name}: expected a uint8 array [T, N, {canvas}, {canvas}] (moving_mnist.canvas = {canvas}), "
            f"got {arr.dtype} {arr.shape}"
        )
    return arr[:, :max_sequences].transpose(1, 0, 2, 3)


def _download(cfg: DownloadConfig, canvas: int, writer: EpisodeStoreWriter) -> None:
    with tempfile.TemporaryDirectory(prefix="moving-mnist-") as tmp:
        path = Path(tmp) / "mnist_test_seq.npy"
        fetch(cfg.url, path, cfg.sha256, cfg.allowed_schemes, cfg.allowed_hosts, desc="moving mnist")
        sequences = load_test_file(path, canvas, cfg.max_sequences, name=cfg.url)
        for seq in tqdm(sequences, desc="moving mnist", unit="seq"):
            writer.add_episode(frames=np.ascontiguousarray(seq)[..., None])
        del sequences  # release the memory map before the directory is removed


def run(cfg: Config, digits_path: Path = DIGITS, out: Path = OUT, store_cfg: StoreConfig | None = None) -> dict:
    """Write the frames store at ``out``; returns its metrics."""
    if cfg.source == "download":
        attrs = {"source": DOWNLOAD_SOURCE, "has_positions": False, "canvas": cfg.canvas, "digit_size": 28}
        with EpisodeStoreWriter(out, store_cfg, attrs=attrs) as w:
            _download(cfg.download, cfg.canvas, w)
    else:
        store = EpisodeStore.open(digits_path)
        digits = store.array("images")[:]
        attrs = {"source": f"generate: from {store.attrs.get('source', 'unknown')}", "has_positions": True,
                 "canvas": cfg.canvas, "digit_size": int(digits.shape[1])}
        frames, positions = generate_sequences(digits, cfg, np.random.default_rng(cfg.seed))
        with EpisodeStoreWriter(out, store_cfg, attrs=attrs) as w:
            for f, p in zip(frames, positions):
                w.add_episode(frames=f[..., None], positions=p)
    log.info("%s: %d episodes, %d frames (%s)", out, len(w.episode_ends), w.n, attrs["source"])
    return {"frames": w.n, "episodes": len(w.episode_ends), "source": attrs["source"],
            "has_positions": attrs["has_positions"]}


def main() -> None:
    cfg = load_section("moving_mnist", Config)
    store_cfg = load_section("store", StoreConfig)
    with stage_run("moving_mnist", None, cfg) as r:
        metrics = run(cfg, DIGITS, OUT, store_cfg)
        write_json(metrics_path("moving_mnist"), metrics)
        r.log_metrics(metrics)


if __name__ == "__main__":
    run_stage(main)

"""Every frame's latents (or token ids) from a trained tokenizer, into an episode store: the
``latents`` params and ``run``, which reads the frames chunk by chunk, encodes each episode in the
tokenizer's windows and writes ``latents.zarr``. The stage ``latents`` (``stages/latents.py``)
calls it; ``bench/bench_latents.py`` measures it.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from pydantic import Field

from models.tokenizers import Tokenizer, pixels
from pipeline.checkpoint import load_model
from pipeline.config import StrictModel
from pipeline.paths import FRAMES_KEY, LATENTS_KEY
from pipeline.reader import iter_batches
from pipeline.store import EpisodeStore, EpisodeStoreWriter, StoreConfig
from pipeline.train import resolve_device

log = logging.getLogger(__name__)


T = TypeVar("T")
_DONE = object()


class Config(StrictModel):
    """The ``latents`` section of params.yaml."""

    batch_frames: int = Field(256, gt=0, description="frames read and encoded per batch (rounded up to whole store chunks)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")


def window_bounds(episode_ends: np.ndarray, window: int) -> np.ndarray:
    """Sorted frame indices where an encode window starts or ends: each episode from its start in
    steps of ``window``, plus the end of every episode."""
    starts = np.concatenate([[0], episode_ends[:-1]])
    cuts = [np.arange(s, e, window) for s, e in zip(starts, episode_ends)]
    return np.unique(np.concatenate([*cuts, episode_ends]))


def prefetch(items: Iterator[T]) -> Iterator[T]:
    """``items`` with the next one read in a background thread meanwhile (zarr decompression
    releases the GIL, so reading overlaps encoding)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(next, items, _DONE)
        while (item := pending.result()) is not _DONE:
            pending = pool.submit(next, items, _DONE)
            yield item


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


@torch.no_grad()
def encode_frames(model: Tokenizer, frames: np.ndarray, bounds: np.ndarray, device: torch.device) -> np.ndarray:
    """Latents of ``frames`` (N, H, W, C) uint8 cut into windows at ``bounds`` (0 .. N).

    Windows of equal length are encoded together, as one batch of (B, length) frames.
    """
    lengths = np.diff(bounds)
    out = np.empty((len(frames), *model.latent_shape), dtype=_numpy_dtype(model.latent_dtype))
    for length in np.unique(lengths):
        starts = bounds[:-1][lengths == length]
        idx = (starts[:, None] + np.arange(length)).reshape(-1)
        x = pixels(torch.from_numpy(frames[idx]).to(device))
        z = model.encode(x.reshape(len(starts), int(length), *x.shape[1:]))
        out[idx] = z.to(model.latent_dtype).reshape(len(idx), *model.latent_shape).cpu().numpy()
    return out


def run(cfg: Config, frames_path: Path | str, tokenizer_dir: Path | str, out_path: Path | str,
        store_cfg: StoreConfig | None = None) -> dict:
    """Encode every frame of ``frames_path`` into the episode store ``out_path``; returns metrics."""
    store_cfg = store_cfg or StoreConfig()
    device = resolve_device(cfg.device)
    model, meta = load_model(tokenizer_dir, "tokenizer", device)
    store = EpisodeStore.open(frames_path)
    frames_arr = store.array(FRAMES_KEY)
    if list(frames_arr.shape[1:]) != meta["frame_shape"]:
        raise ValueError(
            f"{frames_path}: frames are {tuple(frames_arr.shape[1:])} but the tokenizer in {tokenizer_dir} "
            f"was trained on {tuple(meta['frame_shape'])}; rerun the tokenizer stage"
        )
    window = int(meta["encode_window"])
    bounds = window_bounds(store.episode_ends, window)
    chunk = int(frames_arr.chunks[0])
    batch = -(-cfg.batch_frames // chunk) * chunk
    attrs = {
        "kind": meta["kind"],
        "latent_shape": list(model.latent_shape),
        "latent_dtype": meta["latent_dtype"],
        "encode_window": window,
        "frame_shape": meta["frame_shape"],
    }
    if meta["kind"] == "quantize":
        attrs.update(vocab_size=model.vocab_size, mask_id=model.mask_id)

    t0 = time.perf_counter()
    with EpisodeStoreWriter(out_path, store_cfg, attrs) as writer:
        episodes = _Episodes(writer, store.episode_ends)
        carry = np.empty((0, *frames_arr.shape[1:]), dtype=frames_arr.dtype)
        for start, frames in prefetch(iter_batches(frames_path, FRAMES_KEY, batch, progress=True)):
            frames = np.concatenate([carry, frames]) if len(carry) else frames
            first = start - len(carry)
            last = start + len(frames) - len(carry)
            # encode up to the last window boundary inside what has been read; carry the rest
            inside = bounds[(bounds >= first) & (bounds <= last)]
            cut = int(inside[-1]) - first
            if cut > 0:
                episodes.add(encode_frames(model, frames[:cut], inside - first, device))
            carry = frames[cut:]
        if len(carry):
            raise RuntimeError(f"{frames_path}: {len(carry)} frames after the last episode end")
    seconds = time.perf_counter() - t0
    n = store.n_frames
    log.info("%s: %d frames in %.1f s (%.0f frames/s) -> %s", frames_path, n, seconds, n / seconds, out_path)
    return {
        "kind": meta["kind"],
        "frames": n,
        "episodes": store.n_episodes,
        "seconds": seconds,
        "frames_per_s": n / seconds,
        "latent_values_per_frame": int(np.prod(model.latent_shape)),
    }


class _Episodes:
    """Collects encoded frames in order and hands whole episodes to the writer."""

    def __init__(self, writer: EpisodeStoreWriter, episode_ends: np.ndarray):
        self.writer = writer
        self.ends = [int(e) for e in episode_ends]
        self.parts: list[np.ndarray] = []
        self.pos = 0          # frames received
        self.written = 0      # frames handed to the writer
        self.episode = 0

    def add(self, latents: np.ndarray) -> None:
        self.parts.append(latents)
        self.pos += len(latents)
        while self.episode < len(self.ends) and self.ends[self.episode] <= self.pos:
            buf = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
            take = self.ends[self.episode] - self.written
            self.writer.add_episode(**{LATENTS_KEY: buf[:take]})
            self.parts = [buf[take:]] if len(buf) > take else []
            self.written += take
            self.episode += 1

"""Evaluation helpers shared by the model stages (tokenizer, dynamics, policy, evaluate).

- The held-out split: whole episodes, chosen once by the tokenizer stage (``split_episodes``) and
  recorded in its ``tokenizer.json`` (``val_episodes``); every later stage holds out the same ones,
  so no model in an evaluation has seen them (``held_out_split``).
- Held-out windows, the mean training frame, reconstructions through a tokenizer, image quality.
- ``store_fingerprint``: identifies the data a run trained on (every byte of the arrays used), so a
  checkpoint is resumed only on the same data.
- Per-horizon frame errors of rollouts against the truth (``horizon_errors``).
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from models.tokenizers import pixels
from pipeline.image_metrics import (
    NA,
    Distance,
    collapse_ratio,
    psnr,
    spread,
    ssim,
    to_images,
)
from pipeline.paths import FRAMES_KEY
from pipeline.reader import iter_batches, window_index
from pipeline.store import EpisodeStore

# -- the held-out split --------------------------------------------------------------------------


def held_out_split(n_episodes: int, val_episodes: list[int] | np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, held-out ids) of a store of ``n_episodes`` episodes, given the held-out ids
    recorded by the tokenizer stage. ``where`` names the record in errors."""
    val = np.asarray(sorted(int(v) for v in val_episodes), dtype=np.int64)
    if len(val) == 0:
        raise ValueError(f"{where}: no held-out episodes recorded; rerun the tokenizer stage")
    if val.min() < 0 or val.max() >= n_episodes:
        raise ValueError(f"{where}: held-out episode {int(val.max())} does not exist in a store of "
                         f"{n_episodes} episodes; the tokenizer was trained on other data: rerun it")
    train = np.setdiff1d(np.arange(n_episodes, dtype=np.int64), val)
    if len(train) == 0:
        raise ValueError(f"{where}: every episode is held out; nothing left to train on")
    return train, val


def split_held_out(held_out: np.ndarray, test_fraction: float, seed: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(validation ids, test ids): the held-out episodes split once more, seeded, so that choices
    are made on validation episodes and figures reported on test episodes. ``round(n *
    test_fraction)`` episodes (at least 1, at most n - 1) are test episodes."""
    held = np.asarray(sorted(int(v) for v in held_out), dtype=np.int64)
    if len(held) < 2:
        raise ValueError(f"{where}: {len(held)} held-out episode; a validation and a test split need at least 2 "
                         f"(raise the tokenizer's eval.val_fraction)")
    n_test = min(len(held) - 1, max(1, int(round(len(held) * test_fraction))))
    order = np.random.default_rng(seed).permutation(len(held))
    return np.sort(held[order[n_test:]]), np.sort(held[order[:n_test]])


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of 0..n-1 with no fixed point (n >= 2), seeded: sequence i takes the actions of
    sequence ``p[i]``, never its own."""
    if n < 2:
        raise ValueError("deranging actions across sequences needs at least 2 sequences")
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


# -- intervals -----------------------------------------------------------------------------------


def episode_resamples(groups: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-episode bootstrap: ``(counts (n_boot, G), group index (N,))``: how often each of the G
    episodes of ``groups`` (N,) (the episode of each measured item) is drawn in each resample of G
    episodes with replacement. Items of one episode are correlated (overlapping windows, one
    scene), so episodes, not items, are what is resampled."""
    uniq, index = np.unique(np.asarray(groups), return_inverse=True)
    g = len(uniq)
    picks = np.random.default_rng(seed).integers(0, g, size=(n_boot, g))
    counts = np.zeros((n_boot, g), dtype=np.float64)
    np.add.at(counts, (np.repeat(np.arange(n_boot), g), picks.reshape(-1)), 1.0)
    return counts, index


def resampled_sums(values: np.ndarray, index: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums and item counts of ``values`` (N, ...) (NaN: not measured) in each resample:
    ``(sums (n_boot, ...), n (n_boot, ...))``; their ratio is the resampled mean."""
    v = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(v)
    g = counts.shape[1]
    per_sum = np.zeros((g, *v.shape[1:]))
    per_n = np.zeros((g, *v.shape[1:]))
    np.add.at(per_sum, index, np.where(ok, v, 0.0))
    np.add.at(per_n, index, ok.astype(np.float64))
    flat = counts @ per_sum.reshape(g, -1), counts @ per_n.reshape(g, -1)
    return flat[0].reshape(-1, *v.shape[1:]), flat[1].reshape(-1, *v.shape[1:])


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval of bootstrap ``samples`` (n_boot, ...) (NaN resamples ignored)."""
    lo = (1 - level) / 2 * 100
    with np.errstate(all="ignore"):
        low, high = np.nanpercentile(samples, [lo, 100 - lo], axis=0)
    return low, high


# -- data ----------------------------------------------------------------------------------------


def store_fingerprint(store: EpisodeStore, keys: list[str], batch: int = 4096) -> str:
    """sha256 (16 hex digits) of a store's episode ends, attrs and every value of ``keys``."""
    h = hashlib.sha256(store.episode_ends.tobytes())
    h.update(json.dumps(store.attrs, sort_keys=True, default=str).encode())
    for key in keys:
        arr = store.array(key)
        h.update(f"{key}:{arr.dtype}:{arr.shape}".encode())
        for _, block in iter_batches(store.path, key, batch):
            h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()[:16]


def held_out_windows(store: EpisodeStore, val_ids: np.ndarray, window: int, max_frames: int,
                     key: str = FRAMES_KEY) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of held-out episodes, evenly picked, at most ``max_frames`` frames:
    ``(arrays (N, window, ...), [start, end) rows (N, 2))``."""
    idx = window_index(store.episode_ends, val_ids, window, window)
    if len(idx) == 0:
        raise ValueError(f"{store.path}: no held-out window of {window} frames in episodes {list(val_ids)[:8]}")
    n = max(1, min(len(idx), max_frames // window))
    pick = idx[np.linspace(0, len(idx) - 1, n).round().astype(int)]
    arr = store.array(key)
    return np.stack([arr[int(a) : int(b)] for a, b in pick]), pick


def mean_frame(store: EpisodeStore, train_ids: np.ndarray, key: str = FRAMES_KEY, batch: int = 1024) -> np.ndarray:
    """The mean training frame (H, W, C) in [0, 1], over every frame of the training episodes."""
    is_train = store.frames_of(train_ids)
    total = np.zeros(store.array(key).shape[1:], dtype=np.float64)
    for start, frames in iter_batches(store.path, key, batch):
        keep = is_train[start : start + len(frames)]
        total += frames[keep].sum(axis=0, dtype=np.float64)
    return (total / max(1, int(is_train.sum())) / 255).astype(np.float32)


# -- measuring -----------------------------------------------------------------------------------


@torch.no_grad()
def reconstruct(model: torch.nn.Module, windows: np.ndarray, batch_frames: int,
                device: torch.device) -> tuple[np.ndarray, np.ndarray, float]:
    """A tokenizer's reconstructions (N*T, H, W, C) of uint8 windows (N, T, H, W, C), the targets
    likewise (in [0, 1]), and the latent std across frames."""
    t = windows.shape[1]
    per = max(1, batch_frames // t)
    recons, targets, latents = [], [], []
    for i in range(0, len(windows), per):
        x = pixels(torch.from_numpy(windows[i : i + per]).to(device))
        z = model.encode(x)
        recons.append(to_images(model.decode(z)))
        targets.append(to_images(x))
        latents.append(z.flatten(0, 1).float().cpu())
    return np.concatenate(recons), np.concatenate(targets), spread(torch.cat(latents))


def quality(recon: np.ndarray, target: np.ndarray, lpips_fn: Distance | None, lpips_reason: str | None,
            device: torch.device) -> dict:
    """psnr, ssim, lpips (or "n/a" and lpips_reason), collapse_ratio of images (N, H, W, C) in [0, 1]."""
    out = {"psnr": psnr(recon, target), "ssim": ssim(recon, target), "collapse_ratio": collapse_ratio(recon, target)}
    if lpips_fn is None:
        out.update(lpips=NA, lpips_reason=lpips_reason)
    else:
        with torch.no_grad():
            a = torch.from_numpy(recon).permute(0, 3, 1, 2).to(device)
            b = torch.from_numpy(target).permute(0, 3, 1, 2).to(device)
            out["lpips"] = float(torch.cat([lpips_fn(a[i : i + 64], b[i : i + 64]) for i in range(0, len(a), 64)]).mean())
    return out


def horizon_errors(pred: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """Per-horizon errors of predicted frames against the truth, both (N, H, h, w, c) in [0, 1].

    ``mse`` (H,): the mean squared error per pixel; ``mse_frame_sum`` (H,): squared error summed over
    a frame's pixels (OpenSTL's MSE); ``psnr`` (H,): mean over sequences of each frame's PSNR (dB,
    data range 1, capped like ``image_metrics.psnr``).
    """
    if pred.shape != target.shape or pred.ndim != 5:
        raise ValueError(f"predictions {pred.shape} and targets {target.shape} must both be (N, H, h, w, c)")
    err = (pred.astype(np.float64) - target.astype(np.float64)) ** 2
    per_frame = err.reshape(*err.shape[:2], -1)
    mse = per_frame.mean(axis=2)                                    # (N, H)
    with np.errstate(divide="ignore"):
        p = np.minimum(10 * np.log10(1.0 / np.maximum(mse, 1e-20)), 100.0)
    return {"mse": mse.mean(axis=0), "mse_frame_sum": per_frame.sum(axis=2).mean(axis=0), "psnr": p.mean(axis=0)}

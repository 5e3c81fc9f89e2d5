"""Encode throughput of the ``latents`` stage vs the tokenizer's forward pass; training steps/s.

A sharded episode store (the default ``store`` params) of gameplay-like 64x64x3 uint8 frames is
written with ``EpisodeStoreWriter``. For each tokenizer kind, built from the ``tokenizer.gameplay``
params (untrained weights: the cost does not depend on them):

- ``stage``: ``pipeline.latents.run`` (what the stage runs) end to end (chunk-aligned reads, encoding, writing the store);
- ``forward``: the baseline, ``model.encode`` on the same frames held in memory, in batches of the
  same size and the same windows, nothing read or written.

Throughput is frames/s, the median of ``--repeats`` interleaved runs; ratio = stage / forward
(goal >= 0.8 for the learned tokenizers; ``quantize`` costs almost nothing to compute, so its ratio
shows the cost of reading and writing the stores). Training: steady-state steps/s of
``pipeline.train.train`` on the store through the window reader (``loader`` params) vs the same
optimizer steps on one in-memory batch.

Run from the repository root: ``.venv/bin/python -m bench.bench_latents``. On a GPU machine the
same command measures the GPU (``device: auto``).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import report
from models.tokenizers import build_tokenizer, pixels, reconstruction_loss
from pipeline.checkpoint import save_model
from pipeline.config import load_section
from pipeline import latents
from pipeline.reader import LoaderConfig, WindowDataset
from pipeline.store import EpisodeStoreWriter, StoreConfig
from pipeline.tokenizer import Config, encode_window, model_config, train_config
from pipeline.train import resolve_device, step_batches, train

GOAL = 0.8
FRAME_SHAPE = (64, 64, 3)


def gameplay_like(n: int, rng: np.random.Generator) -> np.ndarray:
    """Frames of 8x8-pixel tiles of a few colours, scrolled by one pixel per frame."""
    tiles = rng.integers(0, 6, (n // 8 + 12, 12))
    palette = rng.integers(0, 256, (6, 3), dtype=np.uint8)
    world = palette[np.repeat(np.repeat(tiles, 8, axis=0), 8, axis=1)]
    return np.stack([world[t : t + 64, t % 32 : t % 32 + 64] for t in range(n)])


def write_store(path: Path, episodes: int, length: int, cfg: StoreConfig) -> np.ndarray:
    rng = np.random.default_rng(0)
    frames = []
    with EpisodeStoreWriter(path, cfg) as w:
        for _ in range(episodes):
            ep = gameplay_like(length, rng)
            w.add_episode(frames=ep)
            frames.append(ep)
    return np.concatenate(frames)


@torch.no_grad()
def forward_fps(model, frames: np.ndarray, bounds: np.ndarray, batch: int, device) -> float:
    """Frames/s of model.encode on in-memory frames, in the stage's batches and windows."""
    t0 = time.perf_counter()
    for s in range(0, len(frames), batch):
        inside = bounds[(bounds >= s) & (bounds <= s + batch)] - s
        latents.encode_frames(model, frames[s : s + int(inside[-1])], inside, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(frames) / (time.perf_counter() - t0)


def bench_encode(kind: str, cfg: Config, store: Path, frames: np.ndarray, ends: np.ndarray, root: Path,
                 lcfg: latents.Config, scfg: StoreConfig, repeats: int) -> dict:
    device = resolve_device(lcfg.device)
    torch.manual_seed(0)
    model = build_tokenizer(kind, **model_config(cfg, kind, FRAME_SHAPE)).eval()
    window = encode_window(cfg.model_copy(update={"kind": kind}))
    save_model(model, "tokenizer", kind, {
        "latent_shape": list(model.latent_shape), "encode_window": window, "frame_shape": list(FRAME_SHAPE),
        "latent_dtype": str(model.latent_dtype).removeprefix("torch."),
    }, root / f"tok-{kind}")
    model = model.to(device)
    bounds = latents.window_bounds(ends, window)
    chunk = scfg.chunk_frames
    batch = -(-lcfg.batch_frames // chunk) * chunk
    stage, forward = [], []
    forward_fps(model, frames[:batch], bounds[bounds <= batch], batch, device)  # warm-up
    for _ in range(repeats):
        m = latents.run(lcfg, store, root / f"tok-{kind}", root / f"latents-{kind}.zarr", scfg)
        stage.append(m["frames_per_s"])
        forward.append(forward_fps(model, frames, bounds, batch, device))
    s, f = statistics.median(stage), statistics.median(forward)
    return {"stage_fps": round(s, 1), "forward_fps": round(f, 1), "ratio": round(s / f, 3)}


def bench_train(kind: str, cfg: Config, store: Path, root: Path, loader: LoaderConfig, steps: int) -> dict:
    """Steady-state steps/s of the training loop (the marginal rate between a short and a long run,
    which leaves out starting the loader's workers) and of bare steps on one in-memory batch."""
    cfg = cfg.model_copy(update={"kind": kind})
    window = encode_window(cfg)
    base = train_config(cfg).model_copy(update={"eval_every": 10**9, "ckpt_every": 10**9, "log_every": 10**9})

    def loss_fn(model, batch, step):
        x = pixels(batch["frames"])
        return reconstruction_loss(model(x), x)

    def fresh():
        torch.manual_seed(0)
        return build_tokenizer(kind, **model_config(cfg, kind, FRAME_SHAPE))

    dataset = WindowDataset([(store, "frames")], window, cfg.mae.stride if kind == "mae" else 1, None, loader)
    seconds = {}
    for n in (2, steps // 4, steps):  # the first run starts the loader's forkserver: a warm-up
        tcfg = base.model_copy(update={"steps": n})
        t0 = time.perf_counter()
        train(fresh(), loss_fn, step_batches(dataset, tcfg, loader), tcfg, root / f"ckpt-{kind}-{n}")
        seconds[n] = time.perf_counter() - t0
    loop = (steps - steps // 4) / (seconds[steps] - seconds[steps // 4])

    device = resolve_device(base.device)
    model = fresh().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=base.lr)
    batch = {"frames": torch.from_numpy(np.stack([dataset[i]["frames"] for i in range(base.batch_size)])).to(device)}
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            t0 = time.perf_counter()
        loss, _ = loss_fn(model, batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bare = steps / (time.perf_counter() - t0)
    return {"train_steps_per_s": round(loop, 2), "bare_steps_per_s": round(bare, 2),
            "frames_per_step": base.batch_size * window}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--length", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--kinds", default="quantize,cnn,mae")
    args = parser.parse_args()
    cfg = load_section("tokenizer", Config, item="gameplay")
    lcfg = load_section("latents", latents.Config)
    scfg = load_section("store", StoreConfig)
    loader = load_section("loader", LoaderConfig)
    kinds = args.kinds.split(",")
    figures: dict = {"frames": args.episodes * args.length, "batch_frames": lcfg.batch_frames,
                     "device": str(resolve_device(lcfg.device)), "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        frames = write_store(root / "frames.zarr", args.episodes, args.length, scfg)
        ends = np.arange(1, args.episodes + 1) * args.length
        for kind in kinds:
            figures[kind] = bench_encode(kind, cfg, root / "frames.zarr", frames, ends, root, lcfg, scfg, args.repeats)
            if kind != "quantize" and args.train_steps:
                figures[kind].update(bench_train(kind, cfg, root / "frames.zarr", root, loader, args.train_steps))
    figures["goal"] = GOAL
    # the goal concerns learned tokenizers; quantize's forward pass is nearly free, so its ratio
    # measures reading and writing the stores (reported for context)
    figures["meets_goal"] = all(figures[k]["ratio"] >= GOAL for k in kinds if k != "quantize")
    report("latents", figures)


if __name__ == "__main__":
    main()

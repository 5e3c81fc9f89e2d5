"""Stage ``latents`` (foreach dataset): encode every frame with the trained tokenizer.

Reads ``data/<dataset>/frames.zarr`` in chunk-aligned batches, encodes them with the tokenizer of
``data/<dataset>/tokenizer/`` and writes ``data/<dataset>/latents.zarr``: an episode store with the
frames' ``meta/episode_ends`` and one array ``data/latents`` of shape (T, *latent_shape):

- ``quantize``: (T, size, size) uint8 token ids 0..levels-1 (``mask_id`` = levels is never stored);
- ``cnn``: (T, h, w, C) float16 in [-1, 1] (channels last, like the frames);
- ``mae``: (T, n_latents, latent_dim) float16 in [-1, 1]. The MAE is block-causal over time: each
  episode is encoded in consecutive windows of ``encode_window`` frames from its start, so the
  latents of frame t depend on the frames of its window up to t (as in training).

Attrs: ``kind``, ``latent_shape``, ``latent_dtype``, ``encode_window``, ``frame_shape``, and for
``quantize`` ``vocab_size`` and ``mask_id``. Metric: throughput in frames/s.
"""
from __future__ import annotations


from pipeline.atomic import write_json
from pipeline.cli import run_stage
from pipeline.config import load_section
from pipeline.latents import Config, run
from pipeline.paths import DATASETS, frames_store, latents_store, metrics_path, tokenizer_dir
from pipeline.store import StoreConfig
from pipeline.tracking import stage_run


def main(item: str | None = None) -> None:
    cfg = load_section("latents", Config)
    store_cfg = load_section("store", StoreConfig)
    with stage_run("latents", item, cfg) as r:
        metrics = run(cfg, frames_store(item), tokenizer_dir(item), latents_store(item), store_cfg)
        write_json(metrics_path("latents", item), metrics)
        r.log_metrics(metrics)


if __name__ == "__main__":
    run_stage(main, foreach=DATASETS)

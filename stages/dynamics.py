"""Stage ``dynamics`` (foreach dataset): an action-conditioned world model over the frame latents.

Two families, chosen by ``dynamics.<dataset>.family`` (models in ``models/``):

- ``masked`` (``models/masked_dynamics.py``): a masked-token video transformer (CoPilot4D /
  MaskGIT) over the ``quantize`` tokenizer's token ids; three objectives mixed by params; rollouts
  frame by frame, each frame sampled by iterative unmasking or (``masked.decode: expected``) set to
  each token's expected gray level, the model's minimum-MSE point estimate.
- ``flow`` (``models/flow_dynamics.py``): DreamerV4-style flow matching with x-prediction,
  diffusion forcing (per-frame signal levels, lightly corrupted context) and shortcut forcing
  (bootstrap targets for larger steps), over the continuous latents of a ``cnn`` or ``mae``
  tokenizer; training alternates many short windows with occasional long ones; sampling takes K
  shortcut Euler steps per frame with the past frames' keys and values cached.

A family whose kind of latents the tokenizer does not give is a params error naming both keys.

Data: windows of ``data/<ds>/latents.zarr`` (``latents``) and ``data/<ds>/actions.zarr``
(``actions`` [dx, dy], ``valid``; ``action_class`` for discrete actions), taken with a stride inside
episodes, read through ``pipeline/reader.py``; trained with the shared loop (``pipeline/train.py``:
resume, EMA, checkpoints, MLflow, tqdm). Actions condition frames as ``models.common.frame_actions``
defines: frame t+1 is predicted from frames <= t and the actions up to t. The held-out episodes are
the tokenizer's (``tokenizer.json`` ``val_episodes``): no training window comes from them.

This stage trains only; the ``evaluate`` stage rolls the model out and scores it.

Outputs: ``data/<ds>/dynamics/`` (``model.pt``, ``dynamics.json``: family, config, tokenizer kind,
action input, sampling settings, held-out episodes, the initialisation seed, training health),
``metrics/dynamics-<ds>.json`` (training health: ``final_loss``, ``steps_per_s``, ``train_seconds``)
and ``plots/dynamics-<ds>.json`` (the training loss per logged step).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import write_json
from pipeline.checkpoint import read_meta, save_model
from pipeline.cli import run_stage
from pipeline.config import ParamsError, StrictModel, load_section, params_path
from pipeline.dynamics import (
    RUN_FACTS,
    Config,
    model_config_from_data,
    build,
    sample_settings,
    sources,
    alternating_batches,
    loss_function,
)
from pipeline.evaluation import held_out_split, store_fingerprint
from pipeline.paths import (
    ACTION_CLASS_KEY,
    DATASETS,
    LATENTS_KEY,
    actions_store,
    checkpoint_dir,
    dynamics_dir,
    latents_store,
    metrics_path,
    tokenizer_dir,
)
from pipeline.reader import LoaderConfig, WindowDataset
from pipeline.store import EpisodeStore
from pipeline.tracking import stage_run
from pipeline.train import clear_checkpoint, resolve_device, train
from pipeline.world import check_family, latent_norm

log = logging.getLogger(__name__)


def run(cfg: Config, item_paths: dict[str, Path], out_dir: Path | str, work_dir: Path | str, *,
        where: str = "dynamics", tokenizer_key: str = "tokenizer.kind", loader: LoaderConfig | None = None,
        tracker=None) -> tuple[dict, list[dict]]:
    """Train the dynamics model on ``item_paths`` (``latents``, ``actions``, ``tokenizer``), save it
    to ``out_dir``. Returns (training health, the loss per logged step)."""
    tok_meta = read_meta(item_paths["tokenizer"], "tokenizer")
    try:
        check_family(cfg.family, tok_meta["kind"], f"{where}.family", tokenizer_key)
    except ValueError as exc:
        raise ParamsError(str(exc)) from None
    lat = EpisodeStore.open(item_paths["latents"])
    act = EpisodeStore.open(item_paths["actions"])
    if cfg.action_input == "discrete" and ACTION_CLASS_KEY not in act.keys:
        raise ParamsError(f"{where}.action_input is 'discrete' but {item_paths['actions']} has no "
                          f"'{ACTION_CLASS_KEY}' (only gameplay has discrete actions); use 'continuous'")
    if not np.array_equal(act.episode_ends, lat.episode_ends):
        raise ValueError(f"{act.path}: episodes differ from {lat.path}; rerun the stages that write them")
    train_ids, val_ids = held_out_split(lat.n_episodes, tok_meta["val_episodes"], f"{item_paths['tokenizer']}")
    is_train = lat.frames_of(train_ids)  # per frame
    model_cfg = model_config_from_data(cfg, tok_meta, act, is_train)
    train_cfg = cfg.train
    device = resolve_device(train_cfg.device)
    torch.manual_seed(train_cfg.seed)  # the evaluate stage's prior-only model starts from the same weights
    model = build(cfg, tok_meta, where, model_cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %s model, %.2fM parameters, %d train / %d held-out episodes", where, cfg.family, n_params / 1e6,
             len(train_ids), len(val_ids))

    src = sources(lat.path, act.path, cfg.action_input == "discrete")
    short = WindowDataset(src, cfg.window, cfg.stride, train_ids, loader)
    long, long_batch = None, 0
    every = cfg.flow.long_every if cfg.family == "flow" else 0
    if every:
        try:
            long = WindowDataset(src, cfg.flow.long_window, cfg.stride, train_ids, loader)
            long_batch = max(1, cfg.train.batch_size * cfg.window // cfg.flow.long_window)
        except ValueError:
            log.warning("%s: no training episode holds a long window of %d frames; short windows only",
                        where, cfg.flow.long_window)
            every = 0
    mask_id = tok_meta["config"]["levels"] if cfg.family == "masked" else None
    norm = None
    if cfg.family == "flow":  # per-channel statistics of the training latents
        norm = latent_norm(lat.array(LATENTS_KEY)[:][is_train])
    config = {"params": cfg.model_dump(mode="json"), "model": model_cfg,
              "data": store_fingerprint(lat, [LATENTS_KEY]) + store_fingerprint(act, act.keys)}
    t0 = time.perf_counter()
    result = train(model, loss_function(cfg, mask_id, norm), alternating_batches(short, long, train_cfg, every, long_batch, loader),
                   train_cfg, Path(work_dir), config=config, run=tracker, desc=f"dynamics {cfg.family}")
    train_seconds = time.perf_counter() - t0
    done = result.step - result.resumed_from
    model = result.model.eval()
    losses = [{"step": int(r["step"]), "loss": float(r["loss"])} for r in result.history]
    metrics = {
        "family": cfg.family, "tokenizer_kind": tok_meta["kind"], "action_input": cfg.action_input,
        "n_params": int(n_params), "train_steps": result.step, "train_seconds": train_seconds,
        "steps_per_s": done / max(train_seconds, 1e-9), "final_loss": losses[-1]["loss"] if losses else None,
        "train_episodes": int(len(train_ids)), "val_episodes": int(len(val_ids)),
    }
    if result.resumed_from:
        metrics["resumed_from_step"] = result.resumed_from
    log.info("%s: final loss %s after %d steps (%.1f steps/s)", where, metrics["final_loss"], result.step,
             metrics["steps_per_s"])
    meta = {"tokenizer_kind": tok_meta["kind"], "action_input": cfg.action_input, "sample": sample_settings(cfg),
            "val_episodes": val_ids.tolist(), "latent_shape": tok_meta["latent_shape"], "latent_norm": norm,
            "init_seed": train_cfg.seed, "metrics": {k: v for k, v in metrics.items() if k not in RUN_FACTS}}
    save_model(model, "dynamics", cfg.family, meta, Path(out_dir))
    clear_checkpoint(work_dir)
    return metrics, losses


def params_for(item: str) -> tuple[Config, str]:
    """The dataset's dynamics params, checked against its tokenizer kind before any work."""
    cfg = load_section("dynamics", Config, item=item)
    tok = load_section("tokenizer", _TokenizerKind, item=item)
    try:
        check_family(cfg.family, tok.kind, f"dynamics.{item}.family", f"tokenizer.{item}.kind")
    except ValueError as exc:
        raise ParamsError(f"{params_path()}: {exc}") from None
    return cfg, tok.kind


class _TokenizerKind(StrictModel):
    """Only the tokenizer's kind (the rest of its block is the tokenizer stage's to validate)."""

    model_config = {**StrictModel.model_config, "extra": "ignore"}
    kind: str = "quantize"


def main(item: str) -> None:
    cfg, _ = params_for(item)
    loader = load_section("loader", LoaderConfig)
    paths = {"latents": latents_store(item), "actions": actions_store(item), "tokenizer": tokenizer_dir(item)}
    with stage_run("dynamics", item, cfg) as r:
        metrics, rows = run(cfg, paths, dynamics_dir(item), checkpoint_dir("dynamics", item), where=f"dynamics.{item}",
                            tokenizer_key=f"tokenizer.{item}.kind", loader=loader, tracker=r)
        write_json(metrics_path("dynamics", item), metrics)
        write_json(Path("plots") / f"dynamics-{item}.json", rows)
        r.log_metrics(metrics)
        r.log_model(dynamics_dir(item))  # model.pt: the state dict; dynamics.json: class and config


if __name__ == "__main__":
    run_stage(main, foreach=DATASETS)

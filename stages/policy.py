"""Stage ``policy`` (foreach dataset): trains the MDLM policy and its MLP baseline.

The policy (``models/policy.py``) is masked discrete diffusion (MDLM) over the next ``horizon``
discrete actions, conditioned on the latent state (the latents of the current frame and the
``state_frames - 1`` frames before it, and optionally the moves that led to it); the baseline
(``MLPPolicy``) predicts one distribution per horizon position from the same state. Both train on
windows of ``state_frames + horizon`` frames of ``latents.zarr`` and ``actions.zarr`` of the
training episodes (those the tokenizer did not hold out), through the shared reader and training
loop; the params, the data and the saving are ``pipeline/policy.py``'s. The MLP holds back
``mlp.val_fraction`` of the training episodes and keeps the weights of its lowest NLL on them
(early stopping; ``pipeline.policy.BestCheckpoint``).

Outputs: ``data/<ds>/policy/`` (``model.pt``, ``mlp.pt``, ``policy.json``: see
``pipeline.policy.save_policy``) and ``metrics/policy-<ds>.json`` with training health only. The
evaluation (held-out NLL and accuracy beside the baselines, imagination inside the world model) is
the ``evaluate`` stage's.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from models import registry
from models.policy import curriculum_t_max, mlp_policy_loss, training_loss
from pipeline.atomic import write_json
from pipeline.checkpoint import read_meta
from pipeline.cli import run_stage
from pipeline.config import ParamsError, load_section
from pipeline.evaluation import held_out_split, store_fingerprint
from pipeline.paths import (
    ACTION_CLASS_KEY,
    ACTIONS_KEY,
    DATASETS,
    LATENTS_KEY,
    VALID_KEY,
    actions_store,
    checkpoint_dir,
    latents_store,
    metrics_path,
    policy_dir,
    tokenizer_dir,
)
from pipeline.policy import BestCheckpoint, Config, fit_coder, mlp_nll, mlp_split, save_policy, split_batch
from pipeline.reader import LoaderConfig, WindowDataset
from pipeline.store import EpisodeStore
from pipeline.tracking import stage_run
from pipeline.train import clear_checkpoint, resolve_device, run_dir, step_batches, train
from pipeline.world import flow_grid

log = logging.getLogger(__name__)

MLP_VAL_WINDOWS = 2048  # the MLP's validation pairs, evenly picked from the windows of its validation episodes


def run(cfg: Config, paths: dict[str, Path], out_dir: Path | str, work_dir: Path | str, *, where: str = "policy",
        loader: LoaderConfig | None = None, tracker=None) -> dict:
    """Train both models on ``paths``' latents and actions (the held-out split of the tokenizer's
    ``paths["tokenizer"]``), save them to ``out_dir``; returns the training-health metrics."""
    tok_meta = read_meta(paths["tokenizer"], "tokenizer")
    lat, act = EpisodeStore.open(paths["latents"]), EpisodeStore.open(paths["actions"])
    train_ids, val_ids = held_out_split(lat.n_episodes, tok_meta["val_episodes"], str(paths["tokenizer"]))
    device = resolve_device(cfg.train.device)
    coder = fit_coder(cfg, act, train_ids)
    kind = "tokens" if tok_meta["kind"] == "quantize" else "continuous"
    state_shape = list(tok_meta["latent_shape"]) if kind == "tokens" else list(flow_grid(tok_meta["latent_shape"]))
    state = {"n_actions": coder.n_actions, "horizon": cfg.horizon, "state_frames": cfg.state_frames,
             "state_kind": kind, "state_shape": state_shape, "state_vocab": tok_meta["config"].get("levels", 16) + 1}
    model_cfg = {**state, **cfg.model.model_dump()}
    mlp_cfg = {**state, "past_actions": cfg.model.past_actions, **cfg.mlp.model_dump(exclude={"train", "val_fraction"})}
    try:
        torch.manual_seed(cfg.train.seed)
        model = registry.build("policy", "mdlm", model_cfg).to(device)
        mlp = registry.build("policy", "mlp", mlp_cfg).to(device)
    except ValueError as exc:
        raise ParamsError(f"{where}.model: {exc} (state latents {state_shape})") from None

    src = {LATENTS_KEY: (lat.path, LATENTS_KEY), ACTIONS_KEY: (act.path, ACTIONS_KEY), VALID_KEY: (act.path, VALID_KEY)}
    if coder.discrete:
        src[ACTION_CLASS_KEY] = (act.path, ACTION_CLASS_KEY)
    dataset = WindowDataset(src, cfg.window, cfg.stride, train_ids, loader)
    data_key = store_fingerprint(lat, [LATENTS_KEY]) + store_fingerprint(act, act.keys)
    steps, start = cfg.train.steps, cfg.loss.curriculum_start

    def loss_fn(m, batch, step):
        state, ids, past = split_batch(batch, cfg, coder, kind)
        t_max = curriculum_t_max(step, steps, start) if start < 1 else 1.0
        loss, parts = training_loss(m, ids, state, schedule=cfg.loss.schedule, weighting=cfg.loss.weighting,
                                    t_range=(1e-3, t_max), past=past)
        return loss, {k: float(v) for k, v in parts.items() if k != "loss"}

    t0 = time.perf_counter()
    result = train(model, loss_fn, step_batches(dataset, cfg.train, loader), cfg.train, Path(work_dir) / "mdlm",
                   config={"params": cfg.model_dump(mode="json"), "data": data_key}, run=tracker, desc="policy mdlm")
    train_seconds = time.perf_counter() - t0

    def mlp_loss(m, batch, step):
        state, ids, past = split_batch(batch, cfg, coder, kind)
        loss, parts = mlp_policy_loss(m, ids, state, past=past)
        return loss, {"accuracy": float(parts["accuracy"])}

    # the MLP baseline: early stopping on a validation slice of the training episodes (never the
    # held-out ones): it trains on the rest and keeps the weights of its lowest NLL on the slice
    mlp_train_ids, mlp_val_ids = mlp_split(train_ids, cfg.mlp.val_fraction, cfg.mlp.train.seed)
    mlp_run = {"params": cfg.model_dump(mode="json"), "data": data_key}
    best = None
    if len(mlp_val_ids):
        val_set = WindowDataset(src, cfg.window, cfg.stride, mlp_val_ids, loader)
        val_set.open()
        pick = np.linspace(0, len(val_set) - 1, min(len(val_set), MLP_VAL_WINDOWS)).round().astype(int)
        val_batch = {k: torch.from_numpy(np.stack([val_set[int(i)][k] for i in pick])) for k in src}
        v_state, v_ids, v_past = split_batch(val_batch, cfg, coder, kind)
        best = BestCheckpoint(lambda m: mlp_nll(m, v_state, v_ids, v_past),
                              run_dir(Path(work_dir) / "mlp", cfg.mlp.train, mlp_run) / "best.pt")
    mlp_set = WindowDataset(src, cfg.window, cfg.stride, mlp_train_ids, loader) if best is not None else dataset

    t1 = time.perf_counter()
    mlp_result = train(mlp, mlp_loss, step_batches(mlp_set, cfg.mlp.train, loader), cfg.mlp.train,
                       Path(work_dir) / "mlp", evaluate=best, config=mlp_run, desc="policy mlp baseline")
    mlp_seconds = time.perf_counter() - t1
    picked = best is not None and best.state is not None
    if picked:  # the early-stopping choice
        mlp_result.model.load_state_dict(best.state)
    model, mlp = result.model.eval(), mlp_result.model.eval()

    metrics = {
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "mlp_final_loss": mlp_result.history[-1]["loss"] if mlp_result.history else None,
        "mlp_best_step": best.best_step if picked else mlp_result.step,
        "mlp_val_nll": best.best_score if picked else None,
        "mlp_val_episodes": int(len(mlp_val_ids)),
        "train_steps": result.step, "train_seconds": train_seconds, "mlp_train_seconds": mlp_seconds,
        "steps_per_s": (result.step - result.resumed_from) / max(train_seconds, 1e-9),
        "n_params": int(sum(p.numel() for p in model.parameters())), "n_actions": coder.n_actions,
        "train_episodes": int(len(train_ids)), "val_episodes": int(len(val_ids)),
    }
    if result.resumed_from:
        metrics["resumed_from_step"] = result.resumed_from
    log.info("%s: final loss %.4f (mlp %.4f, kept its step %d of %d), %d steps in %.1f s", where,
             metrics["final_loss"] or float("nan"), metrics["mlp_final_loss"] or float("nan"),
             metrics["mlp_best_step"], mlp_result.step, result.step, train_seconds)
    meta = {"coder": coder.state_dict(), "state_frames": cfg.state_frames, "horizon": cfg.horizon,
            "state_kind": kind, "tokenizer_kind": tok_meta["kind"], "val_episodes": val_ids.tolist(),
            "sample": cfg.sample.model_dump(), "schedule": cfg.loss.schedule}
    save_policy(model, mlp, meta, Path(out_dir))
    clear_checkpoint(Path(work_dir) / "mdlm")
    clear_checkpoint(Path(work_dir) / "mlp")
    return metrics


def main(item: str) -> None:
    cfg = load_section("policy", Config, item=item)
    loader = load_section("loader", LoaderConfig)
    paths = {"latents": latents_store(item), "actions": actions_store(item), "tokenizer": tokenizer_dir(item)}
    with stage_run("policy", item, cfg) as r:
        metrics = run(cfg, paths, policy_dir(item), checkpoint_dir("policy", item), where=f"policy.{item}",
                      loader=loader, tracker=r)
        write_json(metrics_path("policy", item), metrics)
        r.log_metrics(metrics)
        r.log_model(policy_dir(item))  # model.pt, mlp.pt: state dicts; policy.json: classes and configs


if __name__ == "__main__":
    run_stage(main, foreach=DATASETS)

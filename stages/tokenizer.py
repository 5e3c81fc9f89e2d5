"""Stage ``tokenizer`` (foreach dataset): train (or build) a frame tokenizer, measure it, save it.

The kind is ``tokenizer.<dataset>.kind``: ``quantize`` (fixed 16-level tokens, no training),
``cnn`` (convolutional autoencoder) or ``mae`` (block-causal masked-autoencoder transformer);
see ``models/tokenizers.py``. Training uses the shared loop (``pipeline/train.py``) on windows of
the training episodes; its resumable state lives in ``checkpoints/tokenizer-<dataset>/`` until the
run completes, so a killed run continues where it stopped.

Measured on held-out episodes (split by whole episodes): PSNR and SSIM (scikit-image), LPIPS when
it can be built (else ``"n/a"`` and the reason), and in the same table the baselines: the mean
training image (``psnr_mean_image``) and the ``quantize`` reconstruction (``psnr_quantize``).
Health: the collapse ratio (spread of reconstructions over spread of inputs) and the latent std at
every evaluation; ``collapsed`` is true when the ratio stayed below ``health.collapse_threshold``
for ``health.collapse_patience`` evaluations in a row.

Output ``data/<dataset>/tokenizer/``: ``model.pt`` (the state dict, EMA weights when EMA is on)
and ``tokenizer.json`` (kind, model config, latent shape and dtype, metrics), written and read
back by ``pipeline.checkpoint`` (``load_tokenizer``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from models.tokenizers import (
    QuantizeConfig,
    QuantizeTokenizer,
    Tokenizer,
    build_tokenizer,
    mask_ratio_at,
    pixels,
    reconstruction_loss,
)
from pipeline.atomic import write_json
from pipeline.checkpoint import save_model
from pipeline.cli import run_stage
from pipeline.config import ParamsError, load_section
from pipeline.evaluation import (
    held_out_windows,
    mean_frame,
    quality,
    reconstruct,
    store_fingerprint,
)
from pipeline.image_metrics import (
    CollapseGuard,
    Distance,
    collapse_ratio,
    image_grid,
    lpips_or_reason,
    psnr,
    to_images,
)
from pipeline.paths import (
    DATASETS,
    FRAMES_KEY,
    checkpoint_dir,
    frames_store,
    metrics_path,
    tokenizer_dir,
)
from pipeline.reader import LoaderConfig, WindowDataset, split_episodes
from pipeline.store import EpisodeStore
from pipeline.tokenizer import (
    RUN_FACTS,
    Config,
    model_config,
    encode_window,
    train_config,
)
from pipeline.tracking import stage_run
from pipeline.train import (
    TrainConfig,
    clear_checkpoint,
    resolve_device,
    step_batches,
    train,
)

log = logging.getLogger(__name__)


def _loss_fn(cfg: Config, perceptual: Distance | None):
    def loss_fn(model, batch, step):
        x = pixels(batch[FRAMES_KEY])
        if cfg.kind == "mae":
            ratio = mask_ratio_at(step, cfg.mae.mask_ratio_max, cfg.mae.mask_warmup_steps)
            loss, parts = reconstruction_loss(model(x, ratio), x, perceptual, cfg.lpips_weight)
            return loss, {**parts, "mask_ratio_max": ratio}
        return reconstruction_loss(model(x), x, perceptual, cfg.lpips_weight)

    return loss_fn


def _probe_fn(probe: np.ndarray, cfg: Config, guard: CollapseGuard, device: torch.device):
    def evaluate(model, step):
        recon, target, zstd = reconstruct(model, probe, cfg.eval.batch_size, device)
        ratio = collapse_ratio(recon, target)
        collapsed = guard.update(ratio, step)
        return {
            "psnr": psnr(recon, target), "collapse_ratio": ratio, "latent_std": zstd,
            "collapsed": float(collapsed), "images": image_grid([target, recon]),
        }

    return evaluate


def run(
    cfg: Config,
    frames_path: Path | str,
    out_dir: Path | str,
    work_dir: Path | str,
    *,
    where: str = "tokenizer",
    loader: LoaderConfig | None = None,
    tracker=None,
) -> dict:
    """Train/build the tokenizer on ``frames_path``, measure it, save it to ``out_dir``.

    ``work_dir`` holds the resumable training state (removed on success); ``where`` names the
    params block in messages (``tokenizer.gameplay``); ``tracker`` is a StageRun or None.
    """
    store = EpisodeStore.open(frames_path)
    frame_shape = tuple(store.array(FRAMES_KEY).shape[1:])
    # params that cannot fit these frames fail here, before any work
    try:
        model_config(cfg, cfg.kind, frame_shape)
        build_tokenizer(cfg.kind, **model_config(cfg, cfg.kind, frame_shape))
    except ValueError as exc:
        raise ParamsError(f"{where}.{cfg.kind}: {exc} (the frames of {frames_path} are {frame_shape})") from None
    train_cfg = train_config(cfg)
    device = resolve_device(train_cfg.device if train_cfg else "auto")
    lpips_fn, lpips_reason = lpips_or_reason(cfg.lpips_net, device)
    if cfg.lpips_weight > 0 and lpips_fn is None:
        raise ParamsError(
            f"{where}.lpips_weight is {cfg.lpips_weight} but LPIPS is unavailable here: {lpips_reason}. "
            f"Set {where}.lpips_weight: 0 in params.yaml, or run where LPIPS works."
        )
    train_ids, val_ids = split_episodes(store.n_episodes, cfg.eval.val_fraction, cfg.eval.split_seed)
    if len(val_ids) == 0:
        raise ValueError(f"{frames_path}: {store.n_episodes} episode(s) leave none held out; need at least 2")
    window = encode_window(cfg)
    held_out, _ = held_out_windows(store, val_ids, window, cfg.eval.max_frames)
    log.info("%s: %d train / %d held-out episodes, %d held-out frames", frames_path,
             len(train_ids), len(val_ids), held_out.shape[0] * window)

    # baselines: the mean training image and the quantize tokenizer
    targets = to_images(pixels(torch.from_numpy(held_out)))
    mean = mean_frame(store, train_ids)
    metrics: dict = {"psnr_mean_image": psnr(np.broadcast_to(mean, targets.shape), targets)}
    quant = QuantizeTokenizer(QuantizeConfig(**model_config(cfg, "quantize", frame_shape)))
    metrics["psnr_quantize"] = psnr(reconstruct(quant, held_out, cfg.eval.batch_size, device)[0], targets)

    torch.manual_seed(train_cfg.seed if train_cfg else 0)
    model = build_tokenizer(cfg.kind, **model_config(cfg, cfg.kind, frame_shape)).to(device)
    guard = CollapseGuard(cfg.health.collapse_threshold, cfg.health.collapse_patience)
    train_info: dict = {"train_steps": 0}
    if train_cfg is not None:
        model, train_info, evals = _train(
            cfg, train_cfg, model, store, train_ids, probe=held_out[: max(1, cfg.eval.probe_frames // window)],
            perceptual=lpips_fn if cfg.lpips_weight > 0 else None, guard=guard, device=device,
            work_dir=work_dir, loader=loader, tracker=tracker,
        )
        # the verdict on every evaluation of the run, including those before a resumption
        guard = CollapseGuard.replay(guard.threshold, guard.patience,
                                     [(row["step"], row["collapse_ratio"]) for row in evals])

    recon, target, zstd = reconstruct(model, held_out, cfg.eval.batch_size, device)
    scores = quality(recon, target, lpips_fn, lpips_reason, device)
    if cfg.kind == "quantize":
        guard.update(scores["collapse_ratio"], 0)
    metrics.update(scores)
    metrics.update(
        kind=cfg.kind,
        latent_std=zstd,
        collapsed=guard.collapsed,
        collapse_first_step=guard.first_flagged_step,
        psnr_gain_vs_mean_image=scores["psnr"] - metrics["psnr_mean_image"],
        eval_frames=int(len(target)),
        train_episodes=int(len(train_ids)),
        val_episodes=int(len(val_ids)),
        n_params=int(sum(p.numel() for p in model.parameters())),
        **train_info,
    )
    if guard.collapsed:
        log.error("%s: tokenizer COLLAPSED (collapse_ratio %.3f < %.3f): reconstructions barely depend on the input",
                  where, scores["collapse_ratio"], cfg.health.collapse_threshold)
    if tracker is not None:
        tracker.log_image(image_grid([target[:: max(1, len(target) // 8)], recon[:: max(1, len(target) // 8)]]),
                          "reconstructions/final.png")
    save_model(model, "tokenizer", cfg.kind, {
        "latent_shape": list(model.latent_shape),
        "latent_dtype": str(model.latent_dtype).removeprefix("torch."),
        "encode_window": window,
        "frame_shape": list(frame_shape),
        "val_episodes": val_ids.tolist(),
        "metrics": {k: v for k, v in metrics.items() if k not in RUN_FACTS},
    }, Path(out_dir))
    if train_cfg is not None:
        clear_checkpoint(work_dir)
    return metrics


def _train(cfg: Config, train_cfg: TrainConfig, model: Tokenizer, store: EpisodeStore, train_ids: np.ndarray, *,
           probe: np.ndarray, perceptual: Distance | None, guard: CollapseGuard, device: torch.device,
           work_dir: Path | str, loader: LoaderConfig | None, tracker) -> tuple[Tokenizer, dict, list[dict]]:
    """Train with the shared loop on windows of the training episodes; returns (model, info, evals)."""
    window = encode_window(cfg)
    stride = cfg.mae.stride if cfg.kind == "mae" else 1
    dataset = WindowDataset([(store.path, FRAMES_KEY)], window, stride, train_ids, loader)
    config = {"params": cfg.model_dump(mode="json"), "data": store_fingerprint(store, [FRAMES_KEY])}
    t0 = time.perf_counter()
    result = train(
        model, _loss_fn(cfg, perceptual), step_batches(dataset, train_cfg, loader), train_cfg, Path(work_dir),
        evaluate=_probe_fn(probe, cfg, guard, device), config=config, run=tracker, desc=f"tokenizer {cfg.kind}",
    )
    seconds = time.perf_counter() - t0
    done = result.step - result.resumed_from
    info = {
        "train_steps": result.step,
        "train_seconds": seconds,
        "steps_per_s": done / seconds if seconds > 0 else 0.0,
        "final_loss": result.history[-1]["loss"] if result.history else None,
    }
    if result.resumed_from:
        info["resumed_from_step"] = result.resumed_from
    return result.model, info, result.evals


def main(item: str | None = None) -> None:
    cfg = load_section("tokenizer", Config, item=item)
    loader = load_section("loader", LoaderConfig)
    with stage_run("tokenizer", item, cfg) as r:
        metrics = run(
            cfg, frames_store(item), tokenizer_dir(item),
            checkpoint_dir("tokenizer", item), where=f"tokenizer.{item}", loader=loader, tracker=r,
        )
        write_json(metrics_path("tokenizer", item), metrics)
        r.log_metrics(metrics)
        r.log_model(tokenizer_dir(item))  # model.pt: the state dict; tokenizer.json: class and config


if __name__ == "__main__":
    run_stage(main, foreach=DATASETS)

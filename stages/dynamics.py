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
the tokenizer's (``tokenizer.json`` ``val_episodes``), so no model of the evaluation has seen them.

Evaluation (held-out episodes, in frame space through the tokenizer's decoder): rollouts of
``eval.horizon`` frames from ``eval.context_frames`` context frames, MSE and PSNR per horizon
against the true frames, beside copying the last context frame, the mean training frame and the
tokenizer's own reconstruction (the ceiling); the same rollouts with the actions shuffled across
held-out sequences (the action-sensitivity gap); for ``flow`` quality and time at K = 1, 2, 4, ...,
k_max steps per frame; for ``masked`` the MSE and PSNR of both decodes (``mse_maskgit``,
``mse_expected``; ``mse`` is the configured one's).

Outputs: ``data/<ds>/dynamics/`` (``model.pt``, ``dynamics.json``: family, config, tokenizer kind,
action input, sampling settings, held-out episodes, metrics), ``metrics/dynamics-<ds>.json`` and
``plots/dynamics-<ds>.json`` (per-horizon rows).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from models import flow_dynamics, masked_dynamics
from models.common import frame_actions
from pipeline.atomic import write_json
from pipeline.checkpoint import read_meta, save_model
from pipeline.cli import run_stage
from pipeline.config import ParamsError, StrictModel, load_section, params_path
from pipeline.evaluation import (
    held_out_split,
    held_out_windows,
    horizon_errors,
    mean_frame,
    store_fingerprint,
)
from pipeline.image_metrics import image_grid
from pipeline.paths import (
    ACTION_CLASS_KEY,
    ACTIONS_KEY,
    DATASETS,
    FRAMES_KEY,
    LATENTS_KEY,
    VALID_KEY,
    actions_store,
    checkpoint_dir,
    dynamics_dir,
    frames_store,
    latents_store,
    metrics_path,
    tokenizer_dir,
)
from pipeline.reader import LoaderConfig, WindowDataset, make_loader
from pipeline.store import EpisodeStore
from pipeline.tracking import stage_run
from pipeline.train import (
    StepOrder,
    TrainConfig,
    clear_checkpoint,
    resolve_device,
    train,
)
from pipeline.world import (
    World,
    action_inputs,
    check_family,
    flow_grid,
    latent_norm,
    to_model_layout,
)

log = logging.getLogger(__name__)

# facts of one run, left out of dynamics.json (byte-reproducible, also when a killed run resumed)
RUN_FACTS = ("train_seconds", "steps_per_s", "resumed_from_step", "eval_seconds", "rollout_seconds_per_frame",
             "speedup_4_vs_64", "sweep")


# -- params --------------------------------------------------------------------------------------


class ObjectiveParams(StrictModel):
    """The masked family's objective mix (CoPilot4D) and each objective's temporal mask."""

    future_weight: float = Field(0.5, ge=0, description="future prediction: past clean, future masked")
    joint_weight: float = Field(0.4, ge=0, description="joint denoise: every frame partly masked")
    individual_weight: float = Field(0.1, ge=0, description="individual-frame denoise")
    future_temporal: Literal["causal", "bidirectional", "identity"] = "causal"
    joint_temporal: Literal["causal", "bidirectional", "identity"] = "causal"
    individual_temporal: Literal["causal", "bidirectional", "identity"] = "identity"
    future_min_ratio: float = Field(0.5, gt=0, le=1, description="future frames' mask ratio ~ U(min, max)")
    future_max_ratio: float = Field(1.0, gt=0, le=1)
    future_copies: bool = Field(False, description="future prediction of every frame after the first at once, "
                                "each beside a clean copy of its past (as a new frame in a rollout)")
    time_shift: bool = Field(False, description="each training window at a random offset among the model's "
                             "temporal positions, so that those a rollout reaches beyond the window are trained")

    @model_validator(mode="after")
    def _check(self) -> "ObjectiveParams":
        if self.future_weight + self.joint_weight + self.individual_weight <= 0:
            raise ValueError("the objective weights must not all be 0")
        if self.future_min_ratio > self.future_max_ratio:
            raise ValueError(f"future_min_ratio ({self.future_min_ratio}) exceeds future_max_ratio ({self.future_max_ratio})")
        return self


class MaskedParams(StrictModel):
    patch: int = Field(4, gt=0, description="token-grid patch side: a 32x32 grid in 4x4 patches gives 64 tokens per frame")
    token_dim: int = Field(8, gt=0, description="embedding width of one token id inside a patch")
    dim: int = Field(128, gt=0)
    heads: int = Field(4, gt=0)
    depth: int = Field(4, gt=0, description="blocks of spatial attention, temporal attention, FFN")
    mlp_ratio: int = Field(4, gt=0)
    motion_radius: int = Field(0, ge=0, description="motion-copy head: each token mixes the head with the previous "
                               "frame's tokens moved by up to this many tokens (a learned kernel); 0: off")
    ego_copy: bool = Field(False, description="each token may copy the last context frame moved by the actions "
                           "since it (the ego's own motion; continuous [dx, dy] actions): a gated copy, also an input")
    objectives: ObjectiveParams = ObjectiveParams()
    sample_steps: int = Field(20, gt=0, description="iterative unmasking steps per frame (cosine schedule)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (0: argmax)")
    decode: Literal["maskgit", "expected"] = Field(
        "maskgit", description="rollouts' frames: maskgit (sample_steps of iterative unmasking) or expected (each "
        "token's expected gray level, the model's minimum-MSE estimate, in one pass); metrics report both")


class FlowParams(StrictModel):
    patch: int = Field(2, gt=0, description="latent-grid patch side: 16x16 in 2x2 patches gives 64 tokens per frame")
    dim: int = Field(128, gt=0)
    heads: int = Field(4, gt=0)
    depth: int = Field(4, gt=0, description="blocks of spatial attention, causal temporal attention, MLP")
    mlp_ratio: int = Field(4, gt=0)
    k_max: int = Field(64, gt=0, description="finest step 1/k_max; step sizes d = 2^i / k_max")
    tau_ctx: float = Field(0.9, ge=0, le=1, description="signal level of context frames, in training and sampling")
    bootstrap_fraction: float = Field(0.125, ge=0, le=1, description="share of each batch on bootstrap targets")
    teacher: Literal["ema", "online"] = Field("ema", description="who takes the bootstrap half steps")
    min_context: int = Field(1, ge=0, description="fewest context frames of a training window")
    context_copies: bool = Field(False, description="every frame a target beside a copy of its past at tau_ctx "
                                 "(its context, as in rollouts), at twice the frames per pass")
    long_window: int = Field(32, gt=0, description="frames of the occasional long windows")
    long_every: int = Field(8, ge=0, description="every long_every-th step trains on long windows (0: never)")
    sample_steps: int = Field(4, gt=0, description="shortcut Euler steps per generated frame")
    residual: bool = Field(True, description="predict each frame as a correction of its predecessor's "
                           "denoised input (a network that outputs nothing copies the last frame)")
    camera_warp: bool = Field(False, description="residual base (and an input) = the predecessor moved against the "
                              "camera's motion under the frame's action (continuous: the action, a camera motion; "
                              "discrete: its class's mean training motion)")

    @model_validator(mode="after")
    def _check(self) -> "FlowParams":
        if self.k_max & (self.k_max - 1):
            raise ValueError(f"k_max ({self.k_max}) must be a power of 2")
        if self.sample_steps > self.k_max or self.sample_steps & (self.sample_steps - 1):
            raise ValueError(f"sample_steps ({self.sample_steps}) must be a power of 2 up to k_max ({self.k_max})")
        if self.camera_warp and not self.residual:
            raise ValueError("camera_warp moves the residual base: it needs residual: true")
        return self


class EvalParams(StrictModel):
    context_frames: int = Field(10, gt=0, description="C true frames the rollouts start from")
    horizon: int = Field(10, gt=0, description="frames predicted after the context")
    max_sequences: int = Field(64, gt=0, description="held-out windows of C + horizon frames measured")
    batch_size: int = Field(32, gt=0, description="sequences rolled out at once")
    sweep_sequences: int = Field(16, gt=0, description="flow: sequences of the K = 1 .. k_max sweep")
    sweep_rounds: int = Field(3, gt=0, description="flow: timed rounds of the sweep (median seconds per frame)")
    seed: int = Field(0, ge=0)


class Config(StrictModel):
    """One dataset's block of the ``dynamics`` section of params.yaml."""

    family: Literal["flow", "masked"] = "masked"
    action_input: Literal["continuous", "discrete"] = Field(
        "continuous", description="continuous [dx, dy] or the discrete action_class (gameplay)")
    window: int = Field(20, ge=2, description="frames per training window")
    stride: int = Field(1, gt=0, description="frames between training windows of an episode")
    masked: MaskedParams = MaskedParams()
    flow: FlowParams = FlowParams()
    train: TrainConfig = TrainConfig(steps=400, batch_size=16, lr=1e-3, warmup_steps=40, ema_decay=0.99,
                                     eval_every=100, ckpt_every=50)
    eval: EvalParams = EvalParams()

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.family == "flow" and self.flow.long_every and self.flow.long_window <= self.window:
            raise ValueError(f"flow.long_window ({self.flow.long_window}) must exceed window ({self.window})")
        if self.family == "masked" and self.masked.ego_copy and self.action_input != "continuous":
            raise ValueError(f"masked.ego_copy moves tokens by continuous [dx, dy] actions, but action_input is "
                             f"{self.action_input!r}; set action_input: continuous or masked.ego_copy: false")
        return self

    @property
    def max_frames(self) -> int:
        longest = self.flow.long_window if self.family == "flow" and self.flow.long_every else self.window
        return max(longest, self.eval.context_frames + self.eval.horizon)


# -- building ------------------------------------------------------------------------------------


def model_config(cfg: Config, tok_meta: dict, n_classes: int = 5, action_scale: float = 1.0,
                 class_motion: list[list[float]] | None = None) -> dict:
    """The dynamics model's config fields from the params and the tokenizer's metadata;
    ``action_scale`` multiplies continuous actions (``continuous_action_scale``); ``class_motion``:
    each discrete class's mean motion (``class_motions``), for the flow family's camera warp."""
    actions = {"action_kind": cfg.action_input, "action_dim": 2, "action_classes": n_classes,
               "action_scale": float(action_scale)}
    if cfg.family == "masked":
        p = cfg.masked
        size, levels = tok_meta["config"]["size"], tok_meta["config"]["levels"]
        return {"grid": size, "levels": levels, "patch": p.patch, "token_dim": p.token_dim, "dim": p.dim,
                "heads": p.heads, "depth": p.depth, "mlp_ratio": p.mlp_ratio, "max_frames": cfg.max_frames,
                "motion_radius": p.motion_radius, "ego_copy": p.ego_copy, **actions}
    p = cfg.flow
    return {"latent_shape": list(flow_grid(tok_meta["latent_shape"])), "patch": p.patch, "dim": p.dim,
            "heads": p.heads, "depth": p.depth, "mlp_ratio": p.mlp_ratio, "max_frames": cfg.max_frames,
            "k_max": p.k_max, "residual": p.residual, "camera_warp": p.camera_warp, "class_motion": class_motion,
            **actions}


def continuous_action_scale(act: EpisodeStore, is_train: np.ndarray) -> float:
    """1 / RMS of the valid ``[dx, dy]`` of the frames where ``is_train`` (per frame, bool): continuous
    actions enter the model at unit scale (MNIST's moves are ~0.07 of the half canvas, which a
    freshly initialised embedding all but ignores). 1.0 when those frames hold no valid move."""
    rows = is_train & act.array(VALID_KEY)[:].astype(bool)
    a = act.array(ACTIONS_KEY)[:][rows].astype(np.float64)
    rms = float(np.sqrt(np.mean(a**2))) if a.size else 0.0
    return 1.0 / rms if rms > 0 else 1.0


def class_motions(act: EpisodeStore, is_train: np.ndarray, n_classes: int) -> list[list[float]]:
    """Mean ``[dx, dy]`` of each ``action_class`` over the valid frames where ``is_train`` (per frame,
    bool): what a discrete action means as motion, for the camera warp. [0, 0] for an unseen class."""
    rows = is_train & act.array(VALID_KEY)[:].astype(bool)
    a = act.array(ACTIONS_KEY)[:][rows].astype(np.float64)
    k = act.array(ACTION_CLASS_KEY)[:][rows].astype(np.int64)
    out = []
    for c in range(n_classes):
        sel = a[k == c]
        out.append([round(float(v), 6) for v in sel.mean(0)] if len(sel) else [0.0, 0.0])
    return out


def model_config_from_data(cfg: Config, tok_meta: dict, act: EpisodeStore, is_train: np.ndarray,
                           n_classes: int = 5) -> dict:
    """``model_config`` with what the training frames (``is_train``, per frame) give: the continuous
    actions' scale and, for the camera warp with discrete actions, each class's motion."""
    scale = continuous_action_scale(act, is_train) if cfg.action_input == "continuous" else 1.0
    motions = (class_motions(act, is_train, n_classes) if cfg.family == "flow" and cfg.flow.camera_warp
               and cfg.action_input == "discrete" else None)
    return model_config(cfg, tok_meta, n_classes, action_scale=scale, class_motion=motions)


def build(cfg: Config, tok_meta: dict, where: str, model_cfg: dict) -> torch.nn.Module:
    """The model of ``model_cfg`` (``model_config``), or a ParamsError naming the block when its
    sizes do not fit the latents."""
    from models import registry

    try:
        return registry.build("dynamics", cfg.family, model_cfg)
    except ValueError as exc:
        raise ParamsError(f"{where}.{cfg.family}: {exc} (tokenizer latents {tok_meta['latent_shape']})") from None


def sample_settings(cfg: Config) -> dict:
    if cfg.family == "flow":
        return {"steps": cfg.flow.sample_steps, "tau_ctx": cfg.flow.tau_ctx}
    return {"steps": cfg.masked.sample_steps, "temperature": cfg.masked.temperature, "decode": cfg.masked.decode}


# -- training ------------------------------------------------------------------------------------


def sources(latents: Path, actions: Path, discrete: bool) -> dict[str, tuple[Path, str]]:
    out = {LATENTS_KEY: (latents, LATENTS_KEY), ACTIONS_KEY: (actions, ACTIONS_KEY), VALID_KEY: (actions, VALID_KEY)}
    if discrete:
        out[ACTION_CLASS_KEY] = (actions, ACTION_CLASS_KEY)
    return out


def is_long_step(step: int, every: int) -> bool:
    """Whether optimizer step ``step`` (0-based) trains on long windows: every ``every``-th step."""
    return every > 0 and (step + 1) % every == 0


def long_steps_before(step: int, every: int) -> int:
    return step // every if every > 0 else 0


def alternating_batches(short: WindowDataset, long: WindowDataset | None, cfg: TrainConfig, every: int,
                        long_batch: int, loader: LoaderConfig | None):
    """``batches(start_step)``: short-window batches, and a long-window batch at every ``every``-th
    step; which batch a step gets depends on the step only (resumable, reproducible)."""

    def batches(start: int):
        use_long = long is not None and every > 0
        n_long = long_steps_before(start, every) if use_long else 0
        n_long_end = long_steps_before(cfg.steps, every) if use_long else 0
        short_order = StepOrder(short, cfg.batch_size, cfg.seed, start - n_long, cfg.steps - n_long_end)
        short_it = iter(make_loader(short_order, cfg.batch_size, False, cfg.seed, loader))
        long_it = None
        if use_long and n_long_end > n_long:
            long_order = StepOrder(long, long_batch, cfg.seed + 1, n_long, n_long_end)
            long_it = iter(make_loader(long_order, long_batch, False, cfg.seed + 1, loader))
        for step in range(start, cfg.steps):
            yield next(long_it) if (use_long and is_long_step(step, every)) else next(short_it)

    return batches


def loss_function(cfg: Config, mask_id: int | None, norm: dict | None = None):
    """``loss_fn(model, batch, step, ema)`` of the family."""
    discrete = cfg.action_input == "discrete"

    def conditioning(batch):
        return action_inputs(cfg.action_input, batch[ACTIONS_KEY], batch.get(ACTION_CLASS_KEY) if discrete else None,
                             batch[VALID_KEY], batch[LATENTS_KEY].device)

    if cfg.family == "masked":
        o = cfg.masked.objectives
        loss_cfg = masked_dynamics.MaskedLossConfig(**o.model_dump())

        def masked_loss_fn(model, batch, step, ema=None):
            ids = batch[LATENTS_KEY].long()
            acts, valid = conditioning(batch)
            objectives = masked_dynamics.sample_objectives(ids.shape[0], None, loss_cfg)
            inp, loss_mask, temporal = masked_dynamics.masked_objective_batch(ids, objectives, None, loss_cfg, mask_id)
            cond, has = frame_actions(acts, valid)
            t0 = (masked_dynamics.time_offsets(ids.shape[0], ids.shape[1], model.cfg.max_frames)
                  if loss_cfg.time_shift else None)
            logits = masked_dynamics.objective_logits(model, inp, ids, cond, has, temporal, objectives, loss_cfg, t0)
            return masked_dynamics.masked_loss(logits, ids, loss_mask, objectives)

        return masked_loss_fn

    f = cfg.flow
    loss_cfg = flow_dynamics.FlowLossConfig(k_max=f.k_max, tau_ctx=f.tau_ctx, bootstrap_fraction=f.bootstrap_fraction,
                                            min_context=f.min_context, context_copies=f.context_copies)

    def flow_loss_fn(model, batch, step, ema=None):
        z = to_model_layout(batch[LATENTS_KEY], "flow", batch[LATENTS_KEY].device, norm)
        acts, valid = conditioning(batch)
        teacher = ema if f.teacher == "ema" else None
        return flow_dynamics.shortcut_forcing_loss(model, teacher, z, acts, valid, loss_cfg)

    return flow_loss_fn


# -- evaluation ----------------------------------------------------------------------------------


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of 0..n-1 with no fixed point (n >= 2), seeded."""
    if n < 2:
        raise ValueError("shuffling actions across sequences needs at least 2 held-out sequences")
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


def held_out_sequences(cfg: Config, lat: EpisodeStore, act: EpisodeStore, frames: EpisodeStore,
                       val_ids: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Up to ``n`` non-overlapping held-out windows of C + horizon frames: latents, actions,
    valid, action_class (when present) and the true frames."""
    length = cfg.eval.context_frames + cfg.eval.horizon
    latents, rows = held_out_windows(lat, val_ids, length, n * length, key=LATENTS_KEY)
    out = {LATENTS_KEY: latents}
    for key in (ACTIONS_KEY, VALID_KEY, ACTION_CLASS_KEY):
        if key in act.keys:
            arr = act.array(key)
            out[key] = np.stack([arr[int(a) : int(b)] for a, b in rows])
    arr = frames.array(FRAMES_KEY)
    out[FRAMES_KEY] = np.stack([arr[int(a) : int(b)] for a, b in rows])
    return out


def rollout_frames(world: World, seqs: dict[str, np.ndarray], cfg: Config, actions_perm: np.ndarray | None = None,
                   steps: int | None = None, limit: int | None = None, decode: str | None = None
                   ) -> tuple[np.ndarray, float]:
    """Decoded rollouts (N, horizon, H, W, C) in [0, 1] and the seconds per generated frame.

    ``actions_perm``: take sequence i's actions from sequence ``actions_perm[i]`` (shuffled control);
    ``decode``: the masked family's decode, when not the model's own."""
    c, h = cfg.eval.context_frames, cfg.eval.horizon
    n = len(seqs[LATENTS_KEY]) if limit is None else min(limit, len(seqs[LATENTS_KEY]))
    order = np.arange(n) if actions_perm is None else actions_perm[:n]
    gen = torch.Generator(device=world.device).manual_seed(cfg.eval.seed)
    out, seconds = [], 0.0
    for s in range(0, n, cfg.eval.batch_size):
        idx = np.arange(s, min(n, s + cfg.eval.batch_size))
        context = world.latents(seqs[LATENTS_KEY][idx, :c])
        classes = seqs.get(ACTION_CLASS_KEY)
        acts, valid = world.actions(seqs[ACTIONS_KEY][order[idx]], None if classes is None else classes[order[idx]],
                                    seqs[VALID_KEY][order[idx]])
        t0 = time.perf_counter()
        z = world.rollout(context, acts, valid, h, steps=steps, generator=gen, decode=decode)
        seconds += time.perf_counter() - t0
        out.append(world.decode(z))
    return np.concatenate(out), seconds / (n * h)


def evaluate(world: World, cfg: Config, seqs: dict[str, np.ndarray], mean: np.ndarray) -> tuple[dict, list[dict], np.ndarray]:
    """The metrics, per-horizon rows and an image grid of held-out rollouts."""
    c, h = cfg.eval.context_frames, cfg.eval.horizon
    truth = seqs[FRAMES_KEY].astype(np.float32) / 255
    target = truth[:, c:]
    pred, sec_per_frame = rollout_frames(world, seqs, cfg)
    perm = derangement(len(target), np.random.default_rng(cfg.eval.seed))
    shuffled, _ = rollout_frames(world, seqs, cfg, actions_perm=perm)
    recon = world.decode(world.latents(seqs[LATENTS_KEY]))[:, c:]
    curves = {
        "": horizon_errors(pred, target),
        "_copy_last": horizon_errors(np.repeat(truth[:, c - 1 : c], h, axis=1), target),
        "_mean_frame": horizon_errors(np.broadcast_to(mean, target.shape).copy(), target),
        "_shuffled_actions": horizon_errors(shuffled, target),
        "_tokenizer": horizon_errors(recon, target),
    }
    metrics: dict = {"eval_sequences": int(len(target)), "context_frames": c, "horizon": h,
                     "rollout_seconds_per_frame": sec_per_frame}
    for suffix, e in curves.items():
        metrics[f"mse{suffix}"] = float(e["mse"].mean())
        metrics[f"psnr{suffix}"] = float(e["psnr"].mean())
        metrics[f"mse_frame_sum{suffix}"] = float(e["mse_frame_sum"].mean())
    if world.family == "masked":  # the other decode beside the model's own, on the same sequences
        own = world.meta["sample"].get("decode", "maskgit")
        other = "expected" if own == "maskgit" else "maskgit"
        e = horizon_errors(rollout_frames(world, seqs, cfg, decode=other)[0], target)
        metrics[f"mse_{own}"], metrics[f"psnr_{own}"] = metrics["mse"], metrics["psnr"]
        metrics[f"mse_{other}"], metrics[f"psnr_{other}"] = float(e["mse"].mean()), float(e["psnr"].mean())
    metrics["mse_gain_vs_copy_last"] = 1 - metrics["mse"] / metrics["mse_copy_last"]
    metrics["mse_gain_vs_mean_frame"] = 1 - metrics["mse"] / metrics["mse_mean_frame"]
    metrics["action_gap"] = metrics["mse_shuffled_actions"] - metrics["mse"]
    rows = [{"horizon": k + 1, **{f"mse{s}": float(e["mse"][k]) for s, e in curves.items()},
             **{f"psnr{s}": float(e["psnr"][k]) for s, e in curves.items()}} for k in range(h)]
    show = slice(0, min(4, len(target)))
    grid = image_grid([x for i in range(show.stop) for x in (truth[i], np.concatenate([truth[i, :c], pred[i]]))],
                      n=c + h)
    return metrics, rows, grid


def step_sweep(world: World, cfg: Config, seqs: dict[str, np.ndarray]) -> dict:
    """Flow: PSNR and seconds per frame at K = 1, 2, 4, ..., k_max, on ``sweep_sequences`` sequences;
    the seconds are the median of ``sweep_rounds`` rounds, interleaved over K (the same frames
    each round: the rollouts are seeded), so that a busy moment does not land on one K alone."""
    c = cfg.eval.context_frames
    n = min(cfg.eval.sweep_sequences, len(seqs[LATENTS_KEY]))
    target = seqs[FRAMES_KEY][:n, c:].astype(np.float32) / 255
    ks = [2**i for i in range(int(math.log2(cfg.flow.k_max)) + 1)]
    psnr: dict[int, float] = {}
    seconds: dict[int, list[float]] = {k: [] for k in ks}
    for r in range(cfg.eval.sweep_rounds):
        for k in ks:
            pred, sec = rollout_frames(world, seqs, cfg, steps=k, limit=n)
            if r == 0:
                psnr[k] = float(horizon_errors(pred, target)["psnr"].mean())
            seconds[k].append(sec)
    return {str(k): {"psnr": psnr[k], "seconds_per_frame": float(np.median(seconds[k]))} for k in ks}


# -- the stage -----------------------------------------------------------------------------------


def run(cfg: Config, item_paths: dict[str, Path], out_dir: Path | str, work_dir: Path | str, *,
        where: str = "dynamics", tokenizer_key: str = "tokenizer.kind", loader: LoaderConfig | None = None,
        tracker=None) -> tuple[dict, list[dict]]:
    """Train the dynamics model on ``item_paths`` (``latents``, ``actions``, ``frames``,
    ``tokenizer``), evaluate it on the held-out episodes, save it to ``out_dir``.
    Returns (metrics, per-horizon rows)."""
    tok_meta = read_meta(item_paths["tokenizer"], "tokenizer")
    try:
        check_family(cfg.family, tok_meta["kind"], f"{where}.family", tokenizer_key)
    except ValueError as exc:
        raise ParamsError(str(exc)) from None
    lat = EpisodeStore.open(item_paths["latents"])
    act = EpisodeStore.open(item_paths["actions"])
    frames = EpisodeStore.open(item_paths["frames"])
    if cfg.action_input == "discrete" and ACTION_CLASS_KEY not in act.keys:
        raise ParamsError(f"{where}.action_input is 'discrete' but {item_paths['actions']} has no "
                          f"'{ACTION_CLASS_KEY}' (only gameplay has discrete actions); use 'continuous'")
    for other in (act, frames):
        if not np.array_equal(other.episode_ends, lat.episode_ends):
            raise ValueError(f"{other.path}: episodes differ from {lat.path}; rerun the stages that write them")
    train_ids, val_ids = held_out_split(lat.n_episodes, tok_meta["val_episodes"], f"{item_paths['tokenizer']}")
    try:  # the held-out rollouts must be possible before any training
        seqs = held_out_sequences(cfg, lat, act, frames, val_ids, cfg.eval.max_sequences)
    except ValueError as exc:
        raise ParamsError(f"{where}.eval: {exc} (context_frames + horizon = "
                          f"{cfg.eval.context_frames + cfg.eval.horizon})") from None
    if len(seqs[LATENTS_KEY]) < 2:
        raise ParamsError(f"{where}.eval: {len(seqs[LATENTS_KEY])} held-out sequence of "
                          f"{cfg.eval.context_frames + cfg.eval.horizon} frames; the shuffled-actions control "
                          f"needs at least 2 (raise max_sequences, or shorten context_frames + horizon)")
    is_train = lat.frames_of(train_ids)  # per frame
    model_cfg = model_config_from_data(cfg, tok_meta, act, is_train)
    train_cfg = cfg.train
    device = resolve_device(train_cfg.device)
    torch.manual_seed(train_cfg.seed)
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

    meta = {"tokenizer_kind": tok_meta["kind"], "action_input": cfg.action_input, "sample": sample_settings(cfg),
            "context_frames": cfg.eval.context_frames, "horizon": cfg.eval.horizon,
            "val_episodes": val_ids.tolist(), "latent_shape": tok_meta["latent_shape"], "latent_norm": norm}
    world = World(model, {"kind": cfg.family, **meta}, *_tokenizer(item_paths["tokenizer"], device), device)
    t1 = time.perf_counter()
    metrics, rows, grid = evaluate(world, cfg, seqs, mean_frame(frames, train_ids))
    if cfg.family == "flow":
        sweep = step_sweep(world, cfg, seqs)
        metrics["sweep"] = sweep
        k4, k64 = sweep.get("4"), sweep.get(str(cfg.flow.k_max))
        if k4 and k64:
            metrics["speedup_4_vs_64"] = k64["seconds_per_frame"] / max(k4["seconds_per_frame"], 1e-12)
            metrics["psnr_drop_4_vs_64"] = k64["psnr"] - k4["psnr"]
    metrics.update(
        family=cfg.family, tokenizer_kind=tok_meta["kind"], action_input=cfg.action_input, n_params=int(n_params),
        train_steps=result.step, train_seconds=train_seconds, steps_per_s=done / max(train_seconds, 1e-9),
        final_loss=result.history[-1]["loss"] if result.history else None, eval_seconds=time.perf_counter() - t1,
        train_episodes=int(len(train_ids)), val_episodes=int(len(val_ids)),
    )
    if result.resumed_from:
        metrics["resumed_from_step"] = result.resumed_from
    log.info("%s: held-out mse %.5f (copy-last %.5f, mean frame %.5f, shuffled actions %.5f), psnr %.2f dB "
             "(tokenizer %.2f)", where, metrics["mse"], metrics["mse_copy_last"], metrics["mse_mean_frame"],
             metrics["mse_shuffled_actions"], metrics["psnr"], metrics["psnr_tokenizer"])
    if tracker is not None:
        tracker.log_image(grid, "rollouts/held_out.png")
        for row in rows:
            tracker.log_metrics({f"horizon/{k}": v for k, v in row.items() if k != "horizon"}, step=row["horizon"])
    save_model(model, "dynamics", cfg.family, {**meta, "metrics": {k: v for k, v in metrics.items() if k not in RUN_FACTS}},
               Path(out_dir))
    clear_checkpoint(work_dir)
    return metrics, rows


def _tokenizer(path: Path, device: torch.device):
    from pipeline.checkpoint import load_model

    return load_model(path, "tokenizer", device)


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
    paths = {"latents": latents_store(item), "actions": actions_store(item), "frames": frames_store(item),
             "tokenizer": tokenizer_dir(item)}
    with stage_run("dynamics", item, cfg) as r:
        metrics, rows = run(cfg, paths, dynamics_dir(item), checkpoint_dir("dynamics", item), where=f"dynamics.{item}",
                            tokenizer_key=f"tokenizer.{item}.kind", loader=loader, tracker=r)
        write_json(metrics_path("dynamics", item), metrics)
        write_json(Path("plots") / f"dynamics-{item}.json", rows)
        r.log_metrics({k: v for k, v in metrics.items() if k != "sweep"})


if __name__ == "__main__":
    run_stage(main, foreach=DATASETS)

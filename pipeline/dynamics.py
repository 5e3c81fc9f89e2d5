"""The world models' library: the ``dynamics`` params, building a model from them and the tokenizer's
metadata, its training data (sources, alternating short and long windows) and loss. The stage
``dynamics`` (``stages/dynamics.py``) trains and writes with it; the ``evaluate`` stage measures the
model (``pipeline/rollouts.py``); ``bench/bench_dynamics.py`` times it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from models import flow_dynamics, masked_dynamics
from models.common import frame_actions
from pipeline.config import ParamsError, StrictModel
from pipeline.paths import ACTION_CLASS_KEY, ACTIONS_KEY, LATENTS_KEY, VALID_KEY
from pipeline.reader import LoaderConfig, WindowDataset, make_loader
from pipeline.store import EpisodeStore
from pipeline.train import StepOrder, TrainConfig
from pipeline.world import action_inputs, flow_grid, to_model_layout


# facts of one run, left out of dynamics.json (byte-reproducible, also when a killed run resumed)
RUN_FACTS = ("train_seconds", "steps_per_s", "resumed_from_step")


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


class Config(StrictModel):
    """One dataset's block of the ``dynamics`` section of params.yaml."""

    family: Literal["flow", "masked"] = "masked"
    action_input: Literal["continuous", "discrete"] = Field(
        "continuous", description="continuous [dx, dy] or the discrete action_class (gameplay)")
    window: int = Field(20, ge=2, description="frames per training window")
    stride: int = Field(1, gt=0, description="frames between training windows of an episode")
    masked: MaskedParams = MaskedParams()
    flow: FlowParams = FlowParams()
    max_frames: int | None = Field(None, gt=1, description="temporal positions of the model: the most frames a "
                                   "rollout keeps in view (context + horizon; flow slides past it, masked cannot); "
                                   "null: the longest training window")
    train: TrainConfig = TrainConfig(steps=400, batch_size=16, lr=1e-3, warmup_steps=40, ema_decay=0.99,
                                     ckpt_every=50)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.family == "flow" and self.flow.long_every and self.flow.long_window <= self.window:
            raise ValueError(f"flow.long_window ({self.flow.long_window}) must exceed window ({self.window})")
        if self.family == "masked" and self.masked.ego_copy and self.action_input != "continuous":
            raise ValueError(f"masked.ego_copy moves tokens by continuous [dx, dy] actions, but action_input is "
                             f"{self.action_input!r}; set action_input: continuous or masked.ego_copy: false")
        if self.max_frames is not None and self.max_frames < self.longest_window:
            raise ValueError(f"max_frames ({self.max_frames}) is shorter than the longest training window "
                             f"({self.longest_window})")
        if self.train.eval_every is not None:
            raise ValueError("train.eval_every does nothing here: the dynamics stage trains only (the evaluate "
                             "stage measures the model); remove it")
        return self

    @property
    def longest_window(self) -> int:
        return self.flow.long_window if self.family == "flow" and self.flow.long_every else self.window

    @property
    def positions(self) -> int:
        """The model's ``max_frames``."""
        return self.max_frames or self.longest_window


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
                "heads": p.heads, "depth": p.depth, "mlp_ratio": p.mlp_ratio, "max_frames": cfg.positions,
                "motion_radius": p.motion_radius, "ego_copy": p.ego_copy, **actions}
    p = cfg.flow
    return {"latent_shape": list(flow_grid(tok_meta["latent_shape"])), "patch": p.patch, "dim": p.dim,
            "heads": p.heads, "depth": p.depth, "mlp_ratio": p.mlp_ratio, "max_frames": cfg.positions,
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


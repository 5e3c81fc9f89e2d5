"""The policy's library: the ``policy`` params, its data (discrete actions, training pairs), saving
and loading a trained policy, and its held-out metrics beside three baselines. The stage ``policy``
(``stages/policy.py``) trains and saves with it; the stage ``evaluate`` measures with it and with
``pipeline/imagination.py`` (the policy acting inside a world model).

The policy (``models/policy.py``) is masked discrete diffusion (MDLM) over the next ``horizon``
discrete actions, conditioned on the latent state: the latents of the current frame and of the
``state_frames - 1`` frames before it (and, with ``model.past_actions`` = P, the ids of the P moves
that led to the current frame). Discrete actions: gameplay's ``action_class`` (none, left, right,
up, down); Moving MNIST's continuous ``[dx, dy]`` through an ``ActionDiscretizer`` (direction and
speed bins, or a k-means codebook) fitted on the training actions and saved with the model
(``ActionCoder``).

A pair (state, next H actions) is a window of ``state_frames + horizon`` frames of ``latents.zarr``
and ``actions.zarr`` inside an episode: the state is frames 0..state_frames-1 (the last one the
current frame); ``actions[t]`` is the move from frame t, so the targets are the moves of frames
state_frames-1 .. state_frames+H-2 (the first one out of the current frame).

Baselines, scored per pair like the policy (``policy_items``):

- the marginal: the training action frequencies at every position;
- repeat the last action: the move into the current frame (frame state_frames-2 to state_frames-1)
  again, with probability ``p_k`` at position k (``repeat_last_probs``, fitted on the training
  windows) and ``1 - p_k`` spread over the other actions in proportion to the marginal;
- the MLP (``MLPPolicy``): a state-conditioned classifier with one distribution per position,
  trained with cross-entropy on all H positions.

Saved layout of a policy directory (``save_policy``, one atomic directory write): ``model.pt``
(the MDLM's state dict), ``mlp.pt`` (the MLP baseline's state dict) and ``policy.json`` (family
``policy``, kind ``mdlm``, the MDLM's config, and the stage's metadata: the coder, state_frames,
horizon, state_kind, tokenizer_kind, val_episodes, sample, schedule, and ``mlp``: the MLP's
config). ``Policy.load`` reads it back with ``weights_only`` loading.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from pydantic import Field, model_validator

from models import registry
from models.policy import (
    ActionDiscretizer,
    DiscretizerConfig,
    MDLMPolicy,
    MLPPolicy,
    marginal_frequencies,
    mask_actions,
    nelbo,
    sample_ancestral,
    sample_maskgit,
)
from pipeline.atomic import atomic_path, dumps_json
from pipeline.checkpoint import MODEL_FILE, CheckpointError, load_model, load_torch, meta_file, save_torch
from pipeline.config import StrictModel
from pipeline.paths import ACTION_CLASS_KEY, ACTIONS_KEY, LATENTS_KEY, VALID_KEY
from pipeline.reader import LoaderConfig, WindowDataset, window_index
from pipeline.store import EpisodeStore
from pipeline.train import TrainConfig
from pipeline.world import grid_layout

MLP_FILE = "mlp.pt"


# -- params --------------------------------------------------------------------------------------


class DiscretizerParams(StrictModel):
    """MNIST's continuous [dx, dy] to discrete ids (``models.policy.ActionDiscretizer``)."""

    mode: Literal["bins", "codebook"] = "bins"
    directions: int = Field(8, gt=0, description="bins: direction sectors")
    speed_bins: int = Field(1, gt=0, description="bins: speed bins (quantiles of the training speeds)")
    still_speed: float = Field(0.02, ge=0, description="bins: slower actions are 'still' (id 0)")
    codebook_size: int = Field(16, gt=1, description="codebook: k-means codewords")
    seed: int = Field(0, ge=0)
    iters: int = Field(100, gt=0)


class ModelParams(StrictModel):
    conditioning: Literal["cross_attention", "add"] = Field(
        "cross_attention", description="the state conditions every action token by cross-attention or addition")
    state_patch: int = Field(8, gt=0, description="patch side over the state's latent grid")
    state_depth: int = Field(0, ge=0, description="self-attention blocks over the state tokens")
    state_stack: bool = Field(True, description="one state token per patch position with its frames stacked "
                              "(motion linear to read) instead of one token per frame and position")
    dim: int = Field(128, gt=0)
    heads: int = Field(4, gt=0)
    depth: int = Field(2, gt=0, description="DiT blocks (AdaLN-Zero on the mask level)")
    mlp_ratio: int = Field(4, gt=0)
    past_actions: int = Field(0, ge=0, description="the state also holds the P actions that led to its last frame "
                              "(the agent's own recent moves; at most state_frames - 1); the MLP baseline gets them too")


class LossParams(StrictModel):
    schedule: Literal["linear", "cosine"] = Field("linear", description="noise schedule alpha_t")
    weighting: Literal["nelbo", "uniform"] = Field("nelbo", description="MDLM NELBO weight or uniform")
    curriculum_start: float = Field(1.0, gt=0, le=1, description="the largest mask level t ramps from this to 1 "
                                    "over training (1: no curriculum)")


class SampleParams(StrictModel):
    sampler: Literal["maskgit", "ancestral"] = "maskgit"
    steps: int = Field(8, gt=0, description="K unmasking steps")
    temperature: float = Field(1.0, ge=0)
    top_k: int | None = Field(None, gt=0)


class MlpParams(StrictModel):
    """The MLP baseline (``models.policy.MLPPolicy``): per-position logits, cross-entropy on all H
    positions (AdamW with the train block's ``weight_decay`` on its weight matrices). A standard
    regularised supervised model of the MDLM's inputs, with no built-in prior: the flattened state is
    projected to ``state_dim`` features (and LayerNorm) before the one-hot past actions join it;
    ``dropout``; and early stopping: ``val_fraction`` of the *training* episodes are held back from
    its training (``mlp_split``; the held-out episodes stay the evaluation's), its NLL on them is
    measured every ``train.eval_every`` steps and the weights of the lowest are kept
    (``BestCheckpoint``).

    Why (held-out test NLL / first-action accuracy on the default data): the plain MLP (flattened
    state into 256 hidden units, 300 steps, last step kept) overfit gameplay's 29 training episodes,
    1.42 / 0.57 against the state-blind marginal's 1.34 / 0.52 and repeat-last's 1.28 / 0.84, and
    underfit MNIST, 1.83 / 0.26 against 2.10 / 0.17 and 1.74 / 0.70, unable to read the past
    actions beside 12,288 state features. This one: gameplay 1.21 / 0.79, MNIST 1.10 / 0.71."""

    hidden: int = Field(256, gt=0)
    layers: int = Field(2, gt=0)
    token_dim: int = Field(4, gt=0)
    state_dim: int = Field(16, ge=0, description="the flattened state's linear projection (then LayerNorm) before "
                           "the past actions join it; 0: none")
    dropout: float = Field(0.5, ge=0, lt=1, description="on the projected state and after every hidden layer")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="share of the training episodes held back to pick the "
                                "checkpoint (lowest NLL there, every train.eval_every steps); 0: the last step")
    train: TrainConfig = TrainConfig(steps=600, batch_size=64, lr=1e-3, warmup_steps=20, ckpt_every=100,
                                     eval_every=50, weight_decay=0.05)


class Config(StrictModel):
    """One dataset's block of the ``policy`` section of params.yaml (training only: the evaluation's
    params are ``EvalParams``, in the ``evaluate`` section)."""

    state_frames: int = Field(3, gt=0, description="latent frames in the state: the current one and those before it")
    horizon: int = Field(8, gt=0, description="H future discrete actions")
    stride: int = Field(1, gt=0, description="frames between training windows")
    discretizer: DiscretizerParams = DiscretizerParams()
    model: ModelParams = ModelParams()
    loss: LossParams = LossParams()
    sample: SampleParams = SampleParams()
    mlp: MlpParams = MlpParams()
    train: TrainConfig = TrainConfig(steps=400, batch_size=64, lr=1e-3, warmup_steps=20, ckpt_every=100,
                                     ema_decay=0.99)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.model.past_actions > self.state_frames - 1:
            raise ValueError(f"model.past_actions ({self.model.past_actions}) must be at most state_frames - 1 "
                             f"({self.state_frames - 1}): the moves between the state's frames")
        return self

    @property
    def window(self) -> int:
        """Frames of one training pair: the state frames and the frames the H actions lead to."""
        return self.state_frames + self.horizon

    @property
    def past_actions(self) -> int:
        return self.model.past_actions


class EvalParams(StrictModel):
    """The policy's evaluation (``evaluate.<dataset>.policy`` in params.yaml)."""

    max_windows: int = Field(512, gt=0, description="held-out (state, actions) pairs, evenly picked")
    mask_levels: list[float] = Field([0.1, 0.3, 0.5, 0.7, 0.9], description="masked accuracy and NLL at these t")
    nelbo_points: int = Field(16, gt=0, description="t points of the NELBO estimate")
    batch_size: int = Field(128, gt=0)
    imagination_sequences: int = Field(32, ge=2, description="held-out starts imagined from")
    imagination_batch_size: int = Field(32, gt=0)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "EvalParams":
        if any(not 0 < t < 1 for t in self.mask_levels):
            raise ValueError(f"mask_levels must lie in (0, 1), got {self.mask_levels}")
        return self


# -- data ----------------------------------------------------------------------------------------


class ActionCoder:
    """The dataset's discrete actions: gameplay's classes as they are, MNIST's [dx, dy] through a
    fitted ``ActionDiscretizer``."""

    def __init__(self, discrete: bool, discretizer: ActionDiscretizer | None, n_classes: int = 5):
        self.discrete, self.discretizer = discrete, discretizer
        self.n_actions = n_classes if discrete else discretizer.n_classes

    def ids(self, actions: torch.Tensor | np.ndarray, action_class=None):
        """Action ids of per-transition actions (..., 2) or classes (...,)."""
        if self.discrete:
            return action_class.long() if isinstance(action_class, torch.Tensor) else np.asarray(action_class, np.int64)
        return self.discretizer.encode(actions)

    def dynamics_input(self, ids: torch.Tensor) -> torch.Tensor:
        """What the dynamics model is conditioned on for these ids: classes, or [dx, dy] representatives."""
        return ids.long() if self.discrete else self.discretizer.decode(ids).float()

    def state_dict(self) -> dict:
        return {"discrete": self.discrete, "n_actions": self.n_actions,
                "discretizer": None if self.discrete else self.discretizer.state_dict()}

    @classmethod
    def from_state_dict(cls, d: dict) -> "ActionCoder":
        if d["discrete"]:
            return cls(True, None, int(d["n_actions"]))
        return cls(False, ActionDiscretizer.from_state_dict(d["discretizer"]))


def fit_coder(cfg: Config, act: EpisodeStore, train_ids: np.ndarray) -> ActionCoder:
    """The coder of ``act``: its classes when it has them, else a discretizer fitted on the valid
    actions of the training episodes ``train_ids``."""
    if ACTION_CLASS_KEY in act.keys:
        return ActionCoder(True, None)
    valid = act.array(VALID_KEY)[:]
    keep = valid & act.frames_of(train_ids)
    disc = ActionDiscretizer(DiscretizerConfig(**cfg.discretizer.model_dump())).fit(act.array(ACTIONS_KEY)[:][keep])
    return ActionCoder(False, disc)


def state_layout(latents: torch.Tensor, kind: str) -> torch.Tensor:
    """Stored latents (B, K, ...) as the policy's state: token ids, or float grids (an MAE
    tokenizer's (N, D) tokens on a grid, ``pipeline.world.grid_layout``)."""
    if kind == "tokens":
        return latents.long()
    return grid_layout(latents.float())


def split_batch(batch: dict, spec, coder: ActionCoder,
                kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(state (B, state_frames, ...), action ids (B, H), past action ids (B, P) or None) of a
    window batch. ``spec``: a ``Config`` or a ``Policy`` (its state_frames, horizon, past_actions)."""
    s, h = spec.state_frames, spec.horizon
    state = state_layout(torch.as_tensor(batch[LATENTS_KEY][:, :s]), kind)
    sl = slice(s - 1, s - 1 + h)  # actions[t]: the move from frame t; t = s-1 is the current frame
    ids = coder.ids(batch[ACTIONS_KEY][:, sl], batch[ACTION_CLASS_KEY][:, sl] if coder.discrete else None)
    return state, torch.as_tensor(ids).long(), past_ids(batch[ACTIONS_KEY], batch.get(ACTION_CLASS_KEY), s - 1,
                                                        spec.past_actions, coder)


def past_ids(actions, action_class, now: int, p: int, coder: ActionCoder) -> torch.Tensor | None:
    """The ids (B, p) of the ``p`` moves that led to frame ``now`` of per-transition ``actions``
    (B, T, ...) / ``action_class`` (B, T); None when p = 0."""
    if p == 0:
        return None
    sl = slice(now - p, now)
    ids = coder.ids(actions[:, sl], action_class[:, sl] if coder.discrete else None)
    return torch.as_tensor(ids).long().clamp(min=0)


def train_action_ids(act: EpisodeStore, train_ids: np.ndarray, coder: ActionCoder) -> np.ndarray:
    """Every valid training transition's action id (the marginal baseline's data)."""
    keep = act.array(VALID_KEY)[:] & act.frames_of(train_ids)
    if coder.discrete:
        return act.array(ACTION_CLASS_KEY)[:][keep].astype(np.int64)
    return coder.ids(act.array(ACTIONS_KEY)[:][keep])


def sample(model: MDLMPolicy, state: torch.Tensor, params: SampleParams, schedule: str, gen: torch.Generator,
           temperature: float | None = None, past: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H) action ids drawn by the sampler of ``params`` (``temperature`` overrides its own; 0:
    argmax). ``gen`` lives on the model's device."""
    temp = params.temperature if temperature is None else temperature
    if params.sampler == "ancestral":
        return sample_ancestral(model, state, params.steps, schedule=schedule, temperature=temp,
                                top_k=params.top_k, generator=gen, past=past)
    return sample_maskgit(model, state, params.steps, temperature=temp, top_k=params.top_k, generator=gen, past=past)


# -- the MLP baseline's early stopping ------------------------------------------------------------


def mlp_split(train_ids: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(episodes the MLP trains on, episodes it picks its checkpoint on): ``round(n * fraction)`` of
    the ``n`` training episodes (seeded; at most n - 1), sorted; none when that is 0 (then the MLP
    trains on all of them and keeps its last step). Never the held-out episodes: those are the
    evaluation's."""
    ids = np.asarray(sorted(int(i) for i in train_ids), dtype=np.int64)
    n_val = min(len(ids) - 1, int(round(len(ids) * fraction)))
    if n_val <= 0:
        return ids, ids[:0]
    order = np.random.default_rng(seed).permutation(len(ids))
    return np.sort(ids[order[n_val:]]), np.sort(ids[order[:n_val]])


@torch.no_grad()
def mlp_nll(mlp: MLPPolicy, state: torch.Tensor, ids: torch.Tensor, past: torch.Tensor | None,
            batch_size: int = 256) -> float:
    """Mean NLL per action (nats) of ``mlp`` on pairs (the held-out ``nll_mlp`` of
    ``policy_items``), in eval mode, on the MLP's device."""
    was_training = mlp.training
    mlp.eval()
    dev = next(mlp.parameters()).device
    total = 0.0
    for i in range(0, len(ids), batch_size):
        pa = None if past is None else past[i : i + batch_size].to(dev)
        lp = mlp(state[i : i + batch_size].to(dev), pa).float().log_softmax(-1)
        total += float(-lp.gather(-1, ids[i : i + batch_size].to(dev).long()[..., None]).sum())
    mlp.train(was_training)
    return total / max(1, ids.numel())


class BestCheckpoint:
    """``train``'s ``evaluate`` callback that does early stopping: ``score(model)`` (lower is
    better, e.g. ``mlp_nll`` on the validation episodes) at every evaluation, and a CPU copy of
    the weights of the best one so far (``best_step``, ``best_score``, ``state``). The first of
    equal scores wins. The best is also written to ``path`` (inside the run's checkpoint directory,
    removed with it), and read back from there when the object is built, so that a run killed and
    resumed still picks among the evaluations from before the kill."""

    def __init__(self, score, path: Path | str):
        self.score, self.path = score, Path(path)
        self.best_step: int | None = None
        self.best_score = float("inf")
        self.state: dict | None = None
        if self.path.exists():
            saved = load_torch(self.path)
            self.best_step, self.best_score, self.state = int(saved["step"]), float(saved["score"]), saved["model"]

    def __call__(self, model: nn.Module, step: int) -> dict:
        value = float(self.score(model))
        if value < self.best_score:
            # a copy (on the CPU, ``.cpu()`` alone would alias the weights that training goes on changing)
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.best_step, self.best_score, self.state = step, value, state
            save_torch({"step": step, "score": value, "model": self.state}, self.path)
        return {"val_nll": value, "best_step": self.best_step}


# -- a saved policy ------------------------------------------------------------------------------


def save_policy(model: MDLMPolicy, mlp: MLPPolicy, meta: dict, out_dir: Path | str) -> None:
    """Write ``model.pt`` (the MDLM), ``mlp.pt`` (the MLP baseline) and ``policy.json`` into
    ``out_dir`` in one atomic directory write (a complete directory or the previous one). The
    MDLM's files are those ``pipeline.checkpoint.save_model(model, "policy", "mdlm", meta, ...)``
    writes (``load_model`` reads them); the record's ``mlp`` is the MLP's config."""
    record = {"family": "policy", "kind": "mdlm", "config": registry.config_of(model), **meta,
              "mlp": registry.config_of(mlp)}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_torch(_cpu_state(model), tmp / MODEL_FILE)
        save_torch(_cpu_state(mlp), tmp / MLP_FILE)
        (tmp / meta_file("policy")).write_text(dumps_json(record))


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


@dataclass
class Policy:
    """A trained policy as the policy stage saved it: the MDLM, the MLP baseline, the action coder
    and ``meta`` (the contents of ``policy.json``)."""

    model: MDLMPolicy
    mlp: MLPPolicy
    coder: ActionCoder
    meta: dict

    @classmethod
    def load(cls, policy_dir: Path | str, device: str | torch.device = "cpu") -> "Policy":
        """Both models in eval mode on ``device`` (state dicts loaded with ``weights_only``)."""
        policy_dir = Path(policy_dir)
        model, meta = load_model(policy_dir, "policy", device)
        where = policy_dir / meta_file("policy")
        if meta["kind"] != "mdlm" or not isinstance(meta.get("mlp"), dict) or "coder" not in meta:
            raise CheckpointError(f"{where}: not the record of an MDLM policy with its MLP baseline and coder; "
                                  f"rerun the policy stage")
        try:
            mlp = registry.build("policy", "mlp", meta["mlp"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: mlp: {exc}; rerun the policy stage") from None
        try:
            mlp.load_state_dict(load_torch(policy_dir / MLP_FILE))
        except RuntimeError as exc:
            raise CheckpointError(f"{policy_dir / MLP_FILE}: does not fit its {where.name} ({exc})") from None
        return cls(model, mlp.to(device).eval(), ActionCoder.from_state_dict(meta["coder"]), meta)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def state_frames(self) -> int:
        return int(self.meta["state_frames"])

    @property
    def horizon(self) -> int:
        return int(self.meta["horizon"])

    @property
    def state_kind(self) -> str:
        return self.meta["state_kind"]

    @property
    def n_actions(self) -> int:
        return self.coder.n_actions

    @property
    def past_actions(self) -> int:
        return int(self.model.cfg.past_actions)

    @property
    def schedule(self) -> str:
        return self.meta["schedule"]

    @property
    def sample_params(self) -> SampleParams:
        return SampleParams.model_validate(self.meta["sample"])

    def act(self, state: torch.Tensor, gen: torch.Generator, temperature: float | None = None,
            past: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H) action ids sampled with the saved sampler settings."""
        return sample(self.model, state, self.sample_params, self.schedule, gen, temperature, past)


# -- evaluation ----------------------------------------------------------------------------------


def _need_last(state_frames: int) -> None:
    if state_frames < 2:
        raise ValueError(f"the repeat-last baseline needs state_frames >= 2 (the move into the current frame "
                         f"lies between the state's last two frames); this policy has state_frames {state_frames}")


def held_out_pairs(policy: Policy, latents: EpisodeStore, actions: EpisodeStore, episodes: np.ndarray,
                   max_windows: int) -> dict:
    """Up to ``max_windows`` evenly picked windows of state_frames + horizon frames (stride 1) of
    ``episodes``, as pairs: ``state`` (N, state_frames, ...), ``ids`` (N, H) the true actions,
    ``past`` (N, P) or None, ``last`` (N,) the id of the move into the current frame (frame
    state_frames-2 to state_frames-1; the repeat-last baseline's action), all CPU tensors; plus
    ``episode`` (N,) the episode id of each pair and ``rows`` (N, 2) its [start, end) store rows
    (numpy)."""
    s, h = policy.state_frames, policy.horizon
    _need_last(s)
    coder = policy.coder
    src = {LATENTS_KEY: (latents.path, LATENTS_KEY), ACTIONS_KEY: (actions.path, ACTIONS_KEY)}
    if coder.discrete:
        src[ACTION_CLASS_KEY] = (actions.path, ACTION_CLASS_KEY)
    held = WindowDataset(src, s + h, 1, np.asarray(episodes, np.int64), LoaderConfig(num_workers=0))
    pick = np.linspace(0, len(held) - 1, min(len(held), max_windows)).round().astype(int)
    batch = {k: torch.from_numpy(np.stack([held[int(i)][k] for i in pick])) for k in src}
    state, ids, past = split_batch(batch, policy, coder, policy.state_kind)
    last = coder.ids(batch[ACTIONS_KEY][:, s - 2], batch[ACTION_CLASS_KEY][:, s - 2] if coder.discrete else None)
    rows = held.windows[pick]
    episode = np.searchsorted(latents.episode_ends, rows[:, 0], side="right").astype(np.int64)
    return {"state": state, "ids": ids, "past": past, "last": torch.as_tensor(last).long(),
            "episode": episode, "rows": rows}


def repeat_last_probs(actions: EpisodeStore, train_episodes: np.ndarray, policy: Policy) -> np.ndarray:
    """(H,) p_k = P(the action at position k == the last action before the state's current frame),
    over every window of state_frames + horizon frames (stride 1) of the training episodes, with
    one pseudo-count each way ((matches + 1) / (windows + 2), so that no NLL is infinite). The
    repeat-last baseline's distribution at position k: p_k on the last action, 1 - p_k spread over
    the other actions in proportion to the marginal."""
    s, h = policy.state_frames, policy.horizon
    _need_last(s)
    rows = window_index(actions.episode_ends, train_episodes, s + h, 1)
    coder = policy.coder
    if coder.discrete:
        every = np.asarray(actions.array(ACTION_CLASS_KEY)[:], np.int64)
    else:
        every = np.asarray(coder.ids(actions.array(ACTIONS_KEY)[:]), np.int64)
    start = rows[:, 0]
    last = every[start + s - 2]
    targets = every[start[:, None] + s - 1 + np.arange(h)]
    matches = (targets == last[:, None]).sum(axis=0)
    return (matches + 1.0) / (len(rows) + 2.0)


def repeat_last_log_probs(last: torch.Tensor, repeat_probs: np.ndarray | torch.Tensor,
                          marginal: torch.Tensor) -> torch.Tensor:
    """(N, H, n_actions) log-probabilities of the repeat-last baseline: at position k, p_k on
    ``last`` (N,), 1 - p_k over the other actions in proportion to ``marginal`` (n_actions,)."""
    p = torch.as_tensor(np.asarray(repeat_probs), dtype=torch.float64)                     # (H,)
    m = marginal.to(torch.float64)
    is_last = torch.nn.functional.one_hot(last.long(), len(m)).bool()                        # (N, n)
    others = m[None] / (1.0 - m[last.long()])[:, None]                                       # (N, n)
    probs = torch.where(is_last[:, None], p[None, :, None], (1.0 - p)[None, :, None] * others[:, None])
    return probs.log()


@torch.no_grad()
def policy_items(policy: Policy, pairs: dict, params: EvalParams, train_ids_flat: np.ndarray,
                 repeat_probs: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pair (N,) float arrays (so that the caller can average over any subset of episodes and
    bootstrap):

    - the MDLM: ``nll`` (its NELBO per action, averaged over the H positions; ``params.nelbo_points``
      t points), ``first_correct`` (argmax at position 0 with every position masked == the true
      first action), ``sample_correct`` (the greedy sample, temperature 0, right at each position:
      mean over H), ``exact_match`` (all H right), ``masked_nll_tXX`` / ``masked_acc_tXX`` per mask
      level t (each action masked with probability t, at least one per pair; per pair the mean over
      its masked positions, NaN when none is masked);
    - the marginal (``train_ids_flat``: every training transition's id, one pseudo-count per
      action): ``nll_marginal``, ``first_correct_marginal`` (its mode), ``exact_match_marginal``;
    - repeat the last action (``repeat_probs``: ``repeat_last_probs``): ``nll_repeat_last``,
      ``first_correct_repeat_last`` (the true first action == the last one), ``exact_match_repeat_last``;
    - the MLP: ``nll_mlp`` (mean over H of its per-position NLL), ``first_correct_mlp`` (position 0's
      argmax), ``exact_match_mlp``.

    NLLs in nats per action; plus ``episode`` (N,), the pairs' episode ids (``pairs["episode"]``).
    Seeded by ``params.seed`` (masks, NELBO points)."""
    model, mlp, dev = policy.model, policy.mlp, policy.device
    gen = torch.Generator(device=dev).manual_seed(params.seed)
    h, n_act, mask_id = policy.horizon, policy.n_actions, model.mask_id
    sample_params, schedule = policy.sample_params, policy.schedule
    state, ids, past, last = pairs["state"], pairs["ids"].long(), pairs["past"], pairs["last"].long()
    parts: dict[str, list[torch.Tensor]] = {}

    def put(key: str, value: torch.Tensor) -> None:
        parts.setdefault(key, []).append(value.detach().double().cpu())

    bs = params.batch_size
    for i in range(0, len(ids), bs):
        st, a = state[i : i + bs].to(dev), ids[i : i + bs].to(dev)
        pa = None if past is None else past[i : i + bs].to(dev)
        put("nll", nelbo(model, a, st, schedule=schedule, n_t=params.nelbo_points, generator=gen, past=pa))
        first = model(torch.full_like(a, mask_id), st, past=pa)[:, 0].argmax(-1)
        put("first_correct", first == a[:, 0])
        got = sample(model, st, sample_params, schedule, gen, temperature=0.0, past=pa)
        put("sample_correct", (got == a).double().mean(1))
        put("exact_match", (got == a).all(1))
        for t in params.mask_levels:
            z, masked = mask_actions(a, torch.full((len(a),), t, device=dev), mask_id, schedule, True, gen)
            logp = model(z, st, past=pa).float().log_softmax(-1)
            ce = -logp.gather(-1, a[..., None]).squeeze(-1)
            right = (logp.argmax(-1) == a).double()
            count = masked.sum(1).double()
            nan = torch.full_like(count, float("nan"))
            key = _level_key(t)
            put(f"masked_nll_{key}", torch.where(count > 0, (ce.double() * masked).sum(1) / count, nan))
            put(f"masked_acc_{key}", torch.where(count > 0, (right * masked).sum(1) / count, nan))
        mlp_logp = mlp.sequence_logits(st, h, pa).float().log_softmax(-1)
        put("nll_mlp", -mlp_logp.gather(-1, a[..., None]).squeeze(-1).mean(1))
        put("first_correct_mlp", mlp_logp[:, 0].argmax(-1) == a[:, 0])
        put("exact_match_mlp", (mlp_logp.argmax(-1) == a).all(1))
    out = {k: torch.cat(v).numpy() for k, v in parts.items()}

    # the state-blind baselines, on the CPU
    marginal = marginal_frequencies(torch.as_tensor(np.asarray(train_ids_flat)).long(), n_act).double()
    mode = int(marginal.argmax())
    out["nll_marginal"] = (-marginal.log()[ids].mean(1)).numpy()
    out["first_correct_marginal"] = (ids[:, 0] == mode).double().numpy()
    out["exact_match_marginal"] = (ids == mode).all(1).double().numpy()
    rl = repeat_last_log_probs(last, repeat_probs, marginal)
    out["nll_repeat_last"] = (-rl.gather(-1, ids[..., None]).squeeze(-1).mean(1)).numpy()
    out["first_correct_repeat_last"] = (ids[:, 0] == last).double().numpy()
    out["exact_match_repeat_last"] = (ids == last[:, None]).all(1).double().numpy()
    out["episode"] = np.asarray(pairs["episode"])
    return out


def _level_key(t: float) -> str:
    return f"t{int(round(t * 100)):02d}"


__all__ = [
    "ActionCoder", "BestCheckpoint", "Config", "DiscretizerParams", "EvalParams", "LossParams", "MLP_FILE", "MlpParams",
    "ModelParams", "Policy", "SampleParams", "fit_coder", "held_out_pairs", "mlp_nll", "mlp_split", "past_ids",
    "policy_items", "repeat_last_log_probs", "repeat_last_probs", "sample", "save_policy", "split_batch",
    "state_layout", "train_action_ids",
]

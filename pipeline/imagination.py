"""Imagination: a trained policy acting inside a trained world model, checked by the data's own
action extractor. The ``evaluate`` stage runs it (``stages/evaluate.py``); the extractors also read
the actions back from the world model's own rollouts (``pipeline/rollouts.py``).

``imagine``: from held-out real context frames the policy (``pipeline.policy.Policy``) samples H
actions, the world model (``pipeline.world.World``) rolls the frames out under them and the data's
own ego-centric extractor (``pipeline/ego.py``: camera motion for gameplay, the tracked digit for
MNIST, discretised by the policy's coder) labels the imagined transitions; the interventional
control rolls the same states out under another sequence's chosen actions (a derangement) and
labels those.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.config import ParamsError
from pipeline.ego import GameplayActionsConfig, MnistActionsConfig, camera_motion, digit_motion
from pipeline.evaluation import derangement
from pipeline.paths import ACTION_CLASS_KEY, ACTIONS_KEY, LATENTS_KEY, VALID_KEY
from pipeline.policy import ActionCoder, EvalParams, Policy, past_ids, state_layout
from pipeline.reader import window_index
from pipeline.store import EpisodeStore
from pipeline.world import World


def check_imagination(spec, world: World, context_frames: int, where: str) -> None:
    """Refuse, before any work, what imagination inside ``world`` from ``context_frames`` real
    frames cannot run: a state longer than the context, a masked world model (which does not slide)
    without room for context + horizon frames, or a world model conditioned on other actions than
    the policy's. ``spec``: a ``Config`` or a ``Policy`` (state_frames, horizon); ``where`` names
    the params block that holds ``context_frames``."""
    c = int(context_frames)
    if c < spec.state_frames:
        raise ParamsError(f"{where}.context_frames ({c}) is shorter than the policy's state_frames "
                          f"({spec.state_frames}): imagination starts from the state of the last context frames")
    max_frames = int(world.dynamics.cfg.max_frames)
    if world.family == "masked" and c + spec.horizon > max_frames:
        raise ParamsError(f"the policy's horizon ({spec.horizon}) + {where}.context_frames ({c}) exceed the masked "
                          f"world model's max_frames {max_frames}; shorten either, or retrain the dynamics "
                          f"model with a longer window")
    coder = getattr(spec, "coder", None)
    if coder is not None and coder.discrete != (world.action_input == "discrete"):
        raise ParamsError(f"the policy's actions are {'discrete classes' if coder.discrete else '[dx, dy]'} but the "
                          f"world model is conditioned on {world.action_input} actions; retrain one of them")


@torch.no_grad()
def imagine(policy: Policy, world: World, latents: EpisodeStore, actions: EpisodeStore, episodes: np.ndarray,
            context_frames: int, params: EvalParams, extractor, seed: int) -> dict:
    """The policy acts inside the world model from held-out real context frames.

    From up to ``params.imagination_sequences`` windows of C + H frames of ``episodes`` (C =
    ``context_frames``; non-overlapping, evenly picked, unique): the policy samples H actions from
    the state (the last state_frames context latents and the past actions before the last context
    frame); the world model rolls H frames out after the C context latents, conditioned on the
    context's real actions and then the chosen ones from the last context frame on (transition C-1
    is the first chosen move; valid there); the tokenizer decodes the frames and ``extractor(clip
    (B, 1 + H, ...) from the last context frame on, rows (B, 2), C) -> (B, H) ids`` labels the
    imagined transitions. The interventional control: the same states and context rolled out under
    the chosen actions of sequence ``perm[i]`` (``perm`` a derangement seeded by ``seed``), labelled
    by the extractor. Both passes draw the rollouts' noise from a generator seeded ``seed + 1``
    afresh (common random numbers: the actions are the only difference); the policy draws from one
    seeded ``seed``.

    Returns numpy arrays: ``chosen`` (N, H), ``recovered`` (N, H), ``deranged`` (N, H) (=
    chosen[perm]), ``recovered_deranged`` (N, H), ``perm`` (N,), ``episode`` (N,), ``rows`` (N, 2)
    [start, end) store rows, ``clips`` (N, C + H, h, w, c) float in [0, 1] (the context decoded from
    the real latents, then the imagined frames under the chosen actions).
    """
    c, h = int(context_frames), policy.horizon
    if c < policy.state_frames:
        raise ValueError(f"context_frames ({c}) is shorter than the policy's state_frames ({policy.state_frames})")
    rows = window_index(latents.episode_ends, episodes, c + h, c + h)
    if len(rows) < 2:
        raise ValueError(f"{latents.path}: fewer than 2 held-out windows of {c + h} frames for imagination")
    n = min(len(rows), params.imagination_sequences)
    rows = np.unique(rows[np.linspace(0, len(rows) - 1, n).round().astype(int)], axis=0)
    coder, dev = policy.coder, policy.device
    la, aa, va = latents.array(LATENTS_KEY), actions.array(ACTIONS_KEY), actions.array(VALID_KEY)
    ca = actions.array(ACTION_CLASS_KEY) if coder.discrete else None
    bs = params.imagination_batch_size
    batches = []
    for s in range(0, len(rows), bs):
        part = rows[s : s + bs]
        window = lambda arr: np.stack([arr[int(a) : int(b)] for a, b in part])  # noqa: E731
        lat, acts, valid = window(la), window(aa), window(va)
        classes = window(ca).astype(np.int64) if coder.discrete else None
        # the context's real actions (the chosen ones replace them from the last context frame on)
        real = torch.from_numpy(classes).clamp(min=0) if coder.discrete else torch.from_numpy(acts).float()
        batches.append((part, lat, acts, valid, classes, real))

    gen = torch.Generator(device=dev).manual_seed(seed)
    chosen = []
    for part, lat, acts, _, classes, _ in batches:
        state = state_layout(torch.from_numpy(lat[:, c - policy.state_frames : c]), policy.state_kind).to(dev)
        past = past_ids(acts, classes, c - 1, policy.past_actions, coder)
        chosen.append(policy.act(state, gen, past=None if past is None else past.to(dev)).cpu())
    chosen_all = torch.cat(chosen)
    perm = derangement(len(chosen_all), np.random.default_rng(seed))
    deranged_all = chosen_all[torch.from_numpy(perm)]

    def rollouts(ids_all: torch.Tensor, keep_clips: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        world_gen = torch.Generator(device=world.device).manual_seed(seed + 1)
        recovered, clips, at = [], [], 0
        for part, lat, _, valid, _, real in batches:
            ids = ids_all[at : at + len(part)]
            at += len(part)
            cond = real.clone()
            cond[:, c - 1 : c - 1 + h] = coder.dynamics_input(ids)
            val = torch.from_numpy(valid).clone()
            val[:, c - 1 : c - 1 + h] = True
            context = world.latents(lat[:, :c])
            z = world.rollout(context, cond.to(world.device), val.to(world.device), h, generator=world_gen)
            clip = world.decode(torch.cat([context, z], dim=1))                   # (B, C + H, h, w, c)
            recovered.append(np.asarray(extractor(clip[:, c - 1 :], part, c), np.int64))
            if keep_clips:
                clips.append(clip)
        return np.concatenate(recovered), clips

    recovered, clips = rollouts(chosen_all, True)
    recovered_deranged, _ = rollouts(deranged_all, False)
    return {
        "chosen": chosen_all.numpy(), "recovered": recovered, "deranged": deranged_all.numpy(),
        "recovered_deranged": recovered_deranged, "perm": perm,
        "episode": np.searchsorted(latents.episode_ends, rows[:, 0], side="right").astype(np.int64),
        "rows": rows, "clips": np.concatenate(clips),
    }


# -- the actions stage's extractors --------------------------------------------------------------


def gameplay_extractor(cfg: GameplayActionsConfig):
    """Camera-motion classes of imagined frames (B, 1 + H, ...) in [0, 1]: (B, H)."""

    def extract(clip: np.ndarray, rows: np.ndarray, c: int) -> np.ndarray:
        u8 = (np.clip(clip, 0, 1) * 255).round().astype(np.uint8)
        return np.stack([camera_motion(cfg, seq)[1].astype(np.int64) for seq in u8])

    return extract


def mnist_extractor(cfg: MnistActionsConfig, frames: EpisodeStore, coder: ActionCoder, size: int):
    """The tracked digit's discretised motion in imagined frames (B, 1 + H, ...): (B, H). The track
    starts from the digit's true box in the last real context frame."""
    if "positions" not in frames.keys:
        raise ValueError(f"{frames.path}: no true digit positions to start the imagined track from")
    pos = frames.array("positions")

    def extract(clip: np.ndarray, rows: np.ndarray, c: int) -> np.ndarray:
        start = np.stack([pos[int(a) + c - 1][cfg.tracked_digit] for a, _ in rows])
        h, w = clip.shape[2:4]
        delta = digit_motion(clip[..., 0], start, size, cfg.tracker_search)      # (B, H, 2) pixels
        return coder.ids(delta / np.array([w / 2, h / 2]))

    return extract

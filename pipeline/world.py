"""A trained world model: the dynamics model and the tokenizer whose latents it predicts.

``World`` hides the two dynamics families behind one interface, used by the dynamics stage's
evaluation and by the policy stage's imagination:

- ``latents(store_array)``: latents as stored (``latents.zarr``) to the model's layout: token ids
  (B, T, H, W) long for ``masked``; float grids (B, T, H, W, C) for ``flow`` (an MAE tokenizer's
  (N, D) tokens per frame are laid out on a sqrt(N) x sqrt(N) grid);
- ``actions(actions, action_class, valid)``: the per-transition conditioning the model was trained
  on (continuous ``[dx, dy]`` or discrete classes);
- ``rollout(context, actions, valid, horizon)``: ``horizon`` new frames after the context, frame by
  frame, in the model's layout;
- ``decode(latents)``: frames (B, T, H, W, C) float in [0, 1] through the tokenizer's decoder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from models import flow_dynamics, masked_dynamics
from pipeline.checkpoint import load_model

FAMILIES = ("flow", "masked")
# which tokenizer kinds give the latents each family models
FAMILY_TOKENIZERS = {"masked": ("quantize",), "flow": ("cnn", "mae")}


def check_family(family: str, tokenizer_kind: str, family_key: str, tokenizer_key: str) -> None:
    """Raise ValueError naming both keys when ``family`` cannot model ``tokenizer_kind``'s latents."""
    if family not in FAMILY_TOKENIZERS:
        raise ValueError(f"{family_key} is {family!r}; expected one of {FAMILIES}")
    if tokenizer_kind not in FAMILY_TOKENIZERS[family]:
        need = " or ".join(FAMILY_TOKENIZERS[family])
        other = next(f for f, kinds in FAMILY_TOKENIZERS.items() if tokenizer_kind in kinds)
        raise ValueError(
            f"{family_key} is {family!r} but {tokenizer_key} is {tokenizer_kind!r}: the {family} family "
            f"models the latents of a {need} tokenizer; set {tokenizer_key} to {need}, or {family_key} to {other!r}"
        )


def flow_grid(latent_shape: tuple[int, ...] | list[int]) -> tuple[int, int, int]:
    """(H, W, C) of continuous latents: a cnn grid as is; MAE (N, D) tokens on a square grid."""
    shape = tuple(int(s) for s in latent_shape)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    if len(shape) == 2:
        n, d = shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"MAE latents of {n} tokens per frame cannot be laid on a square grid; "
                             f"use a square tokenizer n_latents (e.g. 16)")
        return side, side, d
    raise ValueError(f"continuous latents must be (H, W, C) or (N, D) per frame, got {shape}")


@dataclass
class World:
    dynamics: nn.Module
    meta: dict          # dynamics.json
    tokenizer: nn.Module
    tok_meta: dict      # tokenizer.json
    device: torch.device

    @classmethod
    def load(cls, dynamics_dir: Path | str, tokenizer_dir: Path | str, device: str | torch.device = "cpu") -> "World":
        device = torch.device(device)
        dynamics, meta = load_model(dynamics_dir, "dynamics", device)
        tokenizer, tok_meta = load_model(tokenizer_dir, "tokenizer", device)
        if meta.get("tokenizer_kind") != tok_meta["kind"]:
            raise ValueError(f"{dynamics_dir} was trained on {meta.get('tokenizer_kind')} latents, but "
                             f"{tokenizer_dir} holds a {tok_meta['kind']} tokenizer; rerun the dynamics stage")
        return cls(dynamics, meta, tokenizer, tok_meta, device)

    @property
    def family(self) -> str:
        return self.meta["kind"]

    @property
    def action_input(self) -> str:
        return self.meta["action_input"]

    # -- layouts ---------------------------------------------------------------------------------
    def latents(self, stored: np.ndarray | torch.Tensor) -> torch.Tensor:
        return to_model_layout(stored, self.family, self.device, self.meta.get("latent_norm"))

    def actions(self, actions: np.ndarray | torch.Tensor, action_class: np.ndarray | torch.Tensor | None,
                valid: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return action_inputs(self.action_input, actions, action_class, valid, self.device)

    # -- rollouts ---------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, context: torch.Tensor, actions: torch.Tensor, valid: torch.Tensor, horizon: int,
                steps: int | None = None, generator: torch.Generator | None = None, cache: bool = True,
                decode: str | None = None) -> torch.Tensor:
        """``horizon`` frames after ``context`` (B, C, ...) under per-transition ``actions`` (B, C + horizon, ...).

        Masked family: ``decode`` overrides the model's own ("maskgit" or "expected")."""
        s = self.meta["sample"]
        c = context.shape[1]
        acts, val = actions[:, : c + horizon], valid[:, : c + horizon]
        if self.family == "flow":
            return flow_dynamics.rollout(self.dynamics, context, acts, val, horizon, steps=steps or s["steps"],
                                         tau_ctx=s["tau_ctx"], generator=generator, cache=cache)
        return masked_dynamics.rollout(self.dynamics, context, acts, val, horizon, steps=steps or s["steps"],
                                       temperature=s["temperature"], generator=generator, cache=cache,
                                       decode=decode or s.get("decode", "maskgit"))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> np.ndarray:
        """Frames (B, T, H, W, C) float32 in [0, 1] of model-layout latents (B, T, ...).

        A block-causal (MAE) tokenizer decodes in windows of its ``encode_window`` from frame 0."""
        if self.family == "flow":
            z = denormalize(z, self.meta.get("latent_norm"))
            if len(self.tok_meta["latent_shape"]) == 2:
                z = z.reshape(*z.shape[:2], *self.tok_meta["latent_shape"])
        window = int(self.tok_meta.get("encode_window", 1))
        parts = []
        for s in range(0, z.shape[1], window):
            chunk = z[:, s : s + window]
            if self.family == "masked":
                chunk = chunk.to(torch.uint8)
            parts.append(self.tokenizer.decode(chunk).clamp(0, 1))
        x = torch.cat(parts, dim=1)  # (B, T, C, H, W)
        return x.movedim(2, -1).float().cpu().numpy()


def to_model_layout(stored: np.ndarray | torch.Tensor, family: str, device: torch.device | str = "cpu",
                    norm: dict | None = None) -> torch.Tensor:
    """Stored latents (B, T, *latent_shape) in the layout of ``family``'s model: token ids, or
    float grids normalised per channel with ``norm`` (``latent_norm``: mean and std of the
    training latents; a tokenizer's tanh-bounded latents have a std near 0.1, and at unit-variance
    noise the signal would be almost invisible to a flow model at most signal levels)."""
    z = torch.as_tensor(np.asarray(stored) if not isinstance(stored, torch.Tensor) else stored, device=device)
    if family == "masked":
        return z.long()
    z = grid_layout(z.float())
    if norm is not None:
        z = (z - z.new_tensor(norm["mean"])) / z.new_tensor(norm["std"])
    return z


def grid_layout(z: torch.Tensor) -> torch.Tensor:
    """Continuous latents (B, T, *latent_shape) on a grid (B, T, H, W, C): a cnn grid as is, an
    MAE tokenizer's (N, D) tokens per frame on a sqrt(N) x sqrt(N) grid (``flow_grid``)."""
    if z.ndim == 4:  # MAE tokens (B, T, N, D)
        h, w, c = flow_grid(z.shape[2:])
        z = z.reshape(*z.shape[:2], h, w, c)
    return z


def denormalize(z: torch.Tensor, norm: dict | None) -> torch.Tensor:
    """Inverse of ``to_model_layout``'s normalisation."""
    if norm is None:
        return z
    return z * z.new_tensor(norm["std"]) + z.new_tensor(norm["mean"])


def latent_norm(latents: np.ndarray) -> dict:
    """Per-channel (last axis) mean and std of continuous latents (N, ..., C), as JSON-able lists."""
    flat = np.asarray(latents, np.float64).reshape(-1, latents.shape[-1])
    std = np.maximum(flat.std(axis=0), 1e-6)
    return {"mean": [float(v) for v in flat.mean(axis=0)], "std": [float(v) for v in std]}


def action_inputs(action_input: str, actions, action_class, valid, device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-transition conditioning (B, T, 2) float or (B, T) long, and ``valid`` (B, T) bool."""
    val = torch.as_tensor(np.asarray(valid), device=device).bool()
    if action_input == "discrete":
        if action_class is None:
            raise ValueError("discrete actions need the actions store's `action_class` (gameplay only)")
        cls = torch.as_tensor(np.asarray(action_class), device=device).long()
        return cls.clamp(min=0), val & (cls >= 0)
    return torch.as_tensor(np.asarray(actions), device=device).float(), val

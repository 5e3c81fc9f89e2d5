"""Action-conditioned flow-matching world model over continuous frame latents (DreamerV4 style).

Paper: "Training Agents Inside of Scalable World Models" (Hafner et al. 2025), with diffusion
forcing (every frame its own signal level) and shortcut forcing ("One Step Diffusion via Shortcut
Models", Frans et al. 2024). Read top to bottom: config, model, training loss, sampling.

One convention, the paper's, everywhere in this file:

- ``tau`` is the SIGNAL level: 0 = pure noise, 1 = clean; ``noisy(z, eps, tau) = (1 - tau) * eps
  + tau * z``. The model predicts the clean latents (x-prediction); its velocity towards the data
  is ``v = (z_hat - z_tilde) / (1 - tau)``.
- ``d`` is the step size, on the grid ``2**i / k_max`` (i = 0 .. log2 k_max); a shortcut step
  goes from ``tau`` to ``tau + d``, and ``tau`` lies on the grid of its step: {0, d, .., 1 - d}.
- Actions are per transition (``actions[t]``: frame t -> t+1); frames are conditioned through
  ``models.common.frame_actions`` (frame t gets ``actions[t-1]``, frame 0 none).
- Context frames (the past the model conditions on) are corrupted to signal level ``tau_ctx``
  (default 0.9) with step ``d = 1 / k_max``, in training and in sampling alike.

Conditioning is AdaLN-Zero (DiT): per frame, ``c = emb(tau) + emb(d) + emb(action)`` of shape
(B, T, D) gives each block's shift / scale / gate of its three sub-layers (spatial attention,
causal temporal attention, MLP); gates and the output layer start at zero.

Residual base (``residual``): each frame is predicted as a correction of its predecessor's
posterior mean; with ``camera_warp`` that base is first moved against the camera's motion under the
frame's action (``warp``), and the network also reads it as an input (``FlowDynamics.base``).

Limits: temporal positions are learned, so a forward pass (cache included) covers at most
``max_frames`` frames; ``rollout`` keeps a sliding window of the last ``max_frames - 1`` context
frames. MAE latents viewed as (N, 1, D) need ``patch=1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import (MLP, SelfAttention, context_copy_mask, frame_actions, patchify, sinusoidal_embedding,
                           unpatchify, warp)

KV = tuple[torch.Tensor, torch.Tensor]  # one layer's temporal keys and values, each (B*N, heads, T, D/heads)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


@dataclass
class FlowConfig:
    """Sizes of ``FlowDynamics``. ``latent_shape`` is one frame's latent grid (H, W, C)."""

    latent_shape: tuple[int, int, int] = (16, 16, 8)
    patch: int = 2
    dim: int = 128
    heads: int = 4
    depth: int = 4
    mlp_ratio: int = 4
    max_frames: int = 16  # learned temporal positions 0 .. max_frames - 1
    action_kind: Literal["continuous", "discrete"] = "continuous"
    action_dim: int = 2
    action_scale: float = 1.0  # continuous actions are multiplied by this (1 / their RMS: unit-scale inputs)
    action_classes: int = 5
    k_max: int = 64  # finest step 1 / k_max
    residual: bool = False  # predict each frame as a correction of its predecessor's denoised input
    # camera warp: the residual base is the predecessor moved against the camera's motion under the
    # frame's action, and the network also reads that base as an input (``FlowDynamics.base``). Motion
    # in normalised units (image half-sizes; +x right, +y down): continuous actions are that motion
    # (before action_scale); discrete class k moves the camera by class_motion[k].
    camera_warp: bool = False
    class_motion: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self):
        self.latent_shape = tuple(int(s) for s in self.latent_shape)
        if len(self.latent_shape) != 3 or min(self.latent_shape) < 1:
            raise ValueError(f"latent_shape must be three positive sizes (H, W, C), got {self.latent_shape}")
        h, w, _ = self.latent_shape
        if self.patch < 1 or h % self.patch or w % self.patch:
            raise ValueError(f"patch {self.patch} must divide the latent grid {h}x{w}")
        if self.dim < 1 or self.heads < 1 or self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be a positive multiple of heads {self.heads}")
        if self.k_max < 1 or self.k_max & (self.k_max - 1):
            raise ValueError(f"k_max {self.k_max} must be a power of 2")
        if self.action_kind not in ("continuous", "discrete"):
            raise ValueError(f"action_kind must be 'continuous' or 'discrete', got {self.action_kind!r}")
        for name in ("depth", "mlp_ratio", "max_frames", "action_dim", "action_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.action_scale) and self.action_scale > 0):
            raise ValueError(f"action_scale must be finite and > 0, got {self.action_scale}")
        if self.camera_warp:
            if not self.residual:
                raise ValueError("camera_warp moves the residual base: it needs residual")
            if self.action_kind == "continuous" and self.action_dim != 2:
                raise ValueError(f"camera_warp reads continuous actions as [dx, dy], got action_dim {self.action_dim}")
            if self.action_kind == "discrete":
                if self.class_motion is None:
                    raise ValueError("camera_warp with discrete actions needs class_motion (each class's motion)")
                self.class_motion = tuple(tuple(float(v) for v in m) for m in self.class_motion)
                if len(self.class_motion) != self.action_classes or any(len(m) != 2 for m in self.class_motion):
                    raise ValueError(f"class_motion must give [dx, dy] for each of the {self.action_classes} "
                                     f"classes, got {self.class_motion}")

    @property
    def tokens_per_frame(self) -> int:
        h, w, _ = self.latent_shape
        return (h // self.patch) * (w // self.patch)


def noisy(z: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """The paper's corruption ``(1 - tau) * eps + tau * z`` (tau = signal level, 1 = clean).

    ``z``, ``eps``: (B, T, H, W, C); ``tau``: a float or (B, T) (broadcast over the frame)."""
    if torch.is_tensor(tau):
        tau = tau.to(z.dtype).reshape(*tau.shape, *([1] * (z.dim() - tau.dim())))
    return (1 - tau) * eps + tau * z


def step_index(d: torch.Tensor, k_max: int) -> torch.Tensor:
    """Grid index i of step sizes ``d = 2**i / k_max`` (int64, same shape); raises off the grid."""
    i = torch.round(torch.log2(d.double() * k_max)).long()
    if not torch.compiler.is_compiling():
        back = torch.exp2(i.double()) / k_max
        bad = (i < 0) | (i > int(math.log2(k_max))) | ((back - d.double()).abs() > 1e-6)
        if bad.any():
            raise ValueError(f"step size {d[bad].flatten()[0].item():.6g} is not on the grid 2**i / k_max "
                             f"with k_max {k_max}")
    return i


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Block(nn.Module):
    """Spatial attention within a frame, causal temporal attention per token position, MLP;
    each pre-norm residual with AdaLN-Zero modulation from the per-frame condition."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.spatial = SelfAttention(d, cfg.heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.temporal = SelfAttention(d, cfg.heads)
        self.norm3 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(d, cfg.mlp_ratio)
        self.ada = nn.Linear(d, 9 * d)  # zero-initialised by FlowDynamics

    def forward(self, x: torch.Tensor, c: torch.Tensor, past: KV | None = None,
                time_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KV]:
        """``x``: (B, T, N, D) tokens, ``c``: (B, T, D) per-frame condition, ``past``: cached temporal
        keys/values of earlier frames; ``time_mask``: (T, T) bool (True = may attend) in place of
        the causal pattern. Returns the new tokens and this call's temporal (k, v)."""
        b, t, n, d = x.shape
        mod = self.ada(F.silu(c)).unsqueeze(2).chunk(9, dim=-1)  # each (B, T, 1, D)
        # attention on 3-D (batch, sequence, D) views, so SDPA gets 4-D inputs (its fused kernels)
        h = _modulate(self.norm1(x), mod[0], mod[1]).reshape(b * t, n, d)  # attend within a frame
        x = x + mod[2] * self.spatial(h).view(b, t, n, d)
        h = _modulate(self.norm2(x), mod[3], mod[4]).transpose(1, 2).reshape(b * n, t, d)  # over time
        if time_mask is None:
            y, kv = self.temporal(h, is_causal=True, past=past, return_kv=True)
        else:
            y, kv = self.temporal(h, mask=time_mask, past=past, return_kv=True)
        x = x + mod[5] * y.view(b, n, t, d).transpose(1, 2)
        x = x + mod[8] * self.mlp(_modulate(self.norm3(x), mod[6], mod[7]))
        return x, kv


def mmse(z_noisy: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """E[z | z_noisy] for unit-variance latents: ``z_noisy * tau / (tau^2 + (1 - tau)^2)``, with
    ``tau`` per frame (B, T) broadcast over the frame's latents (0 at pure noise, the input when clean)."""
    t = tau.float().reshape(*tau.shape, *([1] * (z_noisy.dim() - tau.dim())))
    return z_noisy.float() * t / (t * t + (1 - t) ** 2)


def predecessors(z_noisy: torch.Tensor, tau: torch.Tensor,
                 prev: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each frame's predecessor and its signal level: the frames shifted one step later in time,
    ``prev`` (noisy latents (B, 1, ...), level (B, 1)) first, or pure noise at level 0 (``mmse`` 0)."""
    if prev is None:
        first, first_tau = torch.zeros_like(z_noisy[:, :1]), torch.zeros_like(tau[:, :1])
    else:
        first, first_tau = prev
    zs = torch.cat([first.to(z_noisy.dtype), z_noisy[:, :-1]], dim=1)
    ts = torch.cat([first_tau.to(tau.dtype), tau[:, :-1]], dim=1)
    return zs, ts


class FlowDynamics(nn.Module):
    """Predicts clean latents ``z_hat`` (B, T, H, W, C) from noisy ones, per-frame signal levels
    and step sizes, and per-frame actions; frame t sees only frames <= t."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        h, w, c = cfg.latent_shape
        d, n = cfg.dim, cfg.tokens_per_frame
        self.inp = nn.Linear(cfg.patch * cfg.patch * c, d)
        self.pos_space = nn.Parameter(torch.randn(n, d) * 0.02)
        self.pos_time = nn.Parameter(torch.randn(cfg.max_frames, d) * 0.02)
        self.tau_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.step_emb = nn.Embedding(int(math.log2(cfg.k_max)) + 1, d)
        if cfg.action_kind == "continuous":
            self.action_emb = nn.Linear(cfg.action_dim, d)
        else:
            self.action_emb = nn.Embedding(cfg.action_classes, d)
        self.no_action = nn.Parameter(torch.randn(d) * 0.02)
        if cfg.camera_warp:
            self.inp_base = nn.Linear(cfg.patch * cfg.patch * c, d)  # the warped base as an input
            if cfg.action_kind == "discrete":
                self.register_buffer("class_motion", torch.tensor(cfg.class_motion, dtype=torch.float32),
                                     persistent=False)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, cfg.patch * cfg.patch * c)
        self.apply(self._init)
        zero = [self.inp_base] if cfg.camera_warp else []
        for m in [b.ada for b in self.blocks] + [self.ada_out, self.out] + zero:  # AdaLN-Zero
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # -- conditioning ------------------------------------------------------------------------

    def noise_embedding(self, tau: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Per-frame embedding of the signal level plus the step size: (B, T) each -> (B, T, D)."""
        if tau.shape != d.shape:
            raise ValueError(f"tau {tuple(tau.shape)} and d {tuple(d.shape)} must both be per frame (B, T)")
        emb_tau = self.tau_mlp(sinusoidal_embedding(tau * 1000.0, self.cfg.dim).to(self.inp.weight.dtype))
        return emb_tau + self.step_emb(step_index(d, self.cfg.k_max))

    def action_embedding(self, actions: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
        """Per-frame action embedding (B, T, D); the learned "no action" vector where ``has`` is False.

        ``actions``: (B, T, action_dim) float (continuous) or (B, T) int64 class ids (discrete)."""
        b, t = has.shape
        if self.cfg.action_kind == "continuous":
            if actions.shape != (b, t, self.cfg.action_dim):
                raise ValueError(f"continuous actions must be (B, T, {self.cfg.action_dim}) = "
                                 f"({b}, {t}, {self.cfg.action_dim}), got {tuple(actions.shape)}")
            emb = self.action_emb(actions.to(self.inp.weight.dtype) * self.cfg.action_scale)
        else:
            if actions.shape != (b, t) or actions.is_floating_point():
                raise ValueError(f"discrete actions must be integer ids (B, T) = ({b}, {t}), "
                                 f"got {tuple(actions.shape)} {actions.dtype}")
            emb = self.action_emb(actions.long())
        return torch.where(has[..., None], emb, self.no_action.to(emb.dtype))

    def condition(self, tau: torch.Tensor, d: torch.Tensor, actions: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
        """The per-frame condition ``c`` (B, T, D) that drives every block's AdaLN."""
        return self.noise_embedding(tau, d) + self.action_embedding(actions, has)

    def content_shift(self, actions: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
        """Per-frame shift (B, T, 2) in latent cells of the scene content under the frame's action:
        the opposite of the camera's motion (normalised by the half image), 0 without an action."""
        h, w, _ = self.cfg.latent_shape
        if self.cfg.action_kind == "continuous":
            motion = actions.float()
        else:
            motion = self.class_motion[actions.long()]
        half = torch.tensor([w / 2, h / 2], device=motion.device)
        return torch.where(has[..., None], -motion * half, torch.zeros_like(motion))

    def base(self, z_prev: torch.Tensor, tau_prev: torch.Tensor, actions: torch.Tensor,
             has: torch.Tensor) -> torch.Tensor:
        """Residual bases (B, T, H, W, C): ``mmse`` of each frame's predecessor ``z_prev`` at
        ``tau_prev``; with ``camera_warp`` moved by ``content_shift`` of the frame's action.

        Why the base also enters as an input: the CNN tokenizer's latents are not shift-equivariant
        at Crafter's tile size (1.78 latent cells at 64 px), so the bilinearly moved latents need a
        correction that depends on them at each position; the tokens of the noisy frame do not
        carry them, and the context reaches a token only unmoved, through temporal attention."""
        out = mmse(z_prev, tau_prev)
        if self.cfg.camera_warp:
            out = warp(out, self.content_shift(actions, has))
        return out

    # -- forward -----------------------------------------------------------------------------

    def forward(
        self,
        z_noisy: torch.Tensor,
        tau: torch.Tensor,
        d: torch.Tensor,
        actions: torch.Tensor,
        has: torch.Tensor,
        past: list[KV] | None = None,
        return_kv: bool = False,
        prev: tuple[torch.Tensor, torch.Tensor] | None = None,
        ctx: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        base: torch.Tensor | None = None,
    ):
        """Predict the clean latents (x-prediction).

        ``z_noisy``: (B, T, H, W, C) at per-frame signal levels ``tau`` (B, T) with step sizes ``d``
        (B, T); ``actions``/``has``: per FRAME (from ``frame_actions``). ``past``: per layer the
        temporal keys/values of earlier frames (a cache); these frames then sit at temporal
        positions ``T_past ..``. Returns ``z_hat`` (B, T, H, W, C), and with ``return_kv`` also this
        call's per-layer (k, v) to extend a cache (``extend_cache``).

        With ``cfg.residual`` the network predicts a correction of a base: frame t's base is the
        posterior-mean estimate of frame t-1 from its noisy input, ``mmse(z_noisy[t-1], tau[t-1])``
        (0 for the first frame of a window), so a network that outputs nothing copies the last
        frame. ``prev``: (noisy latents (B, 1, H, W, C), signal level (B, 1)) of the frame before
        this call's first one (with a cache: the last cached frame), else that frame has no base.
        ``base``: the frames' residual bases (B, T, H, W, C) (``FlowDynamics.base``) in place of
        computing them from ``prev``: a rollout's Euler steps for one new frame share it.

        ``ctx``: (latents (B, T, H, W, C), signal levels (B, T), step sizes (B, T)), a second copy
        of the same T frames as context (context copies, for training): frame t of ``z_noisy`` then
        sees the context copies of frames < t and itself, not the other noisy frames, just as
        a new frame sees the cached context in a rollout, and its base is the context copy of
        frame t-1. Each of the T frames is so a target with a context past, in one pass of 2T frames.
        """
        if ctx is not None:
            return self._forward_with_context(z_noisy, tau, d, actions, has, ctx)
        cfg = self.cfg
        h, w, c = cfg.latent_shape
        b, t = z_noisy.shape[:2]
        if tuple(z_noisy.shape[2:]) != cfg.latent_shape:
            raise ValueError(f"latents must be (B, T, {h}, {w}, {c}), got {tuple(z_noisy.shape)}")
        if tau.shape != (b, t) or d.shape != (b, t) or has.shape != (b, t):
            raise ValueError(f"tau, d and has must be ({b}, {t}), got {tuple(tau.shape)}, "
                             f"{tuple(d.shape)}, {tuple(has.shape)}")
        t0 = 0 if past is None else past[0][0].shape[-2]
        if t0 + t > cfg.max_frames:
            raise ValueError(f"{t0} cached + {t} frames exceed max_frames {cfg.max_frames}")
        x = self.inp(patchify(z_noisy, cfg.patch).to(self.inp.weight.dtype))  # (B, T, N, D)
        x = x + self.pos_space + self.pos_time[t0:t0 + t, None, :]
        if cfg.residual:
            if base is None:
                base = self.base(*predecessors(z_noisy, tau, prev), actions, has)
            if cfg.camera_warp:
                x = x + self.inp_base(patchify(base, cfg.patch).to(self.inp.weight.dtype))
        cond = self.condition(tau, d, actions, has)
        kvs = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cond, None if past is None else past[i])
            kvs.append(kv)
        shift, scale = self.ada_out(F.silu(cond)).unsqueeze(2).chunk(2, dim=-1)
        x = self.out(_modulate(self.norm_out(x), shift, scale))
        z_hat = unpatchify(x, cfg.patch, h, w)
        if cfg.residual:
            z_hat = z_hat + base.to(z_hat.dtype)
        return (z_hat, kvs) if return_kv else z_hat

    def _forward_with_context(self, z_noisy, tau, d, actions, has, ctx):
        cfg = self.cfg
        h, w, c = cfg.latent_shape
        z_ctx, tau_ctx, d_ctx = ctx
        b, t = z_noisy.shape[:2]
        if z_ctx.shape != z_noisy.shape or tau_ctx.shape != (b, t) or d_ctx.shape != (b, t):
            raise ValueError(f"context copies must match the frames {tuple(z_noisy.shape)} and levels ({b}, {t}), "
                             f"got {tuple(z_ctx.shape)}, {tuple(tau_ctx.shape)}, {tuple(d_ctx.shape)}")
        if t > cfg.max_frames:
            raise ValueError(f"{t} frames exceed max_frames {cfg.max_frames}")
        both = torch.cat([z_ctx, z_noisy], dim=1)  # (B, 2T, ...): context copies, then the targets
        x = self.inp(patchify(both, cfg.patch).to(self.inp.weight.dtype))
        pos = self.pos_time[:t]
        x = x + self.pos_space + torch.cat([pos, pos])[:, None, :]
        if cfg.residual:  # a target's predecessor, as a context copy's, is the context copy before it
            base = self.base(*predecessors(z_ctx, tau_ctx, None), actions, has)
            if cfg.camera_warp:
                x = x + self.inp_base(patchify(base, cfg.patch).to(self.inp.weight.dtype)).repeat(1, 2, 1, 1)
        cond = torch.cat([self.condition(tau_ctx, d_ctx, actions, has), self.condition(tau, d, actions, has)], dim=1)
        mask = context_copy_mask(t, x.device)
        for block in self.blocks:
            x, _ = block(x, cond, time_mask=mask)
        shift, scale = self.ada_out(F.silu(cond[:, t:])).unsqueeze(2).chunk(2, dim=-1)
        x = self.out(_modulate(self.norm_out(x[:, t:]), shift, scale))
        z_hat = unpatchify(x, cfg.patch, h, w)
        if cfg.residual:
            z_hat = z_hat + base.to(z_hat.dtype)
        return z_hat

    # -- accounting --------------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_frame(self, frames: int) -> float:
        """nanoGPT-style estimate of training FLOPs (forward + backward) per frame in windows of
        ``frames`` frames: 6 x (per-token weights x tokens + per-frame weights) plus attention
        (12 x layers x dim x attended length per token, spatial N plus temporal ``frames``)."""
        cfg = self.cfg
        n = cfg.tokens_per_frame
        per_token = sum(p.numel() for name, p in self.named_parameters()
                        if (name.startswith("blocks.") and ".ada." not in name) or name.startswith(("inp.", "out.")))
        per_frame = sum(p.numel() for name, p in self.named_parameters()
                        if ".ada." in name or name.startswith(("ada_out.", "tau_mlp.")))
        attn = 12 * cfg.depth * cfg.dim * n * (n + frames)
        return 6.0 * (per_token * n + per_frame) + attn

    def estimate_mfu(self, frames_per_iter: int, frames: int, dt: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved FLOPs (``frames_per_iter`` frames in windows of
        ``frames``, one iteration taking ``dt`` seconds) over ``peak_flops`` (FLOP/s)."""
        return self.flops_per_frame(frames) * frames_per_iter / dt / peak_flops


def extend_cache(cache: list[KV] | None, new: list[KV]) -> list[KV]:
    """Append per-layer temporal keys/values of later frames to a cache (along time)."""
    if cache is None:
        return new
    return [(torch.cat([k, nk], dim=-2), torch.cat([v, nv], dim=-2)) for (k, v), (nk, nv) in zip(cache, new)]


# --------------------------------------------------------------------------------------------
# training loss: diffusion forcing + shortcut forcing
# --------------------------------------------------------------------------------------------


@dataclass
class FlowLossConfig:
    """``k_max``: finest step 1 / k_max (the model's); ``tau_ctx``: signal level of context frames;
    ``bootstrap_fraction``: share of the batch trained with shortcut bootstrap targets;
    context frames per window are uniform in [``min_context``, T - 1].
    ``context_copies``: instead of a context prefix, every frame from ``min_context`` on is a
    target, beside a copy of the window at ``tau_ctx`` that serves as its past
    (``FlowDynamics.forward``'s ``ctx``): each target then sees a lightly corrupted past, as a
    new frame does in a rollout, for twice the frames of a pass."""

    k_max: int = 64
    tau_ctx: float = 0.9
    bootstrap_fraction: float = 0.125
    min_context: int = 1
    context_copies: bool = False

    def __post_init__(self):
        if self.k_max < 1 or self.k_max & (self.k_max - 1):
            raise ValueError(f"k_max {self.k_max} must be a power of 2")
        if not 0.0 <= self.tau_ctx <= 1.0:
            raise ValueError(f"tau_ctx {self.tau_ctx} must lie in [0, 1]")
        if not 0.0 <= self.bootstrap_fraction <= 1.0:
            raise ValueError(f"bootstrap_fraction {self.bootstrap_fraction} must lie in [0, 1]")
        if self.bootstrap_fraction > 0 and self.k_max < 2:
            raise ValueError(f"bootstrap_fraction {self.bootstrap_fraction} > 0 needs k_max >= 2, got {self.k_max}")
        if self.min_context < 1:
            raise ValueError(f"min_context {self.min_context} must be >= 1")


def ramp_weight(tau: torch.Tensor) -> torch.Tensor:
    """DreamerV4's loss weight ``0.9 * tau + 0.1`` (tau = signal level): cleaner inputs weigh more."""
    return 0.9 * tau + 0.1


@dataclass
class Levels:
    """Per-frame levels of a training batch: ``tau``, ``d`` (B, T) float; ``target`` (B, T) bool
    (False = context frame, no loss); ``bootstrap`` (B,) bool (rows with shortcut targets)."""

    tau: torch.Tensor
    d: torch.Tensor
    target: torch.Tensor
    bootstrap: torch.Tensor


def sample_levels(b: int, t: int, cfg: FlowLossConfig, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> Levels:
    """Diffusion-forcing levels for a (b, t) batch of windows.

    Each window: a random prefix of ``min_context .. t-1`` context frames at ``tau_ctx`` with
    ``d = 1/k_max`` (with ``context_copies``: the first ``min_context`` frames); the other frames
    are targets, each with its own step and level. Rows of the
    bootstrap share (``round(b * bootstrap_fraction)`` rows, chosen at random) draw
    ``d = 2**i / k_max`` with i uniform in 1..log2 k_max, the others ``d = 1/k_max``; then
    ``tau = j * d`` with j uniform in 0 .. 1/d - 1 (the grid of its step, tau <= 1 - d).
    """
    if t < cfg.min_context + 1:
        raise ValueError(f"windows of {t} frames leave no target after min_context {cfg.min_context}")
    kw = dict(generator=generator, device=device)
    if cfg.context_copies:  # every frame from min_context on (the copies are the context)
        n_ctx = torch.full((b, 1), cfg.min_context, dtype=torch.long, device=device)
    else:
        n_ctx = torch.randint(cfg.min_context, t, (b, 1), **kw)
    target = torch.arange(t, device=device) >= n_ctx  # (B, T)
    n_boot = int(math.floor(b * cfg.bootstrap_fraction + 0.5))
    bootstrap = torch.zeros(b, dtype=torch.bool, device=device)
    bootstrap[torch.randperm(b, **kw)[:n_boot]] = True
    levels = int(math.log2(cfg.k_max))
    i = torch.randint(1, max(levels, 1) + 1, (b, t), **kw) if levels else torch.zeros(b, t, dtype=torch.long, device=device)
    i = torch.where(bootstrap[:, None], i, 0)
    steps_per_unit = cfg.k_max // 2 ** i  # 1 / d
    j = (torch.rand(b, t, **kw) * steps_per_unit).long().clamp(max=steps_per_unit - 1)
    d = 1.0 / steps_per_unit
    tau = j / steps_per_unit
    d = torch.where(target, d, 1.0 / cfg.k_max).float()
    tau = torch.where(target, tau, cfg.tau_ctx).float()
    return Levels(tau=tau, d=d, target=target, bootstrap=bootstrap)


@torch.no_grad()
def bootstrap_target(teacher: nn.Module, z_tilde: torch.Tensor, tau: torch.Tensor, d: torch.Tensor,
                     target: torch.Tensor, actions: torch.Tensor, has: torch.Tensor, k_max: int,
                     ctx: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The shortcut x-space target ``z_tilde + (1 - tau) * b_bar`` (stop-grad).

    The teacher takes two half steps ``d/2`` with its own Euler steps on the target frames
    (context frames stay as they are, at their own levels):
    ``v' = (f(z_tilde, tau, d/2) - z_tilde) / (1 - tau)``, ``z' = z_tilde + d/2 * v'``,
    ``v'' = (f(z', tau + d/2, d/2) - z') / (1 - tau - d/2)``, ``b_bar = (v' + v'') / 2``.
    The student's loss ``(1 - tau)^2 |v_hat - b_bar|^2`` equals ``|z_hat - this|^2``.
    ``ctx``: the context copies (``FlowDynamics.forward``), the same for both half steps.
    """
    kw = {} if ctx is None else {"ctx": ctx}
    def frame(x):  # (B, T) -> (B, T, 1, 1, 1)
        return x.reshape(*x.shape, 1, 1, 1)

    half = torch.where(target, d / 2, 1.0 / k_max)
    v1 = (teacher(z_tilde, tau, half, actions, has, **kw) - z_tilde) / frame(1 - tau)
    z_mid = torch.where(frame(target), z_tilde + frame(half) * v1, z_tilde)
    tau_mid = torch.where(target, tau + half, tau)
    v2 = (teacher(z_mid, tau_mid, half, actions, has, **kw) - z_mid) / frame(1 - tau_mid)
    b_bar = (v1 + v2) / 2
    return z_tilde + frame(1 - tau) * b_bar


def flow_loss_at(model: nn.Module, teacher: nn.Module | None, z: torch.Tensor, eps: torch.Tensor, levels: Levels,
                 actions: torch.Tensor, has: torch.Tensor, k_max: int, ctx_eps: torch.Tensor | None = None,
                 tau_ctx: float = 0.9) -> tuple[torch.Tensor, dict[str, float]]:
    """The shortcut-forcing loss at given levels and noise (deterministic; ``shortcut_forcing_loss``
    draws them). ``actions``/``has`` per frame. Returns ``(loss, parts)``; parts (floats): ``loss``;
    ``flow`` / ``bootstrap``: the ramp-weighted loss over the flow / bootstrap rows' target frames
    (0 where there are none); ``flow_mse``: the flow rows' unweighted |z_hat - z|^2; ``tau_mean``
    over target frames; ``target_share``: target frames / all frames; ``bootstrap_rows``.

    Flow rows: ``|z_hat - z|^2``; bootstrap rows: ``|z_hat - (z_tilde + (1 - tau) b_bar)|^2``
    (``bootstrap_target``, from ``teacher``, or ``model`` itself when None, without gradient). Each
    frame's mean squared error is weighted by ``ramp_weight(tau)``; the loss is the mean over
    all target frames of the batch (context frames carry none).
    ``ctx_eps``: the noise of context copies at ``tau_ctx`` (``FlowLossConfig.context_copies``),
    or None for none.
    """
    tau, d, target, boot = levels.tau, levels.d, levels.target, levels.bootstrap
    z_tilde = noisy(z, eps, tau)
    ctx = None
    if ctx_eps is not None:
        ones = torch.ones_like(tau)
        ctx = (noisy(z, ctx_eps, tau_ctx), ones * tau_ctx, ones / k_max)
    kw = {} if ctx is None else {"ctx": ctx}
    z_hat = model(z_tilde, tau, d, actions, has, **kw)
    goal = z
    if boot.any():
        teacher = model if teacher is None else teacher
        goal = z.clone()
        goal[boot] = bootstrap_target(teacher, z_tilde[boot], tau[boot], d[boot], target[boot],
                                      actions[boot], has[boot], k_max,
                                      None if ctx is None else tuple(x[boot] for x in ctx))
    per_frame = (z_hat.float() - goal.float()).pow(2).mean(dim=(2, 3, 4))  # (B, T)
    weighted = ramp_weight(tau) * per_frame
    tmask = target.float()
    loss = (weighted * tmask).sum() / tmask.sum()
    flow_mask = tmask * (~boot)[:, None]
    boot_mask = tmask * boot[:, None]
    stats = torch.stack([
        loss,
        (weighted * flow_mask).sum() / flow_mask.sum().clamp(min=1),
        (weighted * boot_mask).sum() / boot_mask.sum().clamp(min=1),
        (per_frame * flow_mask).sum() / flow_mask.sum().clamp(min=1),
        (tau * tmask).sum() / tmask.sum(),
        tmask.mean(),
        boot.float().sum(),
    ]).detach().tolist()  # one device sync
    parts = dict(zip(("loss", "flow", "bootstrap", "flow_mse", "tau_mean", "target_share", "bootstrap_rows"), stats))
    return loss, parts


def shortcut_forcing_loss(model: nn.Module, teacher: nn.Module | None, z: torch.Tensor, actions: torch.Tensor,
                          valid: torch.Tensor | None, cfg: FlowLossConfig,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion forcing + shortcut forcing loss on windows ``z`` (B, T, H, W, C).

    ``actions``: (B, T, ...) per transition, ``valid`` (B, T) bool (see ``frame_actions``);
    ``teacher``: module for the bootstrap targets (an EMA copy), or None for ``model`` itself.
    Draws, in this order from ``generator``: the levels (``sample_levels``), then the noise
    (then the context copies' noise, with ``cfg.context_copies``).
    All T frames are taken as one episode; ``valid`` only masks actions.
    Returns ``(loss, parts)`` as ``flow_loss_at``.
    """
    model_k_max = getattr(getattr(model, "cfg", None), "k_max", cfg.k_max)
    if model_k_max != cfg.k_max:
        raise ValueError(f"loss k_max {cfg.k_max} differs from the model's k_max {model_k_max}")
    z = z.float()
    b, t = z.shape[:2]
    levels = sample_levels(b, t, cfg, generator, z.device)
    eps = torch.randn(z.shape, generator=generator, device=z.device)
    ctx_eps = torch.randn(z.shape, generator=generator, device=z.device) if cfg.context_copies else None
    cond, has = frame_actions(actions, valid)
    return flow_loss_at(model, teacher, z, eps, levels, cond, has, cfg.k_max, ctx_eps, cfg.tau_ctx)


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------


def euler_sample(denoise: Callable[[torch.Tensor, float, float], torch.Tensor], noise: torch.Tensor,
                 steps: int) -> torch.Tensor:
    """``steps`` Euler steps of size ``d = 1/steps`` from pure noise (tau = 0) to tau = 1.

    ``denoise(x, tau, d)`` returns the clean prediction ``z_hat``; each step is
    ``x <- x + d * (z_hat - x) / (1 - tau)`` (written as a lerp, exact at the last step where
    ``d = 1 - tau``), ``tau <- tau + d``. Returns the final x (the sample, tau = 1).
    """
    if steps < 1 or steps & (steps - 1):
        raise ValueError(f"steps {steps} must be a power of 2")
    x = noise
    d = 1.0 / steps
    for k in range(steps):
        tau = k / steps
        x = torch.lerp(x, denoise(x, tau, d), d / (1.0 - tau))
    return x


def _full(b: int, t: int, value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((b, t), value, dtype=torch.float32, device=like.device)


@torch.no_grad()
def sample_next_frame(model: FlowDynamics, context: torch.Tensor, actions: torch.Tensor, has: torch.Tensor,
                      noise: torch.Tensor, steps: int, tau_ctx: float, past: list[KV] | None = None) -> torch.Tensor:
    """Sample the frame after ``context`` with ``euler_sample``; returns it (B, 1, H, W, C), clean.

    ``context``: (B, n, H, W, C) context frames already corrupted to signal level ``tau_ctx``
    (step 1/k_max); ``actions``/``has``: per frame for the n context frames and the new one
    (B, n + 1, ...); ``noise``: (B, 1, H, W, C) the new frame's starting noise. ``past``: the
    per-layer temporal cache of exactly these n context frames; then only the new frame runs at
    each step, otherwise the whole window is recomputed at each step (same result).
    """
    b, n = context.shape[:2]
    d_min = 1.0 / model.cfg.k_max
    if past is not None:
        if past[0][0].shape[-2] != n:
            raise ValueError(f"the cache holds {past[0][0].shape[-2]} frames, the context {n}")
        a_new, has_new = actions[:, n:], has[:, n:]

        # the new frame's residual base: the last context frame's, the same at every step
        base = (model.base(context[:, -1:], _full(b, 1, tau_ctx, context), a_new, has_new)
                if model.cfg.residual else None)

        def denoise(x, tau, d):
            return model(x, _full(b, 1, tau, x), _full(b, 1, d, x), a_new, has_new, past=past, base=base)
    else:
        tau_c = _full(b, n, tau_ctx, context)
        d_c = _full(b, n, d_min, context)

        def denoise(x, tau, d):
            seq = torch.cat([context, x], dim=1)
            taus = torch.cat([tau_c, _full(b, 1, tau, x)], dim=1)
            ds = torch.cat([d_c, _full(b, 1, d, x)], dim=1)
            return model(seq, taus, ds, actions, has)[:, n:]

    return euler_sample(denoise, noise, steps)


def window_start(now: int, start: int, max_frames: int) -> int:
    """The first frame of the window that predicts frame ``now``, given the last window's ``start``:
    the same while it holds at most ``max_frames - 1`` past frames, else the latest
    ``max(1, max_frames // 2)`` past frames."""
    if now - start <= max_frames - 1:
        return start
    return now - max(1, max_frames // 2)


@torch.no_grad()
def rollout(model: FlowDynamics, context: torch.Tensor, actions: torch.Tensor, valid: torch.Tensor | None,
            horizon: int, steps: int = 4, tau_ctx: float = 0.9, generator: torch.Generator | None = None,
            cache: bool = True) -> torch.Tensor:
    """Autoregressive rollout: ``horizon`` frames after ``context`` (B, C, H, W, Cl), frame by frame.

    ``actions``: (B, C + horizon, ...) per transition (``actions[t]`` leads from frame t to t+1)
    and ``valid`` (B, C + horizon) or None, turned into per-frame conditioning by
    ``frame_actions``. Each new frame is sampled with ``steps`` Euler steps from pure noise
    (``sample_next_frame``); every context frame, given or generated, is corrupted once to
    ``tau_ctx`` with its own noise draw. Noise is drawn from ``generator`` in a fixed order
    (the given context frames, then per new frame its starting noise and, once done, its context
    noise), so ``cache=True`` (past keys/values computed once per frame and reused) and
    ``cache=False`` (the window recomputed at every step) give the same frames.

    Sliding window (``window_start``): a window holds at most ``max_frames - 1`` past frames; once
    full it slides by half its length, keeping the latest ``max_frames // 2`` frames (its first
    frame then losing its action, ``has`` False, as at a training window's start), and the cache
    is rebuilt from it. Sliding by one frame would rebuild the cache, a forward pass over the
    whole window, at every frame past ``max_frames``: 15x the work of a 64-frame rollout at
    ``max_frames`` 32.
    Returns the generated clean frames (B, horizon, H, W, Cl).
    """
    model_cfg = model.cfg
    b, c = context.shape[:2]
    if c < 1 or horizon < 1:
        raise ValueError(f"rollout needs >= 1 context frame and horizon >= 1, got {c} and {horizon}")
    if actions.shape[:2] != (b, c + horizon):
        raise ValueError(f"actions must cover context + horizon = {c + horizon} transitions, "
                         f"got {tuple(actions.shape)}")
    cond, has = frame_actions(actions, valid)
    dev = context.device
    frame_shape = (b, 1, *context.shape[2:])
    d_min = 1.0 / model_cfg.k_max

    def randn():
        return torch.randn(frame_shape, generator=generator, device=dev)

    frames = [noisy(context[:, i:i + 1].float(), randn(), tau_ctx) for i in range(c)]  # corrupted context
    kv, kv_start, kv_len = None, -1, 0
    out = []
    start = 0
    for step in range(horizon):
        now = c + step  # absolute index of the new frame
        start = window_start(now, start, model_cfg.max_frames)
        a_win = cond[:, start:now + 1]
        has_win = has[:, start:now + 1].clone()
        has_win[:, 0] = False
        ctx = torch.cat(frames[start:now], dim=1)
        past = None
        if cache:
            if kv is None or kv_start != start:  # (re)build from the window
                kv_start, kv_len, todo = start, 0, ctx
                kv = None
            else:  # append the frames finished since
                todo = ctx[:, kv_len:]
            if todo.shape[1]:
                n0, nt = kv_len, todo.shape[1]
                before = (ctx[:, n0 - 1:n0], _full(b, 1, tau_ctx, ctx)) if n0 else None
                _, new = model(todo, _full(b, nt, tau_ctx, todo), _full(b, nt, d_min, todo),
                               a_win[:, n0:n0 + nt], has_win[:, n0:n0 + nt], past=kv, return_kv=True, prev=before)
                kv, kv_len = extend_cache(kv, new), kv_len + nt
            past = kv
        x = sample_next_frame(model, ctx, a_win, has_win, randn(), steps, tau_ctx, past=past)
        out.append(x)
        frames.append(noisy(x, randn(), tau_ctx))
    return torch.cat(out, dim=1)

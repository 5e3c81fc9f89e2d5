"""Building blocks shared by the model families (dynamics, policy): no file I/O here.

- ``frame_actions``: the one definition of how per-transition actions condition frames.
- ``SelfAttention``: multi-head attention through ``F.scaled_dot_product_attention`` with QK-norm,
  on any leading batch shape, with an optional key/value prefix (a cache of earlier positions).
- ``MLP``, ``sinusoidal_embedding``, ``patchify``/``unpatchify`` of latent grids, ``warp`` (content
  moved by a per-frame shift).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ITU-R BT.601 luma weights of (R, G, B): the one grayscale conversion of the project.
LUMA = (0.299, 0.587, 0.114)

# --------------------------------------------------------------------------------------------
# actions and frames
# --------------------------------------------------------------------------------------------


def context_copy_mask(t: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The (2T, 2T) bool temporal mask (True = may attend) of a window held twice, context copies
    first, then the frames predicted: the copies are causal among themselves; frame t sees the
    copies of frames < t and itself, not the other predicted frames (as a new frame in a rollout)."""
    i = torch.arange(t, device=device)
    mask = torch.zeros(2 * t, 2 * t, dtype=torch.bool, device=device)
    mask[:t, :t] = i[:, None] >= i[None, :]
    mask[t:, :t] = i[:, None] > i[None, :]
    mask[t:, t:] = torch.eye(t, dtype=torch.bool, device=device)
    return mask


def frame_actions(actions: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame action conditioning from per-transition actions.

    The stores hold ``actions[t]``: the move from frame t to frame t+1 (``valid[t]`` False at an
    episode's last frame). Frame t+1 is predicted from frames <= t and actions <= t, so frame t is
    conditioned on ``actions[t-1]``, the move that led to it; frame 0 has none.

    ``actions``: (B, T, ...) per transition; ``valid``: (B, T) bool or None (all valid).
    Returns ``(cond, has)``: ``cond[:, t] = actions[:, t-1]`` (zeros at t = 0) and ``has[:, t]``
    True where frame t has an action (t >= 1 and ``valid[:, t-1]``).
    """
    cond = torch.zeros_like(actions)
    cond[:, 1:] = actions[:, :-1]
    has = torch.zeros(actions.shape[:2], dtype=torch.bool, device=actions.device)
    has[:, 1:] = True if valid is None else valid[:, :-1].bool()
    return cond, has


def warp(z: torch.Tensor, shift: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Frames ``z`` (B, T, H, W, C) with their content moved by ``shift`` (B, T, 2) grid cells
    (dx, dy; +x right, +y down): ``out(p) = z(p - shift)``, bilinear between cells. Where content
    enters, ``padding`` "border" repeats the border, "zeros" gives 0. Integer shifts move cells
    exactly; a zero shift returns ``z``."""
    b, t, h, w, c = z.shape
    x = z.reshape(b * t, h, w, c).permute(0, 3, 1, 2).float()
    s = shift.reshape(b * t, 2).float()
    ys = torch.arange(h, device=z.device, dtype=torch.float32)
    xs = torch.arange(w, device=z.device, dtype=torch.float32)
    gx = (xs[None, None, :] - s[:, 0, None, None] + 0.5) * (2.0 / w) - 1  # align_corners=False centres
    gy = (ys[None, :, None] - s[:, 1, None, None] + 0.5) * (2.0 / h) - 1
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)  # (BT, H, W, 2) as (x, y)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(b, t, h, w, c).to(z.dtype)


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention (SDPA, QK-norm) over the second-to-last axis of (..., S, D).

    ``mask``: bool (S, S_total) or broadcastable, True = may attend; ``is_causal`` instead of a
    mask for a plain causal pattern. ``past``: optional ``(k, v)`` of earlier positions, each
    (..., H, S_past, D/H), prepended to this call's keys and values (a key/value cache); the
    call returns ``(y, (k, v))`` with this call's own keys and values when ``return_kv`` is set.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_kv: bool = False,
    ):
        *lead, s, d = x.shape
        h = self.heads
        qkv = self.qkv(x).view(*lead, s, 3, h, d // h).movedim(-3, 0).transpose(-2, -3)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (..., H, S, D/H)
        q, k = F.rms_norm(q, q.shape[-1:]), F.rms_norm(k, k.shape[-1:])  # QK-norm
        own = (k, v)
        if past is not None:
            k = torch.cat([past[0], k], dim=-2)
            v = torch.cat([past[1], v], dim=-2)
        if is_causal and past is not None:
            # causal with a cache: query i (absolute position S_past + i) sees keys <= S_past + i
            s_past = past[0].shape[-2]
            mask = torch.ones(s, s_past + s, dtype=torch.bool, device=x.device).tril(s_past)
            is_causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        y = self.proj(y.transpose(-2, -3).reshape(*lead, s, d))
        return (y, own) if return_kv else y


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        self.fc = nn.Linear(dim, ratio * dim)
        self.out = nn.Linear(ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.fc(x)))


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features (..., dim) of scalars ``t`` (...,), e.g. a signal level in [0, 1]
    scaled by the caller (DiT / transformer position encoding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# --------------------------------------------------------------------------------------------
# latent grids
# --------------------------------------------------------------------------------------------


def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """Latent grids (B, T, H, W, C) to patch tokens (B, T, (H/p)*(W/p), p*p*C), row-major."""
    b, t, h, w, c = z.shape
    if h % p or w % p:
        raise ValueError(f"patch size {p} must divide the latent grid {h}x{w}")
    z = z.reshape(b, t, h // p, p, w // p, p, c).permute(0, 1, 2, 4, 3, 5, 6)
    return z.reshape(b, t, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``patchify``: (B, T, N, p*p*C) to (B, T, H, W, C)."""
    b, t, n, e = x.shape
    c = e // (p * p)
    x = x.reshape(b, t, h // p, w // p, p, p, c).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, h, w, c)

"""Action-conditioned masked-token video transformer (CoPilot4D / MaskGIT style) over discrete frame tokens.

Conventions
- ``ids``: (B, T, H, W) integer token ids in ``0..levels-1``; ``mask_id = levels`` marks a masked
  token (input only: MASK is never a predicted class, logits have ``levels`` classes).
- Actions are stored per transition (``actions[:, t]`` moves frame t to frame t+1);
  ``models.common.frame_actions`` turns them into frame-aligned ``(cond, has)`` (frame t gets
  ``actions[:, t-1]``; ``has`` False at frame 0 and after an invalid transition). ``forward`` takes
  the frame-aligned pair; ``rollout`` takes per-transition actions and calls ``frame_actions``.
- Temporal mask: bool, True = may attend. A name (``"causal"``, ``"bidirectional"``,
  ``"identity"``), a (T, T) mask, or a per-sequence (B, T, T) mask (a batch that mixes objectives).

Model (one block = spatial attention within a frame, temporal attention per patch position across
frames, FFN; pre-norm residual): each sub-token id (MASK included) is embedded, the p*p embeddings of
a patch are concatenated and projected to ``dim`` (so masking is per sub-token), plus learned spatial
and temporal position embeddings and the frame's action embedding (a learned no-action embedding
where ``has`` is False), added at every patch of the frame. The head maps each patch token to p*p*levels
logits, returned as (B, T, H, W, levels).

Motion-copy head (``motion_radius`` r > 0; a CDNA-style kernel, Finn et al. 2016): each sub-token
also gets a displacement (dy, dx) within r tokens, a kernel width and a gate from its patch token;
where the temporal mask lets frame t see frame t-1, its distribution is the mixture
g * (tokens of frame t-1 around q + (dy, dx), under a Gaussian kernel) + (1 - g) * softmax(head),
and the model returns its log (normalised log-probabilities, used as logits everywhere). Moving
the previous frame's tokens is then one learned displacement instead of a patch re-drawn from a
dim-wide vector; frames that may not see their predecessor (frame 0, the identity mask) get the
head alone.

Ego copy (``ego_copy``; continuous [dx, dy] actions, the ego's own motion): each frame may also
copy an anchor frame's tokens moved by the sum of the actions since it (``ego_source``, ``warp``:
bilinear between cells), through a per-token gate e from its patch token:
e * (ego + unknown * p) + (1 - e) * p, p the distribution above; the copy is also read as an input
(its expected token embedding, through a zero-initialised linear map). A rollout's new frames take
the last context frame as their anchor: the ego's content is moved once from a clean frame instead
of being re-drawn from each predicted frame, so its error does not compound over the horizon.
Training reads windows as rollouts from a random context length (``rollout_anchors``).

Training (CoPilot4D, Zhang et al. 2024, with MaskGIT masking, Chang et al. 2022): one objective per
sequence, drawn with ``MaskedLossConfig`` weights, so a batch mixes them and the temporal mask is
per sequence:
- ``future``: a clean prefix of c ~ U{1..T-1} frames; every later frame masked with its own ratio
  r ~ U(0.5, 1) (per frame), i.e. ceil(r·H·W) of its tokens;
- ``joint``: every frame masked with its own ratio r = cos(π/2·u), u ~ U(0, 1) (per frame);
- ``individual``: as ``joint``, but (by default) under the identity temporal mask.
The loss is cross-entropy on the masked positions only.

Sampling: MaskGIT iterative unmasking of one frame at a time under the causal mask, with a
key/value cache so that each unmasking step runs only the new frame.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.common import MLP, SelfAttention, context_copy_mask, frame_actions, patchify, unpatchify, warp

TEMPORAL_KINDS = ("causal", "bidirectional", "identity")
OBJECTIVES = ("future", "joint", "individual")
ACTION_KINDS = ("continuous", "discrete")
# how a rollout turns a frame's logits into tokens: MaskGIT sampling, or each token's expected level
DECODES = ("maskgit", "expected")
MOTION_INIT_LOG_WIDTH = math.log(0.5)  # initial kernel width, tokens
MOTION_INIT_GATE = 2.0  # initial copy-gate logit


def _rand(
    shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """U[0, 1) numbers drawn on the generator's device (CPU without one): the same stream whatever
    device the model runs on; callers move the result."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, dtype=dtype, device=device)


def temporal_mask(kind: str, t: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The (T, T) bool temporal mask named ``kind`` (True = frame i may attend frame j):
    causal = j <= i, bidirectional = all, identity = j == i."""
    if kind == "causal":
        return torch.ones(t, t, dtype=torch.bool, device=device).tril()
    if kind == "bidirectional":
        return torch.ones(t, t, dtype=torch.bool, device=device)
    if kind == "identity":
        return torch.eye(t, dtype=torch.bool, device=device)
    raise ValueError(f"unknown temporal mask {kind!r}; expected one of {TEMPORAL_KINDS}")


def motion_copy(prev: torch.Tensor, kernel: torch.Tensor, radius: int, mask_id: int) -> torch.Tensor:
    """Class probabilities of displaced previous tokens (a CDNA-style motion kernel, Finn et al. 2016).

    ``prev`` (B, H, W) ids, ``mask_id`` where unknown; ``kernel`` (B, H, W, (2r+1)^2) weights over
    the displacements (dy, dx) in -r..r, row-major (dy outer), each pixel's summing to 1. Returns
    (B, H, W, mask_id + 1): out[q, v] = sum over d of kernel[q, d] * [prev[q + d] == v]; the last
    class holds the weight that fell on MASK or outside the frame."""
    b, h, w = prev.shape
    k = 2 * radius + 1
    if kernel.shape != (b, h, w, k * k):
        raise ValueError(f"kernel must be (B, H, W, (2r+1)^2) = {(b, h, w, k * k)}, got {tuple(kernel.shape)}")
    padded = F.pad(prev.long(), (radius, radius, radius, radius), value=mask_id)
    src = padded.unfold(1, k, 1).unfold(2, k, 1).reshape(b, h, w, k * k)  # src[q, d] = prev[q + d]
    return kernel.new_zeros(b, h, w, mask_id + 1).scatter_add_(-1, src, kernel)


@dataclass
class EgoSource:
    """Where each of T frames takes its ego copy from: ``ids`` (B, T, H, W) the tokens of its anchor
    frame (MASK where unknown), ``shift`` (B, T, 2) the ego's motion since the anchor in grid cells
    (dx, dy; +x right, +y down), ``ok`` (B, T) bool where the copy applies."""

    ids: torch.Tensor
    shift: torch.Tensor
    ok: torch.Tensor

    def select(self, frames: slice) -> "EgoSource":
        return EgoSource(self.ids[:, frames], self.shift[:, frames], self.ok[:, frames])


def ego_source(frames: torch.Tensor, cond: torch.Tensor, has: torch.Tensor, anchor: torch.Tensor,
               grid: int) -> EgoSource:
    """Ego-copy sources of T frames from their anchors.

    ``frames`` (B, T, H, W) ids; ``cond``/``has`` their frame-aligned actions (``frame_actions``:
    ``cond[:, t]`` is the move from frame t-1 to t, [dx, dy] in half-image units, as the actions
    stage normalises them); ``anchor`` (B, T) long, the index of each frame's anchor frame, before
    it (-1: none). Frame t's shift is the sum of ``cond`` over frames anchor+1..t (every move since
    the anchor), in cells of a ``grid``-wide frame (times grid / 2); ``ok`` where there is an anchor
    and every one of those moves is valid."""
    b, t = has.shape
    if frames.shape[:2] != (b, t) or cond.shape != (b, t, 2) or anchor.shape != (b, t):
        raise ValueError(f"frames {tuple(frames.shape)}, cond {tuple(cond.shape)} and anchor {tuple(anchor.shape)} "
                         f"must cover the (B, T) = {(b, t)} frames of has, with [dx, dy] actions")
    idx = torch.arange(t, device=has.device)
    anchor = anchor.long().to(has.device)
    if bool((anchor >= idx).any()) or bool((anchor < -1).any()):
        raise ValueError("each frame's anchor must be an earlier frame (or -1 for none)")
    hasf = has.float()
    moved = torch.cumsum(cond.float() * hasf[..., None], 1)  # moved[t]: the moves of frames 1..t
    count = torch.cumsum(hasf, 1)
    a = anchor.clamp_min(0)
    shift = (moved - moved.gather(1, a[..., None].expand(b, t, 2))) * (grid / 2)
    ok = (anchor >= 0) & (count - count.gather(1, a) == (idx - a).float())
    ids = frames.long().gather(1, a[:, :, None, None].expand(b, t, *frames.shape[2:]))
    return EgoSource(ids, torch.where(ok[..., None], shift, 0.0), ok)


def previous_anchors(b: int, t: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(B, T) anchors of frames copying their predecessor: t - 1 (frame 0: -1, none)."""
    return (torch.arange(t, device=device) - 1).expand(b, t)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


@dataclass
class MaskedConfig:
    """Sizes of the masked-token dynamics model. ``mask_id = levels``; vocabulary ``levels + 1``."""

    grid: int = 32  # token grid H = W
    levels: int = 16  # token classes; MASK id = levels
    patch: int = 4  # p: a grid x grid frame becomes (grid/p)^2 patch tokens of p*p sub-tokens
    token_dim: int = 16  # embedding width of one sub-token
    dim: int = 128
    heads: int = 4
    depth: int = 2
    mlp_ratio: int = 4
    max_frames: int = 32
    action_kind: str = "continuous"  # "continuous" (B, T, action_dim) float | "discrete" (B, T) int
    action_dim: int = 2
    action_classes: int = 5
    action_scale: float = 1.0  # continuous actions are multiplied by this (1 / their RMS: unit-scale inputs)
    motion_radius: int = 0  # r > 0: the motion-copy head (displacements up to r tokens); 0: off
    # the ego copy: each frame may copy an anchor frame's tokens moved by the actions since it
    # (continuous [dx, dy] actions in half-image units, as the actions stage writes them)
    ego_copy: bool = False

    def __post_init__(self):
        for name in ("grid", "levels", "patch", "token_dim", "dim", "heads", "depth", "mlp_ratio", "max_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.levels < 2:
            raise ValueError(f"levels must be >= 2, got {self.levels}")
        if not (math.isfinite(self.action_scale) and self.action_scale > 0):
            raise ValueError(f"action_scale must be finite and > 0, got {self.action_scale}")
        if self.motion_radius < 0:
            raise ValueError(f"motion_radius must be >= 0, got {self.motion_radius}")
        if self.grid % self.patch:
            raise ValueError(f"patch {self.patch} must divide grid {self.grid}")
        if self.ego_copy and (self.action_kind != "continuous" or self.action_dim != 2):
            raise ValueError("ego_copy moves tokens by continuous [dx, dy] actions: it needs action_kind "
                             f"'continuous' with action_dim 2, got {self.action_kind!r} with action_dim {self.action_dim}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be a multiple of heads {self.heads}")
        if self.action_kind not in ACTION_KINDS:
            raise ValueError(f"unknown action_kind {self.action_kind!r}; expected one of {ACTION_KINDS}")
        if self.action_kind == "continuous" and self.action_dim < 1:
            raise ValueError(f"action_dim must be >= 1, got {self.action_dim}")
        if self.action_kind == "discrete" and self.action_classes < 1:
            raise ValueError(f"action_classes must be >= 1, got {self.action_classes}")

    @property
    def mask_id(self) -> int:
        return self.levels

    @property
    def vocab(self) -> int:
        return self.levels + 1

    @property
    def patches(self) -> int:
        """Patch tokens per frame, (grid / patch)^2."""
        return (self.grid // self.patch) ** 2


@dataclass
class KVCache:
    """Temporal keys/values of frames 0..frames-1 under the causal mask, one ``(k, v)`` per block,
    each (B * patches, heads, frames, dim / heads)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    frames: int
    last: torch.Tensor | None = None  # (B, H, W) ids of frame ``frames - 1``: the motion-copy head's previous frame


class Block(nn.Module):
    """Spatial attention (within a frame), temporal attention (per patch position), FFN; pre-norm."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm_s = nn.LayerNorm(dim)
        self.spatial = SelfAttention(dim, heads)
        self.norm_t = nn.LayerNorm(dim)
        self.temporal = SelfAttention(dim, heads)
        self.norm_f = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x`` (B, T, N, D); ``mask`` None (all frames), (T, T) or (B, T, T) bool; ``is_causal``
        instead of a mask (then ``past`` frames are all visible). Returns ``(x, (k, v))`` with this
        call's temporal keys/values, each (B*N, heads, T, D/heads)."""
        b, t, n, d = x.shape
        x = x + self.spatial(self.norm_s(x).reshape(b * t, n, d)).view(b, t, n, d)
        h = self.norm_t(x).transpose(1, 2).reshape(b * n, t, d)
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None, None].expand(b, n, 1, t, t).reshape(b * n, 1, t, t)
        y, kv = self.temporal(h, mask=mask, is_causal=is_causal, past=past, return_kv=True)
        x = x + y.view(b, n, t, d).transpose(1, 2)
        x = x + self.mlp(self.norm_f(x))
        return x, kv


class MaskedDynamics(nn.Module):
    """Masked-token video transformer: ``forward(ids, actions, has, temporal) -> logits``."""

    def __init__(self, cfg: MaskedConfig):
        super().__init__()
        self.cfg = cfg
        p2 = cfg.patch**2
        self.token = nn.Embedding(cfg.vocab, cfg.token_dim)
        self.patch_in = nn.Linear(p2 * cfg.token_dim, cfg.dim)
        self.pos_space = nn.Parameter(torch.randn(cfg.patches, cfg.dim) * 0.02)
        self.pos_time = nn.Parameter(torch.randn(cfg.max_frames, cfg.dim) * 0.02)
        if cfg.action_kind == "continuous":
            self.action = nn.Sequential(nn.Linear(cfg.action_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        else:
            self.action = nn.Embedding(cfg.action_classes, cfg.dim)
        self.no_action = nn.Parameter(torch.randn(cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, p2 * cfg.levels)
        if cfg.motion_radius:  # per sub-token: displacement (dy, dx), log kernel width, copy-gate logit
            self.motion = nn.Linear(cfg.dim, p2 * 4)
            with torch.no_grad():  # start as a slightly blurred copy of the previous frame, mostly trusted
                self.motion.weight.mul_(0.1)
                self.motion.bias.view(p2, 4).copy_(torch.tensor([0.0, 0.0, MOTION_INIT_LOG_WIDTH, MOTION_INIT_GATE]))
        if cfg.ego_copy:  # the ego copy as an input (zero at the start) and its per-token gate
            self.ego_in = nn.Linear(p2 * cfg.token_dim, cfg.dim)
            self.ego_gate = nn.Linear(cfg.dim, p2)
            with torch.no_grad():
                self.ego_in.weight.zero_()
                self.ego_in.bias.zero_()
                self.ego_gate.weight.mul_(0.1)
                self.ego_gate.bias.zero_()

    # ---- inputs -----------------------------------------------------------------------------

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if ids.dim() != 4 or ids.shape[-2:] != (c.grid, c.grid):
            raise ValueError(f"ids must be (B, T, {c.grid}, {c.grid}), got {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
        ids = ids.long()
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi > c.mask_id:
            raise ValueError(f"token ids must lie in 0..{c.mask_id} (MASK = {c.mask_id}), got {lo}..{hi}")
        return ids

    def action_embedding(self, actions: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) embedding of frame-aligned actions; the no-action embedding where ``has`` is False."""
        c = self.cfg
        b, t = has.shape
        if c.action_kind == "continuous":
            if actions.shape != (b, t, c.action_dim):
                raise ValueError(f"continuous actions must be (B, T, {c.action_dim}) = {(b, t, c.action_dim)}, "
                                 f"got {tuple(actions.shape)}")
            a = self.action(torch.where(has[..., None], actions.float() * c.action_scale, 0.0))
        else:
            if actions.shape != (b, t) or actions.dtype.is_floating_point:
                raise ValueError(f"discrete actions must be integer (B, T) = {(b, t)}, "
                                 f"got {tuple(actions.shape)} {actions.dtype}")
            a_ids = torch.where(has, actions.long(), 0)
            if a_ids.numel() and (int(a_ids.min()) < 0 or int(a_ids.max()) >= c.action_classes):
                raise ValueError(f"discrete actions must lie in 0..{c.action_classes - 1}, "
                                 f"got {int(a_ids.min())}..{int(a_ids.max())}")
            a = self.action(a_ids)
        return torch.where(has[..., None], a, self.no_action.to(a.dtype))

    def ego_copy(self, ego: EgoSource) -> torch.Tensor:
        """(B, T, H, W, levels + 1) class probabilities of each frame's ego copy: its anchor's tokens
        moved by its shift (``warp``, bilinear between cells). The last class holds the weight of
        MASK and of what entered from outside the frame: all of it where ``ok`` is False."""
        levels = self.cfg.levels
        onehot = F.one_hot(ego.ids.long(), levels + 1).float()
        known = warp(onehot, ego.shift, padding="zeros")[..., :levels] * ego.ok[..., None, None, None]
        return torch.cat([known, (1 - known.sum(-1, keepdim=True)).clamp_min(0)], -1)

    def embed(self, ids: torch.Tensor, actions: torch.Tensor, has: torch.Tensor,
              t0: int | torch.Tensor = 0, ego: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Patch tokens (B, T, N, dim) of frames t0..t0+T-1; ``t0`` an int or one offset per
        sequence, (B,) long (``time_offsets``); ``ego``: the frames' ``ego_copy`` probabilities and
        where it applies, (B, T) bool, read as an input (its expected token embedding) there."""
        ids = self._check_ids(ids)
        b, t = ids.shape[:2]
        if has.shape != (b, t):
            raise ValueError(f"has must be (B, T) = {(b, t)}, got {tuple(has.shape)}")
        x = self.patch_in(patchify(self.token(ids), self.cfg.patch))  # (B, T, N, dim)
        offsets = torch.as_tensor(t0, device=x.device)
        if offsets.dtype.is_floating_point or offsets.shape not in ((), (b,)):
            raise ValueError(f"t0 must be an int or integer (B,) = ({b},) offsets, got {offsets.dtype} {tuple(offsets.shape)}")
        offsets = offsets.long().expand(b)
        if b and (int(offsets.min()) < 0 or int(offsets.max()) + t > self.cfg.max_frames):
            raise ValueError(f"frames from {int(offsets.min())}..{int(offsets.max())} + {t} exceed max_frames "
                             f"{self.cfg.max_frames}")
        pos = self.pos_time[offsets[:, None] + torch.arange(t, device=x.device)]  # (B, T, dim)
        x = x + self.pos_space + pos[:, :, None]
        if ego is not None:
            ego_p, ego_ok = ego
            emb = patchify((ego_p @ self.token.weight.float()).to(x.dtype), self.cfg.patch)
            x = x + self.ego_in(emb) * ego_ok[:, :, None, None].to(x.dtype)
        return x + self.action_embedding(actions, has.bool())[:, :, None]

    def _logits(self, x: torch.Tensor, prev: torch.Tensor | None = None,
                has_prev: torch.Tensor | None = None, ego_p: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H, W, levels) logits of patch tokens ``x`` (B, T, N, dim).

        With the motion-copy head (``motion_radius`` > 0): ``prev`` (B, T, H, W) the ids of each
        frame's previous frame, ``has_prev`` (B, T) bool where the frame may see it. The result is
        then, per token, the log of the mixture g * copy + (1 - g) * softmax(head): g the token's
        gate (0 without a previous frame), copy the ``motion_copy`` of the previous frame under the
        token's Gaussian kernel (its MASK/outside weight goes to softmax(head)); log-probabilities.

        With ``ego_p`` (the frames' ``ego_copy``), that distribution p becomes
        e * (ego + unknown * p) + (1 - e) * p, e the token's ego gate: log-probabilities."""
        c, g = self.cfg, self.cfg.grid
        h = self.norm(x)
        logits = unpatchify(self.head(h), c.patch, g, g)  # (B, T, H, W, levels)
        if not c.motion_radius:
            if ego_p is None:
                return logits
            return self._ego_mix(h, logits.float().softmax(-1), ego_p)
        r = c.motion_radius
        m = unpatchify(self.motion(h).float(), c.patch, g, g)  # (B, T, H, W, 4)
        b, t = m.shape[:2]
        mu = r * torch.tanh(m[..., :2] / r)  # displacement (dy, dx) in tokens, within the radius
        inv_var = torch.exp(-2 * m[..., 2:3])  # 1 / width^2
        d = torch.arange(-r, r + 1, device=m.device, dtype=m.dtype)
        # a Gaussian over the (2r+1)^2 displacements, normalised: the product of one per axis
        ky = (-0.5 * (d - mu[..., :1]) ** 2 * inv_var).softmax(-1)  # (B, T, H, W, 2r+1)
        kx = (-0.5 * (d - mu[..., 1:2]) ** 2 * inv_var).softmax(-1)
        kern = (ky[..., :, None] * kx[..., None, :]).flatten(-2)  # (B, T, H, W, K), dy outer
        gate_px = torch.sigmoid(m[..., 3:]) * has_prev.to(m.dtype)[:, :, None, None, None]
        copy = motion_copy(prev.reshape(b * t, g, g), kern.reshape(b * t, g, g, -1), r, c.mask_id)
        copy = copy.view(b, t, g, g, c.levels + 1)
        head_p = logits.float().softmax(-1)
        p = gate_px * (copy[..., :-1] + copy[..., -1:] * head_p) + (1 - gate_px) * head_p
        if ego_p is not None:
            return self._ego_mix(h, p, ego_p)
        return torch.log(p.clamp_min(1e-12))

    def _ego_mix(self, h: torch.Tensor, p: torch.Tensor, ego_p: torch.Tensor) -> torch.Tensor:
        """Log of e * (ego + unknown * p) + (1 - e) * p: ``p`` (B, T, H, W, levels) the token
        distributions, ``ego_p`` their ``ego_copy``, e each token's gate from patch tokens ``h``."""
        c, g = self.cfg, self.cfg.grid
        e = torch.sigmoid(unpatchify(self.ego_gate(h).float(), c.patch, g, g))  # (B, T, H, W, 1)
        p = e * (ego_p[..., :-1] + ego_p[..., -1:] * p) + (1 - e) * p
        return torch.log(p.clamp_min(1e-12))

    def _prev(self, ids: torch.Tensor, first: torch.Tensor | None) -> torch.Tensor:
        """(B, T, H, W) previous-frame ids of frames ``ids``: ``first`` (B, H, W) before frame 0
        (all MASK when None), then ids[:, :-1]."""
        if first is None:
            first = torch.full_like(ids[:, 0], self.cfg.mask_id)
        return torch.cat([first[:, None].long(), ids[:, :-1].long()], 1)

    def _temporal(self, temporal: str | torch.Tensor, b: int, t: int, device: torch.device) -> torch.Tensor:
        if isinstance(temporal, str):
            return temporal_mask(temporal, t, device)
        m = temporal.to(device)
        if m.dtype != torch.bool or m.shape not in ((t, t), (b, t, t)):
            raise ValueError(f"temporal mask must be a name in {TEMPORAL_KINDS}, or bool (T, T) / (B, T, T) = "
                             f"{(t, t)} / {(b, t, t)}; got {m.dtype} {tuple(m.shape)}")
        if not bool(m.diagonal(dim1=-2, dim2=-1).all()):
            raise ValueError("temporal mask must let every frame attend to itself (diagonal all True)")
        return m

    # ---- forward ----------------------------------------------------------------------------

    def forward(
        self, ids: torch.Tensor, actions: torch.Tensor, has: torch.Tensor, temporal: str | torch.Tensor = "causal",
        t0: int | torch.Tensor = 0, anchor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, H, W, levels) over the token classes (MASK excluded) at every position.

        ``ids`` (B, T, H, W) in 0..levels (MASK = levels); ``actions``/``has`` frame-aligned (see
        ``frame_actions``); ``temporal`` a name, (T, T) or per-sequence (B, T, T) bool mask;
        ``t0`` the first frame's temporal position (per sequence: (B,) long). With ``ego_copy``:
        ``anchor`` (B, T) each frame's anchor frame (``ego_source``; default its predecessor); a
        frame copies its anchor only where the temporal mask lets it see the anchor."""
        ids = self._check_ids(ids)
        b, t = ids.shape[:2]
        mask = self._temporal(temporal, b, t, ids.device)
        ego_p = ego_in = None
        if self.cfg.ego_copy:
            anchor = previous_anchors(b, t, ids.device) if anchor is None else anchor.long().to(ids.device)
            src = ego_source(ids, actions, has, anchor, self.cfg.grid)
            a = anchor.clamp_min(0)
            sees = mask.expand(b, t, t).gather(2, a[..., None])[..., 0]  # frame t may attend its anchor
            src.ok = src.ok & sees
            ego_p = self.ego_copy(src)
            ego_in = (ego_p, src.ok)
        x = self.embed(ids, actions, has, t0, ego_in)
        for blk in self.blocks:
            x, _ = blk(x, mask=mask)
        if not self.cfg.motion_radius:
            return self._logits(x, ego_p=ego_p)
        sees_prev = mask.diagonal(offset=-1, dim1=-2, dim2=-1).expand(b, t - 1)  # frame t+1 may attend frame t
        has_prev = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=x.device), sees_prev], 1)
        return self._logits(x, self._prev(ids, None), has_prev, ego_p)

    def forward_with_context(self, ids: torch.Tensor, ctx_ids: torch.Tensor, actions: torch.Tensor,
                             has: torch.Tensor, t0: int | torch.Tensor = 0,
                             anchor: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, H, W, levels) of frames ``ids`` (B, T, H, W), frame t seeing the context
        copies ``ctx_ids[:, :t]`` (the same frames, clean) and itself, not the other frames of
        ``ids``: each frame is predicted as the new frame of a rollout is, in one pass of 2T frames.
        With ``ego_copy``, frame t copies the context copy ``anchor[:, t]`` (default t - 1; a
        rollout's frames copy its last context frame), and the copies their predecessors."""
        if ctx_ids.shape != ids.shape:
            raise ValueError(f"context copies {tuple(ctx_ids.shape)} must match the frames {tuple(ids.shape)}")
        b, t = ids.shape[:2]
        ego_ctx = ego_in = ego_p = None
        if self.cfg.ego_copy:
            prev = previous_anchors(b, t, ids.device)
            ctx_src = ego_source(ctx_ids, actions, has, prev, self.cfg.grid)
            ego_ctx = (self.ego_copy(ctx_src), ctx_src.ok)
            if anchor is None:  # the predicted frames copy their predecessors too: the same copies
                ego_in = ego_ctx
            else:
                src = ego_source(ctx_ids, actions, has, anchor, self.cfg.grid)
                ego_in = (self.ego_copy(src), src.ok)
            ego_p = ego_in[0]
        x = torch.cat([self.embed(ctx_ids, actions, has, t0, ego_ctx), self.embed(ids, actions, has, t0, ego_in)], dim=1)
        mask = context_copy_mask(t, x.device)
        for blk in self.blocks:
            x, _ = blk(x, mask=mask)
        if not self.cfg.motion_radius:
            return self._logits(x[:, t:], ego_p=ego_p)
        has_prev = (torch.arange(t, device=x.device) > 0).expand(x.shape[0], t)
        return self._logits(x[:, t:], self._prev(ctx_ids, None), has_prev, ego_p)

    def forward_cached(
        self,
        ids: torch.Tensor,
        actions: torch.Tensor,
        has: torch.Tensor,
        cache: KVCache | None = None,
        extend: bool = True,
        ego: EgoSource | None = None,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Causal forward of frames appended after the frames held in ``cache`` (none if None).

        Returns ``(logits (B, T, H, W, levels) of these frames, cache)``: with ``extend`` the cache
        of all frames so far, else the given cache unchanged (an unmasking step of a frame that is
        not final yet). Equals ``forward(all frames, temporal="causal")`` on these frames. With
        ``ego_copy``: ``ego`` these frames' sources (``ego_source``); default their predecessors."""
        t0 = 0 if cache is None else cache.frames
        first = None if cache is None else cache.last
        ego_p = ego_in = None
        if self.cfg.ego_copy:
            if ego is None:
                b, t = ids.shape[:2]
                head = torch.full_like(ids[:, :1], self.cfg.mask_id) if first is None else first[:, None]
                frames = torch.cat([head.long(), ids.long()], 1)
                anchor = previous_anchors(b, t + 1, ids.device).clone()
                if first is None:
                    anchor[:, 1] = -1
                ego = ego_source(frames, torch.cat([torch.zeros_like(actions[:, :1]), actions], 1),
                                 torch.cat([torch.zeros_like(has[:, :1]), has], 1), anchor,
                                 self.cfg.grid).select(slice(1, None))
            ego_p = self.ego_copy(ego)
            ego_in = (ego_p, ego.ok)
        x = self.embed(ids, actions, has, t0, ego_in)
        kvs = []
        for i, blk in enumerate(self.blocks):
            past = None if cache is None else cache.kv[i]
            x, (k, v) = blk(x, is_causal=True, past=past)
            if extend:
                kvs.append((k, v) if past is None else (torch.cat([past[0], k], -2), torch.cat([past[1], v], -2)))
        if self.cfg.motion_radius:
            b, t = ids.shape[:2]
            has_prev = (torch.arange(t, device=x.device) > (0 if first is None else -1)).expand(b, t)
            logits = self._logits(x, self._prev(ids, first), has_prev, ego_p)
        else:
            logits = self._logits(x, ego_p=ego_p)
        return logits, (KVCache(kvs, t0 + x.shape[1], ids[:, -1].long()) if extend else cache)


# --------------------------------------------------------------------------------------------
# training objectives
# --------------------------------------------------------------------------------------------


@dataclass
class MaskedLossConfig:
    """The CoPilot4D objective mix and each objective's temporal mask (a name in TEMPORAL_KINDS)."""

    future_weight: float = 0.5
    joint_weight: float = 0.4
    individual_weight: float = 0.1
    future_temporal: str = "causal"
    joint_temporal: str = "causal"
    individual_temporal: str = "identity"
    future_min_ratio: float = 0.5  # a future frame's mask ratio ~ U(min, max), per frame
    future_max_ratio: float = 1.0
    # future with context copies: every frame after the first masked, each beside a clean copy of
    # its past (``MaskedDynamics.forward_with_context``), as a new frame in a rollout
    future_copies: bool = False
    # each training sequence placed at a random temporal offset (``time_offsets``), so that the
    # positions a rollout reaches beyond the training window are trained too
    time_shift: bool = False

    def __post_init__(self):
        w = self.weights
        if any(x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"objective weights must be >= 0 with a positive sum, got {w}")
        for name in OBJECTIVES:
            kind = getattr(self, f"{name}_temporal")
            if kind not in TEMPORAL_KINDS:
                raise ValueError(f"{name}_temporal {kind!r} must be one of {TEMPORAL_KINDS}")
        if not 0 < self.future_min_ratio <= self.future_max_ratio <= 1:
            raise ValueError(f"need 0 < future_min_ratio <= future_max_ratio <= 1, got "
                             f"{self.future_min_ratio}, {self.future_max_ratio}")

    @property
    def weights(self) -> tuple[float, float, float]:
        return (self.future_weight, self.joint_weight, self.individual_weight)


def sample_objectives(batch: int, generator: torch.Generator | None, cfg: MaskedLossConfig) -> list[str]:
    """One objective name (from OBJECTIVES) per sequence, drawn with ``cfg.weights``."""
    device = generator.device if generator is not None else None
    w = torch.tensor(cfg.weights, dtype=torch.float64, device=device)
    idx = torch.multinomial(w, batch, replacement=True, generator=generator)
    return [OBJECTIVES[i] for i in idx.tolist()]


def masked_objective_batch(
    ids: torch.Tensor,
    objective: str | Sequence[str] | None,
    generator: torch.Generator | None,
    cfg: MaskedLossConfig,
    mask_id: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask a batch of clean token ids (B, T, H, W) for training.

    ``objective``: one name for the whole batch, one name per sequence, or None to draw one per
    sequence with ``sample_objectives``. A frame masked with ratio r gets exactly ceil(r·H·W) MASK
    tokens at uniformly random positions (MaskGIT). Returns ``(input_ids, loss_mask, temporal)``:
    input_ids (B, T, H, W) long with MASK = ``mask_id``; loss_mask (B, T, H, W) bool, True where
    masked; temporal (B, T, T) bool, each sequence's objective mask from ``cfg``. All on ids' device.
    """
    if ids.dim() != 4:
        raise ValueError(f"ids must be (B, T, H, W), got {tuple(ids.shape)}")
    b, t, h, w = ids.shape
    n = h * w
    dev = ids.device
    if objective is None:
        names = sample_objectives(b, generator, cfg)
    elif isinstance(objective, str):
        names = [objective] * b
    else:
        names = list(objective)
        if len(names) != b:
            raise ValueError(f"{len(names)} objectives for a batch of {b}")
    for name in names:
        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; expected one of {OBJECTIVES}")
    is_future = torch.tensor([name == "future" for name in names], dtype=torch.bool)
    if bool(is_future.any()) and t < 2:
        raise ValueError(f"future prediction needs T >= 2 frames (>= 1 context, >= 1 future), got T = {t}")

    u = _rand((b, t), generator, torch.float64).cpu()
    ratio_future = cfg.future_min_ratio + (cfg.future_max_ratio - cfg.future_min_ratio) * u
    ratio_denoise = torch.cos(0.5 * math.pi * u)  # MaskGIT cosine schedule gamma(u), u ~ U(0, 1)
    ratio = torch.where(is_future[:, None], ratio_future, ratio_denoise)
    counts = torch.ceil(ratio * n).long().clamp(1, n)  # every masked frame has >= 1 MASK
    context = 1 + (_rand((b,), generator, torch.float64).cpu() * max(t - 1, 1)).long()  # c ~ U{1..T-1}
    if cfg.future_copies:  # the clean copies are the past: every frame after the first is future
        context = torch.ones_like(context)
    is_context = is_future[:, None] & (torch.arange(t)[None] < context[:, None])
    counts = counts.masked_fill(is_context, 0)

    scores = _rand((b, t, n), generator).cpu()
    rank = scores.argsort(-1).argsort(-1)  # a uniformly random permutation of positions per frame
    mask = (rank < counts[..., None]).view(b, t, h, w).to(dev)
    input_ids = ids.long().masked_fill(mask, mask_id)

    kinds = [temporal_mask(getattr(cfg, f"{name}_temporal"), t) for name in OBJECTIVES]
    temporal = torch.stack(kinds)[[OBJECTIVES.index(name) for name in names]].to(dev)
    return input_ids, mask, temporal


def time_offsets(batch: int, frames: int, max_frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch,) long temporal offsets, uniform in 0 .. max_frames - frames: a window of ``frames``
    placed anywhere among the model's ``max_frames`` learned positions."""
    if frames > max_frames:
        raise ValueError(f"windows of {frames} frames exceed max_frames {max_frames}")
    return (_rand((batch,), generator, torch.float64).cpu() * (max_frames - frames + 1)).long()


def rollout_anchors(batch: int, frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, frames) long ego-copy anchors of training windows read as rollouts: per sequence a
    context of c ~ U{1..frames-1} frames; frame t copies its predecessor within the context
    (t < c) and the last context frame after it, min(t - 1, c - 1); frame 0 none (-1)."""
    if frames < 2:
        raise ValueError(f"rollout anchors need >= 2 frames, got {frames}")
    c = 1 + (_rand((batch,), generator, torch.float64).cpu() * (frames - 1)).long()
    return torch.minimum(torch.arange(frames) - 1, c[:, None] - 1)


def objective_logits(model: "MaskedDynamics", input_ids: torch.Tensor, ids: torch.Tensor, actions: torch.Tensor,
                     has: torch.Tensor, temporal: torch.Tensor, objectives: Sequence[str],
                     cfg: MaskedLossConfig, t0: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Logits of a ``masked_objective_batch``: ``model(input_ids, ...)`` under each sequence's
    temporal mask; with ``cfg.future_copies`` the future rows instead through
    ``forward_with_context`` beside their clean ``ids``. ``t0``: per-sequence temporal offsets
    ((B,) long, ``time_offsets``) or None (every sequence from position 0). With the model's
    ``ego_copy`` those future rows copy anchors as a rollout's frames do (``rollout_anchors``)."""
    t0 = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device) if t0 is None else t0.to(ids.device)
    fut = torch.tensor([o == "future" for o in objectives], dtype=torch.bool, device=ids.device)
    if not cfg.future_copies or not bool(fut.any()):
        return model(input_ids, actions, has, temporal, t0)
    anchor = (rollout_anchors(int(fut.sum()), ids.shape[1], generator).to(ids.device)
              if model.cfg.ego_copy else None)
    f = model.forward_with_context(input_ids[fut], ids[fut], actions[fut], has[fut], t0[fut], anchor)
    if bool(fut.all()):
        return f
    rest = model(input_ids[~fut], actions[~fut], has[~fut], temporal[~fut], t0[~fut])
    out = f.new_empty((ids.shape[0], *f.shape[1:]))
    out[fut] = f
    out[~fut] = rest.to(f.dtype)
    return out


def masked_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    objectives: Sequence[str] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy on the masked positions only, averaged over all masked tokens of the batch.

    ``logits`` (B, T, H, W, levels), ``target_ids`` (B, T, H, W) clean ids, ``loss_mask`` (B, T, H, W)
    bool. Returns ``(loss, parts)``; parts: ``ce``, ``accuracy`` (argmax on masked tokens),
    ``masked_fraction``, and with ``objectives`` (one name per sequence) ``ce_<name>`` per objective present.
    """
    if logits.shape[:-1] != target_ids.shape or loss_mask.shape != target_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, targets {tuple(target_ids.shape)} and loss_mask "
                         f"{tuple(loss_mask.shape)} must agree on (B, T, H, W)")
    m = loss_mask.bool()
    sel = logits[m].float()  # (M, levels)
    tgt = target_ids[m].long()
    if sel.shape[0] == 0:
        loss = logits.sum() * 0.0
        return loss, {"ce": 0.0, "accuracy": float("nan"), "masked_fraction": 0.0}
    ce = F.cross_entropy(sel, tgt, reduction="none")
    loss = ce.mean()
    parts = {
        "ce": loss.item(),
        "accuracy": (sel.argmax(-1) == tgt).float().mean().item(),
        "masked_fraction": m.float().mean().item(),
    }
    if objectives is not None:
        seq = torch.arange(m.shape[0], device=m.device)[:, None, None, None].expand_as(m)[m]
        for name in sorted(set(objectives)):
            rows = torch.tensor([o == name for o in objectives], device=m.device)[seq]
            if bool(rows.any()):
                parts[f"ce_{name}"] = ce[rows].mean().item()
    return loss, parts


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------


def masked_after_step(step: int, steps: int, n: int) -> int:
    """MaskGIT cosine schedule: tokens still masked after step ``step`` (0-based) of ``steps``,
    floor(n·cos(π/2·(step+1)/steps)); 0 after the final step."""
    if step >= steps - 1:
        return 0
    return math.floor(n * math.cos(0.5 * math.pi * (step + 1) / steps))


def _gumbel(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    u = _rand(tuple(shape), generator).to(device).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def maskgit_unmask(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    batch: int,
    n: int,
    mask_id: int,
    steps: int = 20,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    choice_noise: float = 0.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """MaskGIT iterative decoding of ``batch`` sequences of ``n`` tokens, all MASK at the start.

    ``logits_fn(ids (batch, n)) -> logits (batch, n, levels)``. Each step samples every masked
    token (softmax at ``temperature``; 0 = argmax), scores it by the log-probability of the sampled
    token (plus ``choice_noise``·(1 - (k+1)/K)·Gumbel noise when temperature > 0, MaskGIT's annealed
    choice noise), keeps the ``masked_after_step`` lowest-scored ones masked (at least one token is
    revealed per step) and fixes the rest; fixed tokens never change; the final step reveals all.
    Returns (batch, n) long ids in 0..levels-1.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    ids = torch.full((batch, n), mask_id, dtype=torch.long, device=device)
    for k in range(steps):
        masked = ids == mask_id
        n_masked = int(masked[0].sum())
        if n_masked == 0:
            break
        logits = logits_fn(ids).float()
        logp = logits.log_softmax(-1)
        if temperature == 0:
            sampled = logits.argmax(-1)
        else:  # Gumbel-max: a draw from softmax(logits / temperature)
            sampled = (logits / temperature + _gumbel(logits.shape, generator, logits.device)).argmax(-1)
        conf = logp.gather(-1, sampled[..., None])[..., 0]
        if choice_noise > 0 and temperature > 0:
            conf = conf + choice_noise * (1.0 - (k + 1) / steps) * _gumbel(conf.shape, generator, conf.device)
        conf = conf.masked_fill(~masked, float("inf"))
        keep = max(0, min(masked_after_step(k, steps, n), n_masked - 1))
        ids = torch.where(masked, sampled, ids)
        if keep > 0:
            lowest = conf.argsort(dim=1, stable=True)[:, :keep]
            ids.scatter_(1, lowest, mask_id)
    return ids


def expected_levels(logits: torch.Tensor) -> torch.Tensor:
    """Each token's expected gray level under ``softmax(logits)`` (..., levels), rounded to the
    nearest level id: sum_i p_i * i. The quantize tokens are evenly spaced gray levels, so this is
    the model's minimum-squared-error estimate of each token's gray value (rounded), where a sample
    is a random draw whose squared error is, on average, larger by the distribution's variance."""
    levels = logits.shape[-1]
    p = logits.float().softmax(-1)
    mean = (p * torch.arange(levels, dtype=p.dtype, device=p.device)).sum(-1)
    return mean.round().clamp_(0, levels - 1).long()


@torch.no_grad()
def sample_next_frame(
    model: MaskedDynamics,
    past_ids: torch.Tensor,
    cond: torch.Tensor,
    has: torch.Tensor,
    steps: int = 20,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    cache: KVCache | None = None,
    choice_noise: float = 0.0,
    decode: str = "maskgit",
    anchor: int | None = None,
) -> torch.Tensor:
    """Sample frame t given the clean frames ``past_ids`` (B, t, H, W) under the causal mask.

    ``cond``/``has``: frame-aligned actions covering frames 0..t, (B, >= t+1, ...). With ``cache``
    (holding exactly frames 0..t-1, from ``forward_cached``) each unmasking step runs only the new
    frame; without, each step runs all t+1 frames. ``decode``: "maskgit" (iterative unmasking,
    ``steps`` and ``temperature``) or "expected" (``expected_levels``: one pass, no randomness).
    ``anchor``: with ``ego_copy``, the past frame (index) that frame t copies, moved by the actions
    since (default t - 1). Returns (B, H, W) long ids in 0..levels-1.
    """
    if decode not in DECODES:
        raise ValueError(f"unknown decode {decode!r}; expected one of {DECODES}")
    c = model.cfg
    b, t = past_ids.shape[:2]
    if cache is not None and cache.frames != t:
        raise ValueError(f"cache holds {cache.frames} frames but past_ids has {t}")
    if has.shape[1] < t + 1:
        raise ValueError(f"frame-aligned actions must cover frames 0..{t}, got {has.shape[1]} frames")
    past = past_ids.long()
    cond_t, has_t = cond[:, t : t + 1], has[:, t : t + 1]
    anchors = ego = None
    if c.ego_copy:
        a = t - 1 if anchor is None else anchor
        if not 0 <= a < t:
            raise ValueError(f"anchor {a} must index one of the {t} past frames")
        anchors = previous_anchors(b, t + 1, past.device).clone()
        anchors[:, t] = a
        padded = torch.cat([past, past[:, -1:]], 1)  # frame t's own tokens are never read
        ego = ego_source(padded, cond[:, : t + 1], has[:, : t + 1], anchors, c.grid).select(slice(t, t + 1))

    def logits_fn(flat: torch.Tensor) -> torch.Tensor:
        frame = flat.view(b, 1, c.grid, c.grid)
        if cache is not None:
            logits, _ = model.forward_cached(frame, cond_t, has_t, cache, extend=False, ego=ego)
        else:
            logits = model(torch.cat([past, frame], 1), cond[:, : t + 1], has[:, : t + 1], "causal",
                           anchor=anchors)[:, -1:]
        return logits.reshape(b, c.grid * c.grid, c.levels)

    if decode == "expected":
        out = expected_levels(logits_fn(torch.full((b, c.grid * c.grid), c.mask_id, dtype=torch.long,
                                                   device=past_ids.device)))
    else:
        out = maskgit_unmask(logits_fn, b, c.grid * c.grid, c.mask_id, steps, temperature, generator,
                             choice_noise, past_ids.device)
    return out.view(b, c.grid, c.grid)


@torch.no_grad()
def rollout(
    model: MaskedDynamics,
    context_ids: torch.Tensor,
    actions: torch.Tensor,
    valid: torch.Tensor | None,
    horizon: int,
    steps: int = 20,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    cache: bool = True,
    choice_noise: float = 0.0,
    decode: str = "maskgit",
) -> torch.Tensor:
    """Predict ``horizon`` frames after ``context_ids`` (B, C, H, W), one frame at a time, each
    decoded by ``decode`` (see ``sample_next_frame``) and fed back as the next frame's past. With
    ``ego_copy`` every new frame copies the last context frame, moved by the actions since.

    ``actions``: per transition, (B, >= C+horizon-1, ...) (``actions[:, t]`` moves frame t to t+1);
    ``valid``: (B, same) bool or None. With ``cache`` the context and each finished frame run once
    through the model and their temporal keys/values are reused. Returns (B, horizon, H, W) long
    ids in 0..levels-1 (never MASK).
    """
    c_len = context_ids.shape[1]
    total = c_len + horizon
    if c_len < 1 or horizon < 1:
        raise ValueError(f"need >= 1 context frame and horizon >= 1, got C = {c_len}, horizon = {horizon}")
    if total > model.cfg.max_frames:
        raise ValueError(f"context {c_len} + horizon {horizon} exceed max_frames {model.cfg.max_frames}")
    if actions.shape[1] < total - 1:
        raise ValueError(f"actions cover {actions.shape[1]} transitions, need >= {total - 1} (C + horizon - 1)")
    acts = actions[:, :total]
    val = None if valid is None else valid[:, :total]
    if acts.shape[1] < total:  # the last transition is never used: pad it
        pad = torch.zeros_like(acts[:, :1])
        acts = torch.cat([acts, pad], 1)
        val = None if val is None else torch.cat([val, torch.zeros_like(val[:, :1])], 1)
    cond, has = frame_actions(acts, val)
    frames = context_ids.long()
    kv = model.forward_cached(frames, cond[:, :c_len], has[:, :c_len])[1] if cache else None
    out = []
    for i in range(horizon):
        t = c_len + i
        nxt = sample_next_frame(model, frames, cond, has, steps, temperature, generator, kv, choice_noise, decode,
                                anchor=c_len - 1)
        frames = torch.cat([frames, nxt[:, None]], 1)
        if cache and i < horizon - 1:
            kv = model.forward_cached(nxt[:, None], cond[:, t : t + 1], has[:, t : t + 1], kv)[1]
        out.append(nxt)
    return torch.stack(out, 1)

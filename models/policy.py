"""Masked discrete diffusion (MDLM) policy over sequences of H future discrete actions.

The method is MDLM (Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models"):

- forward process: each action token of a clean sequence ``x`` (ids 0..n_actions-1) is replaced,
  independently, by the MASK id (``n_actions``) with probability ``1 - alpha_t``; ``alpha_t`` is
  the schedule's *signal* level: ``alpha_0 = 1`` (clean), ``alpha_1 = 0`` (all masked).
  Schedules: ``linear`` alpha_t = 1 - t; ``cosine`` alpha_t = 1 - sin(pi t / 2) (the masked
  fraction follows MaskGIT's cosine, cos(pi/2 (1 - t))).
- SUBS parameterisation: the output head has ``n_actions`` classes only (zero masking
  probability: MASK is never predicted or sampled) and unmasked tokens are carried over unchanged
  by both samplers (carry-over unmasking); the loss therefore only has terms on masked positions.
- NELBO (continuous time, MDLM eq. 10-11): ``E_t [ w(t) sum_{l masked} -log p_theta(x_l | z_t) ]``
  with ``w(t) = -alpha'_t / (1 - alpha_t)`` (``1/t`` for linear), divided by H here (nats per action
  token).
- sampling: MDLM's ancestral sampler (from t to s < t, a masked token is revealed with probability
  ``(alpha_s - alpha_t) / (1 - alpha_t)``) and MaskGIT's confidence-based iterative unmasking.

Conventions of this module:

- ``t`` in [0, 1] is diffusion time (0 clean, 1 all masked).
- The network is conditioned on the *mask level* of its input: the fraction of the H positions that
  hold MASK (``mask_ratio(ids, mask_id)``). Training and both samplers feed exactly that, so the
  conditioning means the same thing whatever the schedule and also when some positions are given.
- State: latents of the current frame and K recent frames, ``(B, K+1, h, w)`` token ids
  (``state_kind="tokens"``, any ids < ``state_vocab``, including the frame tokenizer's MASK) or
  ``(B, K+1, h, w, c)`` floats in [-1, 1] (``"continuous"``).

Randomness: every function that draws takes an optional ``torch.Generator``, which must live on
the device of the data (a CPU generator for CPU tensors, a CUDA one for CUDA tensors).

Also here: ``ActionDiscretizer`` (continuous [dx, dy] to ids and back), and two baselines: the
marginal action frequencies and ``MLPPolicy`` (a state-conditioned classifier with one
distribution per horizon position). No file I/O: the stage trains and saves these, and
``pipeline/policy.py`` loads them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import MLP, SelfAttention, patchify, sinusoidal_embedding

SCHEDULES = ("linear", "cosine")
WEIGHTINGS = ("nelbo", "uniform")
STATE_KINDS = ("tokens", "continuous")
CONDITIONINGS = ("cross_attention", "add")


def _from_dict(cls, d: dict[str, Any]):
    """Build a config dataclass from a plain dict (JSON: lists become tuples where the default
    is a tuple); unknown keys are an error naming them."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# --------------------------------------------------------------------------------------------
# noise schedule
# --------------------------------------------------------------------------------------------


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def alpha(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """The signal level alpha_t (probability that a token is still unmasked at time t);
    alpha_0 = 1, alpha_1 = 0, decreasing."""
    _check_schedule(schedule)
    if schedule == "linear":
        return 1.0 - t
    return 1.0 - torch.sin(0.5 * math.pi * t)


def alpha_prime(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """d alpha_t / dt (<= 0)."""
    _check_schedule(schedule)
    if schedule == "linear":
        return -torch.ones_like(t)
    return -0.5 * math.pi * torch.cos(0.5 * math.pi * t)


def nelbo_weight(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """MDLM's NELBO weight ``-alpha'_t / (1 - alpha_t)`` (>= 0): ``1/t`` for linear,
    ``(pi/2) cot(pi t / 2)`` for cosine. Infinite at t = 0: sample t >= some eps."""
    return -alpha_prime(t, schedule) / (1.0 - alpha(t, schedule))


def curriculum_t_max(step: int, steps: int, start: float = 0.25) -> float:
    """Upper bound of the mask time t at training ``step``: rises linearly from ``start`` to 1
    over ``steps`` steps (1 from then on; ``steps <= 0`` disables the curriculum). Low t = few
    masked tokens = easier, so training starts easy."""
    if not 0.0 < start <= 1.0:
        raise ValueError(f"curriculum start {start} must be in (0, 1]")
    if steps <= 0 or step >= steps:
        return 1.0
    return start + (1.0 - start) * step / steps


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


@dataclass
class PolicyConfig:
    n_actions: int = 5                      # action ids 0..n_actions-1; MASK = n_actions (input only)
    horizon: int = 8                        # H future actions
    state_frames: int = 3                   # K+1 frames of latents
    state_kind: str = "tokens"              # tokens (ids) | continuous (floats in [-1, 1])
    state_shape: tuple[int, ...] = (32, 32)  # (h, w) for tokens, (h, w, c) for continuous
    state_vocab: int = 17                   # tokens: ids 0..state_vocab-1 (the tokenizer's MASK is a plain input)
    state_patch: int = 8                    # patch size over the state grid
    state_depth: int = 0                    # self-attention blocks over the state tokens (before conditioning)
    state_stack: bool = False               # one token per patch position, its frames stacked (motion is linear to read)
    conditioning: str = "cross_attention"   # cross_attention | add
    dim: int = 128
    heads: int = 4
    depth: int = 2
    mlp_ratio: int = 4
    past_actions: int = 0                   # the state also holds the P action ids that led to its last frame

    def __post_init__(self):
        self.state_shape = tuple(self.state_shape)
        if self.past_actions < 0:
            raise ValueError(f"past_actions {self.past_actions} must be >= 0")
        if self.n_actions < 2:
            raise ValueError(f"n_actions {self.n_actions} must be >= 2")
        if self.horizon < 1:
            raise ValueError(f"horizon {self.horizon} must be >= 1")
        if self.state_kind not in STATE_KINDS:
            raise ValueError(f"unknown state_kind {self.state_kind!r}; expected one of {STATE_KINDS}")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {self.conditioning!r}; expected one of {CONDITIONINGS}")
        want = 2 if self.state_kind == "tokens" else 3
        if len(self.state_shape) != want:
            raise ValueError(f"state_shape {self.state_shape} must have {want} dims for state_kind "
                             f"{self.state_kind!r}")
        h, w = self.state_shape[:2]
        if h % self.state_patch or w % self.state_patch:
            raise ValueError(f"state_patch {self.state_patch} must divide the state grid {h}x{w}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be a multiple of heads {self.heads}")

    @property
    def mask_id(self) -> int:
        return self.n_actions

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able dict (``from_dict`` inverts it)."""
        d = asdict(self)
        d["state_shape"] = list(self.state_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PolicyConfig:
        return _from_dict(cls, d)


def mask_ratio(ids: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(B,) fraction of the positions of ``ids`` (B, H) that hold ``mask_id``: the mask level the
    policy network is conditioned on."""
    return (ids == mask_id).float().mean(dim=1)


def _check_state(state: torch.Tensor, frames: int, kind: str, shape: tuple[int, ...], who: str) -> None:
    want = (frames, *shape)
    if state.dim() != len(want) + 1 or tuple(state.shape[1:]) != want:
        raise ValueError(f"{who}: state of shape {tuple(state.shape)} does not match (B, {', '.join(map(str, want))}) "
                         f"for state_kind {kind!r}")
    if kind == "tokens" and state.is_floating_point():
        raise ValueError(f"{who}: state_kind 'tokens' needs integer ids, got dtype {state.dtype}")


def _check_past(past: torch.Tensor | None, p: int, n_actions: int, b: int, who: str) -> None:
    """``past``: (B, p) action ids, required exactly when ``p`` > 0."""
    if p == 0:
        if past is not None:
            raise ValueError(f"{who}: past actions given to a model built with past_actions = 0")
        return
    if past is None or tuple(past.shape) != (b, p) or past.is_floating_point():
        got = None if past is None else f"{tuple(past.shape)} {past.dtype}"
        raise ValueError(f"{who}: past actions must be integer ids (B, past_actions) = ({b}, {p}), got {got}")
    if past.numel() and (int(past.min()) < 0 or int(past.max()) >= n_actions):
        raise ValueError(f"{who}: past action ids span [{int(past.min())}, {int(past.max())}], "
                         f"outside 0..{n_actions - 1}")


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, S, D) to a context (B, N, D) (SDPA, QK-norm)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be a multiple of heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        n, h = ctx.shape[1], self.heads
        q = self.q(x).view(b, s, h, d // h).transpose(1, 2)
        k, v = self.kv(ctx).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        q, k = F.rms_norm(q, q.shape[-1:]), F.rms_norm(k, k.shape[-1:])
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class _Block(nn.Module):
    """Plain pre-norm transformer block (state encoder)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DiTBlock(nn.Module):
    """DiT block with AdaLN-Zero: shift/scale/gate of every sub-layer come from the conditioning
    vector ``c`` (B, D) through a zero-initialised linear layer, so the block starts as the identity.
    Sub-layers: self-attention over the H action tokens, cross-attention to the state tokens
    (``cross=True``), MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, cross: bool):
        super().__init__()
        self.cross = cross
        self.norm1, self.attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6), SelfAttention(dim, heads)
        if cross:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.xattn = CrossAttention(dim, heads)
        self.norm3, self.mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6), MLP(dim, mlp_ratio)
        self.n_mod = 9 if cross else 6
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mod * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        m = self.ada(c).chunk(self.n_mod, dim=-1)
        x = x + m[2][:, None] * self.attn(_modulate(self.norm1(x), m[0], m[1]))
        if self.cross:
            x = x + m[5][:, None] * self.xattn(_modulate(self.norm2(x), m[3], m[4]), ctx)
            m = m[6:]
        else:
            m = m[3:]
        return x + m[2][:, None] * self.mlp(_modulate(self.norm3(x), m[0], m[1]))


class StateEncoder(nn.Module):
    """State latents to tokens (B, (K+1) * n_patches, D), or (B, n_patches, D) with ``state_stack``.

    Patches of ``state_patch`` x ``state_patch`` cells are projected linearly to ``dim``: for
    token ids that is the linear map of the one-hot patch (p*p*vocab inputs), computed as a sum of
    per-(cell, id) embeddings (``EmbeddingBag``, no one-hot built); for continuous latents a
    ``Linear`` of the flattened patch. Then learned frame and patch-position embeddings,
    ``state_depth`` self-attention blocks over all frames' tokens, and a final LayerNorm. With
    ``state_stack`` a patch position's K+1 frame embeddings are concatenated and mixed by one linear
    map into a single token, so that motion (a difference between frames) is one linear read-out."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        h, w = cfg.state_shape[:2]
        p = cfg.state_patch
        self.n_patches = (h // p) * (w // p)
        if cfg.state_kind == "tokens":
            self.embed = nn.EmbeddingBag(p * p * cfg.state_vocab, cfg.dim, mode="sum")
            nn.init.normal_(self.embed.weight, std=1.0 / p)
            self.register_buffer("cell_offset", torch.arange(p * p) * cfg.state_vocab, persistent=False)
        else:
            self.proj = nn.Linear(p * p * cfg.state_shape[2], cfg.dim)
        # unit-scale frame and patch-position embeddings, the scale of the patch contents: at 0.02 the
        # LayerNorm below all but erased where a patch is, and policies could not learn "where"
        self.frame_emb = nn.Parameter(torch.randn(cfg.state_frames, 1, cfg.dim))
        self.pos_emb = nn.Parameter(torch.randn(1, self.n_patches, cfg.dim))
        if cfg.state_stack:  # a patch position's frames side by side, mixed by one linear map
            self.stack = nn.Linear(cfg.state_frames * cfg.dim, cfg.dim)
        self.blocks = nn.ModuleList(_Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.state_depth))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        _check_state(state, cfg.state_frames, cfg.state_kind, cfg.state_shape, "StateEncoder")
        b, t = state.shape[:2]
        if cfg.state_kind == "tokens":
            lo, hi = int(state.min()), int(state.max())
            if lo < 0 or hi >= cfg.state_vocab:
                raise ValueError(f"StateEncoder: state ids span [{lo}, {hi}], outside 0..{cfg.state_vocab - 1}")
            idx = patchify(state.long()[..., None], cfg.state_patch) + self.cell_offset   # (B, T, N, p*p)
            x = self.embed(idx.reshape(-1, idx.shape[-1])).view(b, t, self.n_patches, cfg.dim)
        else:
            x = self.proj(patchify(state.float(), cfg.state_patch))                     # (B, T, N, D)
        if cfg.state_stack:
            x = self.stack(x.transpose(1, 2).reshape(b, self.n_patches, t * cfg.dim)) + self.pos_emb  # (B, N, D)
        else:
            x = (x + self.frame_emb + self.pos_emb).flatten(1, 2)  # (B, T*N, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class MDLMPolicy(nn.Module):
    """Masked discrete diffusion policy: ``forward(ids, state, t) -> logits (B, H, n_actions)``.

    ``ids`` (B, H): action ids 0..n_actions-1 with ``mask_id = n_actions`` at masked positions
    (the input embedding has n_actions + 1 rows; the head has n_actions outputs, so MASK is never
    predicted). ``t`` (B,): the mask level of ``ids`` in [0, 1] (by this module's convention the
    fraction of MASK positions, ``mask_ratio``); None computes it from ``ids``. It conditions the
    AdaLN-Zero blocks through a sinusoidal embedding. The state conditions every action token:
    cross-attention to the state tokens in every block (``"cross_attention"``) or an
    attention-pooled state vector added to every action token (``"add"``). Learned position
    embeddings over the horizon. Logits are returned at every position (raw, not carried over).
    """

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        # unit-scale action and position embeddings: the same scale as the LayerNormed pooled state
        # vector of "add" (with 0.02 the state swamped the positions and training stalled)
        self.action_emb = nn.Embedding(cfg.n_actions + 1, d)
        self.pos_emb = nn.Parameter(torch.randn(1, cfg.horizon, d))
        self.t_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.state_enc = StateEncoder(cfg)
        if cfg.past_actions:  # unit scale, like the LayerNormed state tokens they join
            self.past_emb = nn.Embedding(cfg.n_actions, d)
            nn.init.normal_(self.past_emb.weight)
            self.past_pos = nn.Parameter(torch.randn(1, cfg.past_actions, d))
        cross = cfg.conditioning == "cross_attention"
        if not cross:
            self.pool_query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
            self.pool = CrossAttention(d, cfg.heads)
            self.pool_out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.heads, cfg.mlp_ratio, cross) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        nn.init.zeros_(self.final_ada[1].weight)
        nn.init.zeros_(self.final_ada[1].bias)
        self.head = nn.Linear(d, cfg.n_actions)

    @property
    def mask_id(self) -> int:
        return self.cfg.n_actions

    def forward(self, ids: torch.Tensor, state: torch.Tensor, t: torch.Tensor | None = None,
                past: torch.Tensor | None = None) -> torch.Tensor:
        """``past`` (B, past_actions): the action ids that led to the state's last frame (oldest
        first), state tokens of their own beside the latents' (required iff ``past_actions`` > 0)."""
        cfg = self.cfg
        if ids.dim() != 2 or ids.shape[1] != cfg.horizon:
            raise ValueError(f"action ids of shape {tuple(ids.shape)} must be (B, horizon={cfg.horizon})")
        if state.shape[0] != ids.shape[0]:
            raise ValueError(f"state batch {state.shape[0]} != action batch {ids.shape[0]}")
        if t is None:
            t = mask_ratio(ids, self.mask_id)
        if t.shape != (ids.shape[0],):
            raise ValueError(f"t of shape {tuple(t.shape)} must be (B,) = ({ids.shape[0]},)")
        c = self.t_mlp(sinusoidal_embedding(t * 1000.0, cfg.dim))
        s = self.state_enc(state)                                     # (B, N, D)
        _check_past(past, cfg.past_actions, cfg.n_actions, ids.shape[0], "MDLMPolicy")
        if cfg.past_actions:
            s = torch.cat([s, self.past_emb(past.long()) + self.past_pos], dim=1)
        x = self.action_emb(ids.long()) + self.pos_emb                # (B, H, D)
        ctx = None
        if cfg.conditioning == "cross_attention":
            ctx = s
        else:
            pooled = self.pool(self.pool_query.expand(s.shape[0], -1, -1), s)  # (B, 1, D)
            x = x + self.pool_out(pooled)
        for blk in self.blocks:
            x = blk(x, c, ctx)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.head(_modulate(self.final_norm(x), shift, scale))


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def sample_t(b: int, t_range: tuple[float, float] = (1e-3, 1.0), stratified: bool = True,
             generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B,) mask times uniform in ``t_range``; ``stratified`` uses MDLM's low-discrepancy
    (antithetic) sampler: one point per 1/B stratum, which lowers the loss variance."""
    lo, hi = t_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"t_range {t_range} must satisfy 0 <= lo <= hi <= 1")
    u = torch.rand(b, generator=generator, device=device)
    if stratified:
        u = (u / b + torch.arange(b, device=device) / b) % 1.0
    return lo + (hi - lo) * u


def mask_actions(actions: torch.Tensor, t: torch.Tensor, mask_id: int, schedule: str = "linear",
                 ensure_masked: bool = False,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MDLM forward process: each token of ``actions`` (B, H) is replaced by ``mask_id`` with
    probability ``1 - alpha_t`` (t (B,) per sequence). ``ensure_masked`` masks one random
    position in rows that drew none. Returns ``(z, masked)``: ids (B, H) long with MASK at masked
    positions (discrete ids, no noise) and the bool mask (B, H)."""
    b, h = actions.shape
    p = 1.0 - alpha(t, schedule)                                      # (B,) masking probability
    masked = torch.rand(b, h, generator=generator, device=actions.device) < p[:, None]
    if ensure_masked:
        none = ~masked.any(dim=1)
        pick = torch.randint(0, h, (b,), generator=generator, device=actions.device)
        masked = masked | (none[:, None] & F.one_hot(pick, h).bool())
    z = torch.where(masked, torch.full_like(actions, mask_id), actions).long()
    return z, masked


def mdlm_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
              schedule: str = "linear", weighting: str = "nelbo") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The masked-diffusion loss from logits (B, H, n_actions), clean ``targets`` (B, H),
    ``masked`` (B, H) bool and mask times ``t`` (B,).

    Cross-entropy on masked positions only (SUBS: unmasked positions are carried over and carry no
    loss; their logits cannot change the value). ``weighting``:
    - ``"nelbo"``: mean over sequences of ``w(t) * sum_masked CE / H`` with w = ``nelbo_weight``
      (MDLM's continuous-time NELBO, nats per action token);
    - ``"uniform"``: mean CE over all masked tokens of the batch.
    Rows with no masked token contribute 0 (no NaN; a batch without any gives loss 0).

    Returns ``(loss, parts)``; parts are detached 0-dim tensors: ``nelbo`` (the NELBO estimate
    whatever the weighting), ``nll_masked`` (mean CE over masked tokens), ``masked_accuracy``
    (argmax accuracy over masked tokens), ``mask_fraction``, ``t_mean``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    b, h, n = logits.shape
    if targets.shape != (b, h) or masked.shape != (b, h):
        raise ValueError(f"targets {tuple(targets.shape)} and masked {tuple(masked.shape)} must be (B, H) = ({b}, {h})")
    ce_all = F.cross_entropy(logits.float().reshape(b * h, n), targets.reshape(-1).long(),
                             reduction="none").view(b, h)
    ce = torch.where(masked, ce_all, torch.zeros_like(ce_all))
    n_masked = masked.sum()
    denom = n_masked.clamp(min=1).float()
    # rows without a masked token are exact zero terms (their weight may be inf at t = 0)
    w = torch.where(masked.any(dim=1), nelbo_weight(t.float(), schedule), torch.zeros_like(t, dtype=torch.float))
    per_seq_nelbo = w * ce.sum(dim=1) / h                                       # (B,)
    nelbo = per_seq_nelbo.mean()
    uniform = ce.sum() / denom
    loss = nelbo if weighting == "nelbo" else uniform
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == targets) & masked
        parts = {
            "loss": loss.detach(),
            "nelbo": nelbo.detach(),
            "nll_masked": uniform.detach(),
            "masked_accuracy": correct.sum() / denom,
            "mask_fraction": masked.float().mean(),
            "t_mean": t.float().mean(),
        }
    return loss, parts


def _check_actions(actions: torch.Tensor, n_actions: int, who: str) -> None:
    if actions.is_floating_point():
        raise ValueError(f"{who}: actions must be integer ids, got dtype {actions.dtype}")
    lo, hi = int(actions.min()), int(actions.max())
    if lo < 0 or hi >= n_actions:
        raise ValueError(f"{who}: action ids span [{lo}, {hi}], outside 0..{n_actions - 1}")


def training_loss(model: MDLMPolicy, actions: torch.Tensor, state: torch.Tensor, *,
                  schedule: str = "linear", weighting: str = "nelbo",
                  t_range: tuple[float, float] = (1e-3, 1.0), stratified: bool = True,
                  ensure_masked: bool | None = None,
                  generator: torch.Generator | None = None,
                  past: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One MDLM training loss on clean ``actions`` (B, H) given ``state``.

    One mask time per sequence, t ~ U(t_range) (a curriculum passes ``(lo, curriculum_t_max(step,
    ...))``), tokens masked with probability 1 - alpha_t, the network conditioned on the mask
    level of its input, ``mdlm_loss`` on the masked positions. ``ensure_masked`` (None: True for
    ``uniform``, False for ``nelbo``) forces one masked token in rows that drew none; it is off for
    the NELBO because a forced token at small t gets weight ~1/t, which biases the bound and
    inflates its variance, whereas an empty row is an exact zero term of the NELBO.
    Returns ``(loss, parts)`` as ``mdlm_loss``.
    """
    _check_actions(actions, model.cfg.n_actions, "training_loss")
    if ensure_masked is None:
        ensure_masked = weighting == "uniform"
    t = sample_t(actions.shape[0], t_range, stratified, generator, actions.device)
    z, masked = mask_actions(actions, t, model.mask_id, schedule, ensure_masked, generator)
    logits = model(z, state, mask_ratio(z, model.mask_id), past)
    return mdlm_loss(logits, actions, masked, t, schedule, weighting)


@torch.no_grad()
def nelbo(model: MDLMPolicy, actions: torch.Tensor, state: torch.Tensor, *, schedule: str = "linear",
          n_t: int = 16, generator: torch.Generator | None = None, past: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) MDLM NELBO estimate per sequence in nats per action token (an upper bound on the
    per-token NLL): the t-integral by the midpoint rule on ``n_t`` points, one random mask per
    point, no forced masking (unbiased in the mask draws)."""
    _check_actions(actions, model.cfg.n_actions, "nelbo")
    b, h = actions.shape
    total = torch.zeros(b, device=actions.device)
    for i in range(n_t):
        t = torch.full((b,), (i + 0.5) / n_t, device=actions.device)
        z, masked = mask_actions(actions, t, model.mask_id, schedule, False, generator)
        logits = model(z, state, mask_ratio(z, model.mask_id), past)
        ce = F.cross_entropy(logits.float().transpose(1, 2), actions.long(), reduction="none")
        total += nelbo_weight(t, schedule) * torch.where(masked, ce, torch.zeros_like(ce)).sum(1) / h
    return total / n_t


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------


def _start(model: MDLMPolicy, state: torch.Tensor, fixed: torch.Tensor | None) -> torch.Tensor:
    b, h, m = state.shape[0], model.cfg.horizon, model.mask_id
    if fixed is None:
        return torch.full((b, h), m, dtype=torch.long, device=state.device)
    if tuple(fixed.shape) != (b, h):
        raise ValueError(f"fixed of shape {tuple(fixed.shape)} must be (B, H) = ({b}, {h})")
    lo, hi = int(fixed.min()), int(fixed.max())
    if lo < 0 or hi > m:
        raise ValueError(f"fixed ids span [{lo}, {hi}], outside 0..{m} (MASK = {m} at free positions)")
    return fixed.long().clone()


def _draw(logits: torch.Tensor, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ids (B, H) from logits (B, H, n) at ``temperature`` (0: argmax) restricted to the
    ``top_k`` most likely; returns ``(ids, logp)`` with logp the model's own (temperature 1,
    unrestricted) log-probability of each drawn id (the MaskGIT confidence)."""
    b, h, n = logits.shape
    logits = logits.float()
    if top_k is not None and not 1 <= top_k <= n:
        raise ValueError(f"top_k {top_k} must be in 1..{n}")
    if temperature < 0:
        raise ValueError(f"temperature {temperature} must be >= 0")
    if temperature == 0:
        ids = logits.argmax(dim=-1)
    else:
        l = logits / temperature
        if top_k is not None:
            kth = l.topk(top_k, dim=-1).values[..., -1:]
            l = l.masked_fill(l < kth, float("-inf"))
        ids = torch.multinomial(l.softmax(dim=-1).view(b * h, n), 1, generator=generator).view(b, h)
    logp = logits.log_softmax(dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    return ids, logp


def select_masked(confidence: torch.Tensor, masked: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
    """MaskGIT's selection: of the currently ``masked`` positions (B, H) keep masked the
    ``n_keep`` (B,) with the lowest ``confidence`` (B, H); every other position is (or stays)
    unmasked. Returns the new bool mask, a subset of ``masked``."""
    conf = torch.where(masked, confidence.float(), torch.full_like(confidence, float("inf"), dtype=torch.float))
    rank = conf.argsort(dim=1, stable=True).argsort(dim=1)
    return masked & (rank < n_keep[:, None])


def maskgit_n_keep(n0: torch.Tensor, count: torch.Tensor, k: int, steps: int) -> torch.Tensor:
    """(B,) how many positions stay masked after MaskGIT step ``k`` of ``steps`` (1-based):
    ``floor(n0 cos(pi/2 k/steps))`` of the ``n0`` initially masked, at most ``count - 1`` (the
    currently masked count: at least one revealed per step) and 0 at the last step."""
    if k >= steps:
        return torch.zeros_like(count)
    n_keep = torch.floor(n0.float() * math.cos(0.5 * math.pi * k / steps)).long()
    return torch.minimum(n_keep, (count - 1).clamp(min=0))


@torch.no_grad()
def sample_maskgit(model: MDLMPolicy, state: torch.Tensor, steps: int, *, fixed: torch.Tensor | None = None,
                   temperature: float = 1.0, top_k: int | None = None, confidence_noise: float = 0.0,
                   generator: torch.Generator | None = None, past: torch.Tensor | None = None) -> torch.Tensor:
    """Confidence-based iterative unmasking (MaskGIT) in ``steps`` steps; returns (B, H) ids in
    0..n_actions-1 (complete: no MASK left).

    ``fixed`` (B, H): given ids at some positions, ``mask_id`` elsewhere; given ids stay as they are.
    At step k of K every masked position draws an id (``temperature``, ``top_k``); of the n0
    initially masked positions, ``floor(n0 cos(pi/2 k/K))`` stay masked (at least one revealed per
    step, all at k = K): those whose drawn id has the lowest model probability (plus
    ``confidence_noise * (1 - k/K)`` Gumbel noise, MaskGIT's annealed randomness). Revealed
    tokens are fixed for good.
    """
    if steps < 1:
        raise ValueError(f"steps {steps} must be >= 1")
    z = _start(model, state, fixed)
    masked = z == model.mask_id
    n0 = masked.sum(dim=1)
    for k in range(1, steps + 1):
        count = masked.sum(dim=1)
        if not bool(count.any()):
            break
        logits = model(z, state, mask_ratio(z, model.mask_id), past)
        ids, conf = _draw(logits, temperature, top_k, generator)
        if confidence_noise > 0:
            u = torch.rand(conf.shape, generator=generator, device=conf.device).clamp_(1e-20, 1.0)
            conf = conf + confidence_noise * (1 - k / steps) * (-torch.log(-torch.log(u)))
        n_keep = maskgit_n_keep(n0, count, k, steps)
        still = select_masked(conf, masked, n_keep)
        z = torch.where(masked & ~still, ids, z)
        masked = still
    return z


@torch.no_grad()
def ancestral_step(model: MDLMPolicy, z: torch.Tensor, state: torch.Tensor, t: float, s: float, *,
                   schedule: str = "linear", temperature: float = 1.0, top_k: int | None = None,
                   generator: torch.Generator | None = None, past: torch.Tensor | None = None) -> torch.Tensor:
    """One MDLM ancestral step from time ``t`` to ``s < t``: every masked position of ``z``
    (B, H) is revealed with probability ``(alpha_s - alpha_t) / (1 - alpha_t)`` (1 when s = 0)
    with an id drawn from the model's distribution; unmasked ids are carried over. Returns the
    new ids (B, H)."""
    if not 0.0 <= s < t <= 1.0:
        raise ValueError(f"ancestral step needs 0 <= s < t <= 1, got t={t}, s={s}")
    masked = z == model.mask_id
    if not bool(masked.any()):
        return z
    if s == 0.0:
        p = 1.0
    else:
        a_t, a_s = (float(alpha(torch.tensor(v, dtype=torch.float64), schedule)) for v in (t, s))
        p = (a_s - a_t) / (1.0 - a_t)
    logits = model(z, state, mask_ratio(z, model.mask_id), past)
    ids, _ = _draw(logits, temperature, top_k, generator)
    reveal = masked & (torch.rand(z.shape, generator=generator, device=z.device) < p)
    return torch.where(reveal, ids, z)


@torch.no_grad()
def sample_ancestral(model: MDLMPolicy, state: torch.Tensor, steps: int, *, schedule: str = "linear",
                     fixed: torch.Tensor | None = None, temperature: float = 1.0, top_k: int | None = None,
                     generator: torch.Generator | None = None, past: torch.Tensor | None = None) -> torch.Tensor:
    """MDLM's ancestral sampler: ``steps`` steps of ``ancestral_step`` on the uniform grid from
    t = 1 to t = 0 (the last step reveals all). ``fixed`` as in ``sample_maskgit``. Returns
    (B, H) ids in 0..n_actions-1."""
    if steps < 1:
        raise ValueError(f"steps {steps} must be >= 1")
    _check_schedule(schedule)
    z = _start(model, state, fixed)
    for i in range(steps):
        t, s = 1.0 - i / steps, 1.0 - (i + 1) / steps
        z = ancestral_step(model, z, state, t, s, schedule=schedule,
                           temperature=temperature, top_k=top_k, generator=generator, past=past)
    return z


# --------------------------------------------------------------------------------------------
# action discretiser (MNIST [dx, dy])
# --------------------------------------------------------------------------------------------


@dataclass
class DiscretizerConfig:
    mode: str = "bins"           # bins (direction sectors x speed bins + still) | codebook (k-means)
    directions: int = 8          # bins: angular sectors, sector 0 centred on +x
    speed_bins: int = 1          # bins: speed bins over moving actions (edges: quantiles of training speeds)
    still_speed: float = 0.02    # bins: speeds below this are the "still" class (id 0); action units
    codebook_size: int = 16      # codebook: k
    seed: int = 0                # codebook: k-means++ init seed
    iters: int = 100             # codebook: Lloyd iterations (at most)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiscretizerConfig:
        return _from_dict(cls, d)


def _as_numpy(x) -> tuple[np.ndarray, bool]:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy(), True
    return np.asarray(x), False


class ActionDiscretizer:
    """Continuous actions [dx, dy] (..., 2) to discrete ids and back.

    ``bins``: id 0 = still (speed < ``still_speed``); id ``1 + s * directions + d`` for speed bin s
    and direction sector d (sector d centred on angle ``2 pi d / directions`` of atan2(dy, dx)).
    Speed-bin edges are quantiles of the moving training speeds; a bin's representative is its
    sector's centre angle at the median training speed of that bin (the mid-point of its edges
    when no training action fell in it), so it lies inside its own bin.
    ``codebook``: k-means (k-means++ init, seeded) on the training actions; representative =
    codeword, encode = nearest codeword (lowest id on ties).

    ``fit(actions)`` returns self; ``encode(actions) -> ids`` (int64, numpy or torch like the
    input); ``decode(ids) -> (..., 2)`` float32 representatives; ``state_dict()`` is a JSON-able
    dict of lists and numbers, ``from_state_dict`` inverts it.
    """

    def __init__(self, cfg: DiscretizerConfig | None = None):
        self.cfg = cfg or DiscretizerConfig()
        if self.cfg.mode not in ("bins", "codebook"):
            raise ValueError(f"unknown discretizer mode {self.cfg.mode!r}; expected 'bins' or 'codebook'")
        self.edges: np.ndarray | None = None          # bins: speed edges, len = n_speed + 1 (last: +inf)
        self.speed_rep: np.ndarray | None = None      # bins: representative speed per speed bin
        self.codebook: np.ndarray | None = None       # codebook: (k, 2)

    # -- properties --------------------------------------------------------------------------

    @property
    def fitted(self) -> bool:
        return self.edges is not None or self.codebook is not None

    @property
    def n_classes(self) -> int:
        self._need_fit()
        if self.cfg.mode == "bins":
            return 1 + self.cfg.directions * (len(self.edges) - 1)
        return len(self.codebook)

    def _need_fit(self) -> None:
        if not self.fitted:
            raise RuntimeError("ActionDiscretizer is not fitted: call fit(actions) or from_state_dict")

    # -- fit ---------------------------------------------------------------------------------

    def fit(self, actions) -> ActionDiscretizer:
        a, _ = _as_numpy(actions)
        a = a.reshape(-1, 2).astype(np.float64)
        a = a[np.isfinite(a).all(axis=1)]
        if len(a) == 0:
            raise ValueError("fit needs at least one finite action")
        if self.cfg.mode == "bins":
            self._fit_bins(a)
        else:
            self._fit_codebook(a)
        return self

    def _fit_bins(self, a: np.ndarray) -> None:
        cfg = self.cfg
        if cfg.directions < 1 or cfg.speed_bins < 1 or cfg.still_speed < 0:
            raise ValueError(f"bins need directions >= 1, speed_bins >= 1, still_speed >= 0 (got {cfg.directions}, "
                             f"{cfg.speed_bins}, {cfg.still_speed})")
        speed = np.hypot(a[:, 0], a[:, 1])
        moving = speed[speed >= cfg.still_speed]
        inner = np.quantile(moving, np.arange(1, cfg.speed_bins) / cfg.speed_bins) if len(moving) else np.zeros(0)
        # strictly increasing edges; duplicate quantiles (e.g. constant speeds) merge bins
        edges = [cfg.still_speed]
        for e in inner:
            if e > edges[-1]:
                edges.append(float(e))
        edges.append(math.inf)
        self.edges = np.asarray(edges, dtype=np.float64)
        top = float(moving.max()) if len(moving) else cfg.still_speed + 1.0
        reps = []
        for j in range(len(edges) - 1):
            lo, hi = edges[j], edges[j + 1]
            inside = moving[(moving >= lo) & (moving < hi)]
            if len(inside):
                reps.append(float(np.median(inside)))
            else:
                reps.append(0.5 * (lo + (hi if math.isfinite(hi) else max(top, lo + 1.0))))
        self.speed_rep = np.asarray(reps, dtype=np.float64)

    def _fit_codebook(self, a: np.ndarray) -> None:
        k = self.cfg.codebook_size
        uniq = np.unique(a, axis=0)
        if k < 1 or len(uniq) < k:
            raise ValueError(f"codebook_size {k} must be in 1..{len(uniq)} (the number of distinct training actions)")
        rng = np.random.default_rng(self.cfg.seed)
        # k-means++ init on the distinct points (so centres start distinct)
        centres = [uniq[rng.integers(len(uniq))]]
        for _ in range(1, k):
            d2 = ((uniq[:, None] - np.asarray(centres)[None]) ** 2).sum(-1).min(1)
            centres.append(uniq[rng.choice(len(uniq), p=d2 / d2.sum())])
        c = np.asarray(centres)
        for _ in range(self.cfg.iters):
            d2 = ((a[:, None] - c[None]) ** 2).sum(-1)
            assign = d2.argmin(1)
            new = c.copy()
            for j in range(k):
                pts = a[assign == j]
                if len(pts):
                    new[j] = pts.mean(0)
                else:  # empty cluster: move it to the point farthest from its centre
                    new[j] = a[d2[np.arange(len(a)), assign].argmax()]
            if np.allclose(new, c, rtol=0, atol=1e-12):
                c = new
                break
            c = new
        if len(np.unique(c, axis=0)) < k:
            raise ValueError(f"k-means gave duplicate codewords with codebook_size {k}; use a smaller codebook")
        self.codebook = c

    # -- encode / decode ---------------------------------------------------------------------

    def encode(self, actions):
        """Ids (...,) int64 of actions (..., 2); numpy in, numpy out; torch in, torch out."""
        self._need_fit()
        a, is_torch = _as_numpy(actions)
        if a.shape[-1] != 2:
            raise ValueError(f"actions of shape {a.shape} must end in 2 ([dx, dy])")
        flat = a.reshape(-1, 2).astype(np.float64)
        if self.cfg.mode == "bins":
            speed = np.hypot(flat[:, 0], flat[:, 1])
            width = 2 * math.pi / self.cfg.directions
            ang = np.mod(np.arctan2(flat[:, 1], flat[:, 0]), 2 * math.pi)
            sector = np.floor((ang + width / 2) / width).astype(np.int64) % self.cfg.directions
            sbin = np.searchsorted(self.edges, speed, side="right") - 1      # -1: still
            ids = np.where(sbin < 0, 0, 1 + np.clip(sbin, 0, None) * self.cfg.directions + sector)
        else:
            ids = ((flat[:, None] - self.codebook[None]) ** 2).sum(-1).argmin(1)
        ids = ids.astype(np.int64).reshape(a.shape[:-1])
        return torch.from_numpy(ids).to(actions.device) if is_torch else ids

    def decode(self, ids):
        """Representatives (..., 2) float32 of ids (...,); numpy or torch like the input."""
        self._need_fit()
        i, is_torch = _as_numpy(ids)
        i = i.astype(np.int64)
        n = self.n_classes
        if i.size and (i.min() < 0 or i.max() >= n):
            raise ValueError(f"ids span [{i.min()}, {i.max()}], outside 0..{n - 1}")
        out = self.representatives()[i]
        return torch.from_numpy(out).to(ids.device) if is_torch else out

    def representatives(self) -> np.ndarray:
        """(n_classes, 2) float32: the decoded [dx, dy] of every id."""
        self._need_fit()
        if self.cfg.mode == "codebook":
            return self.codebook.astype(np.float32)
        dirs = self.cfg.directions
        reps = [np.zeros(2)]
        for sp in self.speed_rep:
            for d in range(dirs):
                ang = 2 * math.pi * d / dirs
                reps.append(sp * np.array([math.cos(ang), math.sin(ang)]))
        return np.asarray(reps, dtype=np.float32)

    # -- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the config, and the fitted edges / speeds / codebook as lists (``inf`` edge
        stored as the string "inf")."""
        self._need_fit()
        d: dict[str, Any] = {"config": asdict(self.cfg)}
        if self.cfg.mode == "bins":
            d["edges"] = [e if math.isfinite(e) else "inf" for e in self.edges.tolist()]
            d["speed_rep"] = self.speed_rep.tolist()
        else:
            d["codebook"] = self.codebook.tolist()
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> ActionDiscretizer:
        obj = cls(DiscretizerConfig.from_dict(d["config"]))
        if obj.cfg.mode == "bins":
            obj.edges = np.asarray([math.inf if e == "inf" else float(e) for e in d["edges"]], dtype=np.float64)
            obj.speed_rep = np.asarray(d["speed_rep"], dtype=np.float64)
        else:
            obj.codebook = np.asarray(d["codebook"], dtype=np.float64)
        return obj


# --------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def sequence_metrics(logits: torch.Tensor, actions: torch.Tensor) -> dict[str, float]:
    """Metrics of per-position predictive distributions ``logits`` (B, H, n) against ``actions``
    (B, H): ``nll`` (mean -log p per action token, nats) and ``first_action_acc`` (argmax at
    position 0)."""
    lp = logits.float().log_softmax(dim=-1)
    nll = -lp.gather(-1, actions.long()[..., None]).mean()
    acc = (lp[:, 0].argmax(-1) == actions[:, 0]).float().mean()
    return {"nll": float(nll), "first_action_acc": float(acc)}


def marginal_frequencies(actions: torch.Tensor, n_actions: int, smoothing: float = 1.0) -> torch.Tensor:
    """(n_actions,) action frequencies over all positions of ``actions``, with ``smoothing``
    pseudo-counts per class (so unseen classes keep a finite NLL)."""
    _check_actions(actions, n_actions, "marginal_frequencies")
    counts = torch.bincount(actions.reshape(-1).long(), minlength=n_actions).double() + smoothing
    return (counts / counts.sum()).float()


def marginal_metrics(train_actions: torch.Tensor, test_actions: torch.Tensor, n_actions: int,
                     smoothing: float = 1.0) -> dict[str, float]:
    """The state-blind baseline: the training marginal at every position of every test sequence.
    Returns ``sequence_metrics`` (``nll`` nats per token, ``first_action_acc``)."""
    p = marginal_frequencies(train_actions, n_actions, smoothing)
    logits = p.log().expand(*test_actions.shape, n_actions)
    return sequence_metrics(logits, test_actions)


@dataclass
class MLPPolicyConfig:
    n_actions: int = 5
    horizon: int = 8            # H future actions, one distribution per position
    state_frames: int = 3
    state_kind: str = "tokens"
    state_shape: tuple[int, ...] = (32, 32)
    state_vocab: int = 17
    token_dim: int = 4          # tokens: embedding width per cell before flattening
    state_dim: int = 16         # the flattened state's linear projection (then LayerNorm); 0: none, raw into the MLP
    hidden: int = 256
    layers: int = 2             # hidden layers
    dropout: float = 0.0        # on the state's features and after every hidden layer (training mode only)
    past_actions: int = 0       # the P action ids that led to the state's last frame, one-hot beside it

    def __post_init__(self):
        self.state_shape = tuple(self.state_shape)
        if self.state_kind not in STATE_KINDS:
            raise ValueError(f"unknown state_kind {self.state_kind!r}; expected one of {STATE_KINDS}")
        want = 2 if self.state_kind == "tokens" else 3
        if len(self.state_shape) != want:
            raise ValueError(f"state_shape {self.state_shape} must have {want} dims for state_kind {self.state_kind!r}")
        if self.horizon < 1:
            raise ValueError(f"horizon {self.horizon} must be >= 1")
        if self.state_dim < 0:
            raise ValueError(f"state_dim {self.state_dim} must be >= 0 (0: no projection)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout} must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state_shape"] = list(self.state_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MLPPolicyConfig:
        return _from_dict(cls, d)


class MLPPolicy(nn.Module):
    """State-conditioned per-position classifier: logits (B, horizon, n_actions), one independent
    distribution per horizon position (an output layer of horizon * n_actions).

    Inputs: the flattened state (token ids embedded per cell, ``token_dim`` each; or the continuous
    latents) and the past action ids one-hot. With ``state_dim`` > 0 the flattened state first goes
    through a linear projection to ``state_dim`` features and a LayerNorm, and only then joins the
    past actions: the state's thousands of inputs (12,288 on MNIST, 6,144 on gameplay) would
    otherwise drown the 2 x n_actions past-action inputs in the first layer, and the narrow
    projection holds most of the model's capacity on few episodes (the old, unprojected MLP lost
    to the state-blind marginal on gameplay and could not learn to repeat the last action on
    MNIST). Then ``layers`` hidden layers (Linear, GELU), with ``dropout`` on the projected state
    features and after every hidden layer. ``state_dim`` = 0: the flattened state goes straight
    into the first hidden layer (the old baseline)."""

    def __init__(self, cfg: MLPPolicyConfig):
        super().__init__()
        self.cfg = cfg
        cells = cfg.state_frames * math.prod(cfg.state_shape[:2])
        if cfg.state_kind == "tokens":
            self.embed = nn.Embedding(cfg.state_vocab, cfg.token_dim)
            width = cells * cfg.token_dim
        else:
            width = cells * cfg.state_shape[2]
        if cfg.state_dim:
            self.state_proj = nn.Sequential(nn.Linear(width, cfg.state_dim), nn.LayerNorm(cfg.state_dim))
            width = cfg.state_dim
        self.state_drop = nn.Dropout(cfg.dropout)
        width += cfg.past_actions * cfg.n_actions
        layers: list[nn.Module] = []
        for _ in range(cfg.layers):
            layers += [nn.Linear(width, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = cfg.hidden
        layers.append(nn.Linear(width, cfg.horizon * cfg.n_actions))
        self.net = nn.Sequential(*layers)

    def forward(self, state: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, horizon, n_actions)."""
        cfg = self.cfg
        _check_state(state, cfg.state_frames, cfg.state_kind, cfg.state_shape, "MLPPolicy")
        _check_past(past, cfg.past_actions, cfg.n_actions, state.shape[0], "MLPPolicy")
        x = (self.embed(state.long()) if cfg.state_kind == "tokens" else state.float()).flatten(1)
        if cfg.state_dim:
            x = self.state_proj(x)
        x = self.state_drop(x)
        if cfg.past_actions:
            x = torch.cat([x, F.one_hot(past.long(), cfg.n_actions).to(x.dtype).flatten(1)], dim=1)
        return self.net(x).view(-1, cfg.horizon, cfg.n_actions)

    def _check_horizon(self, horizon: int) -> None:
        if horizon != self.cfg.horizon:
            raise ValueError(f"MLPPolicy predicts horizon {self.cfg.horizon} positions, asked for {horizon}")

    def sequence_logits(self, state: torch.Tensor, horizon: int, past: torch.Tensor | None = None) -> torch.Tensor:
        """(B, horizon, n_actions): the per-position logits (``horizon`` must be the model's)."""
        self._check_horizon(horizon)
        return self(state, past)

    def predict(self, state: torch.Tensor, horizon: int, past: torch.Tensor | None = None) -> torch.Tensor:
        """(B, horizon) argmax ids, position by position."""
        return self.sequence_logits(state, horizon, past).argmax(-1)


def mlp_policy_loss(model: MLPPolicy, actions: torch.Tensor, state: torch.Tensor,
                    past: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of ``MLPPolicy``'s per-position logits against the actions (B, horizon), mean
    over all positions (what its ``nll`` is scored on). Returns ``(loss, parts)`` with detached
    ``loss`` and ``accuracy`` (the first action: position 0's argmax)."""
    _check_actions(actions, model.cfg.n_actions, "mlp_policy_loss")
    if actions.dim() != 2 or actions.shape[1] != model.cfg.horizon:
        raise ValueError(f"mlp_policy_loss: actions of shape {tuple(actions.shape)} must be "
                         f"(B, horizon={model.cfg.horizon})")
    logits = model(state, past)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), actions.reshape(-1).long())
    with torch.no_grad():
        acc = (logits[:, 0].argmax(-1) == actions[:, 0]).float().mean()
    return loss, {"loss": loss.detach(), "accuracy": acc}


__all__ = [
    "ActionDiscretizer", "CrossAttention", "DiTBlock", "DiscretizerConfig", "MDLMPolicy", "MLPPolicy",
    "MLPPolicyConfig", "PolicyConfig", "StateEncoder", "alpha", "alpha_prime", "ancestral_step",
    "curriculum_t_max", "marginal_frequencies", "marginal_metrics", "mask_actions", "mask_ratio",
    "maskgit_n_keep",
    "mdlm_loss", "mlp_policy_loss", "nelbo", "nelbo_weight", "sample_ancestral", "sample_maskgit",
    "sample_t", "select_masked", "sequence_metrics", "training_loss",
]

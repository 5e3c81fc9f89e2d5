"""Frame tokenizers: a fixed 16-level quantizer, a convolutional autoencoder and a block-causal
masked-autoencoder transformer (DreamerV4's tokenizer, small).

Every tokenizer has the same interface, on pixel tensors ``x`` of shape (B, T, C, H, W) with
values in [0, 1]:

- ``encode(x)`` returns the latents in their storage layout, (B, T, *latent_shape);
- ``decode(z)`` returns reconstructions of shape (B, T, C, H, W);
- ``forward(x)`` encodes and decodes.

``latent_shape`` and ``latent_dtype`` say what the latents store holds per frame. This module has
no file I/O: the stages build, train, save and load these modules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import LUMA

# --------------------------------------------------------------------------------------------
# quantize: the fixed tokenizer of the CoPilot4D Moving MNIST notes
# --------------------------------------------------------------------------------------------



@dataclass
class QuantizeConfig:
    image_size: int = 64   # frames are image_size x image_size (set from the data)
    channels: int = 1      # 1 (grayscale) or 3 (RGB; turned into luma)
    size: int = 32         # token grid is size x size
    levels: int = 16       # ids 0..levels-1; id `levels` is MASK


class QuantizeTokenizer(nn.Module):
    """Resize to ``size`` (area averaging), grayscale, round to ``levels`` evenly spaced gray levels
    from black to white. No parameters, no training."""

    def __init__(self, cfg: QuantizeConfig):
        super().__init__()
        if cfg.levels < 2 or cfg.levels > 255:
            raise ValueError(f"quantize levels must be in 2..255 (got {cfg.levels})")
        self.cfg = cfg

    @property
    def vocab_size(self) -> int:
        return self.cfg.levels + 1

    @property
    def mask_id(self) -> int:
        return self.cfg.levels

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.cfg.size, self.cfg.size)

    latent_dtype = torch.uint8

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        x = x.flatten(0, 1).float()
        if x.shape[1] == 3:
            x = (x * x.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = F.interpolate(x, size=(self.cfg.size, self.cfg.size), mode="area")
        ids = (x.clamp(0, 1) * (self.cfg.levels - 1)).round()
        return ids.to(torch.uint8).view(b, t, self.cfg.size, self.cfg.size)

    def dequantize(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (MASK excluded) to gray levels at the token resolution: 0 is black, levels-1 white."""
        return ids.float() / (self.cfg.levels - 1)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape[:2]
        g = self.dequantize(ids).flatten(0, 1).unsqueeze(1)
        g = F.interpolate(g, size=(self.cfg.image_size, self.cfg.image_size), mode="bilinear",
                          align_corners=False)
        return g.expand(-1, self.cfg.channels, -1, -1).reshape(b, t, self.cfg.channels, *g.shape[-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


# --------------------------------------------------------------------------------------------
# cnn: a convolutional autoencoder with a continuous latent grid
# --------------------------------------------------------------------------------------------


@dataclass
class CNNConfig:
    image_size: int = 64
    channels: int = 3
    latent_size: int = 16      # latent grid is latent_size x latent_size (image_size / 2^k)
    latent_channels: int = 8
    width: int = 32            # channels after the first downsampling; doubled at each further one
    blocks: int = 2            # residual blocks at the latent resolution (encoder and decoder)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, ch), ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(8, ch), ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class CNNTokenizer(nn.Module):
    """Strided convs down to a tanh-bounded latent grid, residual blocks there, transposed convs up.

    The work happens at the latent resolution, which keeps it cheap enough to train on a CPU.
    """

    latent_dtype = torch.float16

    def __init__(self, cfg: CNNConfig):
        super().__init__()
        n_down = round(math.log2(cfg.image_size / cfg.latent_size)) if 0 < cfg.latent_size < cfg.image_size else 0
        if n_down < 1 or cfg.latent_size * 2**n_down != cfg.image_size:
            raise ValueError(
                f"cnn latent_size {cfg.latent_size} must be image_size {cfg.image_size} / 2^k with k >= 1"
            )
        self.cfg = cfg
        widths = [cfg.channels] + [cfg.width * 2**i for i in range(n_down)]
        top = widths[-1]
        enc: list[nn.Module] = []
        for i in range(n_down):
            enc += [nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1), nn.SiLU()]
        enc += [ResBlock(top) for _ in range(cfg.blocks)]
        enc += [nn.GroupNorm(min(8, top), top), nn.SiLU(), nn.Conv2d(top, cfg.latent_channels, 1)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, top, 3, padding=1)]
        dec += [ResBlock(top) for _ in range(cfg.blocks)]
        dec += [nn.GroupNorm(min(8, top), top), nn.SiLU()]
        for i in reversed(range(n_down)):
            dec.append(nn.ConvTranspose2d(widths[i + 1], widths[i], 4, stride=2, padding=1))
            if i:
                dec.append(nn.SiLU())
        self.decoder = nn.Sequential(*dec)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.cfg.latent_size, self.cfg.latent_size, self.cfg.latent_channels)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        z = torch.tanh(self.encoder(x.flatten(0, 1) * 2 - 1))
        return z.permute(0, 2, 3, 1).reshape(b, t, *self.latent_shape)  # channels last

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        b, t = z.shape[:2]
        y = self.decoder(z.flatten(0, 1).permute(0, 3, 1, 2).float())
        return (y.view(b, t, *y.shape[1:]) + 1) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


# --------------------------------------------------------------------------------------------
# mae: the block-causal transformer tokenizer of DreamerV4
# --------------------------------------------------------------------------------------------


@dataclass
class MAEConfig:
    image_size: int = 64
    channels: int = 3
    patch_size: int = 8
    n_latents: int = 16        # learned latent tokens per frame
    latent_dim: int = 16       # bottleneck width of each latent token (tanh)
    dim: int = 128
    heads: int = 4
    depth: int = 3             # encoder blocks
    decoder_depth: int = 3
    mlp_ratio: int = 4
    max_frames: int = 16       # temporal positions (the training window and the encode chunk)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = F.rms_norm(q, q.shape[-1:]), F.rms_norm(k, k.shape[-1:])  # QK-norm
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


def encoder_mask(t: int, n_patches: int, n_latents: int, device=None) -> torch.Tensor:
    """Attention mask (True = may attend) over tokens laid out per frame as [patches, latents].

    A patch sees the patches of its own frame only; a latent sees patches and latents of its own
    and every earlier frame.
    """
    frame, is_latent = _layout(t, [False] * n_patches + [True] * n_latents, device)
    same = frame[:, None] == frame[None, :]
    past = frame[None, :] <= frame[:, None]
    patch_row = ~is_latent[:, None] & ~is_latent[None, :] & same
    latent_row = is_latent[:, None] & past
    return patch_row | latent_row


def decoder_mask(t: int, n_patches: int, n_latents: int, device=None) -> torch.Tensor:
    """Attention mask over tokens laid out per frame as [latents, patch queries].

    A latent sees latents of its own and earlier frames; a patch query sees the patch queries of
    its own frame and the latents of its own and earlier frames.
    """
    frame, is_latent = _layout(t, [True] * n_latents + [False] * n_patches, device)
    same = frame[:, None] == frame[None, :]
    past = frame[None, :] <= frame[:, None]
    to_latent = is_latent[None, :] & past
    query_to_query = ~is_latent[:, None] & ~is_latent[None, :] & same
    return to_latent | query_to_query


def _layout(t: int, block: list[bool], device) -> tuple[torch.Tensor, torch.Tensor]:
    kinds = torch.tensor(block, device=device)
    frame = torch.arange(t, device=device).repeat_interleave(len(block))
    return frame, kinds.repeat(t)


class MAETokenizer(nn.Module):
    """Patches + learned latent tokens, block-causal over time, tanh bottleneck, masked training."""

    latent_dtype = torch.float16

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"mae patch_size {cfg.patch_size} must divide image_size {cfg.image_size}")
        if cfg.dim % cfg.heads:
            raise ValueError(f"mae dim {cfg.dim} must be a multiple of heads {cfg.heads}")
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        self.n_patches = self.grid**2
        patch_dim = cfg.channels * cfg.patch_size**2
        d = cfg.dim

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape) * 0.02)

        # encoder
        self.patch_in = nn.Linear(patch_dim, d)
        self.enc_patch_pos = param(self.n_patches, d)
        self.mask_token = param(d)
        self.latent_queries = param(cfg.n_latents, d)
        self.enc_time = param(cfg.max_frames, d)
        self.encoder = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.enc_norm = nn.LayerNorm(d)
        self.to_latent = nn.Linear(d, cfg.latent_dim)
        # decoder
        self.from_latent = nn.Linear(cfg.latent_dim, d)
        self.dec_latent_pos = param(cfg.n_latents, d)
        self.patch_queries = param(self.n_patches, d)
        self.dec_time = param(cfg.max_frames, d)
        self.decoder = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth))
        self.dec_norm = nn.LayerNorm(d)
        self.patch_out = nn.Linear(d, patch_dim)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.cfg.n_latents, self.cfg.latent_dim)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c, _, _ = x.shape
        p, g = self.cfg.patch_size, self.grid
        x = x.reshape(b, t, c, g, p, g, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, t, g * g, c * p * p)

    def unpatchify(self, y: torch.Tensor) -> torch.Tensor:
        b, t = y.shape[:2]
        p, g, c = self.cfg.patch_size, self.grid, self.cfg.channels
        y = y.reshape(b, t, g, g, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return y.reshape(b, t, c, g * p, g * p)

    def _check_frames(self, t: int) -> None:
        if t > self.cfg.max_frames:
            raise ValueError(f"mae got {t} frames, more than max_frames={self.cfg.max_frames}")

    def encode(self, x: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (B, T, n_latents, latent_dim) in [-1, 1]; ``patch_mask`` (B, T, P) hides patches."""
        b, t = x.shape[:2]
        self._check_frames(t)
        p, n = self.n_patches, self.cfg.n_latents
        patches = self.patch_in(self.patchify(x * 2 - 1))
        if patch_mask is not None:
            patches = torch.where(patch_mask[..., None], self.mask_token.to(patches.dtype), patches)
        patches = patches + self.enc_patch_pos
        latents = self.latent_queries.expand(b, t, n, -1)
        h = torch.cat([patches, latents], dim=2) + self.enc_time[:t, None, :]
        h = h.reshape(b, t * (p + n), -1)
        mask = encoder_mask(t, p, n, x.device)
        for blk in self.encoder:
            h = blk(h, mask)
        h = h.view(b, t, p + n, -1)[:, :, p:]
        return torch.tanh(self.to_latent(self.enc_norm(h)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        b, t = z.shape[:2]
        self._check_frames(t)
        p, n = self.n_patches, self.cfg.n_latents
        latents = self.from_latent(z.to(self.from_latent.weight.dtype)) + self.dec_latent_pos
        queries = self.patch_queries.expand(b, t, p, -1)
        h = torch.cat([latents, queries], dim=2) + self.dec_time[:t, None, :]
        h = h.reshape(b, t * (n + p), -1)
        mask = decoder_mask(t, p, n, z.device)
        for blk in self.decoder:
            h = blk(h, mask)
        h = h.view(b, t, n + p, -1)[:, :, n:]
        return (self.unpatchify(self.patch_out(self.dec_norm(h))) + 1) / 2

    def forward(self, x: torch.Tensor, mask_ratio_max: float = 0.0) -> torch.Tensor:
        patch_mask = None
        if mask_ratio_max > 0:
            patch_mask = sample_patch_mask(x.shape[0], x.shape[1], self.n_patches, mask_ratio_max, x.device)
        return self.decode(self.encode(x, patch_mask))


def sample_patch_mask(b: int, t: int, n_patches: int, ratio_max: float, device=None) -> torch.Tensor:
    """Per frame a ratio r ~ U(0, ratio_max); each patch of that frame is hidden with probability r."""
    ratio = torch.rand(b, t, 1, device=device) * ratio_max
    return torch.rand(b, t, n_patches, device=device) < ratio


def mask_ratio_at(step: int, ratio_max: float, warmup_steps: int) -> float:
    """The curriculum: the maximum mask ratio grows linearly from 0 to ``ratio_max``."""
    if warmup_steps <= 0:
        return ratio_max
    return ratio_max * min(1.0, step / warmup_steps)


# --------------------------------------------------------------------------------------------
# building and losses
# --------------------------------------------------------------------------------------------

Tokenizer = QuantizeTokenizer | CNNTokenizer | MAETokenizer


def build_tokenizer(kind: str, **config) -> Tokenizer:
    """A tokenizer of ``kind`` (quantize, cnn, mae) from the fields of its config dataclass."""
    from models import registry

    return registry.build("tokenizer", kind, config)


Perceptual = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reconstruction_loss(
    x_hat: torch.Tensor, x: torch.Tensor, perceptual: Perceptual | None = None, lpips_weight: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE + ``lpips_weight`` * perceptual distance (``perceptual`` on (N, C, H, W) in [0, 1])."""
    mse = F.mse_loss(x_hat.float(), x.float())
    parts = {"mse": mse.item()}
    loss = mse
    if lpips_weight > 0:
        if perceptual is None:
            raise ValueError("lpips_weight > 0 needs a perceptual loss (LPIPS)")
        lp = perceptual(x_hat.flatten(0, 1).float(), x.flatten(0, 1).float()).mean()
        parts["lpips"] = lp.item()
        loss = loss + lpips_weight * lp
    return loss, parts


def pixels(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames (..., H, W, C), as stored, to float pixels (..., C, H, W) in [0, 1]."""
    return frames.movedim(-1, -3).float() / 255

"""The frame tokenizers' params (``tokenizer.<dataset>``) and what follows from them: the model
config of each kind, the window a tokenizer encodes at once, the training config. The stage
``tokenizer`` (``stages/tokenizer.py``) trains and evaluates with it; ``bench/bench_latents.py``
builds the same models.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config import StrictModel
from pipeline.train import TrainConfig


# facts of one run, left out of tokenizer.json (byte-reproducible, also when a killed run resumed)
RUN_FACTS = ("train_seconds", "steps_per_s", "resumed_from_step")


class QuantizeParams(StrictModel):
    size: int = Field(32, gt=0, description="token grid size (frames are resized to size x size)")
    levels: int = Field(16, ge=2, le=255, description="gray levels: ids 0..levels-1, id `levels` is MASK")


class CNNParams(StrictModel):
    latent_size: int = Field(16, gt=0, description="latent grid size: frame size / 2^k")
    latent_channels: int = Field(8, gt=0)
    width: int = Field(32, gt=0, description="channels after the first downsampling")
    blocks: int = Field(2, ge=0, description="residual blocks at the latent resolution")
    train: TrainConfig = TrainConfig(steps=600, lr=2e-3, warmup_steps=50, eval_every=100, ckpt_every=100)


class MAEParams(StrictModel):
    patch_size: int = Field(8, gt=0)
    n_latents: int = Field(16, gt=0, description="latent tokens per frame")
    latent_dim: int = Field(16, gt=0, description="bottleneck width per latent token")
    dim: int = Field(128, gt=0)
    heads: int = Field(4, gt=0)
    depth: int = Field(2, gt=0)
    decoder_depth: int = Field(2, gt=0)
    mlp_ratio: int = Field(4, gt=0)
    window: int = Field(4, gt=0, description="frames per training window (block-causal over time)")
    stride: int = Field(2, gt=0, description="frames between training windows")
    mask_ratio_max: float = Field(0.5, ge=0, lt=1, description="MAE: per-frame mask ratio ~ U(0, max)")
    mask_warmup_steps: int = Field(500, ge=0, description="curriculum: max ratio ramps from 0 over these steps")
    train: TrainConfig = TrainConfig(steps=1500, lr=1e-3, warmup_steps=50, eval_every=250, ckpt_every=250,
                                     ema_decay=0.995)


class EvalParams(StrictModel):
    val_fraction: float = Field(0.1, gt=0, lt=1, description="held-out episodes (whole episodes)")
    split_seed: int = Field(0, ge=0)
    max_frames: int = Field(512, gt=0, description="held-out frames measured at the end")
    probe_frames: int = Field(64, gt=0, description="held-out frames measured at every evaluation")
    batch_size: int = Field(64, gt=0, description="frames per batch when measuring")


class HealthParams(StrictModel):
    collapse_threshold: float = Field(0.2, gt=0, lt=1, description="reconstruction/input spread below which a run looks collapsed")
    collapse_patience: int = Field(3, gt=0, description="evaluations in a row below the threshold that flag collapse")


class Config(StrictModel):
    """One dataset's block of the ``tokenizer`` section of params.yaml."""

    kind: Literal["quantize", "cnn", "mae"] = "quantize"
    lpips_weight: float = Field(0.0, ge=0, description="loss = MSE + lpips_weight * LPIPS (needs the lpips extra)")
    lpips_net: Literal["vgg", "alex", "squeeze"] = "vgg"
    quantize: QuantizeParams = QuantizeParams()
    cnn: CNNParams = CNNParams()
    mae: MAEParams = MAEParams()
    eval: EvalParams = EvalParams()
    health: HealthParams = HealthParams()

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.kind == "quantize" and self.lpips_weight > 0:
            raise ValueError(f"lpips_weight ({self.lpips_weight}) does nothing for kind 'quantize' (it trains "
                             f"nothing); set it to 0 or choose kind cnn or mae")
        return self


# -- building --------------------------------------------------------------------------------


def model_config(cfg: Config, kind: str, frame_shape: tuple[int, ...]) -> dict:
    """The model dataclass fields for ``kind`` from the params and the frames' (H, W, C)."""
    h, w, c = frame_shape
    if h != w:
        raise ValueError(f"tokenizers need square frames (got {h}x{w}); set gameplay_frames.width = height")
    base = {"image_size": int(h), "channels": int(c)}
    if kind == "quantize":
        return {**base, **cfg.quantize.model_dump()}
    if kind == "cnn":
        return {**base, **cfg.cnn.model_dump(exclude={"train"})}
    mae = cfg.mae.model_dump(exclude={"window", "stride", "mask_ratio_max", "mask_warmup_steps", "train"})
    return {**base, **mae, "max_frames": cfg.mae.window}


def encode_window(cfg: Config) -> int:
    """Frames a tokenizer sees at once: the MAE window (block-causal over time), else 1."""
    return cfg.mae.window if cfg.kind == "mae" else 1


def train_config(cfg: Config) -> TrainConfig | None:
    """The chosen kind's training block (None for ``quantize``), its batch counted in windows."""
    if cfg.kind == "quantize":
        return None
    tc = getattr(cfg, cfg.kind).train
    return tc.model_copy(update={"batch_size": max(1, tc.batch_size // encode_window(cfg))})


# -- the stage ---------------------------------------------------------------------------------

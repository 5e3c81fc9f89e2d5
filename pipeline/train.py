"""The training loop shared by every training stage.

``train(model, loss_fn, batches, cfg, ckpt_dir, ...)``: AdamW, linear warmup then cosine decay of
the learning rate, gradient clipping, bf16 autocast where the device supports it (CUDA), optional
EMA of the weights, fixed seeds, tqdm progress, MLflow metrics every ``log_every`` steps and
evaluations (with an image grid) every ``eval_every`` steps.

Every ``ckpt_every`` steps the whole training state (model, EMA, optimizer, RNG, step, history) is
written atomically to ``<ckpt_dir>/<run key>/state.pt`` as plain state dicts, loaded back with
``torch.load(..., weights_only=True)``, plus a readable ``state.json``. The run key
(``run_key``) is a hash of the run's configs (the ``TrainConfig`` and the caller's ``config``), so
runs of different configs sharing one ``ckpt_dir`` (experiments queued or run side by side) never
touch each other's state. A run that was killed resumes from its last checkpoint when started
again with the same configs, from any working directory (``pipeline.paths.checkpoint_dir`` puts
``ckpt_dir`` under the main repository, also for ``dvc exp run --temp``/``--queue``): the data order
is a function of the step (``step_batches``), so the resumed run sees the batches the killed one
would have seen and its loss curve continues.

A checkpoint that cannot be resumed is never trusted and never fatal: an unreadable file, a file
that is not a training state of this loop (another program's state dict, an older layout), one
whose weights do not fit the model, or one of another config. The run logs a warning naming the
file and why, starts afresh and replaces the file at its first checkpoint.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import math
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from pydantic import Field, model_validator
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.atomic import write_json
from pipeline.checkpoint import CheckpointError, load_torch, save_torch
from pipeline.config import StrictModel
from pipeline.reader import LoaderConfig, make_loader

log = logging.getLogger(__name__)

STATE = "state.pt"
STATE_JSON = "state.json"
STATE_KEYS = ("step", "config", "model", "ema", "optimizer", "rng_cpu", "rng_cuda", "history", "evals")

# The run directories of the runs this process completed, by base directory: what
# ``clear_checkpoint`` removes.
_RUN_DIRS: dict[Path, set[Path]] = {}


class TrainConfig(StrictModel):
    """The ``train`` block of a training stage's params."""

    steps: int = Field(1000, gt=0, description="optimizer steps in all")
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of lr")
    warmup_steps: int = Field(100, ge=0, description="linear warmup, then cosine decay")
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null: no clipping")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the weights; null: off")
    log_every: int = Field(25, gt=0)
    eval_every: int | None = Field(None, gt=0, description="evaluations during training, for a stage that has "
                                   "them (the tokenizer's collapse guard); null: at the end only")
    ckpt_every: int = Field(250, gt=0)
    seed: int = Field(0, ge=0)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    bf16: bool = Field(True, description="bf16 autocast where supported (CUDA); off on CPU")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps >= self.steps and self.warmup_steps > 0:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return dev


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a model's parameters (buffers copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


# -- data order as a function of the step ------------------------------------------------------


class StepOrder(Dataset):
    """Item ``i`` is sample ``start_step * batch_size + i`` of an endless stream of seeded epochs.

    Epoch ``e`` visits ``dataset`` in the order ``permutation(seed, e)``; read in order (no shuffle)
    in batches of ``batch_size``, batch ``k`` is the one that step ``start_step + k`` trains on, no
    matter where a run started. Picklable: the permutation is recomputed in each worker.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, start_step: int, end_step: int):
        self.dataset = dataset
        self.n = len(dataset)  # type: ignore[arg-type]
        self.offset = start_step * batch_size
        self.length = max(0, end_step - start_step) * batch_size
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.length

    def open(self) -> None:
        opener = getattr(self.dataset, "open", None)
        if callable(opener):
            opener()

    def __getitem__(self, i: int) -> Any:
        epoch, pos = divmod(self.offset + i, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self.dataset[int(self._perm[1][pos])]


Batches = Callable[[int], Iterable[Any]]


def step_batches(dataset: Dataset, cfg: TrainConfig, loader: LoaderConfig | None = None) -> Batches:
    """``batches(start_step)``: the batches of steps ``start_step .. cfg.steps - 1``, in order."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("the training set is empty")

    def batches(start_step: int) -> Iterable[Any]:
        order = StepOrder(dataset, cfg.batch_size, cfg.seed, start_step, cfg.steps)
        return make_loader(order, cfg.batch_size, shuffle=False, seed=cfg.seed, cfg=loader)

    return batches


# -- checkpoints -------------------------------------------------------------------------------


def _config_key(cfg: TrainConfig, config: Any) -> str:
    """Canonical JSON of the run: a checkpoint resumes only a run of the same configs."""
    return json.dumps({"train": cfg.model_dump(mode="json"), "run": config}, sort_keys=True, default=str)


def run_key(cfg: TrainConfig, config: Any = None) -> str:
    """The name of a run's checkpoint directory under ``ckpt_dir``: 16 hex digits of the sha256 of
    its canonical configs. ``config`` should describe what is trained (params, a fingerprint of the
    data), not where: a path of the workspace in it would keep an experiment from resuming in
    another workspace."""
    return hashlib.sha256(_config_key(cfg, config).encode()).hexdigest()[:16]


def run_dir(ckpt_dir: Path | str, cfg: TrainConfig, config: Any = None) -> Path:
    """Where ``train(..., cfg, ckpt_dir, config=config)`` keeps its resumable state."""
    return Path(ckpt_dir) / run_key(cfg, config)


FITS_NOT = "another model"  # the reason prefix of a state whose weights no longer fit the model


def _mismatch(expected: dict, got: Any, what: str) -> str | None:
    """Why the state dict ``got`` does not fit ``expected`` (keys and shapes), or None."""
    if not isinstance(got, dict):
        return f"its {what} is a {type(got).__name__}, not a state dict"
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        return f"{FITS_NOT}: its {what} weights do not fit the model (missing {missing[:4]}, unexpected {extra[:4]})"
    for k, v in expected.items():
        if getattr(got[k], "shape", None) != v.shape:
            return (f"{FITS_NOT}: its {what} weight '{k}' has shape {tuple(getattr(got[k], 'shape', ()))}, "
                    f"the model's {tuple(v.shape)}")
    return None


@dataclass
class TrainResult:
    model: nn.Module          # the EMA model when EMA is on, else the trained model (eval mode)
    step: int                 # optimizer steps done
    history: list[dict] = field(default_factory=list)  # one row per log_every steps
    evals: list[dict] = field(default_factory=list)    # one row per evaluation
    resumed_from: int = 0     # step the run resumed from (0: fresh start)
    stopped_early: bool = False
    ckpt_dir: Path | None = None  # the run's own checkpoint directory (``run_dir``)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else str(v)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return batch


def _wants_ema(loss_fn: Callable) -> bool:
    try:
        return "ema" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False


class Trainer:
    """One training run; see ``train``. Its state lives in ``run_dir(ckpt_dir, cfg, config)``."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, ckpt_dir: Path, config: Any, run: Any):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.base_dir = Path(ckpt_dir)
        self.ckpt_dir = run_dir(ckpt_dir, cfg, config)
        self.config_key = _config_key(cfg, config)
        self.config = config
        self.run = run
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas,
        )
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.step = 0
        self.history: list[dict] = []
        self.evals: list[dict] = []

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.model if self.ema else self.model

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "step": self.step,
            "config": self.config_key,
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict() if self.ema else {},
            "optimizer": self.opt.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "history": self.history,
            "evals": self.evals,
        }

    def save(self) -> None:
        save_torch(self.state(), self.ckpt_dir / STATE)
        write_json(self.ckpt_dir / STATE_JSON, {
            "step": self.step, "config": self.config, "history": self.history, "evals": self.evals,
        })

    def unusable(self, state: Any) -> str | None:
        """Why the loaded ``state`` cannot be resumed by this run, or None when it can."""
        if not isinstance(state, dict):
            return f"it holds a {type(state).__name__}, not a training state of pipeline.train"
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            return f"it is not a training state of pipeline.train (no {', '.join(missing)})"
        if state["config"] != self.config_key:
            return "it is the checkpoint of a different config"
        if not isinstance(state["step"], int) or not isinstance(state["rng_cpu"], torch.Tensor):
            return "its step or RNG state is not of a training state of pipeline.train"
        why = _mismatch(self.model.state_dict(), state["model"], "model")
        if why is None and self.ema:
            why = _mismatch(self.ema.model.state_dict(), state["ema"], "EMA")
        if why is None:
            groups = state["optimizer"].get("param_groups") if isinstance(state["optimizer"], dict) else None
            ours = [len(g["params"]) for g in self.opt.param_groups]
            if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != ours:
                why = f"{FITS_NOT}: its optimizer state does not fit the model's parameters"
        return why

    def try_resume(self) -> bool:
        """Restore the state saved in ``ckpt_dir`` when there is one this run can resume; True if so.

        The checkpoint of a different config (e.g. a hash collision of the run key), or one whose
        weights no longer fit the model (its code changed), is logged and the run starts afresh,
        replacing it at its first checkpoint. A file that is not a training
        state this run can resume (``unusable``, or unreadable) raises ``CheckpointError`` naming
        it, why, and the way out: nothing is overwritten that the user did not decide to discard.
        """
        path = self.ckpt_dir / STATE
        if not path.exists():
            return False
        way_out = f"remove {path} to start this run afresh"
        try:
            state = load_torch(path, self.device)
        except CheckpointError as exc:  # truncated, not a torch file, objects weights_only refuses
            raise CheckpointError(f"{exc}; {way_out}") from None
        if isinstance(state, dict) and state.get("config", self.config_key) != self.config_key:
            log.warning("%s: the checkpoint of a different config; starting afresh (it is replaced at the first "
                        "checkpoint)", path)
            return False
        why = self.unusable(state)
        if why is not None and why.startswith(FITS_NOT):  # the model's code changed since: start afresh
            log.warning("%s: cannot resume: %s; starting afresh (it is replaced at the first checkpoint)", path, why)
            return False
        if why is not None:
            raise CheckpointError(f"{path}: cannot resume: {why}; {way_out}")
        self.model.load_state_dict(state["model"])
        if self.ema:
            self.ema.model.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if state["rng_cuda"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
        self.step = int(state["step"])
        self.history, self.evals = list(state["history"]), list(state["evals"])
        log.info("resuming from %s at step %d", path, self.step)
        return True

    # -- steps ---------------------------------------------------------------------------------
    def train_step(self, batch: Any, loss_fn: Callable) -> tuple[float, float, dict]:
        lr = lr_at(self.step, self.cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16(self.cfg, self.device)):
            extra = {"ema": self.ema.model if self.ema else None} if _wants_ema(loss_fn) else {}
            loss, parts = loss_fn(self.model, _to_device(batch, self.device), self.step, **extra)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step}; lower train.lr or check the data")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.grad_clip if self.cfg.grad_clip else float("inf")
        grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.opt.step()
        if self.ema:
            self.ema.update(self.model)
        self.step += 1
        return float(loss.detach()), grad_norm, {"lr": lr, **parts}

    def evaluate(self, evaluate: Callable) -> dict:
        self.eval_model.eval()
        with torch.no_grad():
            out = dict(evaluate(self.eval_model, self.step))
        images = out.pop("images", None)
        row = {"step": self.step, **out}
        self.evals.append(row)
        log.info("step %d: %s", self.step, ", ".join(f"{k} {_fmt(v)}" for k, v in out.items()))
        if self.run is not None:
            self.run.log_metrics({f"val/{k}": v for k, v in out.items()}, step=self.step)
            if images is not None:
                self.run.log_image(images, f"reconstructions/step_{self.step:06d}.png")
        return row

    def log_row(self, losses: list[float], grad_norms: list[float], parts: list[dict]) -> None:
        row = {"step": self.step, "loss": float(np.mean(losses)), "grad_norm": float(np.mean(grad_norms))}
        for k in parts[-1]:
            row[k] = float(np.mean([p[k] for p in parts if k in p]))
        self.history.append(row)
        if self.run is not None:
            self.run.log_metrics({f"train/{k}": v for k, v in row.items() if k != "step"}, step=self.step)


def train(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any, int], tuple[torch.Tensor, dict]],
    batches: Batches,
    cfg: TrainConfig,
    ckpt_dir: Path | str,
    *,
    evaluate: Callable[[nn.Module, int], dict] | None = None,
    config: Any = None,
    run: Any = None,
    stop_after: int | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` steps, resuming from its checkpoint under ``ckpt_dir``.

    ``ckpt_dir`` is the stage's base directory (``pipeline.paths.checkpoint_dir``); the run's state
    lives in ``run_dir(ckpt_dir, cfg, config)``, so runs of other configs under the same base are
    left alone. A checkpoint there that cannot be resumed is logged as a warning naming the file
    and the run starts afresh (see the module docstring). ``clear_checkpoint(ckpt_dir)`` removes the
    state once the caller has written its outputs.

    - ``loss_fn(model, batch, step) -> (loss, parts)``: ``parts`` are floats logged with the loss.
      A loss function with an ``ema`` parameter also gets the EMA model (None when EMA is off),
      e.g. as the teacher of shortcut-forcing bootstrap targets.
    - ``batches(start_step)``: the batches of steps ``start_step ..`` in order (``step_batches``).
    - ``evaluate(model, step) -> dict``: scalar metrics, plus optionally ``images`` (an
      (H, W, 3) uint8 grid logged to MLflow); run every ``eval_every`` steps and at the end.
    - ``config``: JSON-able description of the run (model, data); a checkpoint resumes only a run
      with the same ``config`` and ``cfg``.
    - ``run``: a ``StageRun`` (MLflow) or None.
    - ``stop_after``: stop after this many steps of this session without saving (as if killed);
      for tests of resumption.

    The caller seeds and builds the model (``torch.manual_seed(cfg.seed)`` first) so that a fresh
    run is reproducible; the resumed run restores the RNG state of its checkpoint.
    """
    trainer = Trainer(model, cfg, Path(ckpt_dir), config, run)
    resumed = trainer.try_resume()
    start = trainer.step
    if not resumed:
        torch.manual_seed(cfg.seed)
    losses: list[float] = []
    grad_norms: list[float] = []
    parts: list[dict] = []
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True)
    stopped = False
    iterator: Iterator = iter(batches(start)) if start < cfg.steps else iter(())
    try:
        while trainer.step < cfg.steps:
            if stop_after is not None and trainer.step - start >= stop_after:
                stopped = True
                break
            loss, gn, p = trainer.train_step(next(iterator), loss_fn)
            losses.append(loss)
            grad_norms.append(gn)
            parts.append(p)
            bar.update(1)
            step = trainer.step
            if step % cfg.log_every == 0 or step == cfg.steps:
                trainer.log_row(losses, grad_norms, parts)
                bar.set_postfix(loss=f"{np.mean(losses):.4g}", lr=f"{p['lr']:.2e}")
                losses, grad_norms, parts = [], [], []
            if evaluate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                trainer.evaluate(evaluate)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                trainer.save()
    finally:
        bar.close()
    if evaluate is not None and not stopped and (not trainer.evals or trainer.evals[-1]["step"] != trainer.step):
        trainer.evaluate(evaluate)  # a run resumed at its final step still reports
    if not stopped:
        _RUN_DIRS.setdefault(trainer.base_dir.resolve(), set()).add(trainer.ckpt_dir.resolve())
    out = trainer.eval_model.eval()
    return TrainResult(out, trainer.step, trainer.history, trainer.evals, start, stopped, trainer.ckpt_dir)


def clear_checkpoint(ckpt_dir: Path | str) -> None:
    """Remove the state of the runs this process completed under the base ``ckpt_dir`` (call it
    after the run's final outputs are written), and ``ckpt_dir`` itself once it is empty.

    The state of other runs there (other configs, perhaps running now in another experiment, or
    killed and waiting to be resumed, or stopped early in this process) is kept. ``ckpt_dir`` may
    also be a run's own directory (``TrainResult.ckpt_dir``); a checkpoint of the old flat layout
    (``ckpt_dir/state.pt``) is removed.
    """
    base = Path(ckpt_dir).resolve()
    for d in _RUN_DIRS.pop(base, set()):
        shutil.rmtree(d, ignore_errors=True)
    if (base / STATE).exists() or (base / STATE_JSON).exists():  # a run directory, or the old layout
        for name in (STATE, STATE_JSON):
            (base / name).unlink(missing_ok=True)
        for runs in _RUN_DIRS.values():
            runs.discard(base)
    try:
        base.rmdir()  # only when empty
    except OSError:
        pass

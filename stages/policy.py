"""Stage ``policy`` (foreach dataset): an MDLM policy over discrete action sequences, and imagination.

The policy (``models/policy.py``) is masked discrete diffusion (MDLM) over the next ``horizon``
discrete actions, conditioned on the latent state: the latents of the current frame and of the
``state_frames - 1`` frames before it. Discrete actions: gameplay's ``action_class`` (none, left,
right, up, down); Moving MNIST's continuous ``[dx, dy]`` through an ``ActionDiscretizer`` (direction
and speed bins, or a k-means codebook) fitted on the training actions and saved with the model.

Training pairs (state, next H actions) are windows of ``state_frames + horizon`` frames of
``latents.zarr`` and ``actions.zarr`` inside episodes, through the shared reader and training loop;
the held-out episodes are the tokenizer's. In the same metrics table, two baselines: the marginal
action frequencies and a state-conditioned one-step classifier (an MLP, repeated over the horizon).

Imagination: from held-out real context frames, the policy samples H actions, the dynamics model
(``data/<ds>/dynamics``) rolls the frames out under them, the tokenizer decodes them, and the data's
own ego-centric extractor (``pipeline/ego.py``: camera motion for gameplay, the tracked digit for
MNIST, discretised the same way) labels the imagined transitions. ``action_fidelity`` is the
agreement of the chosen and the recovered actions; ``action_fidelity_shuffled`` the same against
the chosen actions shuffled across sequences. A few imagined episodes are saved as GIFs (real
context frames, then imagined frames framed in red) in ``reports/policy-<ds>/`` and in MLflow.
"""
from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator

from models.policy import (
    ActionDiscretizer,
    DiscretizerConfig,
    curriculum_t_max,
    marginal_frequencies,
    mask_actions,
    mlp_policy_loss,
    nelbo,
    sample_ancestral,
    sample_maskgit,
    sequence_metrics,
    training_loss,
)
from pipeline.atomic import atomic_path, write_json
from pipeline.checkpoint import read_meta, save_model
from pipeline.cli import run_stage
from pipeline.config import ParamsError, StrictModel, load_section
from pipeline.ego import (
    GameplayActionsConfig,
    MnistActionsConfig,
    camera_motion,
    digit_motion,
    resolve_tile_px,
)
from pipeline.evaluation import held_out_split, store_fingerprint
from pipeline.paths import (
    ACTION_CLASS_KEY,
    ACTIONS_KEY,
    DATASETS,
    LATENTS_KEY,
    VALID_KEY,
    actions_store,
    checkpoint_dir,
    dynamics_dir,
    frames_store,
    latents_store,
    metrics_path,
    policy_dir,
    tokenizer_dir,
)
from pipeline.reader import LoaderConfig, WindowDataset, window_index
from pipeline.store import EpisodeStore
from pipeline.tracking import stage_run
from pipeline.train import (
    TrainConfig,
    clear_checkpoint,
    resolve_device,
    step_batches,
    train,
)
from pipeline.world import World, flow_grid

log = logging.getLogger(__name__)

RUN_FACTS = ("train_seconds", "steps_per_s", "resumed_from_step", "eval_seconds", "mlp_train_seconds")


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
    hidden: int = Field(256, gt=0)
    layers: int = Field(2, gt=0)
    token_dim: int = Field(4, gt=0)
    train: TrainConfig = TrainConfig(steps=300, batch_size=64, lr=1e-3, warmup_steps=20, eval_every=1000,
                                     ckpt_every=100)


class EvalParams(StrictModel):
    max_windows: int = Field(512, gt=0, description="held-out (state, actions) pairs measured")
    mask_levels: list[float] = Field([0.1, 0.3, 0.5, 0.7, 0.9], description="masked accuracy and NLL at these t")
    nelbo_points: int = Field(16, gt=0, description="t points of the NELBO estimate")
    batch_size: int = Field(128, gt=0)
    seed: int = Field(0, ge=0)


class ImaginationParams(StrictModel):
    sequences: int = Field(32, ge=2, description="held-out starts imagined from")
    gifs: int = Field(4, ge=0, description="imagined episodes saved as GIFs")
    batch_size: int = Field(32, gt=0)


class Config(StrictModel):
    """One dataset's block of the ``policy`` section of params.yaml."""

    state_frames: int = Field(3, gt=0, description="latent frames in the state: the current one and those before it")
    horizon: int = Field(8, gt=0, description="H future discrete actions")
    stride: int = Field(1, gt=0, description="frames between training windows")
    discretizer: DiscretizerParams = DiscretizerParams()
    model: ModelParams = ModelParams()
    loss: LossParams = LossParams()
    sample: SampleParams = SampleParams()
    mlp: MlpParams = MlpParams()
    train: TrainConfig = TrainConfig(steps=400, batch_size=64, lr=1e-3, warmup_steps=20, eval_every=1000,
                                     ckpt_every=100, ema_decay=0.99)
    eval: EvalParams = EvalParams()
    imagination: ImaginationParams = ImaginationParams()

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if any(not 0 < t < 1 for t in self.eval.mask_levels):
            raise ValueError(f"eval.mask_levels must lie in (0, 1), got {self.eval.mask_levels}")
        if self.model.past_actions > self.state_frames - 1:
            raise ValueError(f"model.past_actions ({self.model.past_actions}) must be at most state_frames - 1 "
                             f"({self.state_frames - 1}): the moves between the state's frames")
        return self

    @property
    def window(self) -> int:
        """Frames of one training pair: the state frames and the frames the H actions lead to."""
        return self.state_frames + self.horizon


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


def fit_coder(cfg: Config, act: EpisodeStore, train_ids: np.ndarray) -> ActionCoder:
    if ACTION_CLASS_KEY in act.keys:
        return ActionCoder(True, None)
    valid = act.array(VALID_KEY)[:]
    keep = valid & act.frames_of(train_ids)
    disc = ActionDiscretizer(DiscretizerConfig(**cfg.discretizer.model_dump())).fit(act.array(ACTIONS_KEY)[:][keep])
    return ActionCoder(False, disc)


def state_layout(latents: torch.Tensor, kind: str) -> torch.Tensor:
    """Stored latents (B, K, ...) as the policy's state: token ids, or float grids (MAE tokens on a grid)."""
    if kind == "tokens":
        return latents.long()
    z = latents.float()
    if z.ndim == 4:
        h, w, c = flow_grid(z.shape[2:])
        z = z.reshape(*z.shape[:2], h, w, c)
    return z


def split_batch(batch: dict, cfg: Config, coder: ActionCoder,
                kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(state (B, state_frames, ...), action ids (B, H), past action ids (B, P) or None) of a
    window batch."""
    s, h = cfg.state_frames, cfg.horizon
    state = state_layout(batch[LATENTS_KEY][:, :s], kind)
    sl = slice(s - 1, s - 1 + h)  # actions[t]: the move from frame t; t = s-1 is the current frame
    ids = coder.ids(batch[ACTIONS_KEY][:, sl], batch[ACTION_CLASS_KEY][:, sl] if coder.discrete else None)
    return state, ids, past_ids(batch[ACTIONS_KEY], batch.get(ACTION_CLASS_KEY), s - 1, cfg, coder)


def past_ids(actions, action_class, now: int, cfg: Config, coder: ActionCoder) -> torch.Tensor | None:
    """The ids (B, P) of the P = ``model.past_actions`` moves that led to frame ``now`` of
    per-transition ``actions`` (B, T, ...) / ``action_class`` (B, T); None when P = 0."""
    p = cfg.model.past_actions
    if p == 0:
        return None
    sl = slice(now - p, now)
    ids = coder.ids(actions[:, sl], action_class[:, sl] if coder.discrete else None)
    return torch.as_tensor(ids).long().clamp(min=0)


# -- metrics -------------------------------------------------------------------------------------


@torch.no_grad()
def policy_metrics(model, mlp, coder: ActionCoder, cfg: Config, state: torch.Tensor, ids: torch.Tensor,
                   train_ids_flat: torch.Tensor, past: torch.Tensor | None = None) -> dict:
    """Held-out metrics of the policy beside the marginal and the MLP baselines."""
    gen = torch.Generator(device=state.device).manual_seed(cfg.eval.seed)
    bs = cfg.eval.batch_size
    n_act, mask_id = coder.n_actions, model.mask_id
    out: dict = {}
    nll, first_logits, samples, mlp_logits = [], [], [], []
    per_level: dict[float, list] = {t: [] for t in cfg.eval.mask_levels}
    for i in range(0, len(ids), bs):
        st, a = state[i : i + bs], ids[i : i + bs]
        pa = None if past is None else past[i : i + bs]
        nll.append(nelbo(model, a, st, schedule=cfg.loss.schedule, n_t=cfg.eval.nelbo_points, generator=gen, past=pa))
        all_masked = torch.full_like(a, mask_id)
        first_logits.append(model(all_masked, st, past=pa)[:, 0])
        samples.append(sample(model, st, cfg, gen, temperature=0.0, past=pa))
        mlp_logits.append(mlp.sequence_logits(st, cfg.horizon, pa))
        for t in cfg.eval.mask_levels:
            tt = torch.full((len(a),), t)
            z, masked = mask_actions(a, tt, mask_id, cfg.loss.schedule, True, gen)
            logits = model(z, st, past=pa).float().log_softmax(-1)
            ce = -logits.gather(-1, a[..., None]).squeeze(-1)
            per_level[t].append((ce[masked], (logits.argmax(-1) == a)[masked]))
    out["nll"] = float(torch.cat(nll).mean())
    first = torch.cat(first_logits).argmax(-1)
    out["first_action_acc"] = float((first == ids[:, 0]).float().mean())
    samples = torch.cat(samples)
    out["seq_exact_match"] = float((samples == ids).all(-1).float().mean())
    out["sample_action_acc"] = float((samples == ids).float().mean())
    for t, parts in per_level.items():
        key = f"t{int(round(t * 100)):02d}"
        out[f"masked_nll_{key}"] = float(torch.cat([p[0] for p in parts]).mean())
        out[f"masked_acc_{key}"] = float(torch.cat([p[1] for p in parts]).float().mean())
    # baselines
    p = marginal_frequencies(train_ids_flat, n_act)
    marg = sequence_metrics(p.log().expand(*ids.shape, n_act), ids)
    mode = int(p.argmax())
    out.update(nll_marginal=marg["nll"], first_action_acc_marginal=marg["first_action_acc"],
               seq_exact_match_marginal=float((ids == mode).all(-1).float().mean()))
    mlp_l = torch.cat(mlp_logits)
    m = sequence_metrics(mlp_l, ids)
    out.update(nll_mlp=m["nll"], first_action_acc_mlp=m["first_action_acc"],
               seq_exact_match_mlp=float((mlp_l.argmax(-1) == ids).all(-1).float().mean()))
    out["nll_gain_vs_marginal"] = out["nll_marginal"] - out["nll"]
    out["nll_gain_vs_mlp"] = out["nll_mlp"] - out["nll"]
    return out


def sample(model, state: torch.Tensor, cfg: Config, gen: torch.Generator, temperature: float | None = None,
           past: torch.Tensor | None = None):
    s = cfg.sample
    temp = s.temperature if temperature is None else temperature
    if s.sampler == "ancestral":
        return sample_ancestral(model, state, s.steps, schedule=cfg.loss.schedule, temperature=temp,
                                top_k=s.top_k, generator=gen, past=past)
    return sample_maskgit(model, state, s.steps, temperature=temp, top_k=s.top_k, generator=gen, past=past)


# -- imagination ---------------------------------------------------------------------------------


def imagination(model, coder: ActionCoder, cfg: Config, world: World, lat: EpisodeStore, act: EpisodeStore,
                frames: EpisodeStore, val_ids: np.ndarray, extractor, kind: str) -> tuple[dict, list[np.ndarray]]:
    """The policy acts inside the world model from held-out real context frames; the data's own
    extractor labels the imagined transitions. Returns the metrics and the imagined clips
    (context decoded from the real latents, then the imagined frames)."""
    c, h = int(world.meta["context_frames"]), cfg.horizon
    if c < cfg.state_frames:
        raise ParamsError(f"policy.state_frames ({cfg.state_frames}) exceeds the dynamics context ({c} frames)")
    rows = window_index(lat.episode_ends, val_ids, c + h, c + h)
    if len(rows) < 2:
        raise ValueError(f"{lat.path}: fewer than 2 held-out windows of {c + h} frames for imagination")
    rows = rows[np.linspace(0, len(rows) - 1, min(len(rows), cfg.imagination.sequences)).round().astype(int)]
    rows = np.unique(rows, axis=0)
    gen = torch.Generator().manual_seed(cfg.eval.seed + 1)
    chosen, recovered, clips = [], [], []
    la, aa = lat.array(LATENTS_KEY), act.array(ACTIONS_KEY)
    va = act.array(VALID_KEY)
    ca = act.array(ACTION_CLASS_KEY) if coder.discrete else None
    for s in range(0, len(rows), cfg.imagination.batch_size):
        part = rows[s : s + cfg.imagination.batch_size]
        latents = np.stack([la[int(a) : int(b)] for a, b in part])
        acts = np.stack([aa[int(a) : int(b)] for a, b in part])
        valid = np.stack([va[int(a) : int(b)] for a, b in part])
        state = state_layout(torch.from_numpy(latents[:, c - cfg.state_frames : c]), kind)
        classes = np.stack([ca[int(a) : int(b)] for a, b in part]).astype(np.int64) if coder.discrete else None
        past = past_ids(acts, classes, c - 1, cfg, coder)
        with torch.no_grad():
            ids = sample(model, state, cfg, gen, past=past)                       # (B, H) chosen
        # the context's real actions, then the chosen ones from the last context frame on
        if coder.discrete:
            cond = torch.from_numpy(classes).clamp(min=0)
        else:
            cond = torch.from_numpy(acts).float()
        cond = cond.clone()
        cond[:, c - 1 : c - 1 + h] = coder.dynamics_input(ids)
        val = torch.from_numpy(valid).clone()
        val[:, c - 1 : c - 1 + h] = True
        context = world.latents(latents[:, :c])
        with torch.no_grad():
            z = world.rollout(context, cond.to(world.device), val.to(world.device), h, generator=gen)
        clip = world.decode(torch.cat([context, z], dim=1))                       # (B, C + H, H, W, C)
        rec = extractor(clip[:, c - 1 :], part, c)                                # (B, H)
        chosen.append(ids.numpy())
        recovered.append(np.asarray(rec))
        clips.extend(clip)
    chosen_a, recovered_a = np.concatenate(chosen), np.concatenate(recovered)
    perm = _derangement(len(chosen_a), np.random.default_rng(cfg.eval.seed))
    metrics = {
        "action_fidelity": float((chosen_a == recovered_a).mean()),
        "action_fidelity_shuffled": float((chosen_a[perm] == recovered_a).mean()),
        "action_fidelity_first": float((chosen_a[:, 0] == recovered_a[:, 0]).mean()),
        "imagined_sequences": int(len(chosen_a)),
        "imagined_action_counts": np.bincount(chosen_a.reshape(-1), minlength=coder.n_actions).tolist(),
        "recovered_action_counts": np.bincount(recovered_a.reshape(-1), minlength=coder.n_actions).tolist(),
    }
    metrics["action_fidelity_gap"] = metrics["action_fidelity"] - metrics["action_fidelity_shuffled"]
    return metrics, clips


def check_imagination(cfg: Config, world: World, where: str) -> None:
    """Refuse, before any training, params that imagination inside ``world`` cannot run with."""
    c = int(world.meta["context_frames"])
    if c < cfg.state_frames:
        raise ParamsError(f"{where}.state_frames ({cfg.state_frames}) exceeds the dynamics context ({c} frames)")
    max_frames = int(world.dynamics.cfg.max_frames)
    if world.family == "masked" and c + cfg.horizon > max_frames:
        raise ParamsError(f"{where}.horizon ({cfg.horizon}) + the dynamics context ({c} frames) exceed the masked "
                          f"world model's max_frames {max_frames}; shorten the horizon or retrain the dynamics "
                          f"model with a longer window")


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


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


def save_gifs(clips: list[np.ndarray], c: int, out_dir: Path, n: int, scale: int = 3) -> list[Path]:
    """GIFs of the first ``n`` clips: real context frames, then imagined frames framed in red."""
    paths = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for i, clip in enumerate(clips[:n]):
            images = []
            for t, frame in enumerate(clip):
                rgb = np.repeat(frame, 3, axis=-1) if frame.shape[-1] == 1 else frame
                img = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
                img = np.kron(img, np.ones((scale, scale, 1), np.uint8))
                if t >= c:
                    img[:2], img[-2:], img[:, :2], img[:, -2:] = (220, 30, 30), (220, 30, 30), (220, 30, 30), (220, 30, 30)
                images.append(Image.fromarray(img))
            buf = io.BytesIO()
            images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=200, loop=0)
            (tmp / f"imagined_{i:02d}.gif").write_bytes(buf.getvalue())
            paths.append(out_dir / f"imagined_{i:02d}.gif")
    return paths


# -- the stage -----------------------------------------------------------------------------------


def run(cfg: Config, item: str, paths: dict[str, Path], out_dir: Path | str, gif_dir: Path | str,
        work_dir: Path | str, *, where: str = "policy", extractor_cfg: StrictModel | None = None,
        loader: LoaderConfig | None = None, tracker=None) -> dict:
    tok_meta = read_meta(paths["tokenizer"], "tokenizer")
    lat, act, frames = (EpisodeStore.open(paths[k]) for k in ("latents", "actions", "frames"))
    train_ids, val_ids = held_out_split(lat.n_episodes, tok_meta["val_episodes"], str(paths["tokenizer"]))
    device = resolve_device(cfg.train.device)
    world = World.load(paths["dynamics"], paths["tokenizer"], device)
    check_imagination(cfg, world, where)
    if item == "gameplay":  # the extractor's params checked before any work
        try:
            gameplay_cfg = resolve_tile_px(extractor_cfg or GameplayActionsConfig(), frames.attrs, "actions.gameplay",
                                           str(frames.path))
        except ValueError as exc:
            raise ParamsError(str(exc)) from None
    coder = fit_coder(cfg, act, train_ids)
    kind = "tokens" if tok_meta["kind"] == "quantize" else "continuous"
    state_shape = list(tok_meta["latent_shape"]) if kind == "tokens" else list(flow_grid(tok_meta["latent_shape"]))
    from models import registry

    model_cfg = {"n_actions": coder.n_actions, "horizon": cfg.horizon, "state_frames": cfg.state_frames,
                 "state_kind": kind, "state_shape": state_shape,
                 "state_vocab": tok_meta["config"].get("levels", 16) + 1, **cfg.model.model_dump()}
    mlp_cfg = {"n_actions": coder.n_actions, "state_frames": cfg.state_frames, "state_kind": kind,
               "state_shape": state_shape, "state_vocab": model_cfg["state_vocab"],
               "past_actions": cfg.model.past_actions, **cfg.mlp.model_dump(exclude={"train"})}
    try:
        torch.manual_seed(cfg.train.seed)
        model = registry.build("policy", "mdlm", model_cfg).to(device)
        mlp = registry.build("policy", "mlp", mlp_cfg).to(device)
    except ValueError as exc:
        raise ParamsError(f"{where}.model: {exc} (state latents {state_shape})") from None

    src = {LATENTS_KEY: (lat.path, LATENTS_KEY), ACTIONS_KEY: (act.path, ACTIONS_KEY), VALID_KEY: (act.path, VALID_KEY)}
    if coder.discrete:
        src[ACTION_CLASS_KEY] = (act.path, ACTION_CLASS_KEY)
    dataset = WindowDataset(src, cfg.window, cfg.stride, train_ids, loader)
    data_key = store_fingerprint(lat, [LATENTS_KEY]) + store_fingerprint(act, act.keys)
    steps = cfg.train.steps
    start = cfg.loss.curriculum_start

    def loss_fn(m, batch, step):
        state, ids, past = split_batch(batch, cfg, coder, kind)
        t_max = curriculum_t_max(step, steps, start) if start < 1 else 1.0
        loss, parts = training_loss(m, ids, state, schedule=cfg.loss.schedule, weighting=cfg.loss.weighting,
                                    t_range=(1e-3, t_max), past=past)
        return loss, {k: float(v) for k, v in parts.items() if k != "loss"}

    t0 = time.perf_counter()
    result = train(model, loss_fn, step_batches(dataset, cfg.train, loader), cfg.train, Path(work_dir) / "mdlm",
                   config={"params": cfg.model_dump(mode="json"), "data": data_key}, run=tracker, desc="policy mdlm")
    train_seconds = time.perf_counter() - t0

    def mlp_loss(m, batch, step):
        state, ids, past = split_batch(batch, cfg, coder, kind)
        loss, parts = mlp_policy_loss(m, ids, state, positions="all", past=past)
        return loss, {"accuracy": float(parts["accuracy"])}

    t1 = time.perf_counter()
    mlp_result = train(mlp, mlp_loss, step_batches(dataset, cfg.mlp.train, loader), cfg.mlp.train,
                       Path(work_dir) / "mlp", config={"params": cfg.model_dump(mode="json"), "data": data_key},
                       desc="policy mlp baseline")
    mlp_seconds = time.perf_counter() - t1
    model, mlp = result.model.eval(), mlp_result.model.eval()

    # held-out pairs
    t2 = time.perf_counter()
    held = WindowDataset(src, cfg.window, 1, val_ids, LoaderConfig(num_workers=0))
    pick = np.linspace(0, len(held) - 1, min(len(held), cfg.eval.max_windows)).round().astype(int)
    batch = {k: torch.from_numpy(np.stack([held[int(i)][k] for i in pick])) for k in src}
    state, ids, past = split_batch(batch, cfg, coder, kind)
    train_batch_ids = _train_action_ids(act, train_ids, coder)
    metrics = policy_metrics(model, mlp, coder, cfg, state, ids, torch.from_numpy(train_batch_ids), past)

    if item == "gameplay":
        extractor = gameplay_extractor(gameplay_cfg)
    else:
        extractor = mnist_extractor(extractor_cfg or MnistActionsConfig(), frames, coder,
                                    int(frames.attrs.get("digit_size", 28)))
    imag, clips = imagination(model, coder, cfg, world, lat, act, frames, val_ids, extractor, kind)
    metrics.update(imag)
    c = int(world.meta["context_frames"])
    gifs = save_gifs(clips, c, Path(gif_dir), cfg.imagination.gifs)
    metrics.update(
        n_actions=coder.n_actions, eval_pairs=int(len(ids)), train_episodes=int(len(train_ids)),
        val_episodes=int(len(val_ids)), train_steps=result.step, train_seconds=train_seconds,
        steps_per_s=(result.step - result.resumed_from) / max(train_seconds, 1e-9),
        mlp_train_seconds=mlp_seconds, eval_seconds=time.perf_counter() - t2,
        n_params=int(sum(p.numel() for p in model.parameters())),
    )
    if result.resumed_from:
        metrics["resumed_from_step"] = result.resumed_from
    log.info("%s: nll %.3f (marginal %.3f, mlp %.3f), first action acc %.3f (marginal %.3f, mlp %.3f), "
             "action fidelity %.3f (shuffled %.3f)", where, metrics["nll"], metrics["nll_marginal"],
             metrics["nll_mlp"], metrics["first_action_acc"], metrics["first_action_acc_marginal"],
             metrics["first_action_acc_mlp"], metrics["action_fidelity"], metrics["action_fidelity_shuffled"])
    if tracker is not None:
        for g in gifs:
            tracker.log_artifact(g, "imagination")
    meta = {"coder": coder.state_dict(), "state_frames": cfg.state_frames, "horizon": cfg.horizon,
            "state_kind": kind, "tokenizer_kind": tok_meta["kind"], "val_episodes": val_ids.tolist(),
            "sample": cfg.sample.model_dump(), "schedule": cfg.loss.schedule,
            "metrics": {k: v for k, v in metrics.items() if k not in RUN_FACTS}}
    save_model(model, "policy", "mdlm", meta, Path(out_dir))
    clear_checkpoint(Path(work_dir) / "mdlm")
    clear_checkpoint(Path(work_dir) / "mlp")
    return metrics


def _train_action_ids(act: EpisodeStore, train_ids: np.ndarray, coder: ActionCoder) -> np.ndarray:
    """Every valid training transition's action id (the marginal baseline's data)."""
    keep = act.array(VALID_KEY)[:] & act.frames_of(train_ids)
    if coder.discrete:
        return act.array(ACTION_CLASS_KEY)[:][keep].astype(np.int64)
    return coder.ids(act.array(ACTIONS_KEY)[:][keep])


def main(item: str) -> None:
    cfg = load_section("policy", Config, item=item)
    extractor_cfg = load_section("actions", GameplayActionsConfig if item == "gameplay" else MnistActionsConfig,
                                 item=item)
    loader = load_section("loader", LoaderConfig)
    paths = {"latents": latents_store(item), "actions": actions_store(item), "frames": frames_store(item),
             "tokenizer": tokenizer_dir(item), "dynamics": dynamics_dir(item)}
    with stage_run("policy", item, cfg) as r:
        metrics = run(cfg, item, paths, policy_dir(item), Path("reports") / f"policy-{item}",
                      checkpoint_dir("policy", item), where=f"policy.{item}", extractor_cfg=extractor_cfg,
                      loader=loader, tracker=r)
        write_json(metrics_path("policy", item), metrics)
        r.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, list)})


if __name__ == "__main__":
    run_stage(main, foreach=DATASETS)

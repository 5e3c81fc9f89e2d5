"""World-model evaluation: held-out rollouts scored per horizon against honest baselines.

The ``evaluate`` stage (``stages/evaluate.py``) calls this on the test (and validation) windows of
the held-out episodes; ``bench/`` may time it. Every number is measured in frame space, through the
tokenizer's decoder, on exactly the frames and horizon the model is scored on:

- **Windows**: ``context_frames + horizon`` frames of held-out episodes, ``stride`` apart inside
  an episode, at most ``max_windows`` per split, evenly picked (``eval_windows``).
- **Variants** rolled out from the same context latents (``VARIANTS``): the model's own decode
  (``model``: flow at its own K, the posterior mean at K = 1; masked its configured decode), the
  sampled decode (``sample``: flow at ``sample_steps`` shortcut steps; masked ``maskgit``), the
  masked family's other decode (``expected`` / ``maskgit``), the model under **deranged** actions
  (each window takes the actions of another window, ``derangement``: Genie's shuffled control and
  the interventional action control in one), and the **prior only**: the same model with its
  network untrained (the weights it started training from), so that what the hand-built prior
  (camera warp, ego copy, copy-last residual) gives is told apart from what was learned.
- **Baselines** that need no rollout: copying the last true context frame (``copy_last``), copying
  its tokenizer reconstruction (``copy_last_recon``: the same decode path as the model), the mean
  training frame (``mean_frame``), the tokenizer's reconstruction of the true frames
  (``tokenizer``: the ceiling of any model on these latents).
- **Scores** per window and horizon (``frame_scores``): MSE per pixel, MSE summed over a frame
  (OpenSTL's convention), PSNR per frame capped at ``psnr_cap`` dB (a still frame copied exactly
  would otherwise give 100 dB or infinity and swamp the mean), SSIM (torchmetrics, Gaussian 11x11,
  sigma 1.5), and the mean squared spatial gradient of the prediction (``sharpness``: over that of
  the true frames, aggregated as a ratio of sums: 1 is right, blur below, streaks and noise above).
- **Action fidelity** per horizon: the actions stage's own extractor on consecutive frames (the
  last decoded context frame, then the predicted ones) against the actions given to the model
  (the data's, or the deranged ones), over valid transitions, and over moves only; the same
  extractor on the true frames gives the ceiling (``truth``).

``summarize`` turns the per-window arrays of one split into metrics and per-horizon rows, with
per-episode bootstrap intervals (``pipeline.evaluation.episode_resamples``).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from pipeline.config import StrictModel
from pipeline.evaluation import derangement, episode_resamples, interval, resampled_sums
from pipeline.paths import ACTION_CLASS_KEY, ACTIONS_KEY, FRAMES_KEY, LATENTS_KEY, VALID_KEY
from pipeline.policy import EvalParams as PolicyEvalParams
from pipeline.reader import window_index
from pipeline.store import EpisodeStore
from pipeline.world import World

log = logging.getLogger(__name__)

# Extractor: (clips (B, 1 + H, h, w, c) float in [0, 1], store rows (B, 2), context frames) -> ids (B, H)
Extractor = Callable[[np.ndarray, np.ndarray, int], np.ndarray]
# Labeller: (actions (B, T, 2), action_class (B, T) or None) -> ids (B, T)
Labeller = Callable[[np.ndarray, np.ndarray | None], np.ndarray]


# -- params --------------------------------------------------------------------------------------


class SweepParams(StrictModel):
    """Flow only: quality and time at K = 1, 2, 4, ..., k_max shortcut steps per frame."""

    horizon: int = Field(8, gt=0, description="predicted frames of each test window in the sweep (the first ones)")
    rounds: int = Field(1, gt=0, description="timed rounds, interleaved over K (median seconds per frame)")


class MediaParams(StrictModel):
    windows: int = Field(4, ge=0, description="test windows shown as side-by-side videos and in the contact sheet")
    scale: int = Field(3, gt=0, description="enlargement (nearest neighbour)")
    fps: float = Field(4.0, gt=0)
    contact_horizons: list[int] = Field([1, 2, 4, 8, 16, 32, 64], description="contact sheet columns (those <= horizon)")
    imagined: int = Field(4, ge=0, description="the policy's imagined episodes written as GIFs")


class Config(StrictModel):
    """One dataset's block of the ``evaluate`` section of params.yaml."""

    context_frames: int = Field(10, gt=0, description="C true frames each rollout starts from")
    horizon: int = Field(10, gt=0, description="frames predicted after the context")
    stride: int | None = Field(None, gt=0, description="frames between the windows of an episode (null: "
                               "non-overlapping windows)")
    max_windows: int = Field(64, gt=0, description="held-out windows per split (validation, test), evenly picked")
    test_fraction: float = Field(0.5, gt=0, lt=1, description="share of the held-out episodes that are test "
                                 "episodes (reported); the others validate (choosing)")
    split_seed: int = Field(0, ge=0)
    batch_size: int = Field(32, gt=0, description="windows rolled out at once")
    sample_steps: int = Field(4, gt=0, description="flow: shortcut steps of the sampled decode")
    psnr_cap: float = Field(60.0, gt=0, description="dB: per-frame PSNR is capped here before averaging")
    bootstrap: int = Field(1000, gt=0, description="per-episode bootstrap resamples of the 95 % intervals")
    sweep: SweepParams | None = Field(None, description="flow only: the sampling-steps sweep (null: none)")
    speed_frames: int = Field(32, gt=0, description="frames imagined by one stream (batch 1) to time it")
    media: MediaParams = MediaParams()
    policy: PolicyEvalParams = PolicyEvalParams()
    lpips_net: Literal["alex", "vgg", "squeeze"] = Field("alex", description="LPIPS backbone, where LPIPS can run")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.sweep is not None and self.sweep.horizon > self.horizon:
            raise ValueError(f"sweep.horizon ({self.sweep.horizon}) exceeds horizon ({self.horizon})")
        return self

    @property
    def length(self) -> int:
        return self.context_frames + self.horizon


# -- windows -------------------------------------------------------------------------------------


def eval_windows(lat: EpisodeStore, episodes: np.ndarray, length: int, stride: int | None,
                 max_windows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows (N, 2) [start, end), episode (N,))`` of windows of ``length`` frames of ``episodes``,
    ``stride`` apart (None: ``length``), at most ``max_windows``, evenly picked."""
    rows = window_index(lat.episode_ends, episodes, length, stride or length)
    if len(rows) == 0:
        raise ValueError(f"{lat.path}: no window of {length} frames in episodes {list(map(int, episodes))[:8]}")
    if len(rows) > max_windows:
        rows = rows[np.linspace(0, len(rows) - 1, max_windows).round().astype(int)]
    episode = np.searchsorted(lat.episode_ends, rows[:, 0], side="right")
    return rows, episode


def load_windows(rows: np.ndarray, lat: EpisodeStore, act: EpisodeStore, frames: EpisodeStore) -> dict[str, np.ndarray]:
    """The windows' latents, actions, valid, action_class (when stored) and true frames."""
    out = {}
    sources = [(lat, LATENTS_KEY), (frames, FRAMES_KEY)] + [(act, k) for k in (ACTIONS_KEY, VALID_KEY, ACTION_CLASS_KEY)
                                                            if k in act.keys]
    for store, key in sources:
        arr = store.array(key)
        out[key] = np.stack([arr[int(a) : int(b)] for a, b in rows])
    return out


# -- scores --------------------------------------------------------------------------------------


def sq_gradient(x: np.ndarray) -> np.ndarray:
    """Mean squared spatial gradient (both axes, all channels) of frames (..., h, w, c): (...)."""
    x = np.asarray(x, dtype=np.float64)
    dy = np.diff(x, axis=-3) ** 2
    dx = np.diff(x, axis=-2) ** 2
    return dy.reshape(*x.shape[:-3], -1).mean(-1) + dx.reshape(*x.shape[:-3], -1).mean(-1)


def ssim_frames(pred: np.ndarray, target: np.ndarray, chunk: int = 256) -> np.ndarray:
    """SSIM (torchmetrics: Gaussian 11x11, sigma 1.5, data range 1) of each frame of (N, H, h, w, c): (N, H)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    n, hz = pred.shape[:2]
    p = torch.from_numpy(np.ascontiguousarray(pred, np.float32)).flatten(0, 1).movedim(-1, 1)
    t = torch.from_numpy(np.ascontiguousarray(target, np.float32)).flatten(0, 1).movedim(-1, 1)
    out = [structural_similarity_index_measure(p[i : i + chunk], t[i : i + chunk], data_range=1.0, reduction="none")
           for i in range(0, len(p), chunk)]  # in chunks: torchmetrics pads and stacks five copies of its input
    return torch.cat(out).double().reshape(n, hz).numpy()


def lpips_frames(lpips_fn, pred: np.ndarray, target: np.ndarray, device: torch.device) -> np.ndarray:
    """LPIPS of each frame of (N, H, h, w, c) in [0, 1]: (N, H)."""
    n, hz = pred.shape[:2]
    a = torch.from_numpy(np.ascontiguousarray(pred, np.float32)).flatten(0, 1).movedim(-1, 1).to(device)
    b = torch.from_numpy(np.ascontiguousarray(target, np.float32)).flatten(0, 1).movedim(-1, 1).to(device)
    with torch.no_grad():
        out = torch.cat([lpips_fn(a[i : i + 64], b[i : i + 64]) for i in range(0, len(a), 64)])
    return out.float().cpu().numpy().reshape(n, hz)


def frame_scores(pred: np.ndarray, target: np.ndarray, psnr_cap: float) -> dict[str, np.ndarray]:
    """Per window and horizon (N, H): ``mse`` (per pixel), ``mse_frame_sum`` (OpenSTL: summed over a
    frame's pixels), ``psnr`` (dB, data range 1, capped at ``psnr_cap``), ``ssim`` and ``grad`` (the
    prediction's mean squared spatial gradient) of predictions against targets (N, H, h, w, c) in [0, 1]."""
    if pred.shape != target.shape or pred.ndim != 5:
        raise ValueError(f"predictions {pred.shape} and targets {target.shape} must both be (N, H, h, w, c)")
    err = (pred.astype(np.float64) - target.astype(np.float64)) ** 2
    per_frame = err.reshape(*err.shape[:2], -1)
    mse = per_frame.mean(axis=2)
    with np.errstate(divide="ignore"):
        psnr = np.minimum(10 * np.log10(1.0 / np.maximum(mse, 1e-30)), psnr_cap)
    return {"mse": mse, "mse_frame_sum": per_frame.sum(axis=2), "psnr": psnr, "ssim": ssim_frames(pred, target),
            "grad": sq_gradient(pred)}


def agreement(recovered: np.ndarray, given: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(N, H) 1.0 where the recovered action is the given one, 0.0 where not, NaN where not valid."""
    return np.where(valid, (recovered == given).astype(np.float64), np.nan)


# -- rollouts ------------------------------------------------------------------------------------


def untrained_copy(world: World, seed: int) -> World:
    """The same world model with its network as it was before training (the same config, initialised
    under the training seed): what the hand-built prior alone predicts."""
    from models import registry

    torch.manual_seed(seed)
    net = registry.build("dynamics", world.meta["kind"], world.meta["config"]).to(world.device).eval()
    return World(net, world.meta, world.tokenizer, world.tok_meta, world.device)


def variants(world: World, cfg: Config) -> dict[str, dict]:
    """The rollouts of each window: name -> {world: "trained" | "prior", steps, decode, deranged}."""
    own: dict = {"world": "trained", "steps": None, "decode": None, "deranged": False}
    out = {"model": own, "shuffled_actions": {**own, "deranged": True}, "prior_only": {**own, "world": "prior"}}
    if world.family == "flow":
        if cfg.sample_steps != world.meta["sample"]["steps"]:
            out["sample"] = {**own, "steps": cfg.sample_steps}
    else:
        mine = world.meta["sample"].get("decode", "maskgit")
        other = "expected" if mine == "maskgit" else "maskgit"
        out[other] = {**own, "decode": other}
    return out


def aliases(world: World, cfg: Config) -> dict[str, str]:
    """Metric suffixes naming a variant by its role: ``sample`` (the sampled decode: flow at
    ``sample_steps``, masked ``maskgit``) and, for masked, the model's own decode by its name."""
    if world.family == "flow":
        return {"sample": "model" if cfg.sample_steps == world.meta["sample"]["steps"] else "sample"}
    own = world.meta["sample"].get("decode", "maskgit")
    return {"sample": "model" if own == "maskgit" else "maskgit", own: "model"}


def _conditioning(world: World, seqs: dict, idx: np.ndarray, source: np.ndarray):
    classes = seqs.get(ACTION_CLASS_KEY)
    return world.actions(seqs[ACTIONS_KEY][source], None if classes is None else classes[source],
                         seqs[VALID_KEY][source])


def score_windows(world: World, prior: World, seqs: dict[str, np.ndarray], cfg: Config, mean: np.ndarray,
                  extractor: Extractor, label: Labeller, rows: np.ndarray, keep: np.ndarray, lpips_fn=None
                  ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray], dict]:
    """Roll every window out under each variant and score it against each baseline.

    Returns ``(scores, kept, facts)``: ``scores[name][score]`` (N, H) arrays for every variant and
    baseline (``frame_scores`` plus ``fidelity``, ``fidelity_moves`` for rollouts; ``truth`` has
    ``grad`` and the extractor's ``fidelity``); ``kept``: the frames (len(keep), H, ...) of the
    windows ``keep`` for pictures (``truth``, ``context``, each variant, ``copy_last``); ``facts``:
    ``perm`` (the derangement), ``rollout_seconds_per_frame``. With ``lpips_fn`` (where LPIPS can
    run) the model's decodes and copy-last also get an ``lpips`` score."""
    c, h = cfg.context_frames, cfg.horizon
    n = len(seqs[LATENTS_KEY])
    perm = derangement(n, np.random.default_rng(cfg.seed))
    kinds = variants(world, cfg)
    worlds = {"trained": world, "prior": prior}
    gens = {name: torch.Generator(device=world.device).manual_seed(cfg.seed) for name in kinds}
    given = label(seqs[ACTIONS_KEY], seqs.get(ACTION_CLASS_KEY))[:, c - 1 : c - 1 + h]
    valid = seqs[VALID_KEY][:, c - 1 : c - 1 + h].astype(bool)
    moves = given != 0
    parts: dict[str, dict[str, list]] = {}
    kept: dict[str, list] = {}
    seconds = 0.0

    def add(name: str, scores: dict[str, np.ndarray]):
        for k, v in scores.items():
            parts.setdefault(name, {}).setdefault(k, []).append(v)

    for s in range(0, n, cfg.batch_size):
        idx = np.arange(s, min(n, s + cfg.batch_size))
        pick = np.isin(idx, keep)
        truth = seqs[FRAMES_KEY][idx].astype(np.float32) / 255
        target = truth[:, c:]
        context = world.latents(seqs[LATENTS_KEY][idx, :c])
        recon_all = world.decode(world.latents(seqs[LATENTS_KEY][idx]))
        last = recon_all[:, c - 1 : c]
        bases = {
            "copy_last": np.repeat(truth[:, c - 1 : c], h, axis=1),
            "copy_last_recon": np.repeat(last, h, axis=1),
            "mean_frame": np.broadcast_to(mean, target.shape),
            "tokenizer": recon_all[:, c:],
        }
        for name, pred in bases.items():
            scores = frame_scores(pred, target, cfg.psnr_cap)
            if lpips_fn is not None and name == "copy_last":
                scores["lpips"] = lpips_frames(lpips_fn, pred, target, world.device)
            add(name, scores)
        true_ids = extractor(truth[:, c - 1 :], rows[idx], c)
        add("truth", {"grad": sq_gradient(target), "fidelity": agreement(true_ids, given[idx], valid[idx])})
        if pick.any():
            kept.setdefault("truth", []).append(target[pick])
            kept.setdefault("context", []).append(truth[pick, :c])
            kept.setdefault("copy_last", []).append(bases["copy_last"][pick])
        for name, v in kinds.items():
            source = perm[idx] if v["deranged"] else idx
            acts, val = _conditioning(world, seqs, idx, source)
            t0 = time.perf_counter()
            z = worlds[v["world"]].rollout(context, acts, val, h, steps=v["steps"], generator=gens[name],
                                           decode=v["decode"])
            if name == "model":
                seconds += time.perf_counter() - t0
            pred = world.decode(z)
            scores = frame_scores(pred, target, cfg.psnr_cap)
            if lpips_fn is not None and not v["deranged"] and v["world"] == "trained":
                scores["lpips"] = lpips_frames(lpips_fn, pred, target, world.device)
            rec = extractor(np.concatenate([last, pred], axis=1), rows[idx], c)
            scores["fidelity"] = agreement(rec, given[source], valid[source])
            scores["fidelity_moves"] = agreement(rec, given[source], valid[source] & moves[source])
            add(name, scores)
            if pick.any():
                kept.setdefault(name, []).append(pred[pick])
    scores = {name: {k: np.concatenate(v) for k, v in p.items()} for name, p in parts.items()}
    frames = {k: np.concatenate(v) for k, v in kept.items()}
    return scores, frames, {"perm": perm, "rollout_seconds_per_frame": seconds / (n * h)}


# -- summaries -----------------------------------------------------------------------------------

# the variants and baselines each metric is given for; "" is the model's own decode
MSE_NAMES = ("model", "sample", "expected", "maskgit", "copy_last", "copy_last_recon", "mean_frame", "prior_only",
             "shuffled_actions", "tokenizer")
SHARP_NAMES = ("model", "sample", "expected", "maskgit", "copy_last_recon", "prior_only", "shuffled_actions", "tokenizer")
FIDELITY_NAMES = {"model": "action_fidelity", "shuffled_actions": "action_fidelity_deranged",
                  "truth": "action_fidelity_truth", "prior_only": "action_fidelity_prior_only",
                  "sample": "action_fidelity_sample"}
HEADLINE = ("mse", "psnr", "ssim", "sharpness", "mse_sample", "sharpness_sample", "mse_copy_last", "mse_mean_frame",
            "mse_prior_only", "mse_shuffled_actions", "delta_psnr", "mse_gain_vs_copy_last", "mse_gain_vs_prior_only",
            "world_action_fidelity", "world_action_fidelity_deranged")


def _suffix(name: str) -> str:
    return "" if name == "model" else f"_{name}"


def _stats(sums: dict, ns: dict, scores: dict, aliases: dict[str, str]) -> dict[str, np.ndarray]:
    """Metric arrays (..., H) from resampled (or plain) sums and counts of per-window scores.
    ``sums[(name, score)]`` (..., H); the same keys in ``ns``; ``aliases``: metric suffixes that
    name a variant by its role (``{"sample": "maskgit", "expected": "model"}``)."""
    out: dict[str, np.ndarray] = {}

    def mean(name, score):
        return sums[(name, score)] / np.maximum(ns[(name, score)], 1e-300)

    for name in MSE_NAMES:
        if name not in scores:
            continue
        sfx = _suffix(name)
        out[f"mse{sfx}"] = mean(name, "mse")
        out[f"mse_frame_sum{sfx}"] = mean(name, "mse_frame_sum")
        out[f"psnr{sfx}"] = mean(name, "psnr")
        out[f"ssim{sfx}"] = mean(name, "ssim")
        if (name, "lpips") in sums:
            out[f"lpips{sfx}"] = mean(name, "lpips")
        with np.errstate(divide="ignore"):
            out[f"psnr_of_mean_mse{sfx}"] = -10 * np.log10(np.maximum(out[f"mse{sfx}"], 1e-30))
    for name in SHARP_NAMES:
        if name in scores:
            out[f"sharpness{_suffix(name)}"] = sums[(name, "grad")] / np.maximum(sums[("truth", "grad")], 1e-300)
    for name, key in FIDELITY_NAMES.items():
        if name in scores:
            with np.errstate(invalid="ignore", divide="ignore"):
                out[f"world_{key}"] = sums[(name, "fidelity")] / ns[(name, "fidelity")]
                if name != "truth":
                    out[f"world_{key}_moves"] = sums[(name, "fidelity_moves")] / ns[(name, "fidelity_moves")]
    for alias, name in aliases.items():  # e.g. "sample" -> the variant that is the sampled decode
        for k in ("mse", "psnr", "ssim", "sharpness", "psnr_of_mean_mse", "mse_frame_sum", "lpips"):
            if f"{k}{_suffix(name)}" in out and alias != name:
                out[f"{k}_{alias}"] = out[f"{k}{_suffix(name)}"]
    out["delta_psnr"] = out["psnr"] - out["psnr_shuffled_actions"]
    for base in ("copy_last", "copy_last_recon", "mean_frame", "prior_only", "shuffled_actions"):
        out[f"mse_gain_vs_{base}"] = 1 - out["mse"] / out[f"mse_{base}"]
    return out


def summarize(scores: dict[str, dict[str, np.ndarray]], select: np.ndarray, episode: np.ndarray, aliases: dict[str, str],
              n_boot: int, seed: int, intervals: bool = True) -> tuple[dict, list[dict]]:
    """Metrics (means over the selected windows and every horizon) and per-horizon rows of the
    windows ``select`` (bool (N,)), with per-episode bootstrap 95 % intervals (``<key>_ci_low``,
    ``<key>_ci_high``) of the ``HEADLINE`` metrics and, per horizon, of ``mse``, ``sharpness`` and
    ``action_fidelity``."""
    keys = [(name, score) for name, s in scores.items() for score in s]
    sel = {k: scores[k[0]][k[1]][select] for k in keys}
    h = next(iter(sel.values())).shape[1]

    def sums_of(values: dict, axis_all: bool):
        sums, ns = {}, {}
        for k, v in values.items():
            ok = ~np.isnan(v)
            s, m = np.where(ok, v, 0.0).sum(0), ok.sum(0).astype(np.float64)
            sums[k], ns[k] = (s.sum(-1), m.sum(-1)) if axis_all else (s, m)
        return sums, ns

    per_h = _stats(*sums_of(sel, False), scores, aliases)
    overall = _stats(*sums_of(sel, True), scores, aliases)
    metrics = {k: float(v) for k, v in overall.items()}
    rows = [{"horizon": t + 1, **{k: _num(v[t]) for k, v in per_h.items()}} for t in range(h)]
    metrics.update(windows=int(select.sum()), episodes=int(len(np.unique(episode[select]))))
    if intervals:
        counts, index = episode_resamples(episode[select], n_boot, seed)
        boot_sums, boot_ns = {}, {}
        for k, v in sel.items():
            boot_sums[k], boot_ns[k] = resampled_sums(v, index, counts)  # (B, H)
        boot_h = _stats(boot_sums, boot_ns, scores, aliases)
        boot_all = _stats({k: v.sum(-1) for k, v in boot_sums.items()}, {k: v.sum(-1) for k, v in boot_ns.items()},
                          scores, aliases)
        for key in HEADLINE:
            if key in boot_all:
                lo, hi = interval(boot_all[key])
                metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = _num(lo), _num(hi)
        for key in ("mse", "sharpness", "world_action_fidelity"):
            lo, hi = interval(boot_h[key])
            for t, row in enumerate(rows):
                row[f"{key}_ci_low"], row[f"{key}_ci_high"] = _num(lo[t]), _num(hi[t])
    for row in rows:  # the contract's per-horizon name for the world model's fidelity
        for k in [k for k in row if k.startswith("world_")]:
            row[k[len("world_"):]] = row.pop(k)
    return metrics, rows


def _num(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


# -- the sampling-steps sweep and speed ----------------------------------------------------------


def timed_rollouts(world: World, seqs: dict[str, np.ndarray], cfg: Config, steps: int, horizon: int,
                   decode: bool) -> tuple[np.ndarray | None, float]:
    """Rollouts of every window of ``seqs`` at ``steps`` per frame over ``horizon`` frames (seeded):
    their decoded frames (when ``decode``) and the seconds per generated frame (decoding excluded)."""
    c, n = cfg.context_frames, len(seqs[LATENTS_KEY])
    gen = torch.Generator(device=world.device).manual_seed(cfg.seed)
    preds, sec = [], 0.0
    for s in range(0, n, cfg.batch_size):
        idx = np.arange(s, min(n, s + cfg.batch_size))
        acts, val = _conditioning(world, seqs, idx, idx)
        context = world.latents(seqs[LATENTS_KEY][idx, :c])
        t0 = time.perf_counter()
        z = world.rollout(context, acts, val, horizon, steps=steps, generator=gen)
        sec += time.perf_counter() - t0
        if decode:
            preds.append(world.decode(z))
    return (np.concatenate(preds) if decode else None), sec / (n * horizon)


def step_sweep(world: World, seqs: dict[str, np.ndarray], cfg: Config) -> dict:
    """Flow: MSE, PSNR (capped, per frame) and seconds per frame at K = 1, 2, 4, ..., k_max on the
    windows ``seqs`` over their first ``sweep.horizon`` predicted frames; the seconds are the median
    of ``sweep.rounds`` rounds, interleaved over K, so that a busy moment does not land on one K;
    the quality comes from the first round (the rollouts are seeded: every round is the same)."""
    c, h = cfg.context_frames, cfg.sweep.horizon
    target = seqs[FRAMES_KEY][:, c : c + h].astype(np.float32) / 255
    k_max = int(world.dynamics.cfg.k_max)
    ks = [2**i for i in range(int(math.log2(k_max)) + 1)]
    quality: dict[int, dict] = {}
    seconds: dict[int, list[float]] = {k: [] for k in ks}
    for r in range(cfg.sweep.rounds):
        for k in ks:
            pred, sec = timed_rollouts(world, seqs, cfg, k, h, decode=r == 0)
            seconds[k].append(sec)
            if r == 0:
                sc = frame_scores(pred, target, cfg.psnr_cap)
                quality[k] = {"mse": float(sc["mse"].mean()), "psnr": float(sc["psnr"].mean())}
    return {str(k): {**quality[k], "seconds_per_frame": float(np.median(seconds[k]))} for k in ks}


def imagination_speed(world: World, seqs: dict[str, np.ndarray], cfg: Config) -> dict:
    """Frames per second of one stream (batch 1, the model's own K, cache on) imagining
    ``speed_frames`` frames after the first window's context: latents only, and decoded."""
    c, n = cfg.context_frames, cfg.speed_frames
    if world.family == "masked":  # no sliding window: at most its temporal positions
        n = min(n, int(world.dynamics.cfg.max_frames) - c)
    context = world.latents(seqs[LATENTS_KEY][:1, :c])
    acts, val = _conditioning(world, seqs, np.arange(1), np.arange(1))
    total = c + n
    if acts.shape[1] < total:  # the window's actions, then its last one held
        pad = total - acts.shape[1]
        acts = torch.cat([acts, acts[:, -1:].expand(-1, pad, *acts.shape[2:])], 1)
        val = torch.cat([val, torch.ones_like(val[:, :1]).expand(-1, pad)], 1)
    gen = torch.Generator(device=world.device).manual_seed(cfg.seed)
    world.rollout(context, acts, val, 2, generator=gen)  # warm-up
    t0 = time.perf_counter()
    z = world.rollout(context, acts, val, n, generator=gen)
    t1 = time.perf_counter()
    world.decode(z)
    t2 = time.perf_counter()
    return {"imagine_fps": n / max(t1 - t0, 1e-9), "imagine_fps_decoded": n / max(t2 - t0, 1e-9),
            "imagine_frames": n}

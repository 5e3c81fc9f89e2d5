"""Stage ``actions`` (foreach ``mnist``, ``gameplay``): per-transition actions aligned with the frames.

``data/<ds>/actions.zarr`` has the episodes of ``data/<ds>/frames.zarr`` (same ``episode_ends``):
``actions`` (T, 2) float32, the ``[dx, dy]`` of transition t→t+1 normalised by (W/2, H/2), +x
right, +y down, 0 at each episode's last frame; ``valid`` (T,) bool (False at the last frame);
gameplay also ``action_class`` (T,) int8 (0 none, 1 left, 2 right, 3 up, 4 down; -1 invalid).

- ``mnist``: the motion of one digit (``tracked_digit``). ``truth`` uses the true positions of
  the store; ``tracker`` tracks the digit frame to frame (``pipeline.motion.track_templates``),
  starting from its true box in frame 0 when the store has positions, else from the
  ``tracked_digit``-th largest bright connected component (``pipeline.motion.component_box``).
  ``auto`` takes the truth when there is one. With positions the tracker always runs, and its
  error against the truth is reported (``tracker_mae`` normalised, ``tracker_mae_px`` pixels;
  ``accuracy``: fraction of transitions where its motion equals the true one within half a pixel
  on both axes).
- ``gameplay``: the camera's own motion, minus the shift of the play area's content (the HUD below
  ``play_area`` left out, the player's centre tile masked with ``mask_centre``), by block matching
  or phase correlation, and its class by ``move_threshold`` tiles (``tile_px: auto``: the tile size
  the frames record, Crafter's; frames without tiles, e.g. downloaded videos, count in ``max_shift``
  pixels: ``pipeline.ego.resolve_tile_px`` says why). With Crafter's truth, the true class of a
  transition is the sign of the player's grid move (x right, y down); a transition is
  ``ambiguous`` when the player moved but the scene (the play area without the player's tile,
  which is fixed to the camera) did not change: mean abs difference below ``ambiguous_tol`` grey
  levels, e.g. walking over uniform grass. ``accuracy`` scores every other valid transition.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import motion
from pipeline.atomic import write_json
from pipeline.cli import run_stage
from pipeline.config import ParamsError, StrictModel, load_section
from pipeline.ego import (
    GameplayActionsConfig,
    MnistActionsConfig,
    camera_motion,
    play_area,
    resolve_tile_px,
    transition_actions,
)
from pipeline.paths import DATASETS, actions_store, frames_store, metrics_path
from pipeline.store import EpisodeStore, EpisodeStoreWriter, StoreConfig
from pipeline.tracking import stage_run

log = logging.getLogger(__name__)



CONFIGS: dict[str, type[StrictModel]] = {"mnist": MnistActionsConfig, "gameplay": GameplayActionsConfig}


# ---------------------------------------------------------------------------------------------
# shared


def last_invalid(t: int) -> np.ndarray:
    valid = np.ones(t, bool)
    valid[-1] = False
    return valid


def action_stats(actions: list[np.ndarray], valid: list[np.ndarray]) -> dict:
    a = np.concatenate([x[v] for x, v in zip(actions, valid)]) if actions else np.zeros((0, 2))
    if not len(a):
        return {"transitions": 0, "action_std": None, "action_min": None, "action_max": None}
    return {
        "transitions": int(len(a)),
        "action_std": float(a.std()),
        "action_min": float(a.min()),
        "action_max": float(a.max()),
    }


def _episode_batches(store: EpisodeStore, max_episodes: int):
    """Runs of consecutive episodes of equal length, at most ``max_episodes`` each: ``(first, n, T)``."""
    lengths = store.episode_lengths()
    i = 0
    while i < len(lengths):
        j = i + 1
        while j < len(lengths) and j - i < max_episodes and lengths[j] == lengths[i]:
            j += 1
        yield i, j - i, int(lengths[i])
        i = j


# ---------------------------------------------------------------------------------------------
# mnist


def _start_boxes(gray: np.ndarray, positions: np.ndarray | None, digit: int, size: int):
    """Frame-0 top-left corners ``(N, 2)`` and templates ``(N, size, size)`` of the tracked digit."""
    h, w = gray.shape[2:]
    if positions is None:
        boxes = [motion.component_box(seq[0], digit, size) for seq in gray]
        return np.stack([b[0] for b in boxes]), np.stack([b[1] for b in boxes])
    xy = np.clip(np.rint(positions[:, 0, digit]).astype(np.int64), 0, [w - size, h - size])
    templates = np.stack([seq[0, y : y + size, x : x + size] for seq, (x, y) in zip(gray, xy)])
    return xy, templates


def run_mnist(cfg: MnistActionsConfig, src: Path, out: Path, store_cfg: StoreConfig | None = None) -> dict:
    """Actions of the tracked digit of every sequence of ``src``, written to ``out``; the metrics."""
    store = EpisodeStore.open(src)
    has_pos = bool(store.attrs.get("has_positions")) and "positions" in store.keys
    method = ("truth" if has_pos else "tracker") if cfg.method == "auto" else cfg.method
    if method == "truth" and not has_pos:
        raise ValueError(f"actions.mnist.method = truth, but {src} has no true positions (data/positions)")
    size = int(store.attrs.get("digit_size", 28))
    frames = store.array("frames")
    positions = store.array("positions") if has_pos else None
    h, w = frames.shape[1:3]
    if positions is not None and cfg.tracked_digit >= positions.shape[1]:
        raise ValueError(
            f"actions.mnist.tracked_digit = {cfg.tracked_digit}, but {src} has {positions.shape[1]} digits per frame"
        )
    actions, valid, errors = [], [], []
    batches = list(_episode_batches(store, 256))
    for first, n, t in tqdm(batches, desc="actions@mnist", unit="batch"):
        sl = slice(int(store.episode_starts[first]), int(store.episode_starts[first]) + n * t)
        gray = motion.to_gray(frames[sl]).reshape(n, t, h, w)
        pos = positions[sl].reshape(n, t, -1, 2) if has_pos else None
        start, templates = _start_boxes(gray, pos, cfg.tracked_digit, size)
        tracked = np.diff(motion.track_templates(gray, start, templates, search=cfg.tracker_search), axis=1)
        true = None
        if has_pos:
            true = np.diff(pos[:, :, cfg.tracked_digit].astype(np.float64), axis=1)
            errors.append(np.abs(tracked - true))
        for k in range(n):
            actions.append(transition_actions(true[k] if method == "truth" else tracked[k], w, h))
            valid.append(last_invalid(t))
    with EpisodeStoreWriter(out, store_cfg, attrs={"method": method, "width": w, "height": h}) as writer:
        for a, v in zip(actions, valid):
            writer.add_episode(actions=a, valid=v)
    metrics = {"method": method, "episodes": len(actions), **action_stats(actions, valid)}
    metrics.update(_tracker_metrics(errors, w, h))
    return metrics


def _tracker_metrics(errors: list[np.ndarray], width: int, height: int) -> dict:
    """Tracker error against the truth from per-batch ``|tracked - true|`` pixels ``(n, T-1, 2)``."""
    if not errors:
        return {"tracker_mae": None, "tracker_mae_px": None, "accuracy": None}
    err = np.concatenate([e.reshape(-1, 2) for e in errors])
    return {
        "tracker_mae": float((err / (width / 2, height / 2)).mean()),
        "tracker_mae_px": float(err.mean()),
        "accuracy": float((err.max(axis=1) <= 0.5).mean()),
    }


# ---------------------------------------------------------------------------------------------
# gameplay


def run_gameplay(cfg: GameplayActionsConfig, src: Path, out: Path, store_cfg: StoreConfig | None = None) -> dict:
    """Camera motion of every transition of ``src``, written to ``out``; the metrics (accuracy
    against Crafter's true moves when the store has them)."""
    store = EpisodeStore.open(src)
    has_truth = bool(store.attrs.get("has_truth")) and "player_pos" in store.keys
    try:
        cfg = resolve_tile_px(cfg, store.attrs, "actions.gameplay", str(src))
    except ValueError as exc:
        raise ParamsError(str(exc)) from None
    h, w = store.array("frames").shape[1:3]
    top, bottom, left, right = play_area(cfg, h, w)
    scene = motion.centre_mask(bottom - top, right - left, cfg.tile_px)
    preds, trues, ambiguous = [], [], []
    attrs = {"method": cfg.method, "width": w, "height": h}
    with EpisodeStoreWriter(out, store_cfg, attrs=attrs) as writer:
        for i in tqdm(range(store.n_episodes), desc="actions@gameplay", unit="episode"):
            frames = store.array("frames")[store.episode_slice(i)]
            area = frames[:, top:bottom, left:right]
            t = len(frames)
            camera, classes = camera_motion(cfg, frames)
            cls = np.full(t, -1, np.int8)
            cls[:-1] = classes
            writer.add_episode(actions=transition_actions(camera, w, h), valid=last_invalid(t), action_class=cls)
            preds.append(cls[:-1])
            if has_truth:
                pos = store.array("player_pos")[store.episode_slice(i)].astype(np.int64)
                true = motion.move_classes(np.diff(pos, axis=0))
                trues.append(true)
                ambiguous.append((true != 0) & motion.unchanged(area[:-1], area[1:], scene, cfg.ambiguous_tol))
    pred = np.concatenate(preds) if preds else np.zeros(0, np.int8)
    metrics = {"method": cfg.method, "episodes": store.n_episodes, "transitions": int(len(pred))}
    metrics["pred_counts"] = {n: int((pred == k).sum()) for k, n in enumerate(motion.CLASS_NAMES)}
    if has_truth:
        true, amb = np.concatenate(trues), np.concatenate(ambiguous)
        report = motion.classification_report(pred, true, ~amb)
        metrics.update(report)
        metrics["ambiguous"] = float(amb.mean()) if len(amb) else None
        metrics["ambiguous_count"] = int(amb.sum())
    else:
        metrics.update({"accuracy": None, "ambiguous": None})
    return metrics


# ---------------------------------------------------------------------------------------------


def run(item: str, cfg: StrictModel, src: Path, out: Path, store_cfg: StoreConfig | None = None) -> dict:
    if item == "mnist":
        return run_mnist(cfg, src, out, store_cfg)
    if item == "gameplay":
        return run_gameplay(cfg, src, out, store_cfg)
    raise ValueError(f"unknown actions item {item!r}; expected one of {DATASETS}")


def main(item: str) -> None:
    cfg = load_section("actions", CONFIGS[item], item=item)
    store_cfg = load_section("store", StoreConfig)
    with stage_run("actions", item, cfg) as r:
        start = time.perf_counter()
        metrics = run(item, cfg, frames_store(item), actions_store(item), store_cfg)
        seconds = time.perf_counter() - start
        summary = {k: metrics.get(k) for k in ("accuracy", "ambiguous", "tracker_mae")}
        log.info("actions@%s: %s in %.1f s", item, summary, seconds)
        write_json(metrics_path("actions", item), metrics)
        r.log_metrics({**metrics, "seconds": seconds})


if __name__ == "__main__":
    run_stage(main, foreach=DATASETS)

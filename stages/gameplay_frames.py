"""Gameplay frames: decode the gameplay videos into the episode store ``data/gameplay/frames.zarr``.

One Prefect task per video that ``gameplay_videos`` got (``concurrency`` at once, ``retries``
each); one episode per video, appended in manifest order whatever order the tasks finish in.
Frames are resampled to ``fps``, cropped and resized to ``width`` x ``height``; ``timestamps`` are
seconds from the video's pts. With a Crafter truth record, output frame at time t is recorded
frame ``round(t * video_fps)``: ``player_pos`` is its tile and ``true_action`` the action taken
there (-1 at an episode's last frame). A video that cannot be decoded is a failed row of
``frames_manifest.csv`` and is skipped; the stage fails only when no video survives or more than
``max_failed_fraction`` of them failed.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from pipeline.atomic import write_json
from pipeline.cli import run_stage
from pipeline.config import load_section
from pipeline.flows import run_tasks
from pipeline.frames import Config
from pipeline.manifest import one_line, read_manifest, sha256_file, write_manifest
from pipeline.paths import GAMEPLAY_FRAMES_MANIFEST, GAMEPLAY_VIDEOS, VIDEOS_MANIFEST, frames_store, metrics_path
from pipeline.store import EpisodeStoreWriter, StoreConfig
from pipeline.tracking import stage_run
from pipeline.video import decode_video

log = logging.getLogger(__name__)

STORE = frames_store("gameplay")
FRAMES_MANIFEST = GAMEPLAY_FRAMES_MANIFEST
VIDEOS_DIR = GAMEPLAY_VIDEOS
MANIFEST = VIDEOS_MANIFEST
COLUMNS = ["name", "source", "status", "error", "duration", "frames", "bytes", "sha256"]


def truth_path(video: Path) -> Path:
    return video.with_name(f"{video.name.split('.')[0]}.truth.json")


def align_truth(truth: dict, timestamps: np.ndarray, where: Path) -> dict[str, np.ndarray]:
    """``player_pos`` (T,2) int32 and ``true_action`` (T,) int16 of the output frames."""
    positions = np.asarray(truth["player_pos"], dtype=np.int32)
    actions = np.asarray([*truth["actions"], -1], dtype=np.int16)  # no action at the last frame
    if len(actions) != len(positions):
        raise ValueError(f"{where}: {len(positions)} positions but {len(actions) - 1} actions (expected one fewer)")
    idx = np.rint(timestamps * float(truth["fps"])).astype(np.int64)
    if idx.min() < 0 or idx.max() >= len(positions):
        raise ValueError(
            f"{where}: the video's frame times reach recorded frame {idx.max()}, "
            f"but the truth has {len(positions)} frames"
        )
    true_action = actions[idx]
    true_action[-1] = -1
    return {"player_pos": positions[idx], "true_action": true_action}


def tile_size(cfg: Config, truth: dict) -> dict:
    """The tile size in output pixels of recorded episodes (Crafter: ``unit`` pixels per tile at the
    recorded ``size``), after the crop and the resize: ``tile_px`` and how it was derived."""
    if "size" not in truth or "unit" not in truth:
        return {}
    top, bottom, left, right = cfg.crop or (0, 0, 0, 0)
    size, unit = int(truth["size"]), float(truth["unit"])
    sx, sy = cfg.width / (size - left - right), cfg.height / (size - top - bottom)
    if abs(sx - sy) > 0.01 * max(sx, sy):
        log.warning("frames are resized %.3f x %.3f: tiles are not square; tile_px follows the width", sx, sy)
    return {"tile_px": round(unit * sx, 6),
            "tile_source": f"{unit:g} px tiles at {size} px, cropped {[top, bottom, left, right]}, resized to {cfg.width}"}


def decode_one(cfg: Config, row: dict, videos_dir: Path, with_truth: bool) -> dict:
    """Decode one manifest row's video; returns the episode's arrays and its frames-manifest row."""
    path = videos_dir / row["file"]
    start = time.perf_counter()
    if sha256_file(path) != row["sha256"]:
        raise ValueError(f"{path}: sha256 differs from {videos_dir / MANIFEST}; rerun gameplay_videos")
    frames, timestamps = decode_video(
        path, fps=cfg.fps, size=(cfg.width, cfg.height), crop=cfg.crop, threads=cfg.threads
    )
    arrays = {"frames": frames, "timestamps": timestamps}
    if with_truth:
        tpath = truth_path(path)
        arrays.update(align_truth(json.loads(tpath.read_text()), timestamps, tpath))
    seconds = time.perf_counter() - start
    out_row = {**_base_row(row), "status": "ok", "frames": len(frames)}
    return {"arrays": arrays, "row": out_row, "seconds": seconds}


def _base_row(row: dict) -> dict:
    base = dict.fromkeys(COLUMNS, "")
    base.update({k: row[k] for k in ("name", "source", "duration", "bytes", "sha256")})
    return base


class InOrder:
    """Appends episodes to the store in item order as results arrive in any order."""

    def __init__(self, writer: EpisodeStoreWriter):
        self.writer = writer
        self.pending: dict[int, object] = {}
        self.next = 0

    def __call__(self, i: int, outcome: object) -> None:
        self.pending[i] = outcome
        while self.next in self.pending:
            outcome = self.pending.pop(self.next)
            if not isinstance(outcome, Exception):
                self.writer.add_episode(**outcome["arrays"])
                outcome["arrays"] = None  # written: free the frames
            self.next += 1


def check_failures(rows: list[dict], cfg: Config, manifest: Path) -> None:
    failed = [r for r in rows if r["status"] == "failed"]
    if len(failed) == len(rows) or len(failed) > cfg.max_failed_fraction * len(rows):
        listing = "\n".join(f"  - {r['name']}: {r['error']}" for r in failed)
        raise RuntimeError(
            f"{len(failed)} of {len(rows)} videos failed to decode (max_failed_fraction "
            f"{cfg.max_failed_fraction}; see {manifest}):\n{listing}"
        )


def run(
    cfg: Config,
    store_cfg: StoreConfig,
    videos_dir: Path = VIDEOS_DIR,
    out_store: Path = STORE,
    out_manifest: Path = FRAMES_MANIFEST,
) -> dict:
    """Decode the ok videos of ``videos_dir``'s manifest into ``out_store``; returns the metrics."""
    videos_dir = Path(videos_dir)
    manifest = videos_dir / MANIFEST
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest}: no video manifest; run the gameplay_videos stage")
    jobs = [r for r in read_manifest(manifest) if r["status"] == "ok"]
    if not jobs:
        raise RuntimeError(f"{manifest}: no video with status ok to decode")
    have_truth = [truth_path(videos_dir / r["file"]).exists() for r in jobs]
    with_truth = all(have_truth)
    if any(have_truth) and not with_truth:
        log.warning("%s: only some videos have a truth record; the store gets none", manifest)
    names = [r["name"] for r in jobs]
    attrs = {
        "fps": cfg.fps, "width": cfg.width, "height": cfg.height,
        "crop": list(cfg.crop) if cfg.crop else None, "has_truth": with_truth,
    }
    if with_truth:
        attrs.update(tile_size(cfg, json.loads(truth_path(videos_dir / jobs[0]["file"]).read_text())))
    start = time.perf_counter()
    with EpisodeStoreWriter(out_store, store_cfg, attrs) as writer:
        outcomes = run_tasks(
            lambda row: decode_one(cfg, row, videos_dir, with_truth), jobs,
            name="decode", concurrency=cfg.concurrency, retries=cfg.retries,
            labels=names, on_result=InOrder(writer),
        )
        rows = [
            {**_base_row(job), "status": "failed", "error": one_line(f"{type(o).__name__}: {o}")}
            if isinstance(o, Exception) else o["row"]
            for job, o in zip(jobs, outcomes)
        ]
        write_manifest(out_manifest, rows, COLUMNS)
        check_failures(rows, cfg, out_manifest)
        writer.root.attrs["videos"] = [r["name"] for r in rows if r["status"] == "ok"]
    ok = [o for o in outcomes if not isinstance(o, Exception)]
    frames = int(sum(o["row"]["frames"] for o in ok))
    return {
        "frames": frames,
        "episodes": len(ok),
        "videos_ok": len(ok),
        "videos_failed": len(rows) - len(ok),
        "decode_fps": round(frames / max(sum(o["seconds"] for o in ok), 1e-9), 1),
        "elapsed_s": round(time.perf_counter() - start, 3),
    }


def main() -> None:
    cfg = load_section("gameplay_frames", Config)
    store_cfg = load_section("store", StoreConfig)
    with stage_run("gameplay_frames", None, cfg) as r:
        metrics = run(cfg, store_cfg)
        write_json(metrics_path("gameplay_frames"), metrics)
        r.log_metrics(metrics)


if __name__ == "__main__":
    run_stage(main)

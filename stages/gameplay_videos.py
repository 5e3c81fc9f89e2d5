"""Gameplay videos: record Crafter episodes (offline default) or download URLs with yt-dlp.

Output ``data/gameplay/videos/``: the videos, ``<name>.truth.json`` per Crafter episode and
``manifest.csv`` (one row per video: name, source, status ok/failed, error, file, duration,
frames, bytes, sha256, url, archive_id). One Prefect task per video, ``concurrency`` at once.

The directory is a persistent DVC output, so that yt-dlp's download archive (``archive.txt``)
survives reruns: a URL whose file is still here, unchanged, and whose id is in the archive is not
requested again. A URL is downloaded into a temporary directory beside the videos and its file
replaces the earlier one only once it probes as a video: when the download fails, the earlier
file stays (its row is ``failed`` and says it was kept). A row is ``ok`` only for a file that
probes as a video. The stage removes every file that does not belong to the current params.
"""
from __future__ import annotations

import collections
import glob
import hashlib
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import crafter
import numpy as np
import yt_dlp
from pydantic import Field, field_validator, model_validator

from pipeline.atomic import clean_stale, tmp_sibling, write_json
from pipeline.cli import run_stage
from pipeline.config import StrictModel, load_section
from pipeline.download import check_url
from pipeline.flows import run_tasks
from pipeline.manifest import one_line, read_manifest, sha256_file, write_manifest
from pipeline.paths import GAMEPLAY_VIDEOS, VIDEOS_MANIFEST, metrics_path
from pipeline.tracking import stage_run
from pipeline.video import VideoError, encode_video, probe_video

log = logging.getLogger(__name__)

VIDEOS_DIR = GAMEPLAY_VIDEOS
MANIFEST = VIDEOS_MANIFEST
ARCHIVE = "archive.txt"
COLUMNS = ["name", "source", "status", "error", "file", "duration", "frames", "bytes", "sha256", "url", "archive_id"]

# Crafter's action ids: 0 noop, 1 move_left, 2 move_right, 3 move_up, 4 move_down, 5 do, 6 sleep.
MOVES = (1, 2, 3, 4)
NOT_MOVES = (0, 5)  # the agent never sleeps: sleeping darkens the view and freezes the player
CAMERA_DOC = (
    "The view is centred on the player: after a move_right that succeeded, player_pos x grows by 1 "
    "and the image content shifts left by `unit` pixels (move_down: y grows, content shifts up). "
    "player_pos[i] is the (x, y) tile of frame i (frame 0: after reset); actions[i] is the action "
    "taken at frame i, leading to frame i + 1. The image is `view` tiles of `unit` pixels: the top "
    "`local_view` tiles show the world, the bottom `inventory_rows` rows the inventory."
)


class CrafterConfig(StrictModel):
    episodes: int = Field(12, gt=0)
    steps: int = Field(160, gt=0, description="steps per episode")
    size: int = Field(72, ge=18, description="render size in pixels (square, even)")
    fps: float = Field(10, gt=0)
    crf: int = Field(18, ge=0, le=51)
    hold_min: int = Field(2, gt=0)
    hold_max: int = Field(8, gt=0)
    move_prob: float = Field(0.8, ge=0, le=1)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "CrafterConfig":
        if self.hold_min > self.hold_max:
            raise ValueError(f"hold_min ({self.hold_min}) must not exceed hold_max ({self.hold_max})")
        if self.size % 2:
            raise ValueError(f"size must be even for H.264 yuv420p, got {self.size}")
        return self


class UrlsConfig(StrictModel):
    urls: list[str] = Field(default_factory=list, alias="list")
    allowed_schemes: list[str] = ["https"]
    allowed_hosts: list[str] = ["www.youtube.com", "youtube.com", "youtu.be"]
    format: str = "bv*[height<=360][ext=mp4]/b[height<=360]/bv*/b"
    retries: int = Field(3, ge=0)
    retry_backoff_s: float = Field(2.0, ge=0)
    rate_limit: str | None = Field("4M", description="bytes/s, yt-dlp syntax (4M, 500K); null: none")
    max_filesize_mb: float | None = Field(500, gt=0)

    @field_validator("urls")
    @classmethod
    def _unique(cls, urls: list[str]) -> list[str]:
        dupes = sorted({u for u in urls if urls.count(u) > 1})
        if dupes:
            raise ValueError(f"URLs listed twice: {dupes}")
        return urls

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None and yt_dlp.utils.parse_bytes(value) is None:
            raise ValueError(f"not a rate in bytes/s (like 4M or 500K): {value!r}")
        return value


class Config(StrictModel):
    source: Literal["crafter", "urls"] = "crafter"
    concurrency: int = Field(2, gt=0)
    crafter: CrafterConfig = CrafterConfig()
    urls: UrlsConfig = UrlsConfig()

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.source == "urls" and not self.urls.urls:
            raise ValueError(
                "gameplay_videos.urls.list is empty, but gameplay_videos.source is 'urls': list at "
                "least one URL, or record Crafter episodes (gameplay_videos.source: crafter)"
            )
        return self


# ---------------------------------------------------------------- manifest rows


def video_row(out_dir: Path, name: str, file: str, source: str, url: str = "", archive_id: str = "") -> dict:
    """The manifest row of a video file: ``ok`` with its duration and frame count, or ``failed``
    with the probe's error when the file cannot be probed as a video."""
    path = out_dir / file
    row = {"name": name, "source": source, "status": "ok", "error": "", "file": file, "duration": "",
           "frames": "", "bytes": path.stat().st_size, "sha256": sha256_file(path), "url": url,
           "archive_id": archive_id}
    try:
        info = probe_video(path)
        row.update(duration=info["duration"], frames=info["frames"])
    except VideoError as exc:
        row.update(status="failed", error=one_line(f"probe: {exc}"))
    return row


def failed_row(name: str, source: str, error: str, url: str = "") -> dict:
    row = dict.fromkeys(COLUMNS, "")
    row.update(name=name, source=source, status="failed", error=one_line(error), url=url)
    return row


# A temporary sibling of pipeline.atomic: ``.<target>.tmp-<pid>-<token>`` (or ``.old-``).
_TEMPORARY = re.compile(r"^\.(.+)\.(?:tmp|old)-\d+-[0-9a-f]+$")


def remove_others(out_dir: Path, names: set[str], keep: set[str]) -> None:
    """Delete what does not belong to ``names`` (``<name>.*``) or ``keep`` (file names).

    A temporary sibling (``.<file>.tmp-<pid>-<token>``, pipeline.atomic) is removed only when the
    process that writes it is gone.
    """
    for p in out_dir.iterdir():
        temporary = _TEMPORARY.match(p.name)
        if temporary:
            for gone in clean_stale(out_dir / temporary.group(1)):
                log.info("removed %s (left by a process that is gone)", gone)
            continue
        if p.name in keep or p.name.split(".")[0] in names:
            continue
        log.info("removing %s (not in the current params)", p)
        shutil.rmtree(p) if p.is_dir() else p.unlink()


# ---------------------------------------------------------------- crafter


def agent_actions(rng: np.random.Generator, cfg: CrafterConfig) -> list[int]:
    """The exploring agent's ``cfg.steps`` actions: each held for hold_min..hold_max steps."""
    actions: list[int] = []
    while len(actions) < cfg.steps:
        pool = MOVES if rng.random() < cfg.move_prob else NOT_MOVES
        action = int(pool[rng.integers(len(pool))])
        actions += [action] * int(rng.integers(cfg.hold_min, cfg.hold_max + 1))
    return actions[: cfg.steps]


class _OrderedObjects(dict):
    """An insertion-ordered set of world objects.

    Crafter keeps each chunk's objects in a ``set``, whose order follows memory addresses; it
    picks the creature to despawn from that order, so episodes differed from run to run.
    """

    def add(self, obj) -> None:
        self[obj] = None

    def remove(self, obj) -> None:
        del self[obj]


# Decimals kept of Crafter's daylight (see deterministic_env).
DAYLIGHT_DECIMALS = 6


def deterministic_env(env: crafter.Env) -> crafter.Env:
    """Make ``env`` play and render the same on every machine; returns ``env``.

    - Its world keeps its chunks' objects in insertion order (see _OrderedObjects).
    - Its daylight is rounded to ``DAYLIGHT_DECIMALS`` decimals. Crafter computes it with
      ``np.cos``, which NumPy may compute with other SIMD code (another last bit) on another CPU,
      and the night blend truncates to uint8: one ulp more or less daylight changed 1,145 to
      7,695 pixel values in 3 frames of a 160-step episode. Rounded, the value only differs if
      it lies within an ulp of a rounding boundary.
    """
    world = env._world
    reset = world.reset
    update_time = env._update_time

    def ordered_reset(seed=None):
        reset(seed)
        world._chunks = collections.defaultdict(_OrderedObjects)

    def rounded_time():
        update_time()
        world.daylight = round(float(world.daylight), DAYLIGHT_DECIMALS)

    world.reset = ordered_reset
    env._update_time = rounded_time
    return env


def record_episode(cfg: CrafterConfig, episode: int) -> tuple[np.ndarray, dict]:
    """Play one episode; returns its frames (T,size,size,3) uint8 and its truth record.

    T is 1 + the steps taken (the episode ends early if the player dies).
    """
    seeds = np.random.SeedSequence([cfg.seed, episode])
    env_seed = int(seeds.generate_state(1)[0] % (2**31 - 1))
    rng = np.random.default_rng(seeds.spawn(1)[0])
    env = deterministic_env(crafter.Env(size=(cfg.size, cfg.size), length=cfg.steps, seed=env_seed, reward=False))
    frames = [env.reset()]
    positions = [[int(v) for v in env._player.pos]]
    taken: list[int] = []
    for action in agent_actions(rng, cfg):
        obs, _, done, info = env.step(action)
        frames.append(obs)
        positions.append([int(v) for v in info["player_pos"]])
        taken.append(action)
        if done:
            break
    names = list(env.action_names)
    unit = cfg.size // 9
    truth = {
        "doc": CAMERA_DOC,
        "episode": episode,
        "env_seed": env_seed,
        "fps": cfg.fps,
        "frames": len(frames),
        "size": cfg.size,
        "unit": unit,
        "view": [9, 9],
        "local_view": [9, 7],
        "inventory_rows": 2,
        "action_set": names,
        "actions": taken,
        "action_names": [names[a] for a in taken],
        "player_pos": positions,
    }
    return np.stack(frames), truth


def crafter_name(episode: int) -> str:
    return f"crafter_{episode:03d}"


def write_episode(cfg: CrafterConfig, episode: int, out_dir: Path) -> dict:
    """Record episode ``episode`` to ``<name>.mp4`` and ``<name>.truth.json``; its manifest row."""
    name = crafter_name(episode)
    frames, truth = record_episode(cfg, episode)
    encode_video(frames, out_dir / f"{name}.mp4", cfg.fps, cfg.crf)
    write_json(out_dir / f"{name}.truth.json", truth)
    return video_row(out_dir, name, f"{name}.mp4", "crafter")


def record_crafter(cfg: Config, out_dir: Path) -> list[dict]:
    episodes = list(range(cfg.crafter.episodes))
    names = [crafter_name(e) for e in episodes]
    remove_others(out_dir, set(names), {MANIFEST})
    outcomes = run_tasks(
        lambda e: write_episode(cfg.crafter, e, out_dir), episodes,
        name="crafter-episode", concurrency=cfg.concurrency, labels=names,
    )
    return [
        failed_row(n, "crafter", f"{type(o).__name__}: {o}") if isinstance(o, Exception) else o
        for n, o in zip(names, outcomes)
    ]


# ---------------------------------------------------------------- urls


def url_name(url: str) -> str:
    """A file-name-safe, stable name for a URL: a slug of its last path part and query + a hash."""
    parts = urlsplit(url)
    stem = parts.path.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{stem} {parts.query}").strip("-")[:40] or "video"
    return f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


class _YtdlpLog:
    """yt-dlp's logger: keeps its messages (the reason a download stopped is among them)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def debug(self, msg: str) -> None:
        self.lines.append(msg)
        log.debug(msg)

    info = debug

    def warning(self, msg: str) -> None:
        self.lines.append(msg)
        log.warning(msg)

    def error(self, msg: str) -> None:
        self.lines.append(msg)

    def reason(self) -> str:
        hints = [m for m in self.lines if "ERROR" in m or "larger than" in m or "Aborting" in m]
        return (hints or self.lines or ["no file was written"])[-1]


class DownloadError(RuntimeError):
    """A URL gave no video file."""


def _ytdlp_options(cfg: UrlsConfig, out_dir: Path, name: str, archive: Path | None, logger) -> dict:
    opts = {
        "format": cfg.format,
        "outtmpl": {"default": str(out_dir / f"{name}.%(ext)s")},
        "download_archive": str(archive) if archive else None,
        "noplaylist": True,
        "overwrites": True,  # reached only when the file here is missing or not the archived one
        "logger": logger,
        "noprogress": True,
        # Retries are the Prefect task's (with backoff), not yt-dlp's.
        "retries": 0,
        "extractor_retries": 0,
        "fragment_retries": 0,
        "socket_timeout": 60,
    }
    if cfg.rate_limit is not None:
        opts["ratelimit"] = yt_dlp.utils.parse_bytes(cfg.rate_limit)
    if cfg.max_filesize_mb is not None:
        opts["max_filesize"] = int(cfg.max_filesize_mb * 2**20)
    return opts


def _download_once(url: str, opts: dict) -> tuple[Path | None, dict | None, bool]:
    """One yt-dlp run: (file written or None, info, whether the archive made yt-dlp skip it)."""
    with yt_dlp.YoutubeDL(opts) as ydl:
        try:
            info = ydl.extract_info(url, download=True)
        except yt_dlp.utils.DownloadError as exc:
            raise DownloadError(f"{url}: {exc}") from None
        if info is None:
            return None, None, False
        files = [d.get("filepath") for d in info.get("requested_downloads") or []]
        files = [Path(f) for f in files if f and Path(f).exists()]
        archived = bool(opts.get("download_archive")) and ydl.in_download_archive(info)
        return (files[0] if files else None), info, archived


def files_of(out_dir: Path, name: str) -> list[Path]:
    """The files ``<name>.*`` in ``out_dir`` (a URL's video, whatever its extension)."""
    return sorted(p for p in out_dir.glob(f"{glob.escape(name)}.*") if p.is_file())


def download_url(url: str, name: str, cfg: UrlsConfig, out_dir: Path) -> dict:
    """Download ``url`` to ``<out_dir>/<name>.<ext>`` with yt-dlp; its (``ok``) manifest row.

    yt-dlp writes into a temporary directory beside the videos; the file replaces the earlier
    ``<name>.*`` only once it probes as a video, so a failed or killed download leaves the earlier
    file as it was. When the archive lists the video but its file is not reusable, it is
    downloaded again. Raises DownloadError (the task's retries apply), also for a file that is not
    a readable video.
    """
    logger = _YtdlpLog()
    archive = out_dir / ARCHIVE
    tmp = tmp_sibling(out_dir / name)
    tmp.mkdir()
    try:
        path, info, archived = _download_once(url, _ytdlp_options(cfg, tmp, name, archive, logger))
        if path is None and archived:
            path, info, _ = _download_once(url, _ytdlp_options(cfg, tmp, name, None, logger))
        if path is None:
            raise DownloadError(f"{url}: {logger.reason()}")
        try:
            probe_video(path)
        except VideoError as exc:
            reason = str(exc).removeprefix(f"{path}: ")
            raise DownloadError(f"{url}: the download is not a readable video: {reason}") from None
        earlier = files_of(out_dir, name)
        os.replace(path, out_dir / path.name)
        for p in earlier:
            if p.name != path.name:
                p.unlink()
    except Exception as exc:  # the manifest names no temporary path (its bytes stay the same)
        message = str(exc).replace(f"{tmp}{os.sep}", "")
        if isinstance(exc, DownloadError):
            raise DownloadError(message) from None
        raise DownloadError(f"{url}: {type(exc).__name__}: {message}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    archive_id = yt_dlp.utils.make_archive_id(info["extractor_key"], info["id"])
    return video_row(out_dir, name, path.name, "urls", url, archive_id)


def kept_row(name: str, url: str, error: str, out_dir: Path) -> dict:
    """The ``failed`` row of a URL whose download failed; an earlier file of it that probes as a
    video is kept and named in the row (its bytes and sha256 too), any other is removed."""
    row = failed_row(name, "urls", error, url)
    for path in files_of(out_dir, name):
        try:
            probe_video(path)
        except VideoError:
            continue
        row.update(
            error=one_line(f"{error} (kept the earlier file {path.name})"), file=path.name,
            bytes=path.stat().st_size, sha256=sha256_file(path),
        )
        break
    return row


def reusable(row: dict | None, out_dir: Path, archived: set[str]) -> bool:
    """Whether an earlier run's ``ok`` row still holds: its file unchanged and its id archived."""
    if not row or row["status"] != "ok" or row["archive_id"] not in archived:
        return False
    path = out_dir / row["file"]
    return path.is_file() and sha256_file(path) == row["sha256"]


def download_urls(cfg: Config, out_dir: Path) -> list[dict]:
    ucfg = cfg.urls
    names = [url_name(u) for u in ucfg.urls]
    remove_others(out_dir, set(names), {MANIFEST, ARCHIVE})
    previous = {r["name"]: r for r in read_manifest(out_dir / MANIFEST)}
    archive = out_dir / ARCHIVE
    archived = set(archive.read_text().splitlines()) if archive.exists() else set()
    rows: dict[str, dict] = {}
    todo = []
    for url, name in zip(ucfg.urls, names):
        try:
            check_url(url, ucfg.allowed_schemes, ucfg.allowed_hosts)
        except ValueError as exc:
            rows[name] = failed_row(name, "urls", str(exc), url)
            continue
        if reusable(previous.get(name), out_dir, archived):
            log.info("%s: in the archive and unchanged, not downloaded again", url)
            rows[name] = video_row(out_dir, name, previous[name]["file"], "urls", url, previous[name]["archive_id"])
        else:
            todo.append((url, name))
    outcomes = run_tasks(
        lambda job: download_url(job[0], job[1], ucfg, out_dir), todo,
        name="download", concurrency=cfg.concurrency, retries=ucfg.retries,
        retry_backoff_s=ucfg.retry_backoff_s, labels=[n for _, n in todo],
    )
    for (url, name), outcome in zip(todo, outcomes):
        rows[name] = kept_row(name, url, str(outcome), out_dir) if isinstance(outcome, Exception) else outcome
    # What no row names goes: files of refused URLs, junk beside a failure, another extension.
    remove_others(out_dir, set(), {MANIFEST, ARCHIVE} | {r["file"] for r in rows.values() if r["file"]})
    return [rows[n] for n in names]


# ---------------------------------------------------------------- stage


def run(cfg: Config, out_dir: Path = VIDEOS_DIR) -> dict:
    """Record or download the videos into ``out_dir``; writes the manifest; returns the metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = record_crafter(cfg, out_dir) if cfg.source == "crafter" else download_urls(cfg, out_dir)
    write_manifest(out_dir / MANIFEST, rows, COLUMNS)
    ok = [r for r in rows if r["status"] == "ok"]
    for r in rows:
        if r["status"] == "failed":
            log.warning("%s failed: %s", r["name"], r["error"])
    return {
        "videos_ok": len(ok),
        "videos_failed": len(rows) - len(ok),
        "bytes": int(sum(int(r["bytes"]) for r in ok)),
        "duration_s": round(sum(float(r["duration"] or 0) for r in ok), 3),
        "elapsed_s": round(time.perf_counter() - start, 3),
    }


def main() -> None:
    cfg = load_section("gameplay_videos", Config)
    with stage_run("gameplay_videos", None, cfg) as r:
        metrics = run(cfg)
        write_json(metrics_path("gameplay_videos"), metrics)
        r.log_metrics(metrics)


if __name__ == "__main__":
    run_stage(main)

"""Downloaded videos through ``actions@gameplay`` (issue 18): a real ``dvc repro`` in a temporary
git repository, with the shipped params shrunk and ``gameplay_videos.source: urls`` pointing at
videos served on 127.0.0.1 to real yt-dlp.

Bug guarded: with the default ``actions.gameplay.tile_px: auto``, every downloaded video stopped
the stage ("tile_px is 'auto' but data/gameplay/frames.zarr records no tile size"): only recorded
Crafter episodes record one. The videos here are not Crafter's: a camera panning and tilting over
a smooth textured scene, with a HUD bar fixed to the screen, at another size than the frames (so
that gameplay_frames resizes them, unevenly, as it does real downloads). The camera's path is
known, so the actions store must recover it.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from scipy import ndimage

from pipeline import motion
from pipeline.store import EpisodeStore
from pipeline.video import encode_video
from tests.test_dvc_pipeline import ROOT, deep_update, make_repo, ran_stages, run, shrunk_params

pytestmark = pytest.mark.slow

SRC_W, SRC_H = 128, 96  # the videos' size; gameplay_frames resizes them to 64x64 (x 1/2, y 2/3)
STEP_X, STEP_Y = 12, 9  # camera steps per frame in video pixels: 6 px in the frames on both axes


def scene(seed: int, height: int, width: int) -> np.ndarray:
    """A smooth random RGB texture (blobs of a few pixels, full contrast): a world to look at."""
    noise = np.random.default_rng(seed).random((height, width, 3))
    smooth = ndimage.gaussian_filter(noise, sigma=(3, 3, 0))
    lo, hi = smooth.min(axis=(0, 1)), smooth.max(axis=(0, 1))
    return np.rint(255 * (smooth - lo) / (hi - lo)).astype(np.uint8)


def camera_video(seed: int, path: list[tuple[int, int]]) -> np.ndarray:
    """Frames (T, SRC_H, SRC_W, 3) of a camera whose top-left corner follows ``path`` ``(x, y)``
    over a scene, with a HUD bar (fixed to the screen) over the bottom eighth."""
    xs, ys = np.array(path).T
    world = scene(seed, ys.max() + SRC_H, xs.max() + SRC_W)
    frames = np.stack([world[y : y + SRC_H, x : x + SRC_W] for x, y in path])
    frames[:, -SRC_H // 8 :] = (40, 40, 40)
    frames[:, -SRC_H // 8 + 4 : -4, 8:40] = (200, 60, 60)  # a health bar
    return frames


def walk(steps: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Camera positions from (0, 0) through runs of ``(n, dx, dy)``: n frames moving (dx, dy) each."""
    path = [(0, 0)]
    for n, dx, dy in steps:
        for _ in range(n):
            path.append((path[-1][0] + dx, path[-1][1] + dy))
    return path


def true_classes(path: list[tuple[int, int]]) -> np.ndarray:
    """The class of each transition from the camera's moves (the camera's own motion)."""
    return motion.move_classes(np.diff(np.array(path), axis=0))


# Panning right, holding still, panning left; tilting down, then up, then holding still.
PATHS = {
    "pan": walk([(8, STEP_X, 0), (6, 0, 0), (8, -STEP_X, 0)]),
    "tilt": walk([(8, 0, STEP_Y), (8, 0, -STEP_Y), (5, 0, 0)]),
}


def prefect_api_url() -> dict:
    """``PREFECT_API_URL`` of this process's temporary Prefect server (the one its own flows use),
    started if need be: the stages' processes reach it instead of each starting its own (8-17 s
    each on 2 cores). The class is Prefect's own, not public API: where a Prefect release has moved
    it, the stages start their own servers (slower, the same test)."""
    import pipeline.flows  # noqa: F401  (the project's Prefect settings: no telemetry, a longer start-up)
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:
        return {}
    server = SubprocessASGIServer()
    server.start(timeout=120)
    return {"PREFECT_API_URL": server.api_url}


def test_downloaded_videos_get_actions_with_the_default_params(tmp_path, http_server):
    for i, (name, path) in enumerate(PATHS.items()):
        encode_video(camera_video(i, path), http_server.root / f"{name}.mp4", fps=10, crf=18)
    urls = [http_server.url(f"{name}.mp4") for name in PATHS]

    params = shrunk_params()
    deep_update(params["gameplay_videos"], {
        "source": "urls",
        "urls": {"list": urls, "allowed_schemes": ["http"], "allowed_hosts": ["127.0.0.1"],
                 "retries": 1, "retry_backoff_s": 0.05},
    })
    default_actions = yaml.safe_load((ROOT / "params.yaml").read_text())["actions"]["gameplay"]
    assert params["actions"]["gameplay"] == default_actions and default_actions["tile_px"] == "auto"
    repo = tmp_path / "repo"
    repo.mkdir()
    env = make_repo(repo, params, **prefect_api_url())

    proc = run(["dvc", "repro", "actions@gameplay"], repo, env)
    assert ran_stages(proc.stdout) == ["actions@gameplay", "gameplay_frames", "gameplay_videos"], proc.stdout

    frames = EpisodeStore.open(repo / "data/gameplay/frames.zarr")
    assert "tile_px" not in frames.attrs and not frames.attrs["has_truth"]  # no tiles: the fallback ran
    assert [v.rsplit("-", 1)[0] for v in frames.attrs["videos"]] == list(PATHS)  # downloaded, in params order
    out = EpisodeStore.open(repo / "data/gameplay/actions.zarr")
    np.testing.assert_array_equal(out.episode_ends, frames.episode_ends)
    np.testing.assert_array_equal(out.episode_lengths(), [len(p) for p in PATHS.values()])
    cls, acts, valid = out.array("action_class")[:], out.array("actions")[:], out.array("valid")[:]
    metrics = json.loads((repo / "metrics/actions-gameplay.json").read_text())
    assert metrics["accuracy"] is None and metrics["transitions"] == int(valid.sum()) == sum(
        len(p) - 1 for p in PATHS.values())
    for i, (name, path) in enumerate(PATHS.items()):
        sl = out.episode_slice(i)
        got, want = cls[sl][:-1], true_classes(path)
        assert cls[sl][-1] == -1 and not valid[sl][-1] and valid[sl][:-1].all()
        assert (got == want).mean() >= 0.9, (name, got.tolist(), want.tolist())
        # each move is 6 px of the 64-px frames along its axis (6 / 32 normalised), a still is 0
        a = acts[sl][:-1][got == want]
        moving = want[got == want] > 0
        np.testing.assert_allclose(np.abs(a[moving]).max(axis=1), 6 / 32, atol=1 / 32)
        assert np.abs(a[~moving]).max() < 1 / 32

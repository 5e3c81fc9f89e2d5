"""gameplay_videos: real Crafter recordings, real yt-dlp downloads from a server on 127.0.0.1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import crafter
import numpy as np
import pytest
import yaml

from pipeline.config import ParamsError, load_section
from pipeline.video import probe_video
from stages import gameplay_videos as gv
from stages.gameplay_videos import (
    ARCHIVE,
    MANIFEST,
    Config,
    CrafterConfig,
    read_manifest,
    url_name,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = CrafterConfig(episodes=1, steps=20, size=72, hold_min=2, hold_max=4, seed=5)


def test_record_episode_frames_and_truth_agree():
    frames, truth = gv.record_episode(SMALL, 0)
    assert frames.shape == (21, 72, 72, 3) and frames.dtype == np.uint8
    assert truth["frames"] == 21 and len(truth["player_pos"]) == 21
    assert len(truth["actions"]) == len(truth["action_names"]) == 20
    assert set(truth["actions"]) <= {0, 1, 2, 3, 4, 5}  # moves, noop, do; never sleep
    assert truth["unit"] == 8 and truth["view"] == [9, 9] and truth["local_view"] == [9, 7]
    assert [truth["action_set"][a] for a in truth["actions"]] == truth["action_names"]
    steps = np.abs(np.diff(np.asarray(truth["player_pos"]), axis=0)).sum(axis=1)
    assert steps.max() <= 1  # one tile per step at most


def test_agent_holds_actions():
    cfg = CrafterConfig(steps=200, hold_min=3, hold_max=5, move_prob=0.5)
    actions = gv.agent_actions(np.random.default_rng(0), cfg)
    assert len(actions) == 200
    changes = np.flatnonzero(np.diff(actions)) + 1
    runs = np.diff(np.concatenate([[0], changes, [200]]))[:-1]  # the last run may be cut
    assert runs.min() >= 3  # a repeated pick can make a run longer than hold_max
    moves = np.isin(actions, gv.MOVES).mean()
    assert 0.3 < moves < 0.7


def test_camera_moves_with_the_player():
    """After a move_right that succeeded, x grows by 1 and the world shifts left by one tile."""
    cfg = CrafterConfig(steps=60, size=72, move_prob=1.0, seed=3)
    frames, truth = gv.record_episode(cfg, 0)
    pos, unit = np.asarray(truth["player_pos"]), truth["unit"]
    world = frames[:, : 7 * unit].astype(int)  # the 9x7 local view, without the inventory
    votes = {"left": 0, "other": 0}
    for t, a in enumerate(truth["actions"]):
        if truth["action_set"][a] == "move_right" and pos[t + 1, 0] == pos[t, 0] + 1:
            assert pos[t + 1, 1] == pos[t, 1]
            before, after = world[t], world[t + 1]
            shifted_left = np.abs(before[:, unit:] - after[:, :-unit]).mean()
            shifted_right = np.abs(before[:, :-unit] - after[:, unit:]).mean()
            votes["left" if shifted_left < shifted_right else "other"] += 1
    assert votes["left"] >= 5 and votes["left"] > 4 * votes["other"]


def test_recording_is_deterministic(tmp_path):
    """The same episode recorded here and in another process (other hash seed) is byte-identical."""
    row = gv.write_episode(SMALL, 0, tmp_path / "a")
    code = (
        "import sys; from pathlib import Path; from stages import gameplay_videos as gv; "
        "from tests.stages.test_gameplay_videos import SMALL; gv.write_episode(SMALL, 0, Path(sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], check=True, cwd=ROOT, env=env)
    for suffix in (".mp4", ".truth.json"):
        a = (tmp_path / "a" / f"crafter_000{suffix}").read_bytes()
        assert a == (tmp_path / "b" / f"crafter_000{suffix}").read_bytes()
    truth = json.loads((tmp_path / "a" / "crafter_000.truth.json").read_text())
    assert probe_video(tmp_path / "a" / "crafter_000.mp4")["frames"] == truth["frames"] == row["frames"]
    assert "shifts left" in truth["doc"]


def test_world_objects_are_iterated_in_insertion_order():
    """Crafter's chunk sets iterate in memory-address order; the recorder's world does not."""
    env = gv.deterministic_env(crafter.Env(size=(18, 18), seed=0))
    env.reset()
    world = env._world
    chunks = world._chunks.values()
    assert chunks and all(isinstance(objs, gv._OrderedObjects) for objs in chunks)
    index = {id(obj): i for i, obj in enumerate(world._objects) if obj}
    for objs in chunks:
        order = [index[id(obj)] for obj in objs]
        assert order == sorted(order)


def test_run_records_crafter_episodes_and_removes_stale_files(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "old-video.mp4").write_bytes(b"from another params list")
    cfg = Config.model_validate({"crafter": {"episodes": 2, "steps": 8}})
    metrics = gv.run(cfg, videos)
    assert sorted(p.name for p in videos.iterdir()) == [
        "crafter_000.mp4", "crafter_000.truth.json", "crafter_001.mp4", "crafter_001.truth.json", MANIFEST,
    ]
    rows = read_manifest(videos / MANIFEST)
    assert [(r["name"], r["status"], r["frames"]) for r in rows] == [
        ("crafter_000", "ok", "9"), ("crafter_001", "ok", "9"),
    ]
    assert metrics["videos_ok"] == 2 and metrics["videos_failed"] == 0
    assert metrics["bytes"] == sum(int(r["bytes"]) for r in rows)
    assert metrics["duration_s"] == pytest.approx(2 * 0.9)


def urls_config(urls: list[str], **over) -> Config:
    urls_section = {
        "list": urls, "allowed_schemes": ["http"], "allowed_hosts": ["127.0.0.1"],
        "retries": 1, "retry_backoff_s": 0.05, "max_filesize_mb": 0.1, **over,
    }
    return Config.model_validate({"source": "urls", "concurrency": 2, "urls": urls_section})


def test_urls_downloads_refuses_and_records_failures(tmp_path, http_server, make_video):
    www = http_server.root
    make_video(www / "good.mp4", n=20, fps=10)
    make_video(www / "flaky.mp4", n=10, fps=10)
    noise = np.random.default_rng(0).integers(0, 255, (20, 96, 96, 3), dtype=np.uint8)
    make_video(www / "big.mp4", frames=noise)
    (www / "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(3000))
    (www / "refused.mp4").write_bytes((www / "good.mp4").read_bytes())
    http_server.fail_first["/flaky.mp4"] = 1  # the first attempt fails, the retry succeeds
    port = http_server.base_url.rsplit(":", 1)[1]
    urls = [
        http_server.url("good.mp4"), http_server.url("missing.mp4"), http_server.url("corrupt.mp4"),
        http_server.url("big.mp4"), http_server.url("flaky.mp4"),
        f"http://localhost:{port}/refused.mp4", f"ftp://127.0.0.1:{port}/refused.mp4",
    ]
    out = tmp_path / "videos"
    metrics = gv.run(urls_config(urls), out)

    rows = {r["url"]: r for r in read_manifest(out / MANIFEST)}
    assert [r["url"] for r in read_manifest(out / MANIFEST)] == urls  # params order
    good = rows[urls[0]]
    assert good["status"] == "ok" and good["frames"] == "20" and good["error"] == ""
    assert (out / good["file"]).read_bytes() == (www / "good.mp4").read_bytes()
    assert good["archive_id"] in (out / ARCHIVE).read_text().splitlines()
    missing = rows[urls[1]]
    assert missing["status"] == "failed" and "404" in missing["error"]
    assert http_server.gets("/missing.mp4") == 2  # one attempt + one retry
    corrupt = rows[urls[2]]  # downloaded fine; the frames stage finds it cannot be decoded
    assert corrupt["status"] == "ok" and corrupt["error"].startswith("probe:")
    big = rows[urls[3]]
    assert big["status"] == "failed" and "max-filesize" in big["error"]
    assert not list(out.glob(f"{url_name(urls[3])}*"))  # no partial file left
    assert rows[urls[4]]["status"] == "ok" and http_server.gets("/flaky.mp4") == 3  # 503, then probe + get
    for url in urls[5:]:
        assert rows[url]["status"] == "failed" and "refusing" in rows[url]["error"]
    assert http_server.gets("/refused.mp4") == 0
    assert metrics["videos_ok"] == 3 and metrics["videos_failed"] == 4
    assert metrics["duration_s"] == pytest.approx(2.0 + 1.0)

    # A rerun requests none of the videos it has; dropping a URL from the list removes its file.
    before = (out / MANIFEST).read_text()
    http_server.requests.clear()
    gv.run(urls_config(urls), out)
    assert (out / MANIFEST).read_text() == before
    for name in ("/good.mp4", "/corrupt.mp4", "/flaky.mp4"):
        assert http_server.gets(name) == 0
    gv.run(urls_config(urls[1:]), out)
    assert not (out / good["file"]).exists()
    assert [r["url"] for r in read_manifest(out / MANIFEST)] == urls[1:]


def test_urls_params_are_checked(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"gameplay_videos": {"source": "urls", "urls": {"rate_limit": "fast"}}}))
    with pytest.raises(ParamsError, match="rate_limit"):
        load_section("gameplay_videos", Config, path=params)
    params.write_text(yaml.safe_dump({"gameplay_videos": {"urls": {"list": ["https://a/x", "https://a/x"]}}}))
    with pytest.raises(ParamsError, match="listed twice"):
        load_section("gameplay_videos", Config, path=params)

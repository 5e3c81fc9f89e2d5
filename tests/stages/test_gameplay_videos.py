"""gameplay_videos: real Crafter recordings, real yt-dlp downloads from a server on 127.0.0.1."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
from tests.pipeline.test_video import run_fresh

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


def test_recording_gives_the_same_bytes_alone_in_threads_and_in_a_fresh_process(tmp_path):
    """Guards issue 7.1: the same episode recorded (played, encoded, truth written) alone, beside
    other recordings in threads (as the stage's tasks run), and in another process (another hash
    seed, FFmpeg's C code only, as on another CPU) gives byte-identical files. The old encoder
    gave other bytes on other CPU code."""
    row = gv.write_episode(SMALL, 0, tmp_path / "a")
    jobs = [(0, "b"), (1, "b")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(lambda job: gv.write_episode(SMALL, job[0], tmp_path / job[1]), jobs))
    run_fresh(
        "import sys; from pathlib import Path; from stages import gameplay_videos as gv\n"
        "from tests.stages.test_gameplay_videos import SMALL; gv.write_episode(SMALL, 0, Path(sys.argv[1]))",
        str(tmp_path / "d"),
    )
    for suffix in (".mp4", ".truth.json"):
        alone = (tmp_path / "a" / f"crafter_000{suffix}").read_bytes()
        for other in ("b", "d"):
            assert (tmp_path / other / f"crafter_000{suffix}").read_bytes() == alone, f"{other}/crafter_000{suffix}"
    truth = json.loads((tmp_path / "a" / "crafter_000.truth.json").read_text())
    assert probe_video(tmp_path / "a" / "crafter_000.mp4")["frames"] == truth["frames"] == row["frames"]
    assert "shifts left" in truth["doc"]


def test_frames_do_not_depend_on_the_last_bit_of_daylight(monkeypatch):
    """Guards issue 7.1 (another CPU): Crafter's daylight comes from ``np.cos``, whose last bit
    NumPy's SIMD code may change from one CPU to another. One ulp more or less daylight (injected
    here into Crafter's own computation) changed whole frames (the 11th of every episode); the
    recorder rounds it, so the frames stay the same."""
    cfg = CrafterConfig(episodes=1, steps=12, size=72, seed=5)
    frames, _ = gv.record_episode(cfg, 0)
    update_time = crafter.Env._update_time

    def one_ulp_less(env):
        update_time(env)
        env._world.daylight = np.nextafter(env._world.daylight, -np.inf)

    monkeypatch.setattr(crafter.Env, "_update_time", one_ulp_less)
    other, _ = gv.record_episode(cfg, 0)
    np.testing.assert_array_equal(other, frames)


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
    """Also guards issue 7.4: a download that cannot be probed as a video was an ``ok`` row (with
    the probe's error beside it); it must be ``failed``, with no file kept."""
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
    corrupt = rows[urls[2]]  # downloaded, but not a video: failed (after its retry), nothing kept
    assert corrupt["status"] == "failed" and "the download is not a readable video" in corrupt["error"]
    assert corrupt["file"] == corrupt["sha256"] == "" and ".tmp-" not in corrupt["error"]
    assert not list(out.glob(f"{url_name(urls[2])}*"))
    assert http_server.gets("/corrupt.mp4") > 2  # a download takes 2 GETs: it was retried
    big = rows[urls[3]]
    assert big["status"] == "failed" and "max-filesize" in big["error"]
    assert not list(out.glob(f"{url_name(urls[3])}*"))  # no partial file left
    assert rows[urls[4]]["status"] == "ok" and http_server.gets("/flaky.mp4") == 3  # 503, then probe + get
    for url in urls[5:]:
        assert rows[url]["status"] == "failed" and "refusing" in rows[url]["error"]
    assert http_server.gets("/refused.mp4") == 0
    assert metrics["videos_ok"] == 2 and metrics["videos_failed"] == 5
    assert metrics["duration_s"] == pytest.approx(2.0 + 1.0)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [ARCHIVE, MANIFEST, good["file"], rows[urls[4]]["file"]]
    )  # no temporary directory left

    # A rerun requests none of the videos it has; dropping a URL from the list removes its file.
    before = (out / MANIFEST).read_text()
    http_server.requests.clear()
    gv.run(urls_config(urls), out)
    assert (out / MANIFEST).read_text() == before
    for name in ("/good.mp4", "/flaky.mp4"):
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


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_video_is_replaced_only_by_a_verified_download(tmp_path, http_server, make_video):
    """Guards issue 7.4: a video that is not reusable (here: the run that downloaded it was killed
    before it wrote the manifest) was deleted when downloading it again was killed or failed. The
    earlier file must stay until a download that probes as a video replaces it; a failed row says
    that it was kept; a killed download's temporary files go with the next run."""
    www, out = http_server.root, tmp_path / "videos"
    make_video(www / "clip.mp4", n=20, fps=10)
    url = http_server.url("clip.mp4")
    cfg = urls_config([url], max_filesize_mb=5)
    gv.run(cfg, out)
    [row] = read_manifest(out / MANIFEST)
    video = out / row["file"]
    assert row["status"] == "ok"
    good = video.read_bytes()
    (out / MANIFEST).unlink()  # the state a kill just before the manifest is written leaves

    # A download killed halfway (slowed down so that it can be caught in the act).
    noise = np.random.default_rng(5).integers(0, 255, (30, 96, 96, 3), dtype=np.uint8)
    make_video(www / "clip.mp4", frames=noise)  # the server's video changed meanwhile: 200 KB
    slow = urls_config([url], max_filesize_mb=5, rate_limit="40K")
    code = (
        "import json, sys; from pathlib import Path; from stages import gameplay_videos as gv\n"
        "cfg = gv.Config.model_validate(json.loads(sys.argv[1]))\n"
        "gv.download_url(cfg.urls.urls[0], gv.url_name(cfg.urls.urls[0]), cfg.urls, Path(sys.argv[2]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(slow.model_dump(by_alias=True)), str(out)], cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 60
        while not list(out.rglob("*.part")):  # yt-dlp is writing the new file
            assert proc.poll() is None and time.monotonic() < deadline, "the download did not start"
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert video.read_bytes() == good, "a killed download lost the earlier file"

    # The server fails: the earlier file stays, the row says so.
    http_server.fail_first["/clip.mp4"] = 100
    metrics = gv.run(cfg, out)
    [row] = read_manifest(out / MANIFEST)
    assert row["status"] == "failed" and "503" in row["error"]
    assert f"kept the earlier file {video.name}" in row["error"]
    assert row["file"] == video.name and row["sha256"] == _sha(video) and video.read_bytes() == good
    assert metrics["videos_ok"] == 0 and metrics["videos_failed"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([ARCHIVE, MANIFEST, video.name])  # killed temp gone

    # The server is back: the new download replaces the earlier file.
    http_server.fail_first.clear()
    gv.run(cfg, out)
    [row] = read_manifest(out / MANIFEST)
    assert row["status"] == "ok" and row["file"] == video.name and row["frames"] == "30"
    assert video.read_bytes() == (www / "clip.mp4").read_bytes() != good
    assert sorted(p.name for p in out.iterdir()) == sorted([ARCHIVE, MANIFEST, video.name])


def test_urls_source_with_an_empty_list_is_refused_before_any_work(tmp_path):
    """Guards issue 7.3: ``source: urls`` with an empty ``urls.list`` exited 0 with no video, after
    deleting every recorded video. The stage must refuse it at validation, naming the key, and
    leave the videos directory untouched."""
    videos = tmp_path / "data" / "gameplay" / "videos"
    videos.mkdir(parents=True)
    for name, data in [("crafter_000.mp4", b"a recorded video"), ("crafter_000.truth.json", b"{}"),
                       (MANIFEST, b"name,status\n"), (ARCHIVE, b"generic x\n")]:
        (videos / name).write_bytes(data)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in videos.iterdir()}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"gameplay_videos": {"source": "urls", "urls": {"list": []}}}))
    env = {**os.environ, "PIPELINE_PARAMS": str(params), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "stages.gameplay_videos"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert "gameplay_videos.urls.list is empty" in done.stderr
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in videos.iterdir()} == before
    with pytest.raises(ParamsError, match=r"gameplay_videos\.urls\.list"):
        load_section("gameplay_videos", Config, path=params)
    params.write_text(yaml.safe_dump({"gameplay_videos": {"source": "crafter", "urls": {"list": []}}}))
    assert load_section("gameplay_videos", Config, path=params).source == "crafter"  # only urls needs one

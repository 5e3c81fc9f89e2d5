"""gameplay_frames: real videos (hand-made and downloaded by yt-dlp) decoded into a real store."""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from pipeline import frames as frames_lib
from pipeline.store import EpisodeStore, EpisodeStoreWriter, StoreConfig
from stages import gameplay_frames as gf
from stages import gameplay_videos as gv
from tests.conftest import marker_index

STORE_CFG = StoreConfig(chunk_frames=8, shard_chunks=2)


def frames_config(**over) -> frames_lib.Config:
    return frames_lib.Config.model_validate({"fps": 10, "width": 16, "height": 16, "threads": 1, "retries": 0, **over})


def cut_video(path: Path, seed: int) -> Path:
    """A 20-frame MP4 with its index at the front, cut in half: it probes (the index lists every
    frame), so gameplay_videos keeps it as ``ok``, but decoding stops early."""
    frames = np.random.default_rng(seed).integers(0, 255, (20, 32, 48, 3), dtype=np.uint8)
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as c:
        stream = c.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for frame in frames:
            c.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        c.mux(stream.encode(None))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def add_video(videos, make_video, name: str, n: int, fps: float) -> dict:
    """A marker video with a truth record whose positions and actions encode the frame index."""
    make_video(videos / f"{name}.mp4", n=n, fps=fps)
    truth = {"fps": fps, "frames": n, "size": 72, "unit": 8, "player_pos": [[i, 100 + i] for i in range(n)],
             "actions": [i % 5 for i in range(n - 1)]}
    (videos / f"{name}.truth.json").write_text(json.dumps(truth))
    return gv.video_row(videos, name, f"{name}.mp4", "crafter")


def test_main_aligns_truth_by_timestamp(tmp_path, monkeypatch, make_video):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    videos = tmp_path / "data/gameplay/videos"
    videos.mkdir(parents=True)
    rows = [add_video(videos, make_video, "ep_a", 30, 20), add_video(videos, make_video, "ep_b", 8, 10)]
    gv.write_manifest(videos / gv.MANIFEST, rows, gv.COLUMNS)
    params = {"gameplay_frames": {"width": 16, "height": 16, "retries": 0},
              "store": {"chunk_frames": 8, "shard_chunks": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    gf.main()

    store = EpisodeStore.open(tmp_path / "data/gameplay/frames.zarr")
    assert store.attrs["videos"] == ["ep_a", "ep_b"] and store.attrs["has_truth"] is True
    assert (store.attrs["fps"], store.attrs["width"], store.attrs["height"]) == (10, 16, 16)
    assert store.attrs["tile_px"] == pytest.approx(8 * 16 / 72)  # Crafter's tiles, resized 72 -> 16 px
    np.testing.assert_array_equal(store.episode_lengths(), [15, 8])
    a = store.episode(0)
    assert a["frames"].shape == (15, 16, 16, 3)
    np.testing.assert_array_equal(marker_index(a["frames"]), np.arange(0, 30, 2))  # 20 -> 10 fps
    np.testing.assert_allclose(a["timestamps"], np.arange(15) / 10, atol=1e-9)
    k = np.arange(15)
    np.testing.assert_array_equal(a["player_pos"], np.stack([2 * k, 100 + 2 * k], axis=1))
    assert a["player_pos"].dtype == np.int32 and a["true_action"].dtype == np.int16
    np.testing.assert_array_equal(a["true_action"][:-1], (2 * k[:-1]) % 5)
    assert a["true_action"][-1] == -1
    b = store.episode(1)
    np.testing.assert_array_equal(b["true_action"], [0, 1, 2, 3, 4, 0, 1, -1])
    np.testing.assert_array_equal(b["player_pos"][:, 0], np.arange(8))

    metrics = json.loads((tmp_path / "metrics/gameplay_frames.json").read_text())
    assert (metrics["frames"], metrics["episodes"], metrics["videos_ok"], metrics["videos_failed"]) == (23, 2, 2, 0)
    assert metrics["decode_fps"] > 0
    manifest = gv.read_manifest(tmp_path / "data/gameplay/frames_manifest.csv")
    assert [(r["name"], r["status"], r["frames"]) for r in manifest] == [("ep_a", "ok", "15"), ("ep_b", "ok", "8")]


def test_episodes_are_appended_in_manifest_order(tmp_path):
    """Results arriving as 2, 0, 1 are written as 0, 1, 2; a failure in between is skipped."""
    episodes = [{"arrays": {"x": np.full((n, 2), n, dtype=np.int16)}} for n in (3, 5, 4)]
    with EpisodeStoreWriter(tmp_path / "s.zarr", STORE_CFG) as writer:
        append = gf.InOrder(writer)
        append(2, episodes[2])
        assert writer.n == 0
        append(0, episodes[0])
        assert writer.n == 3
        append(1, RuntimeError("could not decode"))
    store = EpisodeStore.open(tmp_path / "s.zarr")
    np.testing.assert_array_equal(store.episode_lengths(), [3, 4])
    assert store.array("x")[:, 0].tolist() == [3] * 3 + [4] * 4


def test_downloaded_videos_decode_and_broken_ones_are_skipped(tmp_path, http_server, make_video):
    www = http_server.root
    make_video(www / "first.mp4", n=20, fps=10)
    make_video(www / "second.mp4", n=20, fps=20)
    cut_video(www / "corrupt.mp4", seed=0)
    cut_video(www / "truncated.mp4", seed=1)
    names = ["first", "corrupt", "second", "truncated"]
    urls_section = {"list": [http_server.url(f"{n}.mp4") for n in names], "allowed_schemes": ["http"],
                    "allowed_hosts": ["127.0.0.1"], "retries": 0}
    videos = tmp_path / "videos"
    vm = gv.run(gv.Config.model_validate({"source": "urls", "urls": urls_section}), videos)
    assert vm["videos_ok"] == 4  # all four downloaded; two of them cannot be decoded

    store, manifest = tmp_path / "frames.zarr", tmp_path / "frames_manifest.csv"
    metrics = gf.run(frames_config(retries=1), STORE_CFG, videos, store, manifest)
    assert (metrics["videos_ok"], metrics["videos_failed"], metrics["frames"]) == (2, 2, 30)
    rows = {r["name"].split("-")[0]: r for r in gv.read_manifest(manifest)}
    assert [r["status"] for r in rows.values()] == ["ok", "failed", "ok", "failed"]
    for name in ("corrupt", "truncated"):
        assert "VideoError" in rows[name]["error"] and f"{rows[name]['name']}.mp4" in rows[name]["error"]
    s = EpisodeStore.open(store)
    assert s.attrs["has_truth"] is False and s.keys == ["frames", "timestamps"]
    assert s.attrs["videos"] == [rows["first"]["name"], rows["second"]["name"]]
    np.testing.assert_array_equal(s.episode_lengths(), [20, 10])
    np.testing.assert_array_equal(marker_index(s.episode(1)["frames"]), np.arange(0, 20, 2))

    # Past max_failed_fraction the stage fails, naming the videos; the earlier store stays.
    with pytest.raises(RuntimeError, match="2 of 4 videos failed") as err:
        gf.run(frames_config(max_failed_fraction=0.25), STORE_CFG, videos, store, manifest)
    assert rows["corrupt"]["name"] in str(err.value) and rows["truncated"]["name"] in str(err.value)
    assert EpisodeStore.open(store).attrs["videos"] == s.attrs["videos"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".frames")) == []


def test_fails_when_no_video_survives(tmp_path, make_video):
    videos = tmp_path / "videos"
    videos.mkdir()
    changed = add_video(videos, make_video, "changed", 6, 10)
    make_video(videos / "changed.mp4", n=7, fps=10)  # differs from the manifest's sha256
    cut_video(videos / "junk.mp4", seed=2)
    junk = gv.video_row(videos, "junk", "junk.mp4", "urls")
    assert junk["status"] == "ok"  # it probes; decoding finds it cut short
    gv.write_manifest(videos / gv.MANIFEST, [changed, junk], gv.COLUMNS)
    with pytest.raises(RuntimeError, match="2 of 2 videos failed"):
        gf.run(frames_config(max_failed_fraction=1.0), STORE_CFG, videos, tmp_path / "f.zarr", tmp_path / "m.csv")
    rows = gv.read_manifest(tmp_path / "m.csv")
    assert "sha256 differs" in rows[0]["error"] and "junk.mp4" in rows[1]["error"]
    assert not (tmp_path / "f.zarr").exists()

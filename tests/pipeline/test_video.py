"""pipeline.video with real PyAV files: exact frames and timestamps, resampling, crop/resize, errors."""
from __future__ import annotations

import av
import numpy as np
import pytest

from pipeline.video import VideoError, decode_video, encode_video, probe_video
from tests.conftest import marker_frames, marker_index


def test_decode_gives_every_frame_with_pts_timestamps(tmp_path, make_video):
    path = make_video(tmp_path / "v.mp4", n=30, fps=10)
    frames, ts = decode_video(path)
    assert frames.shape == (30, 32, 48, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(marker_index(frames), np.arange(30))
    np.testing.assert_allclose(ts, np.arange(30) / 10, atol=1e-9)
    assert ts.dtype == np.float64


def test_same_fps_keeps_every_frame_once(tmp_path, make_video):
    frames, ts = decode_video(make_video(tmp_path / "v.mp4", n=30, fps=10), fps=10)
    np.testing.assert_array_equal(marker_index(frames), np.arange(30))


def test_downsampling_picks_every_other_frame(tmp_path, make_video):
    frames, ts = decode_video(make_video(tmp_path / "v.mp4", n=30, fps=20), fps=10)
    np.testing.assert_array_equal(marker_index(frames), np.arange(0, 30, 2))
    np.testing.assert_allclose(ts, np.arange(15) / 10, atol=1e-9)


def test_upsampling_repeats_the_last_frame_before_each_time(tmp_path, make_video):
    frames, ts = decode_video(make_video(tmp_path / "v.mp4", n=5, fps=10), fps=20)
    # times 0, .05, .1, ... .4: the last frame at or before each
    np.testing.assert_array_equal(marker_index(frames), [0, 0, 1, 1, 2, 2, 3, 3, 4])
    np.testing.assert_allclose(ts, [0, 0, .1, .1, .2, .2, .3, .3, .4], atol=1e-9)


def test_resize_and_crop(tmp_path, make_video):
    frames = marker_frames(4, 32, 48)
    frames[:, :8] = 250  # a bright band on top, removed by the crop
    path = make_video(tmp_path / "v.mp4", frames=frames)
    out, _ = decode_video(path, size=(20, 10))
    assert out.shape == (4, 10, 20, 3)
    out, _ = decode_video(path, crop=(8, 0, 4, 6))
    assert out.shape == (4, 24, 38, 3)
    np.testing.assert_array_equal(marker_index(out), np.arange(4))
    out, _ = decode_video(path, size=(16, 16), crop=(8, 0, 0, 0), threads=1)
    assert out.shape == (4, 16, 16, 3)
    assert out.max() < 100  # no trace of the band
    with pytest.raises(ValueError, match="crop"):
        decode_video(path, crop=(20, 20, 0, 0))


def test_threads_do_not_change_the_frames(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (12, 32, 48, 3), dtype=np.uint8)
    path = encode_video(frames, tmp_path / "noise.mp4", fps=10)
    one, _ = decode_video(path, threads=1)
    two, _ = decode_video(path, threads=2)
    np.testing.assert_array_equal(one, two)


def test_encoding_is_deterministic_and_atomic(tmp_path):
    frames = np.random.default_rng(1).integers(0, 255, (10, 16, 16, 3), dtype=np.uint8)
    a = encode_video(frames, tmp_path / "a.mp4", fps=10).read_bytes()
    b = encode_video(frames, tmp_path / "b.mp4", fps=10).read_bytes()
    assert a == b
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4"]
    with pytest.raises(ValueError, match="even"):
        encode_video(frames[:, :15], tmp_path / "odd.mp4", fps=10)
    assert not (tmp_path / "odd.mp4").exists()


def test_probe(tmp_path, make_video):
    info = probe_video(make_video(tmp_path / "v.mp4", n=30, fps=20, width=64, height=48))
    assert info == {"duration": 1.5, "frames": 30, "fps": 20.0, "width": 64, "height": 48}


def test_truncated_video_names_the_file(tmp_path, make_video):
    data = make_video(tmp_path / "v.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match="cut.mp4"):
        decode_video(cut)


def test_truncated_faststart_video_is_detected(tmp_path):
    """With the index at the front, a cut file opens: the missing frames must still be noticed."""
    path = tmp_path / "fast.mp4"
    frames = np.random.default_rng(2).integers(0, 255, (20, 32, 48, 3), dtype=np.uint8)
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match=r"fast.mp4: truncated video: decoded \d+ of 20 frames"):
        decode_video(path)


def test_not_a_video_or_missing(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(3).bytes(4000))
    with pytest.raises(VideoError, match="junk.mp4"):
        decode_video(junk)
    with pytest.raises(VideoError, match="junk.mp4"):
        probe_video(junk)
    with pytest.raises(VideoError, match="nothing.mp4: no such video file"):
        decode_video(tmp_path / "nothing.mp4")

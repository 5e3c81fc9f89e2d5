"""pipeline.video with real PyAV files: exact frames and timestamps, resampling, crop/resize, errors,
and the same bytes and frames whatever the thread, process or CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline import video
from pipeline.video import VideoError, decode_video, encode_video, probe_video, rgb_to_yuv420p
from tests.conftest import marker_frames, marker_index

ROOT = Path(__file__).resolve().parents[2]

# Python code that makes the process's FFmpeg run its C code only, as on a CPU without the SIMD sets
# this one has (av_force_cpu_flags(0); x264 runs its C code anyway, see X264_PARAMS). Prepend it
# to the code a fresh process runs.
FFMPEG_C_ONLY = (
    "import ctypes, av\n"
    "lib = next(l.split()[-1] for l in open('/proc/self/maps') if '/libavutil' in l)\n"
    "ctypes.CDLL(lib).av_force_cpu_flags(0)\n"
)
# The rest of another CPU, where a switch exists: NumPy without its x86-64-v3/v4 dispatch targets,
# PyTorch's ATen on its default kernels (no AVX), glibc (libm's exp/log/pow/cos, memcpy) without
# AVX-512, AVX2, FMA or AVX, and NumPy's OpenBLAS on its oldest x86-64 kernels (it picks Haswell,
# Zen, SkylakeX... by the CPU, and each sums a matrix product in its own order).
OTHER_CPU_ENV = {
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
    "ATEN_CPU_CAPABILITY": "default",
    "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX2,-FMA,-AVX",
    "OPENBLAS_CORETYPE": "Prescott",
}
# x264's options spelled out here, its C code: the bytes every CPU must give.
X264_C = "asm=0:threads=1:lookahead-threads=1:sliced-threads=0:non-deterministic=0"


def run_fresh(code: str, *args: str, env: dict | None = None) -> None:
    """Run ``code`` in a fresh interpreter at the repository root as on another CPU (FFMPEG_C_ONLY,
    OTHER_CPU_ENV) and with another hash seed; ``args`` are its ``sys.argv[1:]``, ``env`` more
    environment variables."""
    if not sys.platform.startswith("linux"):
        pytest.skip("finds FFmpeg's libavutil through /proc/self/maps (Linux)")
    env = {**os.environ, "PYTHONHASHSEED": "123", **OTHER_CPU_ENV, **(env or {})}
    subprocess.run([sys.executable, "-c", FFMPEG_C_ONLY + code, *args], check=True, cwd=ROOT, env=env)


def tiles(n: int, seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    """``n`` frames of coloured 8-pixel tiles that scroll by one pixel a frame (gameplay-like)."""
    rng = np.random.default_rng(seed)
    world = rng.integers(0, 256, (height // 8 + 1, width // 8 + n // 8 + 2, 3), dtype=np.uint8)
    world = world.repeat(8, 0).repeat(8, 1)
    return np.stack([world[:height, t : t + width] for t in range(n)])


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


def test_rgb_to_yuv420p_is_bt601_limited_range_rounded_exactly():
    """Y, U, V are BT.601's formula in limited range, rounded half up (exact rationals here)."""
    from fractions import Fraction as F
    import math

    frames = np.random.default_rng(4).integers(0, 256, (2, 6, 8, 3), dtype=np.uint8)
    yuv = rgb_to_yuv420p(frames)
    assert yuv.shape == (2, 9, 8) and yuv.dtype == np.uint8

    def rounded(x: F) -> int:
        return math.floor(x + F(1, 2))

    for t in range(2):
        flat = yuv[t].ravel()
        y, u, v = flat[:48].reshape(6, 8), flat[48:60].reshape(3, 4), flat[60:].reshape(3, 4)
        for i in range(6):
            for j in range(8):
                r, g, b = (int(c) for c in frames[t, i, j])
                assert y[i, j] == 16 + rounded(F(219, 255) * F(299 * r + 587 * g + 114 * b, 1000))
        for i in range(3):
            for j in range(4):
                block = frames[t, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(4, 3).astype(int).sum(0)
                r, g, b = (F(int(c), 4) for c in block)  # the block's mean
                luma = (299 * r + 587 * g + 114 * b) / 1000
                assert u[i, j] == 128 + rounded(F(224, 255) * (b - luma) / F(1772, 1000))
                assert v[i, j] == 128 + rounded(F(224, 255) * (r - luma) / F(1402, 1000))
    # The textbook 8-bit values: black, white, red, green, blue.
    for rgb, expect in [((0, 0, 0), (16, 128, 128)), ((255, 255, 255), (235, 128, 128)),
                        ((255, 0, 0), (81, 90, 240)), ((0, 255, 0), (145, 54, 34)), ((0, 0, 255), (41, 240, 110))]:
        flat = rgb_to_yuv420p(np.full((1, 2, 2, 3), rgb, dtype=np.uint8)).ravel()
        assert tuple(flat[[0, 4, 5]]) == expect


def test_encoding_gives_the_bytes_of_x264s_c_code(tmp_path, monkeypatch):
    """Guards issue 18: x264's SIMD code is not bit-exact with its C code at frame sizes that are
    not a multiple of 16 (72x72, Crafter's: SSSE3 and up gave other bytes than C on an AVX2 machine,
    and an AVX-512 machine others again). Whatever this CPU offers, the bytes must be those of
    x264's C code, which every machine runs alike."""
    frames = tiles(24, seed=0, height=72, width=72)
    ours = encode_video(frames, tmp_path / "ours.mp4", fps=10).read_bytes()
    with monkeypatch.context() as m:
        m.setattr(video, "X264_PARAMS", X264_C)
        c_code = encode_video(frames, tmp_path / "c.mp4", fps=10).read_bytes()
    assert ours == c_code, "encode_video does not give the bytes of x264's C code"
    stream = av.open(str(tmp_path / "ours.mp4")).streams.video[0]
    assert (stream.codec_context.color_range, stream.codec_context.colorspace) == (1, 6)  # BT.601, tv range


def test_encoding_gives_the_same_bytes_beside_other_ffmpeg_work_and_in_fresh_processes(tmp_path):
    """Guards issues 7.1 and 18: on one machine an encode's bytes changed with FFmpeg work in other
    threads (x264's SIMD path reads stack values it never wrote, and FFmpeg leaves the frames' row
    padding uninitialised). The same frames must give the bytes of an encode alone: for 3 rounds,
    4 threads of encodes of these and other frames at several sizes, decodes on FFmpeg's threads,
    and decodes on the encoding thread itself just before it encodes; and in fresh processes on
    other CPU code whose heaps hand out garbage (MALLOC_PERTURB_)."""
    frames = tiles(24, seed=0, height=72, width=72)  # not a multiple of 16: rows carry padding
    alone = encode_video(frames, tmp_path / "alone.mp4", fps=10).read_bytes()
    others = [tiles(24, seed=s, height=h, width=w) for s, (h, w) in enumerate([(72, 72), (48, 64), (24, 40), (72, 104)], 1)]
    (tmp_path / "jobs").mkdir()

    def job(i: int) -> bytes | None:
        kind, out = i % 4, tmp_path / "jobs" / f"{i}.mp4"
        if kind == 1:
            encode_video(others[i // 4 % len(others)], out, fps=10)
            return None
        if kind == 2:  # FFmpeg's decoder threads
            decode_video(tmp_path / "alone.mp4", size=(32, 24), threads=2)
            return None
        if kind == 3:  # this thread's stack holds the decoder's values when x264 starts
            decode_video(tmp_path / "alone.mp4", threads=1)
        return encode_video(frames, out, fps=10).read_bytes()

    same = []
    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            same += [b for b in pool.map(job, range(24)) if b is not None]
    assert len(same) == 36
    differ = sum(b != alone for b in same)
    assert differ == 0, f"{differ} of {len(same)} encodes beside other FFmpeg work differ from the encode alone"

    np.save(tmp_path / "frames.npy", frames)
    for perturb in ("90", "201"):
        fresh = tmp_path / f"fresh{perturb}.mp4"
        run_fresh(
            "import sys, numpy as np; from pipeline.video import encode_video\n"
            "encode_video(np.load(sys.argv[1]), sys.argv[2], fps=10)",
            str(tmp_path / "frames.npy"), str(fresh), env={"MALLOC_PERTURB_": perturb},
        )
        assert fresh.read_bytes() == alone, f"a fresh process on other CPU code (MALLOC_PERTURB_={perturb}) encodes other bytes"


def test_frames_handed_to_the_encoder_have_zero_row_padding(tmp_path):
    """FFmpeg pads each row of a frame to its line size and leaves the padding uninitialised; in a
    process whose heap hands out garbage (MALLOC_PERTURB_), the encoder's frames must still carry
    the planes and zero padding, where PyAV's own ``from_ndarray`` leaves the garbage."""
    run_fresh(
        "import sys, av, numpy as np; from pipeline.video import _yuv420p_frame, rgb_to_yuv420p\n"
        "planes = rgb_to_yuv420p(np.full((1, 72, 72, 3), 200, np.uint8))[0]\n"
        "out = {}\n"
        "for name, f in [('ours', _yuv420p_frame(planes)), ('pyav', av.VideoFrame.from_ndarray(planes, format='yuv420p'))]:\n"
        "    out[name + '_planes'] = f.to_ndarray()\n"
        "    out[name + '_padding'] = np.concatenate([np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, p.width:].ravel() for p in f.planes])\n"
        "out['planes'] = planes\n"
        "np.savez(sys.argv[1], **out)",
        str(tmp_path / "frames.npz"), env={"MALLOC_PERTURB_": "90"},
    )
    got = np.load(tmp_path / "frames.npz")
    np.testing.assert_array_equal(got["ours_planes"], got["planes"])
    assert got["ours_padding"].size > 0 and not got["ours_padding"].any(), "row padding is not zero"
    assert got["pyav_padding"].any(), "PyAV's padding is zero here: this test no longer shows the garbage it guards against"


def test_decoding_gives_the_same_frames_in_threads_and_in_a_fresh_process(tmp_path):
    """Guards issue 7.1 on the decode side: swscale's YUV to RGB conversion at the video's own size
    gave other values on other CPU code (FFmpeg's C code, in the fresh process), and by default it
    runs one slice thread per CPU. Decoded frames must not depend on either."""
    path = encode_video(tiles(20, seed=7), tmp_path / "v.mp4", fps=10)
    settings = [{}, {"size": (40, 30)}, {"size": (32, 32), "crop": (4, 2, 6, 0)}]
    alone = [decode_video(path, **kw)[0] for kw in settings]
    with ThreadPoolExecutor(3) as pool:
        threaded = list(pool.map(lambda i: decode_video(path, threads=2, **settings[i % 3])[0], range(9)))
    for i, frames in enumerate(threaded):
        np.testing.assert_array_equal(frames, alone[i % 3])
    run_fresh(
        "import sys, numpy as np; from pipeline.video import decode_video\n"
        "kw = [{}, {'size': (40, 30)}, {'size': (32, 32), 'crop': (4, 2, 6, 0)}]\n"
        "np.savez(sys.argv[2], *[decode_video(sys.argv[1], **k)[0] for k in kw])",
        str(path), str(tmp_path / "fresh.npz"),
    )
    fresh = np.load(tmp_path / "fresh.npz")
    for i, frames in enumerate(alone):
        np.testing.assert_array_equal(fresh[f"arr_{i}"], frames, err_msg=f"decode_video(**{settings[i]}) on C code")


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

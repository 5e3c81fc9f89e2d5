"""Video I/O with PyAV: H.264 encoding that gives the same bytes on every machine, threaded
decoding with fps resampling.

``encode_video`` converts RGB to YUV itself (``rgb_to_yuv420p``: integer arithmetic in numpy), so
no swscale code runs on the encode side: swscale's RGB to YUV conversion picks its code by the
CPU's SIMD level, and its SIMD and C paths round chroma differently (FFmpeg 8, PyAV 18: 24,998 of
the 401,760 chroma values of a 155-frame 72x72 Crafter episode differ by 1 between them), which
made the videos, and everything downstream, depend on the machine. x264 runs with one thread and
its portable C code only (``X264_PARAMS``: its SIMD code is not what decides the bytes), and every
byte of the frames it is handed is defined, the row padding included (``_yuv420p_frame``).

``decode_video`` returns RGB frames and their timestamps in seconds from the container's pts
(relative to the first frame). With a target ``fps``, output time ``k / fps`` takes the last
source frame whose pts is at or before it, so a source at the target rate keeps every frame and
a 20 fps source at 10 fps keeps every other one. Only the frames kept are converted to RGB; the
conversion and resize are one swscale pass with a reused context, in swscale's bit-exact mode
(``SWS_FLAGS``) and one thread, so the frames do not depend on the CPU either (without it,
decoding at the video's own size gave other RGB values, up to 2 apart, on SSE2 or C code than on
AVX2).
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

from pipeline.atomic import atomic_path

# Timestamps closer than this (seconds) count as equal when resampling (float rounding of pts).
_EPS = 1e-6

# swscale flags of every RGB conversion of decoded frames: area resampling, in the bit-exact mode
# (the same output whatever SIMD code the CPU allows), with accurate rounding.
SWS_FLAGS = Interpolation.AREA | Interpolation.ACCURATE_RND | Interpolation.BITEXACT

# BT.601 in limited ("tv") range: what decoders assume for untagged SD video, and what the encoded
# streams are tagged with (libavutil/pixfmt.h: AVCOL_{PRI,TRC,SPC}_SMPTE170M = 6, AVCOL_RANGE_MPEG = 1).
_SMPTE170M, _RANGE_MPEG = 6, 1
# Luma weights in thousandths (Kr = 0.299, Kg = 0.587, Kb = 0.114) and the chroma differences
# B - Y' and R - Y' in thousandths, which BT.601 divides by 2 (1 - Kb) = 1.772 and 2 (1 - Kr) = 1.402.
_LUMA = np.array([299, 587, 114], dtype=np.int64)
_B_MINUS_Y = np.array([-299, -587, 886], dtype=np.int64)
_R_MINUS_Y = np.array([701, -587, -114], dtype=np.int64)


def _round_div(num: np.ndarray, den: int) -> np.ndarray:
    """``num / den`` rounded half up, exactly (integers)."""
    return (2 * num + den) // (2 * den)


def rgb_to_yuv420p(frames: np.ndarray) -> np.ndarray:
    """(T,H,W,3) uint8 RGB (H, W even) to (T, H*3/2, W) uint8 yuv420p as PyAV lays it out: per
    frame the Y plane (H x W), then U, then V (H/2 x W/2 each), flat, in rows of W.

    BT.601 in limited range, each value the exact formula rounded half up:
    Y = 16 + 219/255 Y' with Y' = 0.299 R + 0.587 G + 0.114 B; U = 128 + 224/255 (B - Y') / 1.772
    and V = 128 + 224/255 (R - Y') / 1.402 of the mean RGB of each 2x2 block (chroma sited at the
    block's centre). Integer arithmetic only, so every machine gets the same values.
    """
    rgb = np.asarray(frames, dtype=np.int64)
    t, h, w, _ = rgb.shape
    y = 16 + _round_div(219 * (rgb @ _LUMA), 255 * 1000)
    block = rgb.reshape(t, h // 2, 2, w // 2, 2, 3).sum(axis=(2, 4))  # 4 x the mean of each 2x2 block
    u = 128 + _round_div(224 * (block @ _B_MINUS_Y), 4 * 255 * 1772)
    v = 128 + _round_div(224 * (block @ _R_MINUS_Y), 4 * 255 * 1402)
    flat = [np.clip(p, 0, 255).astype(np.uint8).reshape(t, -1) for p in (y, u, v)]
    return np.concatenate(flat, axis=1).reshape(t, h * 3 // 2, w)


# x264's options for every encode. ``asm=0`` runs x264's portable C code whatever the CPU offers:
# - its SIMD code is not bit-exact with its C code at frame sizes that are not a multiple of 16
#   (Crafter's 72x72): here SSSE3 and up give other bytes than MMX2/SSE2 or C, and 31 of the 36
#   default episodes came out with other bytes on an AVX-512 machine than on this AVX2 one;
# - on that AVX-512 machine, FFmpeg work in other threads changed an encode's bytes. Under valgrind
#   the SIMD path's macro-block tree (the lookahead's log2 of propagate costs) uses uninitialised
#   stack values, so its output can depend on what ran on the thread before.
# The C code is the same instructions on every x86-64 machine. Valgrind still reports uninitialised
# stack pixels in its weighted-prediction analysis, but they do not reach the bytes: stacks filled
# with six patterns, heaps with MALLOC_PERTURB_, garbage in the frames' row padding, and 4 threads
# of encodes and decodes for 3 rounds all gave the bytes of an encode alone. The cost: 10.1 s of
# encoding for the 36 default episodes against 4.8 s with SIMD (about 0.15 s per episode).
# One thread, no sliced or lookahead threads, deterministic mode: threads would decide by timing.
X264_PARAMS = "asm=0:threads=1:lookahead-threads=1:sliced-threads=0:non-deterministic=0"


def _yuv420p_frame(planes: np.ndarray) -> av.VideoFrame:
    """A yuv420p ``VideoFrame`` of ``planes`` (``rgb_to_yuv420p``'s layout, one frame) whose row
    padding is zero. FFmpeg pads each row to its line size and leaves the padding uninitialised
    (``VideoFrame.from_ndarray`` copies the visible bytes only): an encoder that reads it (x264's
    SIMD code reads whole vectors) would see whatever the process's heap held before."""
    rows, width = planes.shape
    height = rows * 2 // 3
    frame = av.VideoFrame(width, height, "yuv420p")
    flat = planes.reshape(-1)
    start = 0
    for plane in frame.planes:
        w, h = plane.width, plane.height
        padded = np.zeros((h, plane.line_size), dtype=np.uint8)
        padded[:, :w] = flat[start : start + w * h].reshape(h, w)
        np.frombuffer(plane, dtype=np.uint8)[:] = padded.reshape(-1)
        start += w * h
    return frame


class VideoError(ValueError):
    """A video file cannot be read: missing, not a video, corrupt or truncated."""


def encode_video(frames: np.ndarray, path: Path | str, fps: float, crf: int = 18) -> Path:
    """Encode ``frames`` (T,H,W,3) uint8 RGB to an H.264 MP4 (libx264, yuv420p, BT.601 limited
    range) at ``fps``; returns ``path``.

    The same frames give the same bytes in any thread, process or machine (with the same PyAV and
    x264 builds): the RGB to YUV conversion is ``rgb_to_yuv420p`` (no swscale), the frames' row
    padding is zero, x264 runs its C code on one thread (``X264_PARAMS``), and the muxer writes no
    library version. The file is written to a temporary sibling and renamed into place.
    """
    frames = np.asarray(frames)
    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"{path}: frames must be non-empty (T,H,W,3) uint8, got {frames.shape}/{frames.dtype}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"{path}: yuv420p needs an even width and height, got {width}x{height}")
    yuv = rgb_to_yuv420p(frames)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            ctx = stream.codec_context
            ctx.color_range, ctx.colorspace = _RANGE_MPEG, _SMPTE170M
            ctx.color_primaries = ctx.color_trc = _SMPTE170M
            ctx.thread_count = 1
            ctx.options = {
                "crf": str(crf),
                "preset": "medium",
                "threads": "1",
                "x264-params": X264_PARAMS,
            }
            for planes in yuv:
                frame = _yuv420p_frame(planes)
                frame.color_range, frame.colorspace = _RANGE_MPEG, _SMPTE170M
                container.mux(stream.encode(frame))  # already yuv420p: PyAV does not reformat it
            container.mux(stream.encode(None))
    return path


def _reason(exc: av.error.FFmpegError) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _open(path: Path) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    if not path.is_file():
        raise VideoError(f"{path}: no such video file")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        raise VideoError(f"{path}: not a readable video, corrupt or truncated ({_reason(exc)})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: has no video stream")
    return container, container.streams.video[0]


def probe_video(path: Path | str) -> dict:
    """``duration`` (s), ``frames``, ``fps``, ``width``, ``height`` of the first video stream.

    The frame count is the container's, or the number of packets when the container has none.
    """
    path = Path(path)
    container, stream = _open(path)
    with container:
        frames = stream.frames
        if not frames:
            try:
                frames = sum(1 for p in container.demux(stream) if p.size)
            except av.error.FFmpegError as exc:
                raise VideoError(f"{path}: corrupt video ({_reason(exc)})") from None
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = (container.duration or 0) / av.time_base
        rate = stream.average_rate or stream.guessed_rate
        return {
            "duration": duration,
            "frames": int(frames),
            "fps": float(rate) if rate else 0.0,
            "width": int(stream.codec_context.width),
            "height": int(stream.codec_context.height),
        }


def _decoded(path: Path, container, stream) -> Iterator[tuple[Fraction, av.VideoFrame]]:
    """Yield (time from the first frame, frame); errors name the file; a short stream raises."""
    first = None
    n = 0
    try:
        for frame in container.decode(stream):
            if frame.pts is None:
                raise VideoError(f"{path}: frame {n} has no pts")
            t = frame.pts * stream.time_base
            first = t if first is None else first
            n += 1
            yield t - first, frame
    except av.error.FFmpegError as exc:
        raise VideoError(f"{path}: corrupt video after {n} frames ({_reason(exc)})") from None
    if n == 0:
        raise VideoError(f"{path}: no frame could be decoded")
    if stream.frames and n < stream.frames:
        raise VideoError(f"{path}: truncated video: decoded {n} of {stream.frames} frames")


def _resampled(frames: Iterator[tuple[Fraction, av.VideoFrame]], fps: float | None):
    """For each output time k/fps, the last (time, frame) at or before it; all frames without fps."""
    if fps is None:
        yield from frames
        return
    k, prev = 0, None
    for t, frame in frames:
        while prev is not None and k / fps < float(t) - _EPS:
            yield prev
            k += 1
        prev = (t, frame)
    while prev is not None and k / fps <= float(prev[0]) + _EPS:
        yield prev
        k += 1


class _ToRGB:
    """Converts decoded frames to RGB arrays: crop, then resize (area interpolation).

    The reformatters keep their swscale context from frame to frame; building one per frame
    (``frame.reformat``/``frame.to_ndarray``) costs more than decoding a small frame. Every
    conversion runs with ``SWS_FLAGS`` on one swscale thread (PyAV's default, 0, means one per CPU).
    """

    def __init__(self, size: tuple[int, int] | None, crop: tuple[int, int, int, int] | None):
        self.size, self.crop = size, crop
        self.convert = VideoReformatter()
        self.resize = VideoReformatter()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        width, height = self.size or (None, None)
        if self.crop is None:
            return self.convert.reformat(frame, width, height, "rgb24", interpolation=SWS_FLAGS, threads=1).to_ndarray()
        top, bottom, left, right = self.crop
        rgb = self.convert.reformat(frame, format="rgb24", interpolation=SWS_FLAGS, threads=1).to_ndarray()
        rgb = np.ascontiguousarray(rgb[top : rgb.shape[0] - bottom, left : rgb.shape[1] - right])
        if self.size is None:
            return rgb
        cropped = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        return self.resize.reformat(cropped, width, height, interpolation=SWS_FLAGS, threads=1).to_ndarray()


def decode_video(
    path: Path | str,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    crop: tuple[int, int, int, int] | None = None,
    threads: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``path`` to ``(frames (T,H,W,3) uint8 RGB, timestamps (T,) float64 seconds)``.

    ``fps``: resample to this rate (None keeps every frame); ``crop``: (top, bottom, left, right)
    pixels removed before resizing to ``size`` = (width, height); ``threads``: decoder threads
    (0: FFmpeg's choice). Raises ``VideoError`` naming the file when it is corrupt or truncated.
    """
    path = Path(path)
    if fps is not None and fps <= 0:
        raise ValueError(f"{path}: fps must be positive, got {fps}")
    container, stream = _open(path)
    with container:
        if crop is not None:
            _check_crop(path, crop, stream.codec_context.width, stream.codec_context.height)
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        to_rgb = _ToRGB(size, crop)
        out, times = [], []
        cache: tuple[av.VideoFrame, np.ndarray] | None = None
        for t, frame in _resampled(_decoded(path, container, stream), fps):
            if cache is None or cache[0] is not frame:  # a repeated frame is converted once
                cache = (frame, to_rgb(frame))
            out.append(cache[1])
            times.append(float(t))
    return np.stack(out), np.asarray(times, dtype=np.float64)


def _check_crop(path: Path, crop, width: int, height: int) -> None:
    top, bottom, left, right = crop
    if min(crop) < 0 or top + bottom >= height or left + right >= width:
        raise ValueError(f"{path}: crop {list(crop)} does not fit a {width}x{height} video")

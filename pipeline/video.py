"""Video I/O with PyAV: deterministic H.264 encoding, threaded decoding with fps resampling.

``decode_video`` returns RGB frames and their timestamps in seconds from the container's pts
(relative to the first frame). With a target ``fps``, output time ``k / fps`` takes the last
source frame whose pts is at or before it, so a source at the target rate keeps every frame and
a 20 fps source at 10 fps keeps every other one. Only the frames kept are converted to RGB; the
conversion and resize are one swscale pass with a reused context.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from pipeline.atomic import atomic_path

# Timestamps closer than this (seconds) count as equal when resampling (float rounding of pts).
_EPS = 1e-6


class VideoError(ValueError):
    """A video file cannot be read: missing, not a video, corrupt or truncated."""


def encode_video(frames: np.ndarray, path: Path | str, fps: float, crf: int = 18) -> Path:
    """Encode ``frames`` (T,H,W,3) uint8 RGB to an H.264 MP4 (libx264, yuv420p) at ``fps``.

    x264 runs single-threaded so that the same frames always give a byte-identical file. The file
    is written to a temporary sibling and renamed into place.
    """
    frames = np.asarray(frames)
    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"{path}: frames must be non-empty (T,H,W,3) uint8, got {frames.shape}/{frames.dtype}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"{path}: yuv420p needs an even width and height, got {width}x{height}")
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.thread_count = 1
            stream.codec_context.options = {"crf": str(crf), "threads": "1"}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
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
    (``frame.reformat``/``frame.to_ndarray``) costs more than decoding a small frame.
    """

    def __init__(self, size: tuple[int, int] | None, crop: tuple[int, int, int, int] | None):
        self.size, self.crop = size, crop
        self.convert = VideoReformatter()
        self.resize = VideoReformatter()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        width, height = self.size or (None, None)
        if self.crop is None:
            return self.convert.reformat(frame, width, height, "rgb24", interpolation="AREA").to_ndarray()
        top, bottom, left, right = self.crop
        rgb = self.convert.reformat(frame, format="rgb24").to_ndarray()
        rgb = np.ascontiguousarray(rgb[top : rgb.shape[0] - bottom, left : rgb.shape[1] - right])
        if self.size is None:
            return rgb
        cropped = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        return self.resize.reformat(cropped, width, height, interpolation="AREA").to_ndarray()


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

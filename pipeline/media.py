"""Pictures and videos for people to look at: side-by-side rollouts, contact sheets, per-horizon plots,
and their GIF / MP4 / PNG writers.

Images come in as numpy arrays (T, h, w, c) (one image: (h, w, c)) with c = 1 (grey) or 3, float in
[0, 1] (clipped; NaN drawn black) or uint8; every drawing function returns uint8 RGB. Images are
enlarged by an integer ``scale`` with nearest-neighbour repetition only, never smoothed.

Every output is a pure function of the inputs, byte for byte, on any machine with the same pinned
builds (Pillow 13.0.0, PyAV 18.1.0, matplotlib): no timestamps or software versions are written, and
no text is drawn by FreeType. Text uses Pillow's built-in bitmap font
(``ImageFont.load_default_imagefont()``: 6 px per character, 11 px lines, Latin-1 only, anything
else drawn as ``?``), not ``ImageFont.load_default()``, which in Pillow 13 returns an anti-aliased
FreeType font (Aileron, 10 px) whose pixels depend on the FreeType build. Text is light on dark.

Writers are the only functions that touch files; each writes a temporary sibling and renames it into
place (``pipeline.atomic``). Pillow's own animated-GIF writer merges identical consecutive frames
(adding their durations), with no option to stop it, so ``write_gif`` assembles the file itself:
one GIF frame per input frame, always.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import matplotlib.style
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import GifImagePlugin, Image, ImageDraw, ImageFont

from pipeline.atomic import atomic_path, tmp_sibling, write_bytes
from pipeline.video import encode_video

FONT = ImageFont.load_default_imagefont()
LINE = 11  # px, height of a line of FONT
PAD = 4  # px around texts and between rows and columns
BORDER = 2  # px, the frame around each image
BG = (20, 20, 20)  # body background
HEADER_BG = (44, 44, 44)  # header band background
TEXT = (235, 235, 235)
RED = (230, 40, 40)  # frame of predicted frames (t >= context)
GREY = (128, 128, 128)  # frame of context frames
MP4_CRF = 18  # x264 quality of write_mp4: sharp text, still far smaller than GIF for long clips


# ---------------------------------------------------------------------------------------------------
# Inputs and text


def _as_rgb8(x: np.ndarray, what: str) -> np.ndarray:
    """(..., c) with c in {1, 3}, float in [0, 1] or uint8 -> (..., 3) uint8."""
    a = np.asarray(x)
    if a.ndim < 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"{what}: expected (..., h, w, c) with c = 1 or 3, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        a = np.rint(np.clip(np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"{what}: expected float in [0, 1] or uint8, got {a.dtype}")
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


def _enlarge(img: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement of (..., h, w, c) by an integer factor."""
    return np.repeat(np.repeat(img, scale, axis=-3), scale, axis=-2)


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def _text_width(text: str) -> int:
    return int(FONT.getbbox(_latin1(text))[2])


def _draw_text(canvas: np.ndarray, x: int, y: int, text: str, color=TEXT) -> None:
    """Draw ``text`` (one line, top-left at x, y) into the (H, W, 3) uint8 ``canvas`` in place."""
    text = _latin1(text)
    w = _text_width(text)
    if w == 0:
        return
    mask = Image.new("L", (w, LINE))
    ImageDraw.Draw(mask).text((0, 0), text, font=FONT, fill=255)
    m = np.asarray(mask) > 0
    region = canvas[y : y + LINE, x : x + w]
    region[m[: region.shape[0], : region.shape[1]]] = color


def _check_rows(rows: list[tuple[str, np.ndarray]], what: str) -> list[tuple[str, np.ndarray]]:
    """Rows as (label, (T, h, w, 3) uint8); raises ValueError naming a row whose T, h or w differ."""
    if not rows:
        raise ValueError(f"{what}: no rows")
    out: list[tuple[str, np.ndarray]] = []
    for label, seq in rows:
        a = np.asarray(seq)
        if a.ndim != 4:
            raise ValueError(f"{what}: row {label!r} must be (T, h, w, c), got shape {a.shape}")
        a = _as_rgb8(a, f"{what}: row {label!r}")
        if out and a.shape != out[0][1].shape:
            first, ref = out[0]
            raise ValueError(
                f"{what}: row {label!r} has (T, h, w) = {a.shape[:3]}, but row {first!r} has {ref.shape[:3]}"
            )
        out.append((str(label), a))
    if out[0][1].shape[0] == 0:
        raise ValueError(f"{what}: rows have no frames")
    return out


def _check_scale(scale: int, what: str) -> int:
    if int(scale) != scale or scale < 1:
        raise ValueError(f"{what}: scale must be a positive integer, got {scale}")
    return int(scale)


# ---------------------------------------------------------------------------------------------------
# Side by side


def frame_caption(t: int, n_frames: int, context: int) -> str:
    """The header's counter for frame index ``t`` (0-based) of ``n_frames``: ``frame t+1/T  context``
    for ``t < context``, else ``frame t+1/T  horizon k`` with k = t - context + 1."""
    phase = "context" if t < context else f"horizon {t - context + 1}"
    return f"frame {t + 1}/{n_frames}  {phase}"


def _side_by_side_layout(labels: list[str], n_frames: int, h: int, w: int, context: int, scale: int,
                         title: str | None) -> dict:
    """Geometry of ``side_by_side``'s frames: ``size`` (H, W), ``header`` (height of the band),
    ``boxes`` (y, x) of each row's enlarged image (inside its BORDER), ``label_y`` (y of each
    label), ``captions`` per frame."""
    captions = [frame_caption(t, n_frames, context) for t in range(n_frames)]
    header = PAD + (2 * LINE + 2 if title else LINE) + PAD  # title line, 2 px, counter line
    label_w = max(_text_width(label) for label in labels) + 2 * PAD
    cell_h, cell_w = max(h * scale + 2 * BORDER, LINE), w * scale + 2 * BORDER  # a label fits its row
    text_w = max([_text_width(c) for c in captions] + [_text_width(title or "")]) + 2 * PAD
    width = max(label_w + cell_w + PAD, text_w)
    height = header + PAD + len(labels) * (cell_h + PAD)
    tops = [header + PAD + i * (cell_h + PAD) for i in range(len(labels))]
    return {"size": (height, width), "header": header, "captions": captions,
            "boxes": [(top + BORDER, label_w + BORDER) for top in tops],
            "label_y": [top + (cell_h - LINE) // 2 for top in tops]}


def side_by_side(rows: list[tuple[str, np.ndarray]], context: int, scale: int = 3,
                 title: str | None = None) -> np.ndarray:
    """Animation frames (T, H, W, 3) uint8 comparing labelled sequences frame by frame.

    ``rows``: (label, (T, h, w, c)) pairs, all with the same T, h and w (else ValueError naming the
    row). Each output frame has a header band (the ``title`` if any, then ``frame_caption``:
    ``frame t/T  context`` or ``frame t/T  horizon k``, t counted from 1), then one row per sequence:
    its label in a left column, its image enlarged ``scale`` times (nearest neighbour) inside a
    BORDER-px frame, red for predicted frames (index >= ``context``), grey for context frames.
    """
    scale = _check_scale(scale, "side_by_side")
    if context < 0:
        raise ValueError(f"side_by_side: context must be >= 0, got {context}")
    rows = _check_rows(rows, "side_by_side")
    n_frames, h, w = rows[0][1].shape[:3]
    lay = _side_by_side_layout([label for label, _ in rows], n_frames, h, w, context, scale, title)
    height, width = lay["size"]
    header = lay["header"]

    static = np.empty((height, width, 3), dtype=np.uint8)
    static[:] = BG
    static[:header] = HEADER_BG
    if title:
        _draw_text(static, PAD, PAD, title)
    for (label, _), y in zip(rows, lay["label_y"]):
        _draw_text(static, PAD, y, label)
    caption_y = header - PAD - LINE

    out = np.empty((n_frames, height, width, 3), dtype=np.uint8)
    for t in range(n_frames):
        frame = out[t]
        frame[:] = static
        _draw_text(frame, PAD, caption_y, lay["captions"][t])
        color = RED if t >= context else GREY
        for (_, seq), (y, x) in zip(rows, lay["boxes"]):
            frame[y - BORDER : y + h * scale + BORDER, x - BORDER : x + w * scale + BORDER] = color
            frame[y : y + h * scale, x : x + w * scale] = _enlarge(seq[t], scale)
    return out


def imagined_frames(clip: np.ndarray, context: int, scale: int = 3) -> np.ndarray:
    """A policy's imagined episode (T, h, w, c) as animation frames (T, H, W, 3) uint8: the real
    context frames in grey frames, the imagined ones in red, under ``side_by_side``'s header band."""
    return side_by_side([("imagined", clip)], context, scale)


# ---------------------------------------------------------------------------------------------------
# Contact sheet


def _contact_sheet_layout(labels: list[str], n_frames: int, h: int, w: int, context: int, horizons: list[int],
                          scale: int) -> dict:
    """Geometry of ``contact_sheet``: ``size``, ``horizons`` kept, ``columns`` (x of each kept
    horizon's images), ``row_y`` (y of each row's images), ``label_y`` (y of each label), ``header``
    (height of the band)."""
    kept = [k for k in horizons if 1 <= k <= n_frames - context]
    if not kept:
        raise ValueError(f"contact_sheet: none of the horizons {list(horizons)} exists with "
                         f"T = {n_frames} frames and context = {context}")
    header = PAD + LINE + PAD
    label_w = max(_text_width(label) for label in labels) + 2 * PAD
    cell_h, cell_w = max(h * scale + 2 * BORDER, LINE), w * scale + 2 * BORDER
    col_w = max(cell_w, max(_text_width(f"h={k}") for k in kept)) + PAD
    columns = [label_w + j * col_w + BORDER for j in range(len(kept))]
    tops = [header + i * (cell_h + PAD) for i in range(len(labels))]
    size = (header + len(labels) * (cell_h + PAD), label_w + len(kept) * col_w)
    return {"size": size, "horizons": kept, "columns": columns, "header": header,
            "row_y": [top + BORDER for top in tops], "label_y": [top + (cell_h - LINE) // 2 for top in tops]}


def contact_sheet(rows: list[tuple[str, np.ndarray]], context: int, horizons: list[int],
                  scale: int = 2) -> np.ndarray:
    """One image (H, W, 3) uint8: a column per horizon k of ``horizons`` that exists
    (1 <= k <= T - context; the others are skipped; ValueError if none does) showing frame
    ``context + k - 1`` of each row, enlarged ``scale`` times in a red frame; ``h=k`` above each
    column, each row's label on its left. Rows (label, (T, h, w, c)) must share T, h and w."""
    scale = _check_scale(scale, "contact_sheet")
    rows = _check_rows(rows, "contact_sheet")
    n_frames, h, w = rows[0][1].shape[:3]
    lay = _contact_sheet_layout([label for label, _ in rows], n_frames, h, w, context, horizons, scale)
    sheet = np.empty((*lay["size"], 3), dtype=np.uint8)
    sheet[:] = BG
    sheet[: lay["header"]] = HEADER_BG
    for k, x in zip(lay["horizons"], lay["columns"]):
        _draw_text(sheet, x - BORDER, PAD, f"h={k}")
    for (label, seq), y, label_y in zip(rows, lay["row_y"], lay["label_y"]):
        _draw_text(sheet, PAD, label_y, label)
        for k, x in zip(lay["horizons"], lay["columns"]):
            sheet[y - BORDER : y + h * scale + BORDER, x - BORDER : x + w * scale + BORDER] = RED
            sheet[y : y + h * scale, x : x + w * scale] = _enlarge(seq[context + k - 1], scale)
    return sheet


# ---------------------------------------------------------------------------------------------------
# Writers


def _check_fps(fps: float, what: str) -> float:
    if not fps > 0:
        raise ValueError(f"{what}: fps must be positive, got {fps}")
    return float(fps)


def _frames(frames: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(frames)
    if a.ndim != 4 or len(a) == 0:
        raise ValueError(f"{what}: frames must be non-empty (T, H, W, c), got shape {a.shape}")
    return _as_rgb8(a, what)


def _palettize(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(palette (P, 3) uint8 with P <= 256, indices (T, H, W) uint8) shared by all frames: the exact
    colours when there are at most 256 of them, else Pillow's median cut over all frames (no dither)."""
    t, h, w, _ = frames.shape
    rgb = frames.reshape(-1, 3).astype(np.uint32)
    colours, inverse = np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2], return_inverse=True)
    if len(colours) <= 256:
        palette = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=1).astype(np.uint8)
        return palette, inverse.reshape(t, h, w).astype(np.uint8)
    mosaic = Image.fromarray(frames.reshape(t * h, w, 3))
    quantized = mosaic.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    palette = np.asarray(quantized.getpalette("RGB"), dtype=np.uint8).reshape(-1, 3)
    return palette, np.asarray(quantized).reshape(t, h, w)


def _gif_bytes(palette: np.ndarray, indices: np.ndarray, delay_cs: int) -> bytes:
    """A looping GIF89a: global palette, then per frame a graphic control extension (``delay_cs``,
    disposal 1: keep) and the bounding box of the pixels changed since the previous frame (a 1x1 box
    when none did, so the frame still exists), LZW-coded by Pillow."""
    _, height, width = indices.shape
    bits = max(1, (len(palette) - 1).bit_length())
    table = np.zeros((1 << bits, 3), dtype=np.uint8)
    table[: len(palette)] = palette
    parts = [
        b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80 | (bits - 1), 0, 0) + table.tobytes(),
        b"!\xff\x0bNETSCAPE2.0\x03\x01" + struct.pack("<H", 0) + b"\x00",  # loop forever
    ]
    control = b"!\xf9\x04" + struct.pack("<BHB", 1 << 2, delay_cs, 0) + b"\x00"
    for t, idx in enumerate(indices):
        y0, y1, x0, x1 = 0, height, 0, width
        if t > 0:
            changed = idx != indices[t - 1]
            if not changed.any():
                y1, x1 = 1, 1
            else:
                ys, xs = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
                y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
        box = Image.fromarray(np.ascontiguousarray(idx[y0:y1, x0:x1]))  # mode "L": the indices as they are
        parts.append(control)
        parts.extend(GifImagePlugin.getdata(box, offset=(int(x0), int(y0))))
    parts.append(b";")
    return b"".join(parts)


def write_gif(frames: np.ndarray, path: Path | str, fps: float) -> Path:
    """Write ``frames`` (T, H, W, c) as an animated GIF that loops forever; returns ``path``.

    One GIF frame per input frame, identical consecutive frames included, each shown 1000 / fps ms
    rounded to GIF's 10 ms steps (at least 10 ms). One palette for all frames: exact when the frames
    hold at most 256 colours, else a median cut (no dithering).
    """
    path = Path(path)
    fps = _check_fps(fps, f"write_gif {path}")
    frames = _frames(frames, f"write_gif {path}")
    palette, indices = _palettize(frames)
    write_bytes(path, _gif_bytes(palette, indices, max(1, round(100 / fps))))
    return path


def write_mp4(frames: np.ndarray, path: Path | str, fps: float) -> Path:
    """Write ``frames`` (T, H, W, c) as H.264 (``pipeline.video.encode_video``, crf ``MP4_CRF``);
    an odd H or W is padded to even by repeating the last row / column. Returns ``path``."""
    path = Path(path)
    fps = _check_fps(fps, f"write_mp4 {path}")
    frames = _frames(frames, f"write_mp4 {path}")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return encode_video(frames, path, fps, crf=MP4_CRF)


def write_animation(frames: np.ndarray, stem: Path | str, fps: float) -> list[Path]:
    """Write ``<stem>.gif``, and ``<stem>.mp4`` only when it comes out smaller than the GIF (an
    existing ``<stem>.mp4`` is removed otherwise). Returns the paths written, the GIF first."""
    stem = Path(stem)
    gif = write_gif(frames, stem.with_name(stem.name + ".gif"), fps)
    mp4 = stem.with_name(stem.name + ".mp4")
    tmp = tmp_sibling(mp4)
    try:
        write_mp4(frames, tmp, fps)
        if tmp.stat().st_size < gif.stat().st_size:
            os.replace(tmp, mp4)
            return [gif, mp4]
        mp4.unlink(missing_ok=True)
        return [gif]
    finally:
        tmp.unlink(missing_ok=True)


def write_png(image: np.ndarray, path: Path | str) -> Path:
    """Write one image (H, W, c), float in [0, 1] or uint8, as an RGB PNG with no metadata; returns
    ``path``."""
    path = Path(path)
    a = np.asarray(image)
    if a.ndim != 3:
        raise ValueError(f"write_png {path}: expected (H, W, c), got shape {a.shape}")
    with atomic_path(path) as tmp:
        Image.fromarray(_as_rgb8(a, f"write_png {path}")).save(tmp, format="PNG")
    return path


# ---------------------------------------------------------------------------------------------------
# Plots


def horizon_plot(rows: list[dict], y_keys: list[str], path: Path | str, title: str, ylabel: str,
                 log_y: bool = False, labels: dict[str, str] | None = None) -> Path:
    """Write a per-horizon line plot (PNG, 600x400 px) to ``path``; returns ``path``.

    x is ``row["horizon"]``; one line per key of ``y_keys`` (legend text ``labels[key]`` if given),
    through the rows where the key is present and not None; a key no row has is skipped. Where every
    such row also has ``<key>_ci_low`` and ``<key>_ci_high``, the band between them is shaded.
    Drawn with matplotlib's Agg canvas (no pyplot) under its default style, whatever the rc files
    say; no ``Software`` text is written, so the same rows give the same bytes.
    """
    path = Path(path)
    labels = labels or {}
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for key in y_keys:
            points = sorted((r["horizon"], r[key], r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high"))
                            for r in rows if r.get(key) is not None)
            if not points:
                continue
            x = [p[0] for p in points]
            line, = ax.plot(x, [p[1] for p in points], marker="o", markersize=3, label=labels.get(key, key))
            if all(p[2] is not None and p[3] is not None for p in points):
                ax.fill_between(x, [p[2] for p in points], [p[3] for p in points], color=line.get_color(),
                                alpha=0.2, linewidth=0)
        if log_y:
            ax.set_yscale("log")
        if ax.get_lines():
            ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.set_title(title)
        ax.set_xlabel("horizon")
        ax.set_ylabel(ylabel)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    return path

"""pipeline.media: side-by-side frames, contact sheets and plots, and their GIF / MP4 / PNG writers
(frame counts, durations, sizes, pixel values read back, byte-identical rewrites)."""
from __future__ import annotations

import re
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from pipeline import media

RNG = np.random.default_rng(0)


def marked(t: int, h: int, w: int, first: int) -> np.ndarray:
    """(t, h, w, 3) uint8 random frames whose pixel (0, 0) holds a colour no other pixel has (one per
    frame, from ``first``): where that colour lands in a drawing is where the frame's block starts."""
    x = RNG.integers(64, 256, size=(t, h, w, 3), dtype=np.uint8)
    for i in range(t):
        x[i, 0, 0] = (first + i, 7, 9)  # channel 0 < 64 and G, B fixed: unique in the whole drawing
    return x


def enlarged(img: np.ndarray, s: int) -> np.ndarray:
    return np.repeat(np.repeat(img, s, axis=0), s, axis=1)


def block_origin(frame: np.ndarray, colour, scale: int) -> tuple[int, int]:
    """Top-left of the scale x scale cell of ``colour`` (a ``marked`` pixel: found scale**2 times)."""
    hits = np.argwhere(np.all(frame == np.asarray(colour, dtype=np.uint8), axis=-1))
    assert len(hits) == scale * scale, f"colour {tuple(colour)} found {len(hits)} times, not {scale * scale}"
    return int(hits[:, 0].min()), int(hits[:, 1].min())


def smooth(t: int, h: int, w: int) -> np.ndarray:
    """(t, h, w, 3) float frames: diagonal colour gradients drifting slowly over time."""
    y, x = np.mgrid[0:h, 0:w]
    out = np.empty((t, h, w, 3))
    for i in range(t):
        out[i, ..., 0] = (x + i) / (w + t)
        out[i, ..., 1] = y / h
        out[i, ..., 2] = 0.5 + 0.3 * np.sin((x + y + i) / 20)
    return out


# --- side_by_side / imagined_frames ----------------------------------------------------------------


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_side_by_side_enlarges_each_row_by_nearest_neighbour(scale):
    t, h, w, context = 5, 6, 9, 2
    rows = [("truth", marked(t, h, w, 0)), ("model K=4", marked(t, h, w, 10)), ("copy-last", marked(t, h, w, 20))]
    frames = media.side_by_side(rows, context, scale=scale)
    assert frames.dtype == np.uint8 and frames.shape[0] == t and frames.shape[-1] == 3
    for i in range(t):
        for r, (_, seq) in enumerate(rows):
            y, x = block_origin(frames[i], seq[i, 0, 0], scale)
            block = frames[i, y : y + h * scale, x : x + w * scale]
            np.testing.assert_array_equal(block, enlarged(seq[i], scale), err_msg=f"frame {i} row {r}")


def test_side_by_side_shape_grows_with_rows_and_scale():
    t, h, w = 3, 8, 60  # wide enough that the images, not the header's text, decide the width
    one = [("a", marked(t, h, w, 0))]
    three = one + [("b", marked(t, h, w, 10)), ("c", marked(t, h, w, 20))]
    s2, s3 = media.side_by_side(three, 1, scale=2), media.side_by_side(three, 1, scale=3)
    assert s3.shape[1] - s2.shape[1] == 3 * h  # each row's image grows by h
    assert s3.shape[2] - s2.shape[2] == w
    row_height = h * 3 + 2 * media.BORDER + media.PAD
    assert s3.shape[1] - media.side_by_side(one, 1, scale=3).shape[1] == 2 * row_height
    titled = media.side_by_side(three, 1, scale=3, title="mnist, window 0")
    assert titled.shape[1] > s3.shape[1]  # a title line in the header band


def test_side_by_side_header_counts_frames_and_borders_mark_predictions():
    t, h, w, context, scale = 6, 5, 5, 3, 2
    still = np.full((t, h, w, 3), 200, dtype=np.uint8)
    still[:, 0, 0] = (1, 7, 9)
    frames = media.side_by_side([("truth", still)], context, scale=scale)
    y, x = block_origin(frames[0], (1, 7, 9), scale)
    for i in range(t):
        expected = media.RED if i >= context else media.GREY
        corners = [frames[i, y - 1, x - 1], frames[i, y + h * scale, x + w * scale], frames[i, y - media.BORDER, x]]
        for c in corners:
            assert tuple(c) == expected, f"frame {i}: border {tuple(c)}, expected {expected}"
    header = frames[:, : y - media.BORDER]
    assert all(not np.array_equal(header[i], header[i + 1]) for i in range(t - 1))  # the counter changes
    # the same images every frame: only the header band and the borders differ
    body = frames[:, y - media.BORDER :].copy()
    np.testing.assert_array_equal(body[0], body[1])
    assert not np.array_equal(body[context - 1], body[context])


def test_frame_caption():
    assert media.frame_caption(0, 8, 3) == "frame 1/8  context"
    assert media.frame_caption(2, 8, 3) == "frame 3/8  context"
    assert media.frame_caption(3, 8, 3) == "frame 4/8  horizon 1"
    assert media.frame_caption(7, 8, 3) == "frame 8/8  horizon 5"


def test_side_by_side_grey_and_float_inputs_match_uint8_rgb():
    grey8 = RNG.integers(0, 256, size=(4, 6, 7, 1), dtype=np.uint8)
    rgb8 = np.repeat(grey8, 3, axis=-1)
    ref = media.side_by_side([("x", rgb8)], 2, title="t")
    np.testing.assert_array_equal(media.side_by_side([("x", grey8)], 2, title="t"), ref)
    np.testing.assert_array_equal(media.side_by_side([("x", grey8 / 255.0)], 2, title="t"), ref)
    np.testing.assert_array_equal(media.side_by_side([("x", (grey8 / 255.0).astype(np.float32))], 2, title="t"), ref)
    # out of range and NaN floats are clipped / drawn black, never garbage
    wild = np.full((4, 6, 7, 1), 2.0)
    wild[:, 0] = -1.0
    wild[:, 1] = np.nan
    clipped = np.full((4, 6, 7, 1), 255, dtype=np.uint8)
    clipped[:, :2] = 0
    np.testing.assert_array_equal(media.side_by_side([("x", wild)], 2, title="t"),
                                  media.side_by_side([("x", clipped)], 2, title="t"))


def test_side_by_side_rejects_mismatched_rows_naming_them():
    ok = np.zeros((4, 8, 8, 1))
    with pytest.raises(ValueError, match=re.escape("'model K=4'")):
        media.side_by_side([("truth", ok), ("model K=4", np.zeros((5, 8, 8, 1)))], 2)
    with pytest.raises(ValueError, match=re.escape("'|error|'")):
        media.side_by_side([("truth", ok), ("|error|", np.zeros((4, 8, 9, 1)))], 2)
    with pytest.raises(ValueError, match="'rgba'"):
        media.side_by_side([("rgba", np.zeros((4, 8, 8, 4)))], 2)
    with pytest.raises(ValueError, match="'ints'"):
        media.side_by_side([("ints", np.zeros((4, 8, 8, 1), dtype=np.int64))], 2)
    with pytest.raises(ValueError):
        media.side_by_side([], 2)


def test_side_by_side_is_deterministic_and_text_is_two_colour():
    rows = [("truth", smooth(4, 6, 6)), ("model ≥ 1", smooth(4, 6, 6)[::-1])]  # ≥ is drawn as "?"
    a = media.side_by_side(rows, 2, title="déjà vu")
    np.testing.assert_array_equal(a, media.side_by_side(rows, 2, title="déjà vu"))
    border_y = int(np.argwhere(np.all(a[0] == media.GREY, axis=-1))[:, 0].min())  # first row's frame
    colours = {tuple(int(v) for v in c) for c in a[:, : border_y - media.PAD].reshape(-1, 3)}
    assert colours == {media.HEADER_BG, media.TEXT}  # bitmap font: no anti-aliased shades


def test_imagined_frames_marks_imagined_frames_red():
    clip = marked(5, 4, 4, 0)
    frames = media.imagined_frames(clip, context=2, scale=3)
    np.testing.assert_array_equal(frames, media.side_by_side([("imagined", clip)], 2, 3))
    for i in range(5):
        y, x = block_origin(frames[i], clip[i, 0, 0], 3)
        assert tuple(frames[i, y - 1, x - 1]) == (media.RED if i >= 2 else media.GREY)


# --- write_gif -------------------------------------------------------------------------------------


def read_gif(path: Path) -> tuple[list[np.ndarray], list[int], dict]:
    with Image.open(path) as im:
        info = dict(im.info)
        frames, durations = [], []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
            frames.append(np.asarray(im.convert("RGB")))
    return frames, durations, info


@pytest.mark.parametrize("fps", [10, 4])
def test_write_gif_keeps_identical_frames_and_their_durations(tmp_path, fps):
    a, b = marked(1, 12, 10, 0)[0], marked(1, 12, 10, 30)[0]
    frames = np.stack([a, a, a, b, b, a])  # fewer than 256 colours: exact palette
    path = media.write_gif(frames, tmp_path / "x.gif", fps)
    assert path == tmp_path / "x.gif"
    got, durations, info = read_gif(path)
    assert len(got) == len(frames)
    assert durations == [1000 / fps] * len(frames)
    assert info["loop"] == 0
    for i, g in enumerate(got):
        np.testing.assert_array_equal(g, frames[i], err_msg=f"frame {i}")
    assert [p.name for p in tmp_path.iterdir()] == ["x.gif"]  # no temporary sibling left


def test_write_gif_many_colours_is_close_and_byte_identical(tmp_path):
    frames = media.side_by_side([("truth", smooth(6, 20, 24)), ("model", smooth(6, 20, 24)[::-1])], 2)
    assert len(np.unique(frames.reshape(-1, 3), axis=0)) > 256  # the median-cut path
    media.write_gif(frames, tmp_path / "a.gif", 10)
    media.write_gif(frames, tmp_path / "b.gif", 10)
    assert (tmp_path / "a.gif").read_bytes() == (tmp_path / "b.gif").read_bytes()
    got, durations, _ = read_gif(tmp_path / "a.gif")
    assert len(got) == len(frames) and durations == [100] * len(frames)
    assert np.abs(np.stack(got).astype(int) - frames).mean() < 2.0


def test_write_gif_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="fps"):
        media.write_gif(np.zeros((2, 4, 4, 3), np.uint8), tmp_path / "x.gif", 0)
    with pytest.raises(ValueError):
        media.write_gif(np.zeros((4, 4, 3), np.uint8), tmp_path / "x.gif", 10)
    assert not list(tmp_path.iterdir())


# --- write_mp4 -------------------------------------------------------------------------------------


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("h, w", [(32, 48), (33, 47)])
def test_write_mp4_decodes_close_to_input_padded_to_even(tmp_path, h, w):
    frames = smooth(6, h, w)
    path = media.write_mp4(frames, tmp_path / "x.mp4", 10)
    got = decode(path)
    assert got.shape == (6, h + h % 2, w + w % 2, 3)
    diff = np.abs(got[:, :h, :w].astype(float) - np.rint(frames * 255))
    # yuv420p in limited range at crf 18 and the decoder's conversion: about 2.7 here; a swapped
    # channel or a misplaced pad gives tens
    assert diff.mean() < 4.0, diff.mean()
    media.write_mp4(frames, tmp_path / "y.mp4", 10)
    assert path.read_bytes() == (tmp_path / "y.mp4").read_bytes()


# --- write_animation -------------------------------------------------------------------------------


def test_write_animation_keeps_mp4_when_smaller(tmp_path):
    # long, large and mostly static: a smooth background with a small square moving over it
    frames = np.repeat(np.rint(smooth(1, 96, 128) * 255).astype(np.uint8), 48, axis=0)
    for i in range(48):
        frames[i, 40:52, 2 * i : 2 * i + 12] = (250, 250, 250)
    gif = media.write_gif(frames, tmp_path / "ref.gif", 10).stat().st_size
    mp4 = media.write_mp4(frames, tmp_path / "ref.mp4", 10).stat().st_size
    assert mp4 < gif, (mp4, gif)
    written = media.write_animation(frames, tmp_path / "clip.k4", 10)
    assert written == [tmp_path / "clip.k4.gif", tmp_path / "clip.k4.mp4"]
    assert (tmp_path / "clip.k4.gif").read_bytes() == (tmp_path / "ref.gif").read_bytes()
    assert (tmp_path / "clip.k4.mp4").read_bytes() == (tmp_path / "ref.mp4").read_bytes()
    assert len(list(tmp_path.iterdir())) == 4  # no temporary sibling left


def test_write_animation_drops_mp4_when_gif_is_smaller(tmp_path):
    frames = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    frames[1, 2:4, 2:4] = 255
    gif = media.write_gif(frames, tmp_path / "ref.gif", 10).stat().st_size
    mp4 = media.write_mp4(frames, tmp_path / "ref.mp4", 10).stat().st_size
    assert gif < mp4, (gif, mp4)
    (tmp_path / "clip.mp4").write_bytes(b"stale mp4 of an earlier run")
    assert media.write_animation(frames, tmp_path / "clip", 10) == [tmp_path / "clip.gif"]
    assert not (tmp_path / "clip.mp4").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "ref.gif", "ref.mp4"]


# --- contact_sheet ---------------------------------------------------------------------------------


def test_contact_sheet_columns_are_the_horizon_frames():
    t, h, w, context, scale = 6, 5, 7, 2, 2
    rows = [("truth", marked(t, h, w, 0)), ("model", marked(t, h, w, 10)), ("truth w1", marked(t, h, w, 20))]
    sheet = media.contact_sheet(rows, context, [1, 2, 4], scale=scale)
    assert sheet.ndim == 3 and sheet.dtype == np.uint8
    for label, seq in rows:
        xs = []
        for k in [1, 2, 4]:
            frame = seq[context + k - 1]
            y, x = block_origin(sheet, frame[0, 0], scale)
            np.testing.assert_array_equal(sheet[y : y + h * scale, x : x + w * scale], enlarged(frame, scale),
                                          err_msg=f"{label} h={k}")
            assert tuple(sheet[y - 1, x - 1]) == media.RED
            xs.append(x)
        assert xs == sorted(xs)  # columns in the order of horizons
        for i in [0, 1, 4]:  # context frames and horizons not asked for are not drawn
            assert not np.all(sheet == seq[i, 0, 0], axis=-1).any()


def test_contact_sheet_width_grows_with_existing_horizons_only():
    rows = [("a", marked(5, 6, 6, 0))]  # context 2: horizons 1..3 exist
    widths = [media.contact_sheet(rows, 2, hs).shape[1] for hs in ([1], [1, 2], [1, 2, 3])]
    assert widths[0] < widths[1] < widths[2] and widths[2] - widths[1] == widths[1] - widths[0]
    all_three = media.contact_sheet(rows, 2, [1, 2, 3])
    np.testing.assert_array_equal(media.contact_sheet(rows, 2, [1, 2, 3, 4, 9]), all_three)  # 4, 9 skipped
    np.testing.assert_array_equal(media.contact_sheet(rows, 2, [0, 2]), media.contact_sheet(rows, 2, [2]))
    two_rows = media.contact_sheet(rows + [("b", marked(5, 6, 6, 10))], 2, [1, 2, 3])
    assert two_rows.shape[0] > all_three.shape[0] and two_rows.shape[1] == all_three.shape[1]
    with pytest.raises(ValueError, match="horizons"):
        media.contact_sheet(rows, 2, [4, 5])
    with pytest.raises(ValueError, match="'b'"):
        media.contact_sheet(rows + [("b", marked(5, 6, 7, 10))], 2, [1])


# --- write_png -------------------------------------------------------------------------------------


def test_write_png_round_trip_without_metadata(tmp_path):
    image = RNG.integers(0, 256, size=(13, 17, 3), dtype=np.uint8)
    path = media.write_png(image, tmp_path / "x.png")
    with Image.open(path) as im:
        assert im.mode == "RGB" and not im.info
        np.testing.assert_array_equal(np.asarray(im), image)
    media.write_png(image, tmp_path / "y.png")
    assert path.read_bytes() == (tmp_path / "y.png").read_bytes()
    grey = media.write_png(image[..., :1] / 255.0, tmp_path / "grey.png")
    with Image.open(grey) as im:
        np.testing.assert_array_equal(np.asarray(im), np.repeat(image[..., :1], 3, axis=-1))
    levels = np.array([0.0, 0.25, 0.5, 0.999, 1.0]).reshape(1, 5, 1)  # rounded to nearest, not truncated
    with Image.open(media.write_png(levels, tmp_path / "levels.png")) as im:
        assert np.asarray(im)[0, :, 0].tolist() == [0, 64, 128, 255, 255]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.png", "levels.png", "x.png", "y.png"]


# --- horizon_plot ----------------------------------------------------------------------------------


ROWS = [
    {"horizon": k, "mse": 0.01 * k, "mse_ci_low": 0.008 * k, "mse_ci_high": 0.013 * k,
     "copy_last": 0.02 * k, "partial": None if k % 2 else 0.03}
    for k in (3, 1, 2, 4, 5)
]


def test_horizon_plot_is_a_deterministic_png(tmp_path):
    keys = ["mse", "copy_last", "partial"]
    a = media.horizon_plot(ROWS, keys, tmp_path / "a.png", "mnist", "mse", labels={"mse": "model"})
    b = media.horizon_plot(ROWS, keys, tmp_path / "b.png", "mnist", "mse", labels={"mse": "model"})
    assert a.read_bytes() == b.read_bytes()
    with Image.open(a) as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0
        assert (im.width, im.height) == (600, 400)
        assert "Software" not in im.info
    log = media.horizon_plot(ROWS, keys, tmp_path / "log.png", "mnist", "mse", log_y=True, labels={"mse": "model"})
    assert log.read_bytes() != a.read_bytes()


def test_horizon_plot_skips_missing_keys_and_shades_intervals(tmp_path):
    base = media.horizon_plot(ROWS, ["mse"], tmp_path / "base.png", "t", "y").read_bytes()
    missing = media.horizon_plot(ROWS, ["mse", "psnr"], tmp_path / "missing.png", "t", "y").read_bytes()
    assert missing == base  # "psnr" is in no row: no line, no legend entry
    no_ci = [{k: v for k, v in r.items() if "ci" not in k} for r in ROWS]
    assert media.horizon_plot(no_ci, ["mse"], tmp_path / "no_ci.png", "t", "y").read_bytes() != base
    empty = media.horizon_plot(ROWS, ["psnr"], tmp_path / "empty.png", "t", "y")
    with Image.open(empty) as im:
        assert im.size == (600, 400)

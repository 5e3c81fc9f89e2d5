"""pipeline.motion: shift estimators on known shifts, classes and scoring, the digit tracker."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline import motion
from stages.mnist_digits import bundled_digits
from stages.moving_mnist import Config as MovingConfig
from stages.moving_mnist import generate_sequences

SHIFTS = [(0, 0), (3, 0), (-5, 2), (0, -7), (7, 7), (-8, -1)]


def texture(h: int, w: int, seed: int = 0, smooth: float = 0.0) -> np.ndarray:
    t = np.random.default_rng(seed).random((h, w)).astype(np.float32)
    return ndimage.gaussian_filter(t, smooth, mode="wrap") if smooth else t


def crop_pairs(big: np.ndarray, shifts, h: int, w: int, margin: int):
    """(a, b) stacks where b is a's content moved by (dx, dy): windows of one larger texture."""
    a = np.stack([big[margin : margin + h, margin : margin + w]] * len(shifts))
    b = np.stack([big[margin - dy : margin - dy + h, margin - dx : margin - dx + w] for dx, dy in shifts])
    return a, b


def test_phase_correlation_recovers_integer_shifts_of_a_random_texture():
    base = texture(48, 64)
    a = np.stack([base] * len(SHIFTS))
    b = np.stack([np.roll(base, (dy, dx), axis=(0, 1)) for dx, dy in SHIFTS])
    for window in (False, True):
        est = motion.phase_correlation(a, b, max_shift=8, window=window)
        np.testing.assert_array_equal(est, np.array(SHIFTS, np.float32))


def test_phase_correlation_with_new_content_at_the_edges():
    a, b = crop_pairs(texture(80, 96, seed=1), SHIFTS, 48, 64, margin=16)
    est = motion.phase_correlation(a, b, max_shift=8)
    np.testing.assert_array_equal(est, np.array(SHIFTS, np.float32))


@pytest.mark.parametrize("masked", [False, True])
def test_block_matching_recovers_integer_shifts(masked):
    a, b = crop_pairs(texture(80, 96, seed=2), SHIFTS, 48, 64, margin=16)
    mask = motion.centre_mask(48, 64, 8) if masked else None
    est = motion.block_matching(a, b, max_shift=8, mask=mask)
    np.testing.assert_array_equal(est, np.array(SHIFTS, np.float32))


def test_block_matching_ignores_a_static_masked_centre():
    """A static sprite at the centre pulls unmasked matching towards zero shift, not masked."""
    a, b = crop_pairs(texture(80, 96, seed=3, smooth=1.0), [(7, 0)], 48, 64, margin=16)
    a[:, 16:32, 24:40] = b[:, 16:32, 24:40] = 4.0  # a bright static square, much brighter than the scene
    assert tuple(motion.block_matching(a, b, max_shift=8)[0]) == (0.0, 0.0)
    est = motion.block_matching(a, b, max_shift=8, mask=motion.centre_mask(48, 64, 16))
    assert tuple(est[0]) == (7.0, 0.0)


FRACTIONAL = [(2.5, 0.0), (-3.25, 1.5), (0.0, -6.6)]


def fractional_pairs(whole: bool):
    """A smooth periodic texture and its copies shifted by FRACTIONAL; ``whole``: the full periodic
    images (a circular shift), else 48x64 windows (new content at the edges)."""
    base = texture(96, 96, seed=4, smooth=2.0)
    moved = [ndimage.shift(base, (dy, dx), order=3, mode="wrap") for dx, dy in FRACTIONAL]
    if whole:
        return np.stack([base] * len(moved)), np.stack(moved)
    return np.stack([base[24:72, 16:80]] * len(moved)), np.stack([m[24:72, 16:80] for m in moved])


@pytest.mark.parametrize("method", ["phase", "block"])
def test_subpixel_refinement_gets_closer_to_fractional_shifts(method):
    if method == "phase":
        a, b = fractional_pairs(whole=True)
        fn = motion.phase_correlation
    else:
        a, b = fractional_pairs(whole=False)
        fn = motion.block_matching
    coarse = fn(a, b, max_shift=8)
    fine = fn(a, b, max_shift=8, subpixel=True)
    err_fine = np.abs(fine - np.array(FRACTIONAL)).max()
    assert err_fine < 0.3
    assert err_fine < np.abs(coarse - np.array(FRACTIONAL)).max()


def test_hann_window_rescues_phase_correlation_on_smooth_windows():
    """Without a window the image borders of a smooth scene dominate (peak at zero)."""
    a, b = fractional_pairs(whole=False)
    plain = motion.phase_correlation(a, b, max_shift=8)
    windowed = motion.phase_correlation(a, b, max_shift=8, window=True, subpixel=True)
    assert np.abs(plain).max() == 0
    assert np.abs(windowed - np.array(FRACTIONAL)).max() < 0.5


def test_blank_frames_give_zero_shift():
    a = np.zeros((2, 32, 32), np.float32)
    for fn in (motion.phase_correlation, motion.block_matching):
        np.testing.assert_array_equal(fn(a, a + 0.5, max_shift=6), np.zeros((2, 2)))


def test_estimators_refuse_bad_input():
    a = np.zeros((2, 32, 32), np.float32)
    with pytest.raises(ValueError, match="equal shape"):
        motion.block_matching(a, a[:, :16], max_shift=4)
    with pytest.raises(ValueError, match="max_shift 16"):
        motion.phase_correlation(a, a, max_shift=16)
    with pytest.raises(ValueError, match="mask shape"):
        motion.block_matching(a, a, max_shift=4, mask=np.ones((8, 8), bool))


def test_area_bounds_and_centre_mask():
    # Crafter at 64 px: the 7-tile local view ends at row 49.8, so row 49 (part HUD) is left out
    assert motion.area_bounds(64, 64, [0.0, 0.78, 0.0, 1.0]) == (0, 49, 0, 64)
    assert motion.area_bounds(100, 50, [0.1, 0.5, 0.25, 0.75]) == (10, 50, 13, 37)
    with pytest.raises(ValueError, match="empty"):
        motion.area_bounds(64, 64, [0.5, 0.51, 0.0, 1.0])
    m = motion.centre_mask(49, 64, 7.1)
    rows, cols = np.nonzero(~m)
    # the player's tile spans x 28.4..35.6, y 21.3..28.4 (local view 49.8 px high) at 64 px
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (20, 28, 27, 36)


def test_classes_of_shifts_and_moves():
    cam = np.array([[0, 0], [-7, 0.5], [7, -1], [0.2, -7], [1, 7], [3, 3], [-3.6, 0], [5, -6]])
    np.testing.assert_array_equal(motion.shift_classes(cam, 3.55), [0, 1, 2, 3, 4, 0, 1, 3])
    moves = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1], [0, 2]])
    np.testing.assert_array_equal(motion.move_classes(moves), [0, 1, 2, 3, 4, 4])


def test_classification_report_scores_only_the_chosen_transitions():
    true = np.array([0, 1, 1, 2, 3, 4, 4])
    pred = np.array([0, 1, 0, 2, 3, 4, 1])
    scored = np.array([True, True, True, True, True, True, False])
    rep = motion.classification_report(pred, true, scored)
    assert rep["accuracy"] == pytest.approx(5 / 6)
    assert rep["scored"] == 6
    assert rep["confusion"]["left"] == {"none": 1, "left": 1, "right": 0, "up": 0, "down": 0}
    assert rep["confusion"]["down"]["left"] == 0  # the unscored transition
    assert rep["true_counts"] == {"none": 1, "left": 2, "right": 1, "up": 1, "down": 1}
    assert rep["pred_counts"]["none"] == 2


def test_unchanged_tolerates_noise_but_not_content():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    b = a.copy()
    b[1] = np.clip(a[1].astype(int) + rng.integers(-1, 2, a[1].shape), 0, 255)  # coding noise
    b[2, 4:8, 4:8] = 255 - a[2, 4:8, 4:8]  # a changed tile
    mask = np.ones((16, 16), bool)
    np.testing.assert_array_equal(motion.unchanged(a, b, mask, 1.0), [True, True, False])
    mask[4:8, 4:8] = False  # the changed tile masked out
    assert motion.unchanged(a, b, mask, 1.0)[2]


def test_component_box_takes_the_largest_blob_and_zeroes_the_others():
    frame = np.zeros((64, 64), np.float32)
    frame[10:30, 12:26] = 1.0  # 20x14 blob: the largest
    frame[22:28, 30:36] = 0.8  # a 6x6 blob inside the first one's box
    xy, tmpl = motion.component_box(frame, 0, 28)
    assert tuple(xy) == (5, 6)  # centred on the blob's bounding box (19, 20)
    assert tmpl.shape == (28, 28)
    assert tmpl.max() == 1.0 and not np.any(np.isclose(tmpl, 0.8))
    xy2, _ = motion.component_box(frame, 1, 28)
    assert tuple(xy2) == (19, 11)
    assert tuple(motion.component_box(frame, 5, 28)[0]) == (19, 11)  # clipped to the last blob


def sequences(n: int, d: int, seed: int = 0):
    digits, _ = bundled_digits()
    cfg = MovingConfig(num_sequences=n, seq_len=12, digits_per_sequence=d)
    frames, positions = generate_sequences(digits, cfg, np.random.default_rng(seed))
    return motion.to_gray(frames), positions


def track_from_truth(gray: np.ndarray, positions: np.ndarray, search: int = 8) -> np.ndarray:
    start = positions[:, 0, 0].astype(np.int64)
    templates = np.stack([g[0, y : y + 28, x : x + 28] for g, (x, y) in zip(gray, start)])
    return motion.track_templates(gray, start, templates, search=search)


def test_tracker_follows_a_lone_digit_exactly():
    gray, positions = sequences(16, 1)
    np.testing.assert_array_equal(track_from_truth(gray, positions), positions[:, :, 0])


def test_tracker_error_with_two_digits_is_small():
    gray, positions = sequences(64, 2, seed=1)
    tracked = track_from_truth(gray, positions)
    err = np.abs(np.diff(tracked, axis=1) - np.diff(positions[:, :, 0], axis=1))
    assert err.mean() < 0.5  # pixels per transition
    assert (err.max(axis=-1) == 0).mean() > 0.85


def test_tracker_stays_on_its_digit_through_an_overlap():
    """Two digits crossing: the tracked one is found while the other covers part of it."""
    digits, _ = bundled_digits()
    t = 9
    xs = np.arange(t) * 4  # digit 0 moves right, digit 1 left, crossing at frame 4
    frames = np.zeros((1, t, 64, 64), np.uint8)
    for k in range(t):
        for x, d in ((xs[k], digits[0]), (32 - xs[k], digits[7])):
            region = frames[0, k, 18:46, x : x + 28]
            np.maximum(region, d, out=region)
    gray = motion.to_gray(frames)
    tracked = motion.track_templates(gray, np.array([[0, 18]]), gray[:, 0, 18:46, 0:28], search=8)
    np.testing.assert_array_equal(tracked[0, :, 0], xs)
    np.testing.assert_array_equal(tracked[0, :, 1], 18)


def test_estimates_are_the_same_bytes_on_other_cpu_code(tmp_path):
    """Guards issue 18: NumPy's complex multiply runs other SIMD code on other CPUs (fused
    multiply-adds from AVX2 on), so the sub-pixel shifts, and the gameplay actions store, differed
    with NumPy's x86-64-v3 code turned off; and ``to_gray`` was a matrix product, which OpenBLAS
    sums in another order on each kind of CPU (the gameplay actions store differed between an AMD
    Zen 2 and an Intel AVX-512 machine). Each must give the same bytes in a fresh process as on
    another CPU (tests.pipeline.test_video.run_fresh)."""
    from tests.pipeline.test_video import run_fresh

    rng = np.random.default_rng(1)
    a = rng.random((64, 48, 48)).astype(np.float32)
    b = np.roll(a, 2, axis=2)  # no shift in y: its sub-pixel offset is what is left of a cancellation
    rgb = rng.integers(0, 256, (16, 72, 72, 3), dtype=np.uint8)
    np.savez(tmp_path / "pairs.npz", a=a, b=b, rgb=rgb)
    code = (
        "import sys, numpy as np; from pipeline import motion\n"
        "p = np.load(sys.argv[1]); a, b = p['a'], p['b']\n"
        "np.savez(sys.argv[2], bm=motion.block_matching(a, b, max_shift=6, subpixel=True),\n"
        "         pc=motion.phase_correlation(a, b, max_shift=6, subpixel=True), gray=motion.to_gray(p['rgb']))\n"
    )
    here = {
        "bm": motion.block_matching(a, b, max_shift=6, subpixel=True),
        "pc": motion.phase_correlation(a, b, max_shift=6, subpixel=True),
        "gray": motion.to_gray(rgb),
    }
    run_fresh(code, str(tmp_path / "pairs.npz"), str(tmp_path / "fresh.npz"))
    fresh = np.load(tmp_path / "fresh.npz")
    for name, value in here.items():
        assert fresh[name].tobytes() == value.tobytes(), f"{name} differs on other CPU code"

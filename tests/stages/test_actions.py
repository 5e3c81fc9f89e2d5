"""Stage actions: MNIST truth and tracker, gameplay camera motion on real Crafter episodes, the
ambiguous rule, the store layout, params validation and the stage entry point."""
from __future__ import annotations

import json
import re
from pathlib import Path

import crafter
import numpy as np
import pytest
import yaml
from scipy import ndimage
from skimage.transform import resize

from pipeline import motion
from pipeline.config import ParamsError, load_section
from pipeline.store import EpisodeStore, StoreConfig, write_episode_store
from pipeline.video import decode_video, encode_video
from stages import actions
from stages.actions import (
    GameplayActionsConfig,
    MnistActionsConfig,
    resolve_tile_px,
    run_gameplay,
    run_mnist,
)
from stages.mnist_digits import bundled_digits
from stages.moving_mnist import Config as MovingConfig
from stages.moving_mnist import generate_sequences, paste_max

REPO = Path(__file__).resolve().parents[2]
SMALL_STORE = StoreConfig(chunk_frames=16, shard_chunks=2)


# ---------------------------------------------------------------------------------------------
# mnist


@pytest.fixture(scope="module")
def mnist_sequences():
    digits, _ = bundled_digits()
    cfg = MovingConfig(num_sequences=24, seq_len=10, digits_per_sequence=2)
    return generate_sequences(digits, cfg, np.random.default_rng(3))


def mnist_store(path: Path, frames: np.ndarray, positions: np.ndarray | None) -> Path:
    episodes = [
        {"frames": f[..., None], **({"positions": p} if positions is not None else {})}
        for f, p in zip(frames, positions if positions is not None else frames)
    ]
    attrs = {"has_positions": positions is not None, "canvas": 64, "digit_size": 28}
    return write_episode_store(path, episodes, SMALL_STORE, attrs)


def test_mnist_truth_actions_are_the_normalised_position_differences(tmp_path, mnist_sequences):
    frames, positions = mnist_sequences
    src = mnist_store(tmp_path / "frames.zarr", frames, positions)
    metrics = run_mnist(MnistActionsConfig(tracked_digit=1), src, tmp_path / "actions.zarr", SMALL_STORE)
    out = EpisodeStore.open(tmp_path / "actions.zarr")
    np.testing.assert_array_equal(out.episode_ends, EpisodeStore.open(src).episode_ends)
    assert out.attrs["method"] == "truth" == metrics["method"]
    acts = out.array("actions")[:].reshape(24, 10, 2)
    valid = out.array("valid")[:].reshape(24, 10)
    expected = np.diff(positions[:, :, 1].astype(np.float64), axis=1) / 32.0
    np.testing.assert_array_equal(acts[:, :-1], expected.astype(np.float32))
    assert not acts[:, -1].any() and not valid[:, -1].any() and valid[:, :-1].all()
    assert acts.dtype == np.float32 and valid.dtype == bool
    assert metrics["transitions"] == 24 * 9
    assert metrics["action_std"] == pytest.approx(float(expected.std()), rel=1e-5)
    assert metrics["action_max"] <= 0.125 and metrics["action_min"] >= -0.125  # 3.6 px, rounded
    # the tracker ran too, against the same truth
    assert metrics["tracker_mae"] < 0.5 / 32
    assert metrics["tracker_mae_px"] == pytest.approx(metrics["tracker_mae"] * 32)
    assert metrics["accuracy"] > 0.85


def test_mnist_tracker_method_with_positions(tmp_path, mnist_sequences):
    frames, positions = mnist_sequences
    src = mnist_store(tmp_path / "frames.zarr", frames, positions)
    metrics = run_mnist(MnistActionsConfig(method="tracker"), src, tmp_path / "actions.zarr", SMALL_STORE)
    acts = EpisodeStore.open(tmp_path / "actions.zarr").array("actions")[:].reshape(24, 10, 2)
    truth = np.diff(positions[:, :, 0], axis=1) / 32.0
    mae = np.abs(acts[:, :-1] - truth).mean()
    assert metrics["method"] == "tracker"
    assert mae == pytest.approx(metrics["tracker_mae"], abs=1e-6)
    assert mae < 0.5 / 32


def test_mnist_without_positions_tracks_the_largest_blob(tmp_path):
    """The standard-file case: no positions, so the tracker starts on frame 0's largest blob."""
    digits, _ = bundled_digits()
    t = 8
    frames = np.zeros((1, t, 64, 64), np.uint8)
    big = digits[0]
    small = np.where(np.arange(28)[:, None] < 14, digits[1], 0).astype(np.uint8)  # half a digit
    for k in range(t):
        paste_max(frames[0, k], big, 4, 2 + 3 * k)  # the largest blob: moves down 3 px per frame
        paste_max(frames[0, k], small, 34 - 2 * k, 30)
    src = mnist_store(tmp_path / "frames.zarr", frames, None)
    metrics = run_mnist(MnistActionsConfig(), src, tmp_path / "actions.zarr", SMALL_STORE)
    assert metrics["method"] == "tracker"
    assert metrics["tracker_mae"] is None and metrics["accuracy"] is None
    acts = EpisodeStore.open(tmp_path / "actions.zarr").array("actions")[:]
    np.testing.assert_allclose(acts[:-1], np.tile([0.0, 3 / 32], (t - 1, 1)))
    run_mnist(MnistActionsConfig(tracked_digit=1), src, tmp_path / "a1.zarr", SMALL_STORE)
    acts = EpisodeStore.open(tmp_path / "a1.zarr").array("actions")[:]
    np.testing.assert_allclose(acts[:-1], np.tile([-2 / 32, 0.0], (t - 1, 1)))  # the second largest
    with pytest.raises(ValueError, match="actions.mnist.method = truth.*no true positions"):
        run_mnist(MnistActionsConfig(method="truth"), src, tmp_path / "a2.zarr", SMALL_STORE)


def test_mnist_tracked_digit_out_of_range(tmp_path, mnist_sequences):
    frames, positions = mnist_sequences
    src = mnist_store(tmp_path / "frames.zarr", frames[:2], positions[:2])
    with pytest.raises(ValueError, match="tracked_digit = 2.*2 digits"):
        run_mnist(MnistActionsConfig(tracked_digit=2), src, tmp_path / "actions.zarr", SMALL_STORE)
    assert not (tmp_path / "actions.zarr").exists()


# ---------------------------------------------------------------------------------------------
# gameplay


def crafter_episode(seed: int, steps: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A Crafter episode at 72 px: an agent holding random moves/noops for 2..5 steps.
    Returns frames (T,72,72,3), the player's tile (T,2) and the actions taken."""
    env = crafter.Env(size=(72, 72), seed=seed, reward=False)
    frames, pos, taken = [env.reset()], [env._player.pos.copy()], []
    rng = np.random.default_rng(seed)
    action, hold = 0, 0
    for _ in range(steps):
        if hold == 0:
            action, hold = int(rng.integers(0, 5)), int(rng.integers(2, 6))
        hold -= 1
        obs, _, done, _ = env.step(action)
        frames.append(obs)
        pos.append(env._player.pos.copy())
        taken.append(action)
        if done:
            break
    return np.stack(frames), np.stack(pos).astype(np.int32), taken


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    out = resize(frames, (len(frames), size, size, 3), order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def crafter_episodes():
    return [crafter_episode(seed, 60) for seed in (0, 5)]


def gameplay_store(path: Path, episodes: list[tuple[np.ndarray, np.ndarray]], truth: bool = True,
                   **attrs) -> Path:
    """A frames store; ``attrs`` override the recorded ones (None: not recorded)."""
    eps = [{"frames": f, **({"player_pos": p} if truth else {})} for f, p in episodes]
    h, w = episodes[0][0].shape[1:3]
    attrs = {"has_truth": truth, "width": w, "height": h, **attrs}
    if truth:  # what gameplay_frames records for Crafter's 9-tile-wide view
        attrs.setdefault("tile_px", w / 9)
    return write_episode_store(path, eps, SMALL_STORE, {k: v for k, v in attrs.items() if v is not None})


def test_crafter_axes_x_right_y_down(crafter_episodes):
    """Crafter's move_right raises pos x, move_down pos y; the view's content moves the other way."""
    frames, pos, taken = crafter_episodes[0]
    delta = np.diff(pos, axis=0)
    taken = np.array(taken)
    moved = np.abs(delta).sum(1) > 0
    expected = {1: (-1, 0), 2: (1, 0), 3: (0, -1), 4: (0, 1)}  # move_left, right, up, down
    for action, step in expected.items():
        sel = moved & (taken == action)
        assert sel.any(), f"no successful action {action} in the episode"
        assert (delta[sel] == step).all()
    # the content moves the other way: frame t+1 matches frame t moved by -8 px * delta (8 px tiles)
    area = frames[:, :56].astype(np.int16)  # 7 whole tiles above the inventory
    keep = motion.centre_mask(56, 72, 8)  # the player's sprite stays at the centre
    for t in np.nonzero(moved)[0]:
        expected = overlap_mad(area[t], area[t + 1], -8 * delta[t], keep)
        assert expected < overlap_mad(area[t], area[t + 1], 8 * delta[t], keep), t
        assert expected < overlap_mad(area[t], area[t + 1], (0, 0), keep), t


def overlap_mad(a: np.ndarray, b: np.ndarray, shift, keep: np.ndarray) -> float:
    """Mean abs difference of b(p) and a(p - shift) where both exist and ``keep`` holds in both."""
    dx, dy = (int(v) for v in shift)
    h, w = a.shape[:2]
    in_b = (slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0)))
    in_a = (slice(max(-dy, 0), h + min(-dy, 0)), slice(max(-dx, 0), w + min(-dx, 0)))
    m = keep[in_b] & keep[in_a]
    return float(np.abs(b[in_b] - a[in_a])[m].mean())


@pytest.mark.parametrize("codec", ["raw", "h264"])
def test_gameplay_accuracy_on_real_crafter_episodes(tmp_path, crafter_episodes, codec):
    """Rendered at 72 px, optionally through H.264 (crf 18) like the pipeline, resized to 64."""
    episodes = []
    for i, (frames, pos, _) in enumerate(crafter_episodes):
        if codec == "h264":
            frames, _ = decode_video(encode_video(frames, tmp_path / f"ep{i}.mp4", fps=10, crf=18), size=(64, 64))
        else:
            frames = resize_frames(frames, 64)
        episodes.append((frames, pos))
    src = gameplay_store(tmp_path / "frames.zarr", episodes)
    metrics = run_gameplay(GameplayActionsConfig(), src, tmp_path / "actions.zarr", SMALL_STORE)
    assert metrics["accuracy"] >= 0.9, metrics
    assert metrics["transitions"] == sum(len(f) - 1 for f, _ in episodes)
    assert metrics["scored"] + metrics["ambiguous_count"] == metrics["transitions"]
    conf = metrics["confusion"]
    assert sum(sum(row.values()) for row in conf.values()) == metrics["scored"]
    assert sum(conf[c][c] for c in motion.CLASS_NAMES) == round(metrics["accuracy"] * metrics["scored"])
    out = EpisodeStore.open(tmp_path / "actions.zarr")
    np.testing.assert_array_equal(out.episode_ends, EpisodeStore.open(src).episode_ends)
    cls, acts, valid = out.array("action_class")[:], out.array("actions")[:], out.array("valid")[:]
    ends = out.episode_ends - 1
    assert (cls[ends] == -1).all() and not valid[ends].any() and not acts[ends].any()
    assert cls.dtype == np.int8 and valid.sum() == metrics["transitions"]
    # a move is about one tile (7.1 px of 64 → 0.22) along its axis
    moving = valid & (cls > 0)
    assert np.abs(np.abs(acts[moving]).max(axis=1) - 7.1 / 32).max() < 0.03


def test_ambiguous_rule(tmp_path):
    """A true move whose scene is unchanged (uniform tiles) is ambiguous and left out of accuracy;
    a true move over a distinctive tile is scored; an unchanged scene without a move is scored."""
    tile = np.random.default_rng(0).integers(60, 200, (8, 8, 3), dtype=np.uint8)
    scene = np.tile(tile, (9, 9, 1))  # 72x72 of identical tiles, like grass
    scene[56:] = 0  # the inventory rows
    rock = scene.copy()
    rock[8:16, 16:24] = 20  # one distinctive tile
    frames = [scene, scene, rock, np.roll(rock, -8, axis=1), np.roll(rock, -8, axis=1)]
    frames = np.stack([resize_frames(f[None], 64)[0] for f in frames])
    noise = np.random.default_rng(1).random(frames[1].shape) < 0.2
    frames[1] = np.clip(frames[1] + noise, 0, 255)  # coding noise (0.2 grey levels) on the identical frame
    frames[1, 22:28, 29:35] = 255  # the player's sprite turned: it is fixed to the camera
    pos = np.array([[10, 10], [11, 10], [11, 10], [12, 10], [12, 10]], np.int32)
    # transitions: right over identical tiles (ambiguous), none (the rock appears), right, none
    src = gameplay_store(tmp_path / "frames.zarr", [(frames, pos)])
    metrics = run_gameplay(GameplayActionsConfig(), src, tmp_path / "actions.zarr", SMALL_STORE)
    assert metrics["ambiguous_count"] == 1 and metrics["ambiguous"] == pytest.approx(1 / 4)
    assert metrics["scored"] == 3
    assert metrics["true_counts"] == {"none": 2, "left": 0, "right": 1, "up": 0, "down": 0}
    cls = EpisodeStore.open(tmp_path / "actions.zarr").array("action_class")[:]
    np.testing.assert_array_equal(cls, [0, 0, 2, 0, -1])  # the ambiguous one looks like none
    assert metrics["confusion"]["none"]["none"] == 2  # (scene → rock appearing is not a move)
    loose = run_gameplay(GameplayActionsConfig(ambiguous_tol=0.0), src, tmp_path / "a2.zarr", SMALL_STORE)
    assert loose["ambiguous_count"] == 0 and loose["accuracy"] == pytest.approx(3 / 4)


def test_gameplay_without_truth(tmp_path, crafter_episodes):
    frames, pos, _ = crafter_episodes[1]
    src = gameplay_store(tmp_path / "frames.zarr", [(resize_frames(frames[:12], 64), pos[:12])], truth=False)
    metrics = run_gameplay(GameplayActionsConfig(method="phase_correlation", tile_px=64 / 9), src,
                           tmp_path / "a.zarr", SMALL_STORE)
    assert metrics["accuracy"] is None and metrics["ambiguous"] is None
    assert metrics["transitions"] == 11 == sum(metrics["pred_counts"].values())
    assert EpisodeStore.open(tmp_path / "a.zarr").attrs["method"] == "phase_correlation"


def test_tile_px_is_derived_from_the_frames_or_checked_against_them(tmp_path, crafter_episodes):
    """``tile_px: auto`` takes the tile size the frames stage recorded; a number that disagrees with
    it is refused before any work, naming the key."""
    frames, pos, _ = crafter_episodes[1]
    src = gameplay_store(tmp_path / "frames.zarr", [(resize_frames(frames[:6], 64), pos[:6])])
    auto = run_gameplay(GameplayActionsConfig(), src, tmp_path / "a.zarr", SMALL_STORE)
    given = run_gameplay(GameplayActionsConfig(tile_px=64 / 9), src, tmp_path / "b.zarr", SMALL_STORE)
    assert auto["pred_counts"] == given["pred_counts"]
    assert store_bytes(tmp_path / "a.zarr") == store_bytes(tmp_path / "b.zarr")
    with pytest.raises(ParamsError, match=r"actions.gameplay.tile_px is 3.0 but the tiles of .*frames.zarr are 7.111"):
        run_gameplay(GameplayActionsConfig(tile_px=3.0), src, tmp_path / "c.zarr", SMALL_STORE)
    assert not (tmp_path / "c.zarr").exists()


def test_tile_px_auto_is_max_shift_without_a_recorded_tile_size():
    """Guards issue 18: frames without tiles (downloaded videos) record no tile size, and ``auto``
    stopped the stage on them. It now counts moves in ``max_shift`` pixels (and masks a centre
    square of that side); where a tile size is recorded, ``auto`` takes it exactly as before."""
    where, store = "actions.gameplay", "data/gameplay/frames.zarr"
    assert resolve_tile_px(GameplayActionsConfig(), {}, where, store).tile_px == 8.0
    cfg = resolve_tile_px(GameplayActionsConfig(max_shift=5, move_threshold=0.6), {"fps": 10}, where, store)
    assert cfg.tile_px == 5.0 and cfg.max_shift == 5 and cfg.move_threshold == 0.6
    recorded = {"tile_px": 7.111111, "tile_source": "8 px tiles at 72 px, cropped [0, 0, 0, 0], resized to 64"}
    assert resolve_tile_px(GameplayActionsConfig(), recorded, where, store) == GameplayActionsConfig(tile_px=7.111111)
    assert resolve_tile_px(GameplayActionsConfig(max_shift=5), recorded, where, store).tile_px == 7.111111
    given = GameplayActionsConfig(tile_px=3.0)  # a number is used as given where nothing contradicts it
    assert resolve_tile_px(given, {}, where, store) == given


@pytest.mark.parametrize("bad", [0, -7.1, float("nan"), "7.1", True, [7.1]])
def test_a_bad_recorded_tile_size_names_the_store_and_the_value(tmp_path, crafter_episodes, bad):
    frames, pos, _ = crafter_episodes[1]
    src = gameplay_store(tmp_path / "frames.zarr", [(resize_frames(frames[:4], 64), pos[:4])], tile_px=bad)
    with pytest.raises(ParamsError, match=rf"frames.zarr records tile_px = {re.escape(repr(bad))}, not a positive"):
        run_gameplay(GameplayActionsConfig(), src, tmp_path / "a.zarr", SMALL_STORE)
    assert not (tmp_path / "a.zarr").exists()


def test_without_a_recorded_tile_size_crafter_keeps_its_classes(tmp_path, crafter_episodes):
    """The fallback is no new tuning: Crafter's ``max_shift`` (8 px) was sized to one move (a
    7.1 px tile), so the same frames without their tile record get the same classes."""
    episodes = [(resize_frames(frames, 64), pos) for frames, pos, _ in crafter_episodes]
    tiled = run_gameplay(GameplayActionsConfig(), gameplay_store(tmp_path / "tiled.zarr", episodes),
                         tmp_path / "a.zarr", SMALL_STORE)
    bare = run_gameplay(GameplayActionsConfig(), gameplay_store(tmp_path / "bare.zarr", episodes, tile_px=None),
                        tmp_path / "b.zarr", SMALL_STORE)
    assert bare == tiled and tiled["accuracy"] >= 0.9
    assert store_bytes(tmp_path / "a.zarr") == store_bytes(tmp_path / "b.zarr")


def camera_frames(world: np.ndarray, centres, scales, size: int = 64) -> np.ndarray:
    """uint8 frames ``(T, size, size, 3)`` of a pinhole camera over a flat RGB ``world``: frame t
    shows the world around ``centres[t]`` (x, y) magnified ``scales[t]`` times (bilinear)."""
    grid = (np.arange(size) + 0.5 - size / 2).astype(np.float64)
    out = []
    for (cx, cy), s in zip(centres, scales):
        ys, xs = cy + grid[:, None] / s - 0.5, cx + grid[None, :] / s - 0.5
        ys, xs = np.broadcast_arrays(ys, xs)
        out.append(np.stack([ndimage.map_coordinates(world[..., c], [ys, xs], order=1) for c in range(3)], -1))
    return np.clip(np.rint(np.stack(out)), 0, 255).astype(np.uint8)


def test_without_tiles_a_turning_camera_moves_and_walking_forward_does_not(tmp_path):
    """Real gameplay, not Crafter: a camera turning pans the view (5 px per frame: left, then
    right, then up), a camera walking forward magnifies it 6 % per frame about its centre (with
    an avatar fixed to the camera there). With ``tile_px: auto`` on frames that record no tile
    size, the pans are their direction and the walk is ``none``."""
    rng = np.random.default_rng(7)
    world = ndimage.gaussian_filter(rng.random((260, 260, 3)) * 255, sigma=(2, 2, 0))
    world = (world - world.min()) / (world.max() - world.min()) * 255
    pans = [(-5, 0)] * 5 + [(5, 0)] * 5 + [(0, -5)] * 5
    centres = np.cumsum([(130, 130), *pans], axis=0)
    turning = camera_frames(world, centres, np.ones(len(centres)))
    walking = camera_frames(world, [(130, 130)] * 8, 1.06 ** np.arange(8))
    for frames in (turning, walking):
        frames[:, 22:29, 29:36] = (250, 30, 30)  # the avatar at the play area's centre
    src = gameplay_store(tmp_path / "frames.zarr", [(turning, None), (walking, None)], truth=False)
    assert "tile_px" not in EpisodeStore.open(src).attrs
    metrics = run_gameplay(GameplayActionsConfig(), src, tmp_path / "actions.zarr", SMALL_STORE)
    assert metrics["accuracy"] is None and metrics["transitions"] == 15 + 7
    cls = EpisodeStore.open(tmp_path / "actions.zarr").array("action_class")[:]
    np.testing.assert_array_equal(cls[:16], [1] * 5 + [2] * 5 + [3] * 5 + [-1])
    np.testing.assert_array_equal(cls[16:], [0] * 7 + [-1])


def test_gameplay_refuses_a_max_shift_beyond_the_play_area(tmp_path, crafter_episodes):
    frames, pos, _ = crafter_episodes[1]
    src = gameplay_store(tmp_path / "frames.zarr", [(resize_frames(frames[:4], 64), pos[:4])])
    cfg = GameplayActionsConfig(play_area=(0.0, 0.3, 0.0, 1.0), max_shift=12)
    with pytest.raises(ValueError, match="actions.gameplay.max_shift = 12"):
        run_gameplay(cfg, src, tmp_path / "a.zarr", SMALL_STORE)


# ---------------------------------------------------------------------------------------------
# params and the entry point


def write_params(path: Path, **sections) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for item, values in sections.items():
        params["actions"][item] = values
    path.write_text(yaml.safe_dump(params))
    return path


def test_repository_params_load():
    for item, model in actions.CONFIGS.items():
        cfg = load_section("actions", model, item=item, path=REPO / "params.yaml")
        assert cfg == model()  # the defaults match params.yaml


@pytest.mark.parametrize(
    ("item", "values", "message"),
    [
        ("gameplay", {"methd": "block_matching"}, r"actions\.gameplay\.methd: unknown key"),
        ("gameplay", {"method": "optical_flow"}, r"actions\.gameplay\.method: .*'optical_flow'"),
        ("gameplay", {"play_area": [0.8, 0.2, 0.0, 1.0]}, r"actions\.gameplay\.play_area: .*top < bottom"),
        ("gameplay", {"play_area": [0.0, 0.8, 0.0]}, r"actions\.gameplay\.play_area"),
        ("gameplay", {"max_shift": 0}, r"actions\.gameplay\.max_shift: .*greater than 0"),
        ("mnist", {"tracked_digit": -1}, r"actions\.mnist\.tracked_digit"),
        ("mnist", {"method": "oracle"}, r"actions\.mnist\.method: .*'oracle'"),
        ("mnist", {"tracker_search": 8, "play_area": [0, 1, 0, 1]}, r"actions\.mnist\.play_area: unknown key"),
    ],
)
def test_bad_params_name_the_key(tmp_path, item, values, message):
    path = write_params(tmp_path / "params.yaml", **{item: values})
    with pytest.raises(ParamsError, match=message) as err:
        load_section("actions", actions.CONFIGS[item], item=item, path=path)
    assert str(path) in str(err.value)


def test_main_writes_the_store_and_the_metrics(tmp_path, monkeypatch, mnist_sequences):
    frames, positions = mnist_sequences
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    write_params(tmp_path / "params.yaml")
    mnist_store(Path("data/mnist/frames.zarr"), frames[:4], positions[:4])
    actions.main("mnist")
    metrics = json.loads(Path("metrics/actions-mnist.json").read_text())
    assert metrics["method"] == "truth" and metrics["transitions"] == 4 * 9
    assert {"tracker_mae", "tracker_mae_px", "action_std", "action_min", "action_max", "accuracy"} <= set(metrics)
    assert EpisodeStore.open("data/mnist/actions.zarr").n_episodes == 4


def store_bytes(path: Path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_same_params_give_identical_stores(tmp_path, mnist_sequences, crafter_episodes):
    frames, positions = mnist_sequences
    src = mnist_store(tmp_path / "mnist.zarr", frames[:6], positions[:6])
    cfg = MnistActionsConfig(method="tracker")
    run_mnist(cfg, src, tmp_path / "m1.zarr", SMALL_STORE)
    run_mnist(cfg, src, tmp_path / "m2.zarr", SMALL_STORE)
    assert store_bytes(tmp_path / "m1.zarr") == store_bytes(tmp_path / "m2.zarr")
    f, p, _ = crafter_episodes[0]
    src = gameplay_store(tmp_path / "gameplay.zarr", [(resize_frames(f[:20], 64), p[:20])])
    run_gameplay(GameplayActionsConfig(), src, tmp_path / "g1.zarr", SMALL_STORE)
    run_gameplay(GameplayActionsConfig(), src, tmp_path / "g2.zarr", SMALL_STORE)
    assert store_bytes(tmp_path / "g1.zarr") == store_bytes(tmp_path / "g2.zarr")

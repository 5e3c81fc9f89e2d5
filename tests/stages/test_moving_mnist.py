"""Stage moving_mnist: motion model, drawing, determinism, the download source, params."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import ParamsError, load_section
from pipeline.store import EpisodeStore, StoreConfig, write_episode_store
from stages.moving_mnist import Config, generate_sequences, run
from tests.pipeline.test_download import serve

REPO = Path(__file__).resolve().parents[2]
SMALL_STORE = StoreConfig(chunk_frames=8, shard_chunks=2)
FREE = 64 - 28
STEP = 0.1 * FREE  # 3.6 px per frame


def digit_images(k: int, seed: int = 0) -> np.ndarray:
    """k distinct 28x28 'digits': a random blob with an empty 4-pixel border, like MNIST."""
    rng = np.random.default_rng(seed)
    d = np.zeros((k, 28, 28), np.uint8)
    d[:, 4:24, 4:24] = rng.integers(1, 256, size=(k, 20, 20), dtype=np.uint8)
    return d


def make(digits: np.ndarray, seed: int = 0, **kw) -> tuple[np.ndarray, np.ndarray]:
    cfg = Config(**{"num_sequences": 40, "seq_len": 20, **kw})
    return generate_sequences(digits, cfg, np.random.default_rng(seed))


def redraw(digit: np.ndarray, positions: np.ndarray, canvas: int = 64) -> np.ndarray:
    """Draw one frame from (D, 2) positions: the max of the digit placed at each (x, y)."""
    frame = np.zeros((canvas, canvas), np.uint8)
    for x, y in positions.astype(int):
        layer = np.zeros_like(frame)
        layer[y : y + 28, x : x + 28] = digit
        frame = np.maximum(frame, layer)
    return frame


def test_shapes_and_positions_in_bounds():
    frames, pos = make(digit_images(5))
    assert frames.shape == (40, 20, 64, 64) and frames.dtype == np.uint8
    assert pos.shape == (40, 20, 2, 2) and pos.dtype == np.float32
    assert pos.min() >= 0 and pos.max() <= FREE
    np.testing.assert_array_equal(pos, np.rint(pos))  # whole pixels: where the digit was drawn
    assert len(np.unique(pos[:, 0].reshape(-1, 2), axis=0)) > 30  # start positions spread


def test_frames_are_the_max_of_digits_drawn_at_positions():
    digit = digit_images(1)
    frames, pos = make(digit, num_sequences=10)
    for s in range(10):
        for t in range(20):
            np.testing.assert_array_equal(frames[s, t], redraw(digit[0], pos[s, t]))


def test_bounce_keeps_the_digit_inside():
    digits = np.random.default_rng(1).integers(1, 256, size=(3, 28, 28), dtype=np.uint8)  # ink up to the edges
    frames, pos = make(digits, num_sequences=30, seq_len=40, digits_per_sequence=1, speed=0.3)
    mass = frames.reshape(30, 40, -1).sum(-1, dtype=np.int64)
    # every frame shows a whole digit: the same pixel mass as one of the digits
    assert np.isin(mass, digits.reshape(3, -1).sum(-1, dtype=np.int64)).all()
    assert (pos == 0).any() and (pos == FREE).any()  # edges were reached (and left)
    steps = np.diff(pos, axis=1)
    assert (np.sign(steps[:, :, 0, 0]) != np.sign(steps[:, :1, 0, 0])).any()  # velocity flipped


def test_without_bounce_digits_leave_the_canvas():
    frames, pos = make(digit_images(1), num_sequences=20, seq_len=30, digits_per_sequence=1, bounce=False)
    assert pos.min() < 0 or pos.max() > FREE
    speeds = np.linalg.norm(np.diff(pos, axis=1), axis=-1)
    assert abs(speeds.mean() - STEP) < 0.1  # no bounces: constant velocity throughout
    assert (frames[:, -1].reshape(20, -1).sum(-1) < frames[:, 0].reshape(20, -1).sum(-1)).any()


def _interior_runs(track: np.ndarray):
    """Maximal runs [a, b] of frames whose position lies strictly inside (0, FREE) on both axes."""
    inside = ((track > 0) & (track < FREE)).all(-1)
    a = None
    for t, ok in enumerate([*inside, False]):
        if ok and a is None:
            a = t
        elif not ok and a is not None:
            if t - 1 > a:
                yield a, t - 1
            a = None


def test_speed_is_a_tenth_of_the_free_range_per_frame():
    _, pos = make(digit_images(2), num_sequences=100)
    # away from the edges (no bounce in between) the motion is straight at 3.6 px per frame,
    # up to the rounding of both end positions (at most half a pixel on each axis)
    checked = 0
    for s in range(100):
        for d in range(2):
            for a, b in _interior_runs(pos[s, :, d]):
                dist = np.linalg.norm(pos[s, b, d] - pos[s, a, d])
                assert abs(dist - STEP * (b - a)) <= np.sqrt(2) + 1e-6, (s, d, a, b, dist)
                checked += b - a
    assert checked > 1000
    steps = np.linalg.norm(np.diff(pos, axis=1), axis=-1)
    inner = ((pos[:, :-1] > 0) & (pos[:, :-1] < FREE) & (pos[:, 1:] > 0) & (pos[:, 1:] < FREE)).all(-1)
    assert abs(steps[inner].mean() - STEP) < 0.05


def test_same_seed_same_arrays_other_seed_differs():
    digits = digit_images(4)
    f1, p1 = make(digits, seed=3)
    f2, p2 = make(digits, seed=3)
    f3, _ = make(digits, seed=4)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(p1, p2)
    assert not np.array_equal(f1, f3)


def test_digits_larger_than_canvas_refused():
    with pytest.raises(ValueError, match=r"moving_mnist.canvas \(28\)"):
        make(digit_images(1), canvas=28)


@pytest.fixture
def digits_store(tmp_path):
    path = tmp_path / "digits.zarr"
    digits = digit_images(6)
    write_episode_store(path, [{"images": digits, "labels": np.arange(6, dtype=np.uint8)}], SMALL_STORE,
                        attrs={"source": "test digits"})
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_run_writes_store_and_is_byte_identical(digits_store, tmp_path):
    cfg = Config(num_sequences=6, seq_len=5)
    out1, out2 = tmp_path / "a" / "frames.zarr", tmp_path / "b" / "frames.zarr"
    m1 = run(cfg, digits_store, out1, SMALL_STORE)
    m2 = run(cfg, digits_store, out2, SMALL_STORE)
    assert m1 == m2 == {"frames": 30, "episodes": 6, "source": "generate: from test digits", "has_positions": True}
    files1, files2 = _files(out1), _files(out2)
    assert len(files1) > 3 and files1 == files2
    store = EpisodeStore.open(out1)
    assert store.keys == ["frames", "positions"]
    assert store.array("frames").shape == (30, 64, 64, 1) and store.array("positions").shape == (30, 2, 2)
    assert list(store.episode_ends) == [5, 10, 15, 20, 25, 30]
    assert {k: store.attrs[k] for k in ("has_positions", "canvas", "digit_size")} == {
        "has_positions": True, "canvas": 64, "digit_size": 28}
    frames, positions = generate_sequences(
        EpisodeStore.open(digits_store).array("images")[:], cfg, np.random.default_rng(cfg.seed))
    np.testing.assert_array_equal(store.array("frames")[:, :, :, 0], frames.reshape(30, 64, 64))
    np.testing.assert_array_equal(store.array("positions")[:], positions.reshape(30, 2, 2))


@pytest.fixture
def test_file_server(tmp_path):
    """Serves a small standard-layout test file, uint8 [T, N, 64, 64] = (20, 3, 64, 64)."""
    seq = np.random.default_rng(0).integers(0, 256, size=(20, 3, 64, 64), dtype=np.uint8)
    root = tmp_path / "www"
    root.mkdir()
    np.save(root / "mnist_test_seq.npy", seq)
    np.save(root / "wrong_shape.npy", seq[:, :, :32])
    (root / "pickled.npy").write_bytes(b"\x80\x04K\x01.")  # a pickle, not an .npy array
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()}
    with serve(root) as base:
        yield base, digests, seq


def _download_cfg(base: str, name: str, sha256: str, max_sequences: int = 10000) -> Config:
    return Config.model_validate({"source": "download", "download": {
        "url": f"{base}/{name}", "sha256": sha256, "allowed_schemes": ["http"],
        "allowed_hosts": ["127.0.0.1"], "max_sequences": max_sequences}})


def test_download_source(test_file_server, tmp_path):
    base, digests, seq = test_file_server
    out = tmp_path / "frames.zarr"
    metrics = run(_download_cfg(base, "mnist_test_seq.npy", digests["mnist_test_seq.npy"]), tmp_path / "none", out,
                  SMALL_STORE)
    assert metrics["frames"] == 60 and metrics["episodes"] == 3 and metrics["has_positions"] is False
    store = EpisodeStore.open(out)
    assert store.keys == ["frames"] and store.attrs["has_positions"] is False
    np.testing.assert_array_equal(store.array("frames")[:, :, :, 0], seq.transpose(1, 0, 2, 3).reshape(60, 64, 64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames.zarr", "www"]


def test_download_max_sequences(test_file_server, tmp_path):
    base, digests, seq = test_file_server
    run(_download_cfg(base, "mnist_test_seq.npy", digests["mnist_test_seq.npy"], 2), tmp_path, tmp_path / "f.zarr",
        SMALL_STORE)
    store = EpisodeStore.open(tmp_path / "f.zarr")
    assert store.n_episodes == 2
    np.testing.assert_array_equal(store.episode(1)["frames"][..., 0], seq[:, 1])


def test_download_wrong_shape_names_the_file(test_file_server, tmp_path):
    base, digests, _ = test_file_server
    with pytest.raises(ValueError, match=r"/wrong_shape.npy: expected a uint8 array \[T, N, 64, 64\].*\(20, 3, 32, 64\)"):
        run(_download_cfg(base, "wrong_shape.npy", digests["wrong_shape.npy"]), tmp_path, tmp_path / "f.zarr",
            SMALL_STORE)
    assert not (tmp_path / "f.zarr").exists()


def test_download_not_npy_names_the_file(test_file_server, tmp_path):
    base, digests, _ = test_file_server
    with pytest.raises(ValueError, match=r"/pickled.npy: not a readable .npy array"):
        run(_download_cfg(base, "pickled.npy", digests["pickled.npy"]), tmp_path, tmp_path / "f.zarr", SMALL_STORE)
    assert not (tmp_path / "f.zarr").exists()


def test_download_checksum_mismatch(test_file_server, tmp_path):
    base, _, _ = test_file_server
    with pytest.raises(ValueError, match="sha256 mismatch"):
        run(_download_cfg(base, "mnist_test_seq.npy", "a" * 64), tmp_path, tmp_path / "f.zarr", SMALL_STORE)
    assert not (tmp_path / "f.zarr").exists()


def _params_with(tmp_path: Path, change) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    change(params["moving_mnist"])
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_repository_params_validate():
    assert load_section("moving_mnist", Config, path=REPO / "params.yaml") == Config()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update(sped=0.1), r"moving_mnist\.sped: unknown key"),
        (lambda s: s.update(speed=-0.1), r"moving_mnist\.speed: .*greater than or equal to 0"),
        (lambda s: s.update(canvas="big"), r"moving_mnist\.canvas"),
        (lambda s: s["download"].update(mirror="x"), r"moving_mnist\.download\.mirror: unknown key"),
        (lambda s: s.update(source="download"), r"moving_mnist\.download\.sha256"),
    ],
)
def test_params_errors_name_the_key(tmp_path, change, message):
    with pytest.raises(ParamsError, match=message):
        load_section("moving_mnist", Config, path=_params_with(tmp_path, change))

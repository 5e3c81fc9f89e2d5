"""The training-window reader: index, split, values from real zarr 3 stores, spawn workers, pickling."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_section
from pipeline.reader import (
    LoaderConfig,
    WindowDataset,
    iter_batches,
    make_loader,
    split_episodes,
    window_index,
)
from pipeline.store import StoreConfig, StoreCorrupt, write_episode_store

LENGTHS = [5, 12, 3, 20, 9]
TINY = StoreConfig(chunk_frames=4, shard_chunks=2, clevel=1)  # windows cross chunks and shards


def _frames(n: int) -> np.ndarray:
    """(n, 4, 4, 3) uint8 frames whose pixel (0, 0) encodes the global frame index."""
    rng = np.random.default_rng(0)
    f = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    t = np.arange(n)
    f[:, 0, 0, 0], f[:, 0, 0, 1] = t % 256, t // 256
    return f


def _frame_index(window: np.ndarray) -> int:
    return int(window[0, 0, 0, 0]) + 256 * int(window[0, 0, 0, 1])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """frames.zarr and actions.zarr with the same episodes; returns (paths, full arrays)."""
    root = tmp_path_factory.mktemp("stores")
    n = sum(LENGTHS)
    frames = _frames(n)
    actions = np.random.default_rng(1).normal(size=(n, 2)).astype(np.float32)
    bounds = np.cumsum([0, *LENGTHS])
    write_episode_store(root / "frames.zarr", [{"frames": frames[a:b]} for a, b in zip(bounds, bounds[1:])], TINY)
    write_episode_store(root / "actions.zarr", [{"actions": actions[a:b]} for a, b in zip(bounds, bounds[1:])], TINY)
    return root, {"frames": frames, "actions": actions}


def _sources(root):
    return [(root / "frames.zarr", "frames"), (root / "actions.zarr", "actions")]


# -- window_index ----------------------------------------------------------------------------
@pytest.mark.parametrize("window,stride", [(1, 1), (3, 1), (4, 2), (5, 3), (12, 5), (20, 1)])
def test_window_index_matches_brute_force_and_never_crosses_episodes(window, stride):
    ends = np.cumsum(LENGTHS)
    ids = [3, 0, 1, 4, 2]
    idx = window_index(ends, ids, window, stride)
    starts = np.concatenate([[0], ends[:-1]])
    expected = [
        (s, s + window) for e in ids for s in range(starts[e], ends[e] - window + 1, stride)
    ]
    assert idx.dtype == np.int64 and idx.shape == (len(expected), 2)
    assert [tuple(r) for r in idx.tolist()] == expected
    # each window lies inside one episode
    ep_first = np.searchsorted(ends, idx[:, 0], side="right")
    ep_last = np.searchsorted(ends, idx[:, 1] - 1, side="right")
    assert np.array_equal(ep_first, ep_last)
    # count formula per episode
    count = sum(max(0, (LENGTHS[e] - window) // stride + 1) for e in ids)
    assert len(idx) == count


def test_window_index_skips_short_episodes_and_rejects_bad_input():
    ends = np.cumsum(LENGTHS)
    assert len(window_index(ends, [2], 4, 1)) == 0  # episode 2 has 3 frames
    with pytest.raises(ValueError, match="episode id 5 out of range"):
        window_index(ends, [0, 5], 2, 1)
    with pytest.raises(ValueError, match="window and stride"):
        window_index(ends, [0], 0, 1)
    with pytest.raises(ValueError, match="strictly increasing"):
        window_index(np.array([5, 5, 9]), [0], 2, 1)


# -- split_episodes --------------------------------------------------------------------------
def test_split_is_by_whole_episodes_seeded_and_disjoint():
    train, val = split_episodes(20, 0.2, seed=0)
    assert len(val) == 4 and len(train) == 16
    assert set(train).isdisjoint(val) and sorted([*train, *val]) == list(range(20))
    again = split_episodes(20, 0.2, seed=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not np.array_equal(split_episodes(20, 0.2, seed=1)[1], val)


@pytest.mark.parametrize("n,frac", [(2, 0.01), (2, 0.9), (3, 0.5), (5, 0.99)])
def test_split_keeps_one_episode_on_each_side(n, frac):
    train, val = split_episodes(n, frac, seed=3)
    assert len(train) >= 1 and len(val) >= 1 and len(train) + len(val) == n


def test_split_edge_cases():
    assert [len(x) for x in split_episodes(1, 0.5, seed=0)] == [1, 0]
    assert [len(x) for x in split_episodes(4, 0.0, seed=0)] == [4, 0]
    with pytest.raises(ValueError, match="val_fraction"):
        split_episodes(4, 1.0, seed=0)
    with pytest.raises(ValueError, match="n_episodes"):
        split_episodes(0, 0.1, seed=0)


# -- WindowDataset ---------------------------------------------------------------------------
@pytest.mark.parametrize("budget_mb,cache_chunks", [(2048, 64), (0, 2)], ids=["in-memory", "chunk-cache"])
def test_values_equal_direct_slices(stores, budget_mb, cache_chunks):
    root, full = stores
    cfg = LoaderConfig(num_workers=0, memory_budget_mb=budget_mb, cache_chunks=cache_chunks)
    ds = WindowDataset(_sources(root), window=6, stride=2, episode_ids=[1, 3, 4], cfg=cfg)
    assert ds.in_memory == (budget_mb > 0)
    assert len(ds) == (12 - 6) // 2 + 1 + (20 - 6) // 2 + 1 + (9 - 6) // 2 + 1
    order = np.random.default_rng(0).permutation(len(ds))  # random order exercises LRU evictions
    for i in order:
        start, end = ds.windows[i]
        item = ds[int(i)]
        assert set(item) == {"frames", "actions"}
        assert item["frames"].shape == (6, 4, 4, 3) and item["frames"].dtype == np.uint8
        np.testing.assert_array_equal(item["frames"], full["frames"][start:end])
        np.testing.assert_array_equal(item["actions"], full["actions"][start:end])


def test_chunk_cache_decompresses_each_chunk_once(stores):
    root, _ = stores
    cfg = LoaderConfig(num_workers=0, memory_budget_mb=0, cache_chunks=64)
    ds = WindowDataset([(root / "frames.zarr", "frames")], window=5, stride=1, cfg=cfg)
    for i in range(len(ds)):
        ds[i]
    chunks = {c for s, e in ds.windows for c in range(s // 4, (e - 1) // 4 + 1)}
    assert ds._cache.misses == len(chunks)
    assert ds._cache.hits == sum((e - 1) // 4 - s // 4 + 1 for s, e in ds.windows) - len(chunks)


def test_mapping_sources_rename_arrays(stores):
    root, full = stores
    ds = WindowDataset({"x": (root / "frames.zarr", "frames")}, window=3, episode_ids=[0])
    np.testing.assert_array_equal(ds[1]["x"], full["frames"][1:4])


def test_bad_sources_are_named(stores, tmp_path):
    root, _ = stores
    with pytest.raises(KeyError, match="no array 'missing'"):
        WindowDataset([(root / "frames.zarr", "missing")], window=2)
    other = tmp_path / "other.zarr"
    write_episode_store(other, [{"actions": np.zeros((49, 2), np.float32)}], TINY)  # one long episode
    with pytest.raises(ValueError, match="episode_ends differ"):
        WindowDataset([(root / "frames.zarr", "frames"), (other, "actions")], window=2)
    with pytest.raises(ValueError, match="no window of 30 frames"):
        WindowDataset([(root / "frames.zarr", "frames")], window=30)
    with pytest.raises(FileNotFoundError, match="nowhere.zarr"):
        WindowDataset([(tmp_path / "nowhere.zarr", "frames")], window=2)
    with pytest.raises(ValueError, match="'frames' given twice"):
        WindowDataset([(root / "frames.zarr", "frames"), (other, "frames")], window=2)
    with pytest.raises(ValueError, match=r"\(store path, key\) pair"):
        WindowDataset([str(root / "frames.zarr")], window=2)


@pytest.mark.parametrize("budget_mb", [2048, 0], ids=["in-memory", "chunk-cache"])
def test_pickling_after_use_carries_no_zarr_handle(stores, budget_mb):
    root, full = stores
    ds = WindowDataset(_sources(root), window=4, cfg=LoaderConfig(memory_budget_mb=budget_mb))
    ds[3]
    assert ds._arrays  # opened (and loaded) in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._arrays == {} and clone._cache is None and clone._pid is None
    start, end = clone.windows[7]
    np.testing.assert_array_equal(clone[7]["frames"], full["frames"][start:end])


def test_loader_order_is_seeded(stores):
    root, _ = stores
    ds = WindowDataset([(root / "frames.zarr", "frames")], window=3)
    cfg = LoaderConfig(num_workers=0)
    first = [_frame_index(w) for b in make_loader(ds, 4, True, 7, cfg) for w in b["frames"].numpy()]
    again = [_frame_index(w) for b in make_loader(ds, 4, True, 7, cfg) for w in b["frames"].numpy()]
    other = [_frame_index(w) for b in make_loader(ds, 4, True, 8, cfg) for w in b["frames"].numpy()]
    assert first == again and first != other


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_dataloader_with_two_workers(stores, method):
    root, full = stores
    cfg = LoaderConfig(num_workers=2, start_method=method)
    ds = WindowDataset(_sources(root), window=4, stride=1, cfg=cfg)
    loader = make_loader(ds, batch_size=5, shuffle=True, seed=0, cfg=cfg)
    assert loader.multiprocessing_context.get_start_method() == method and loader.persistent_workers
    for _ in range(2):  # two epochs through the same persistent workers
        starts = []
        for batch in loader:
            assert batch["frames"].dtype == torch.uint8 and batch["frames"].shape[1:] == (4, 4, 4, 3)
            for frames, actions in zip(batch["frames"].numpy(), batch["actions"].numpy()):
                s = _frame_index(frames)
                np.testing.assert_array_equal(frames, full["frames"][s : s + 4])
                np.testing.assert_array_equal(actions, full["actions"][s : s + 4])
                starts.append(s)
        assert sorted(starts) == sorted(ds.windows[:, 0].tolist())


# -- iter_batches ----------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 3, 8, 100])
def test_iter_batches_reads_everything_in_order(stores, batch_size):
    root, full = stores
    got = list(iter_batches(root / "frames.zarr", "frames", batch_size))
    n = len(full["frames"])
    assert [s for s, _ in got] == list(range(0, n, batch_size))
    assert all(len(b) == min(batch_size, n - s) for s, b in got)
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]), full["frames"])


def test_loader_defaults_match_params_yaml():
    params = Path(__file__).resolve().parents[2] / "params.yaml"
    assert load_section("loader", LoaderConfig, path=params) == LoaderConfig()


# -- damaged stores --------------------------------------------------------------------------
def _damaged_store(tmp_path) -> Path:
    """A frames store whose second shard (frames 8..15) is cut in half."""
    path = write_episode_store(tmp_path / "frames.zarr", [{"frames": _frames(20)}, {"frames": _frames(14)}], TINY)
    shard = sorted(p for p in (path / "data" / "frames" / "c").rglob("*") if p.is_file())[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return path


def _check_message(exc: BaseException, path: Path) -> None:
    msg = str(exc)
    assert str(path) in msg and "array 'frames'" in msg and f"dvc checkout --force {path}" in msg, msg


@pytest.mark.parametrize("budget_mb", [2048, 0], ids=["in-memory", "chunk-cache"])
def test_damaged_store_raises_store_corrupt_in_the_main_process(tmp_path, budget_mb):
    """Guards issue 7: a damaged shard surfaced as zarr's raw checksum error from the reader."""
    path = _damaged_store(tmp_path)
    ds = WindowDataset([(path, "frames")], window=4, cfg=LoaderConfig(num_workers=0, memory_budget_mb=budget_mb))
    with pytest.raises(StoreCorrupt) as info:  # in memory: _read_all at the first item; else ChunkCache
        for i in range(len(ds)):
            ds[i]
    _check_message(info.value, path)
    with pytest.raises(StoreCorrupt) as info:
        list(iter_batches(path, "frames", 5))
    _check_message(info.value, path)


@pytest.mark.parametrize("budget_mb", [2048, 0], ids=["in-memory", "chunk-cache"])
def test_damaged_store_error_survives_from_the_workers(tmp_path, budget_mb):
    """In DataLoader workers (forkserver) the error reaches the main process as ``StoreCorrupt``
    with its message: raised in ``worker_init_fn`` (loading into memory) or in ``__getitem__``."""
    path = _damaged_store(tmp_path)
    cfg = LoaderConfig(num_workers=2, memory_budget_mb=budget_mb)
    ds = WindowDataset([(path, "frames")], window=4, cfg=cfg)
    with pytest.raises(StoreCorrupt) as info:
        for _ in make_loader(ds, batch_size=4, shuffle=False, seed=0, cfg=cfg):
            pass
    _check_message(info.value, path)
    assert "in DataLoader worker process" in str(info.value)

"""Training-window reader over episode stores, modelled on diffusion_policy's SequenceSampler.

The windows of a split are indexed once (``window_index``: ``[start, end)`` rows that never cross
an episode boundary); ``WindowDataset`` returns, for window ``i``, a dict of the sources' arrays
sliced to ``[start, end)``. Sources may live in different stores (``frames.zarr`` and
``actions.zarr``) as long as their ``meta/episode_ends`` are identical.

Safe in DataLoader workers: zarr 3 runs an asyncio thread, so an open zarr handle is never carried
across a pickle or a fork. Handles and loaded data are per process, opened lazily (or by the
loader's ``worker_init_fn``) and dropped by ``__getstate__``; ``make_loader`` starts workers with
``forkserver`` (or ``spawn``), never ``fork``. When the sources fit ``memory_budget_mb`` each
process reads them into memory once, in chunk-aligned slabs; otherwise windows are read chunk by
chunk through an LRU of decompressed chunks, so windows sharing a chunk decompress it once.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm import tqdm

from pipeline.config import StrictModel
from pipeline.store import EpisodeStore, StoreArray


class LoaderConfig(StrictModel):
    """The ``loader`` section of params.yaml."""

    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: read in the main process)")
    memory_budget_mb: float = Field(
        2048, ge=0, description="load the sources into memory (per process) when they fit this budget"
    )
    cache_chunks: int = Field(64, gt=0, description="decompressed chunks held per process (LRU) otherwise")
    start_method: Literal["forkserver", "spawn"] = Field(
        "forkserver", description="how workers start; never 'fork', which would copy zarr's asyncio thread state"
    )


def split_episodes(n_episodes: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split episode ids into (train, validation) by whole episodes, seeded; both sorted.

    ``round(n * val_fraction)`` episodes go to validation, clamped so that each side gets at least
    one episode when ``n_episodes >= 2`` and ``val_fraction > 0``; a single episode goes to training.
    """
    if n_episodes < 1:
        raise ValueError(f"split_episodes: n_episodes must be >= 1 (got {n_episodes})")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"split_episodes: val_fraction must be in [0, 1) (got {val_fraction})")
    n_val = int(round(n_episodes * val_fraction))
    if val_fraction > 0 and n_episodes >= 2:
        n_val = min(max(n_val, 1), n_episodes - 1)
    elif n_episodes < 2:
        n_val = 0
    perm = np.random.default_rng(seed).permutation(n_episodes)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def _check_episode_ends(episode_ends: np.ndarray, where: str = "episode_ends") -> np.ndarray:
    ends = np.asarray(episode_ends)
    if ends.ndim != 1 or len(ends) == 0 or not np.issubdtype(ends.dtype, np.integer):
        raise ValueError(f"{where}: must be a non-empty 1-D integer array (got {ends.dtype} {ends.shape})")
    if ends[0] <= 0 or np.any(np.diff(ends) <= 0):
        raise ValueError(f"{where}: must be positive and strictly increasing (got {ends[:8].tolist()}...)")
    return ends.astype(np.int64)


def window_index(
    episode_ends: np.ndarray, episode_ids: Sequence[int] | np.ndarray, window: int, stride: int = 1
) -> np.ndarray:
    """``[start, end)`` of every window of ``window`` frames, ``stride`` apart, inside each episode.

    An episode of length L gives ``max(0, (L - window) // stride + 1)`` windows, the first at the
    episode's start; episodes shorter than ``window`` give none. Rows follow ``episode_ids``' order.
    Returns an int64 array of shape (n_windows, 2).
    """
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1 (got window={window}, stride={stride})")
    ends = _check_episode_ends(episode_ends)
    ids = np.asarray(episode_ids, dtype=np.int64).reshape(-1)
    bad = ids[(ids < 0) | (ids >= len(ends))]
    if len(bad):
        raise ValueError(f"episode id {int(bad[0])} out of range: the store has {len(ends)} episodes")
    starts = np.concatenate([[0], ends[:-1]])[ids]
    lengths = ends[ids] - starts
    counts = np.where(lengths >= window, (lengths - window) // stride + 1, 0)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    offsets = (np.arange(int(counts.sum()), dtype=np.int64) - first) * stride
    begin = np.repeat(starts, counts) + offsets
    return np.stack([begin, begin + window], axis=1)


Source = tuple[str | Path, str]
Sources = Mapping[str, Source] | Sequence[Source]


def _normalise_sources(sources: Sources) -> dict[str, tuple[str, str]]:
    """``{name: (store path, key)}`` from a mapping or from (store path, key) pairs (named by key)."""
    items = list(sources.items()) if isinstance(sources, Mapping) else [(None, pair) for pair in sources]
    out: dict[str, tuple[str, str]] = {}
    for name, pair in items:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[1], str)):
            raise ValueError(f"a source must be a (store path, key) pair (got {pair!r})")
        path, key = str(pair[0]), pair[1]
        name = key if name is None else name
        if name in out:
            raise ValueError(f"source name '{name}' given twice ({out[name][0]} and {path}); use a mapping")
        out[name] = (path, key)
    if not out:
        raise ValueError("WindowDataset needs at least one source")
    return out


def _slab_frames(arr: StoreArray, at_least: int = 1) -> int:
    """A chunk-aligned read length: the shard (or chunk) length, a multiple of it >= ``at_least``."""
    unit = int((arr.shards or arr.chunks)[0])
    return unit * max(1, -(-at_least // unit))


def _read_all(arr: StoreArray) -> np.ndarray:
    """The whole array, read in chunk-aligned slabs into one preallocated buffer (``StoreCorrupt``
    when the store is damaged)."""
    out = np.empty(arr.shape, dtype=arr.dtype)
    slab = _slab_frames(arr)
    for s in range(0, arr.shape[0], slab):
        out[s : s + slab] = arr[s : s + slab]
    return out


class ChunkCache:
    """LRU of decompressed chunks along time: windows sharing a chunk decompress it once."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.chunks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def read(self, name: str, arr: StoreArray, start: int, end: int) -> np.ndarray:
        """Rows ``[start, end)`` of ``arr`` (``StoreCorrupt`` when a chunk of it is damaged)."""
        cf = int(arr.chunks[0])
        parts = []
        for c in range(start // cf, (end - 1) // cf + 1):
            chunk = self._chunk(name, arr, c, cf)
            parts.append(chunk[max(start - c * cf, 0) : min(end - c * cf, cf)])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _chunk(self, name: str, arr: StoreArray, c: int, cf: int) -> np.ndarray:
        key = (name, c)
        chunk = self.chunks.get(key)
        if chunk is not None:
            self.chunks.move_to_end(key)
            self.hits += 1
            return chunk
        self.misses += 1
        chunk = arr[c * cf : (c + 1) * cf]
        self.chunks[key] = chunk
        if len(self.chunks) > self.capacity:
            self.chunks.popitem(last=False)
        return chunk


class WindowDataset(Dataset):
    """Windows of ``window`` frames, ``stride`` apart, of the episodes ``episode_ids``.

    ``sources``: ``{name: (store path, key)}`` or a list of ``(store path, key)`` pairs (each named
    by its key), e.g. ``[("data/mnist/frames.zarr", "frames"), ("data/mnist/actions.zarr",
    "actions")]``. Item ``i`` is ``{name: array of shape (window, ...)}`` (numpy, the store's dtype).
    Items may be views of this process's loaded data or cached chunks: treat them as read-only
    (the DataLoader's collate copies them into the batch).
    """

    def __init__(
        self,
        sources: Sources,
        window: int,
        stride: int = 1,
        episode_ids: Sequence[int] | np.ndarray | None = None,
        cfg: LoaderConfig | None = None,
    ):
        self.sources = _normalise_sources(sources)
        self.window = int(window)
        self.stride = int(stride)
        self.cfg = cfg or LoaderConfig()
        self.episode_ends, self.nbytes = self._read_meta()
        n_ep = len(self.episode_ends)
        self.episode_ids = np.arange(n_ep) if episode_ids is None else np.asarray(episode_ids, dtype=np.int64)
        self.windows = window_index(self.episode_ends, self.episode_ids, self.window, self.stride)
        if len(self.windows) == 0:
            first = next(iter(self.sources.values()))[0]
            raise ValueError(
                f"{first}: no window of {self.window} frames fits in the {len(self.episode_ids)} selected episodes"
            )
        self.in_memory = self.nbytes <= self.cfg.memory_budget_mb * 2**20
        self.__dict__.update(self._no_process_state())

    def _read_meta(self) -> tuple[np.ndarray, int]:
        """Check the sources (keys exist, same episode_ends; ``EpisodeStore.open`` checks each
        array's length); return ends and total bytes."""
        stores = {path: EpisodeStore.open(path) for path, _ in self.sources.values()}
        nbytes = 0
        for path, key in self.sources.values():
            nbytes += stores[path].array(key).nbytes
        (path0, store0), *rest = stores.items()
        for path, store in rest:
            if not np.array_equal(store.episode_ends, store0.episode_ends):
                raise ValueError(f"{path}: meta/episode_ends differ from those of {path0}; the stores do not match")
        return _check_episode_ends(store0.episode_ends, f"{path0}: meta/episode_ends"), int(nbytes)

    # -- per-process state: never pickled, reopened in each process ---------------------------
    @staticmethod
    def _no_process_state() -> dict[str, Any]:
        """Opened in this process: ``_pid``; store arrays or loaded numpy arrays; the chunk LRU."""
        return {"_pid": None, "_arrays": {}, "_cache": None}

    def __getstate__(self) -> dict:
        return {**self.__dict__, **self._no_process_state()}

    def open(self) -> None:
        """Open the stores in this process (and load them into memory when they fit the budget)."""
        if self._pid == os.getpid():
            return
        stores = {path: EpisodeStore.open(path) for path, _ in self.sources.values()}
        arrays = {name: stores[path].array(key) for name, (path, key) in self.sources.items()}
        if self.in_memory:
            arrays = {name: _read_all(arr) for name, arr in arrays.items()}
        self._arrays = arrays
        self._cache = None if self.in_memory else ChunkCache(self.cfg.cache_chunks)
        self._pid = os.getpid()

    # -- Dataset -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start, end = (int(v) for v in self.windows[i])
        self.open()
        if self.in_memory:
            return {name: arr[start:end] for name, arr in self._arrays.items()}
        return {name: self._cache.read(name, arr, start, end) for name, arr in self._arrays.items()}


def exit_with_parent() -> threading.Thread | None:
    """In a child process: start a daemon thread that ends this process (``os._exit``) as soon as
    its parent is gone. Returns the thread, or None in a process that has no parent process.

    The thread blocks on ``multiprocessing.parent_process().sentinel``, the read end of a pipe whose
    only write end the parent holds: it reaches EOF when the parent exits or is killed (SIGKILL
    included), also under ``forkserver``, where the OS parent is the forkserver. ``os._exit``, not a
    clean exit: the worker's result queue may be blocked on a pipe that nobody reads any more.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return None
    sentinel = parent.sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        os._exit(1)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def _init_worker(worker_id: int) -> None:
    """Tie the worker's life to the stage's, seed numpy per worker and open (load) the dataset
    before the first batch is asked for."""
    exit_with_parent()
    info = get_worker_info()
    np.random.seed(info.seed % 2**32)
    opener = getattr(info.dataset, "open", None)
    if callable(opener):
        opener()


def _context(cfg: LoaderConfig, dataset: Dataset) -> multiprocessing.context.BaseContext:
    """The workers' start method. A forkserver imports this module and the dataset's once (it opens
    no store), so each worker forks from it in a fraction of a second instead of re-importing torch.
    """
    ctx = multiprocessing.get_context(cfg.start_method)
    if cfg.start_method == "forkserver":
        ctx.set_forkserver_preload(sorted({__name__, type(dataset).__module__} - {"__main__"}))
    return ctx


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    cfg: LoaderConfig | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over ``dataset``: seeded order; workers (forkserver or spawn, never fork) that
    persist across epochs, open the dataset before their first batch and exit as soon as the
    process that made the loader is gone (also after a SIGKILL)."""
    cfg = cfg or LoaderConfig()
    workers = cfg.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        multiprocessing_context=_context(cfg, dataset) if workers > 0 else None,
        persistent_workers=workers > 0,
        worker_init_fn=_init_worker if workers > 0 else None,
    )


def iter_batches(
    path: str | Path, key: str, batch_size: int, progress: bool = False
) -> Iterator[tuple[int, np.ndarray]]:
    """All frames of ``key`` in order, as ``(start, array of up to batch_size frames)``.

    The store is read in chunk-aligned slabs (each chunk decompressed once); batches are exactly
    ``batch_size`` frames except the last. A damaged store raises ``StoreCorrupt``.
    """
    if batch_size < 1:
        raise ValueError(f"iter_batches: batch_size must be >= 1 (got {batch_size})")
    arr = EpisodeStore.open(path).array(key)
    n = arr.shape[0]
    slab = _slab_frames(arr, batch_size)
    pending = np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
    pos = 0
    with tqdm(total=n, unit="frame", desc=f"{Path(path).name}/{key}", disable=not progress) as bar:
        for s in range(0, n, slab):
            block = arr[s : s + slab]
            pending = np.concatenate([pending, block]) if len(pending) else block
            while len(pending) >= batch_size:
                yield pos, pending[:batch_size]
                pending, pos = pending[batch_size:], pos + batch_size
            bar.update(len(block))
        if len(pending):
            yield pos, pending

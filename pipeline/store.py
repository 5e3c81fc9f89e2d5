"""The episode store: every frame/feature store of the pipeline has this one layout.

Like diffusion_policy's ``ReplayBuffer``: the arrays of all episodes are concatenated along time
under ``data/<name>`` and ``meta/episode_ends`` holds the exclusive end index of each episode.
Arrays are chunked along time, compressed with Blosc zstd and stored with zarr 3 sharding, so a
store is a few files, not thousands. A store is written to a temporary sibling directory and
renamed into place when complete: a half-written store is never left at the output path.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from pydantic import Field
from zarr.codecs import BloscCodec

from pipeline.atomic import clean_stale, replace, tmp_sibling
from pipeline.config import StrictModel

FORMAT = "episode-store/1"


class StoreConfig(StrictModel):
    """The ``store`` section of params.yaml."""

    chunk_frames: int = Field(64, gt=0, description="frames per chunk along time")
    shard_chunks: int = Field(32, gt=0, description="chunks per shard file along time")
    clevel: int = Field(3, ge=0, le=9, description="Blosc zstd level")


def _compressor(cfg: StoreConfig) -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=cfg.clevel, shuffle="shuffle")


class EpisodeStoreWriter:
    """Append episodes; ``commit()`` (or leaving the ``with`` block cleanly) renames into place.

    Data is buffered and written a whole shard at a time, so every shard file is written once.
    On an exception the temporary directory is removed and the output path is left untouched.
    """

    def __init__(self, path: Path | str, cfg: StoreConfig | None = None, attrs: dict | None = None):
        self.path = Path(path)
        self.cfg = cfg or StoreConfig()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.path)
        self.tmp = tmp_sibling(self.path)
        self.root = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
        self.root.attrs.update({"format": FORMAT, **(attrs or {})})
        self.data = self.root.require_group("data")
        self.meta = self.root.require_group("meta")
        self.arrays: dict[str, zarr.Array] = {}
        self.pending: dict[str, list[np.ndarray]] = {}
        self.pending_len: dict[str, int] = {}
        self.written: dict[str, int] = {}
        self.episode_ends: list[int] = []
        self.n = 0
        self.committed = False

    @property
    def shard_frames(self) -> int:
        return self.cfg.chunk_frames * self.cfg.shard_chunks

    def _create(self, name: str, sample: np.ndarray) -> None:
        tail = tuple(sample.shape[1:])
        cf = self.cfg.chunk_frames
        self.arrays[name] = self.data.create_array(
            name,
            shape=(0, *tail),
            chunks=(cf, *tail),
            shards=(self.shard_frames, *tail),
            dtype=sample.dtype,
            compressors=_compressor(self.cfg),
            fill_value=0,
        )
        self.pending[name] = []
        self.pending_len[name] = 0
        self.written[name] = 0

    def add_episode(self, **arrays: np.ndarray) -> None:
        """Append one episode: every array has the episode's length along axis 0."""
        if not arrays:
            raise ValueError("add_episode needs at least one array")
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{self.path}: arrays of one episode differ in length: {lengths}")
        if self.arrays and set(arrays) != set(self.arrays):
            raise ValueError(
                f"{self.path}: episode arrays {sorted(arrays)} differ from the store's {sorted(self.arrays)}"
            )
        t = next(iter(lengths.values()))
        if t == 0:
            raise ValueError(f"{self.path}: empty episode")
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            if name not in self.arrays:
                self._create(name, a)
            arr = self.arrays[name]
            if a.shape[1:] != arr.shape[1:] or a.dtype != arr.dtype:
                raise ValueError(
                    f"{self.path}: array '{name}' has shape {a.shape[1:]}/{a.dtype}, "
                    f"store has {arr.shape[1:]}/{arr.dtype}"
                )
            self.pending[name].append(a)
            self.pending_len[name] += t
            self._flush(name, final=False)
        self.n += t
        self.episode_ends.append(self.n)

    def _flush(self, name: str, final: bool) -> None:
        sf = self.shard_frames
        if self.pending_len[name] == 0 or (not final and self.pending_len[name] < sf):
            return
        buf = np.concatenate(self.pending[name]) if len(self.pending[name]) > 1 else self.pending[name][0]
        take = len(buf) if final else (len(buf) // sf) * sf
        arr = self.arrays[name]
        start = self.written[name]
        arr.resize((start + take, *arr.shape[1:]))
        arr[start : start + take] = buf[:take]
        self.written[name] = start + take
        rest = buf[take:]
        self.pending[name] = [rest] if len(rest) else []
        self.pending_len[name] = len(rest)

    def commit(self) -> Path:
        if self.committed:
            return self.path
        for name in self.arrays:
            self._flush(name, final=True)
        ends = np.asarray(self.episode_ends, dtype=np.int64)
        self.meta.create_array(
            "episode_ends", shape=ends.shape, chunks=(max(1, len(ends)),), dtype=np.int64,
            compressors=None, fill_value=0,
        )[:] = ends
        self.root.attrs.update({"n_frames": int(self.n), "n_episodes": int(len(ends))})
        replace(self.tmp, self.path)
        self.committed = True
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "EpisodeStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_episode_store(
    path: Path | str, episodes: list[dict[str, np.ndarray]], cfg: StoreConfig | None = None,
    attrs: dict | None = None,
) -> Path:
    with EpisodeStoreWriter(path, cfg, attrs) as w:
        for ep in episodes:
            w.add_episode(**ep)
    return Path(path)


@dataclass
class EpisodeStore:
    """Read access to an episode store."""

    path: Path
    root: zarr.Group
    episode_ends: np.ndarray

    @classmethod
    def open(cls, path: Path | str) -> "EpisodeStore":
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise FileNotFoundError(f"{path}: not an episode store (no zarr.json); run the stage that writes it")
        root = zarr.open_group(str(path), mode="r")
        if root.attrs.get("format") != FORMAT:
            raise ValueError(f"{path}: not an episode store (format {root.attrs.get('format')!r})")
        ends = np.asarray(root["meta/episode_ends"][:], dtype=np.int64)
        return cls(path, root, ends)

    @property
    def attrs(self) -> dict:
        return dict(self.root.attrs)

    @property
    def keys(self) -> list[str]:
        return sorted(self.root["data"].array_keys())

    def array(self, name: str) -> zarr.Array:
        try:
            return self.root["data"][name]
        except KeyError:
            raise KeyError(f"{self.path}: no array '{name}' (have {self.keys})") from None

    @property
    def n_episodes(self) -> int:
        return int(len(self.episode_ends))

    @property
    def n_frames(self) -> int:
        return int(self.episode_ends[-1]) if len(self.episode_ends) else 0

    @property
    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], self.episode_ends[:-1]]).astype(np.int64)

    def episode_lengths(self) -> np.ndarray:
        return np.diff(np.concatenate([[0], self.episode_ends]))

    def episode_slice(self, i: int) -> slice:
        return slice(int(self.episode_starts[i]), int(self.episode_ends[i]))

    def episode(self, i: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        sl = self.episode_slice(i)
        return {n: self.array(n)[sl] for n in (names or self.keys)}

    def iter_episodes(self, names: list[str] | None = None):
        for i in range(self.n_episodes):
            yield i, self.episode(i, names)

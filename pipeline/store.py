"""The episode store: every frame/feature store of the pipeline has this one layout.

Like diffusion_policy's ``ReplayBuffer``: the arrays of all episodes are concatenated along time
under ``data/<name>`` and ``meta/episode_ends`` holds the exclusive end index of each episode.
Arrays are chunked along time, compressed with Blosc zstd and stored with zarr 3 sharding, so a
store is a few files, not thousands. A store is written to a temporary sibling directory and
renamed into place when complete: a half-written store is never left at the output path.

Damage is detected, never read as data. Format ``episode-store/2`` writes every chunk (also one of
fill values) and a crc32c checksum after each compressed chunk, besides the checksum zarr keeps of
each shard's index. ``EpisodeStore.open`` checks, from metadata and file sizes only, that every
array has the length ``meta/episode_ends`` says and (format 2) that every shard file is there;
every read through ``EpisodeStore.array`` turns a failed checksum or decompression into
``StoreCorrupt``, which names the store, the array and the two ways out: ``dvc checkout --force
<store>`` restores it from DVC's cache, ``dvc repro -f -s <stage>`` rebuilds it. Stores of format
``episode-store/1`` (no chunk checksums, empty chunks not written) are still read.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
import zarr
from pydantic import Field
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.atomic import clean_stale, replace, tmp_sibling
from pipeline.config import StrictModel

FORMAT = "episode-store/2"
FORMAT_V1 = "episode-store/1"  # read too: no chunk checksums, chunks of fill values not written
FORMATS = (FORMAT_V1, FORMAT)

# What zarr and its codecs raise on damaged bytes: a checksum that does not match (ValueError), a
# failed decompression (RuntimeError), a shard shorter than its index (ValueError), an I/O error.
_READ_ERRORS = (ValueError, RuntimeError, OSError, EOFError)


class StoreCorrupt(ValueError):
    """An episode store whose files are damaged or disagree with each other.

    The message names the store and the array and says how to get a good copy back. One argument
    (the message), so that it survives the trip from a DataLoader worker to the main process.
    """


def writer_stage(path: Path | str) -> str | None:
    """The DVC stage whose outputs hold ``path`` (``name`` or ``name@item``), from the nearest
    ``dvc.yaml`` above it; None when there is none or no stage lists it."""
    target = Path(path).resolve()
    root = next((d for d in target.parents if (d / "dvc.yaml").is_file()), None)
    if root is None:
        return None
    rel = target.relative_to(root).as_posix()
    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return None
    for name, body in stages.items():
        if not isinstance(body, dict):
            continue
        if "foreach" in body:
            items = body["foreach"]
            pairs = items.items() if isinstance(items, dict) else ((v, v) for v in items)
            variants = [(f"{name}@{key}", body.get("do") or {}, {"key": key, "item": value})
                        for key, value in pairs]
        else:
            variants = [(name, body, {})]
        for stage, spec, subs in variants:
            for out in spec.get("outs") or []:
                out = next(iter(out)) if isinstance(out, dict) else str(out)
                for var, value in subs.items():
                    out = out.replace(f"${{{var}}}", str(value))
                if rel == out or rel.startswith(out.rstrip("/") + "/"):
                    return stage
    return None


def corrupt_error(path: Path | str, what: str, reason: Any) -> StoreCorrupt:
    """``StoreCorrupt`` for ``what`` (e.g. "array 'frames'") of the store at ``path``, saying why
    (``reason``: text or the exception caught) and how to restore or rebuild the store."""
    if isinstance(reason, BaseException):
        reason = f"{type(reason).__name__}: {reason}"
    reason = str(reason).strip().rstrip(".")
    stage = writer_stage(path)
    rebuild = (f"`dvc repro -f -s {stage}`" if stage
               else "`dvc repro -f -s <stage>` of the stage that writes it")
    return StoreCorrupt(
        f"{path}: {what} is corrupt or incomplete on disk ({reason}). Restore the store from DVC's "
        f"cache with `dvc checkout --force {path}`, or rebuild it with {rebuild}."
    )


def _selection_ok(shape: tuple[int, ...], selection: Any) -> bool:
    """Whether ``selection`` is a valid index of an array of ``shape`` (so that a read error is
    the data's fault, not the caller's). Allocates nothing of the array's size."""
    try:
        np.broadcast_to(np.empty((), np.uint8), shape)[selection]
    except Exception:
        return False
    return True


class StoreArray:
    """A read-only array of an episode store: a zarr array whose reads raise ``StoreCorrupt``.

    ``arr[selection]`` returns a numpy array (zarr's basic indexing); a checksum that does not
    match or a chunk that does not decompress raises ``StoreCorrupt`` naming the store and the
    array. ``shape``, ``dtype``, ``chunks``, ``shards``, ``nbytes`` come from the metadata; other
    attributes are the zarr array's (``.zarr`` is the array itself, whose reads are not checked).
    """

    def __init__(self, store_path: Path, name: str, array: zarr.Array):
        self.store_path = store_path
        self.name = name
        self.zarr = array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.zarr.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.zarr.dtype

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self.zarr.chunks)

    @property
    def shards(self) -> tuple[int, ...] | None:
        return self.zarr.shards

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.zarr.nbytes)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, selection: Any) -> np.ndarray:
        try:
            return self.zarr[selection]
        except _READ_ERRORS as exc:
            if not _selection_ok(self.shape, selection):
                raise
            raise corrupt_error(self.store_path, f"array '{self.name}'", exc) from exc

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[...], dtype=dtype)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_") or attr == "zarr":
            raise AttributeError(attr)
        return getattr(self.zarr, attr)

    def __repr__(self) -> str:
        return f"<StoreArray {self.store_path}/data/{self.name} shape={self.shape} dtype={self.dtype}>"


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
            compressors=[_compressor(self.cfg), Crc32cCodec()],  # a checksum of every chunk
            fill_value=0,
            config={"write_empty_chunks": True},  # every shard file exists: a missing one is damage
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
            compressors=Crc32cCodec(), fill_value=0, config={"write_empty_chunks": True},
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
    """Read access to an episode store (``open`` checks it; ``array`` reads are checked)."""

    path: Path
    root: zarr.Group
    episode_ends: np.ndarray

    @classmethod
    def open(cls, path: Path | str) -> "EpisodeStore":
        """Open and check the store at ``path``; raises ``FileNotFoundError`` when there is none,
        ``ValueError`` when it is not an episode store, ``StoreCorrupt`` when it is damaged: an
        array whose length differs from ``meta/episode_ends``, bad episode ends, or (format 2) a
        shard file that is missing or shorter than its index. Reads metadata and file sizes only."""
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise FileNotFoundError(f"{path}: not an episode store (no zarr.json); run the stage that writes it")
        try:
            root = zarr.open_group(str(path), mode="r")
            fmt = root.attrs.get("format")
        except _READ_ERRORS as exc:
            raise corrupt_error(path, "its metadata (zarr.json)", exc) from exc
        if fmt not in FORMATS:
            raise ValueError(f"{path}: not an episode store (format {fmt!r}; expected one of {FORMATS})")
        try:
            ends_arr = root["meta/episode_ends"]
        except KeyError:
            raise corrupt_error(path, "meta/episode_ends", "missing") from None
        except _READ_ERRORS as exc:
            raise corrupt_error(path, "meta/episode_ends", exc) from exc
        ends = StoreArray(path, "meta/episode_ends", ends_arr)[:]
        store = cls(path, root, np.asarray(ends, dtype=np.int64))
        store._check(fmt)
        return store

    def _check(self, fmt: str) -> None:
        """The checks of ``open`` after the episode ends are read."""
        ends, path = self.episode_ends, self.path
        if ends.ndim != 1 or (len(ends) and (ends[0] <= 0 or np.any(np.diff(ends) <= 0))):
            raise corrupt_error(path, "meta/episode_ends",
                                f"not positive and strictly increasing: {ends[:8].tolist()}...")
        attrs = self.root.attrs
        recorded = {"n_frames": self.n_frames, "n_episodes": self.n_episodes}
        for key, value in recorded.items():
            if key in attrs and int(attrs[key]) != value:
                raise corrupt_error(path, "meta/episode_ends",
                                    f"they give {key} = {value}, the store's attributes say {attrs[key]}")
        try:
            data = dict(self.root["data"].arrays()) if "data" in self.root else {}
        except _READ_ERRORS as exc:
            raise corrupt_error(path, "the metadata of data/", exc) from exc
        for name, arr in sorted(data.items()):
            if arr.shape[0] != self.n_frames:
                raise corrupt_error(
                    path, f"array '{name}'",
                    f"it has {arr.shape[0]} frames, meta/episode_ends says {self.n_frames} "
                    f"({self.n_episodes} episodes)",
                )
            if fmt == FORMAT:
                self._check_shard_files(name, arr)

    def _check_shard_files(self, name: str, arr: zarr.Array) -> None:
        """Every shard file of a format-2 array is there and longer than its index."""
        shard = arr.shards or arr.chunks
        inner = math.prod(s // c for s, c in zip(shard, arr.chunks)) if arr.shards else 0
        index_bytes = 16 * inner + 4 if inner else 0
        for i in range(-(-arr.shape[0] // shard[0])):
            key = arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
            f = self.path / "data" / name / key
            try:
                size = f.stat().st_size
            except FileNotFoundError:
                raise corrupt_error(self.path, f"array '{name}'", f"shard file {f} is missing") from None
            if size <= index_bytes:
                raise corrupt_error(self.path, f"array '{name}'",
                                    f"shard file {f} has {size} bytes, no more than its {index_bytes}-byte index")

    @property
    def attrs(self) -> dict:
        return dict(self.root.attrs)

    @property
    def keys(self) -> list[str]:
        return sorted(self.root["data"].array_keys())

    def array(self, name: str) -> StoreArray:
        """The array ``data/<name>``: a ``StoreArray`` whose reads raise ``StoreCorrupt`` on damage."""
        try:
            return StoreArray(self.path, name, self.root["data"][name])
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

    def frames_of(self, episodes: np.ndarray | list[int]) -> np.ndarray:
        """(frames,) bool: True at every frame of the given ``episodes`` (indices), e.g. the training split."""
        return np.isin(np.repeat(np.arange(self.n_episodes), self.episode_lengths()), np.asarray(episodes))

    def episode_slice(self, i: int) -> slice:
        return slice(int(self.episode_starts[i]), int(self.episode_ends[i]))

    def episode(self, i: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        sl = self.episode_slice(i)
        return {n: self.array(n)[sl] for n in (names or self.keys)}

    def iter_episodes(self, names: list[str] | None = None):
        for i in range(self.n_episodes):
            yield i, self.episode(i, names)

"""The episode store: round trips, layout, atomic writes (a killed writer leaves nothing)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.store import (
    EpisodeStore,
    EpisodeStoreWriter,
    StoreConfig,
    write_episode_store,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = StoreConfig(chunk_frames=4, shard_chunks=2, clevel=3)


def episodes(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"frames": rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8), "pos": rng.random((n, 2)).astype(np.float32)}
        for n in lengths
    ]


def test_round_trip_and_layout(tmp_path):
    eps = episodes([5, 13, 1, 9])
    path = write_episode_store(tmp_path / "s.zarr", eps, SMALL, attrs={"fps": 10})
    s = EpisodeStore.open(path)
    assert s.episode_ends.tolist() == [5, 18, 19, 28]
    assert s.n_frames == 28 and s.n_episodes == 4 and s.attrs["fps"] == 10
    assert s.keys == ["frames", "pos"]
    for i, ep in s.iter_episodes():
        for k in ep:
            np.testing.assert_array_equal(ep[k], eps[i][k])
    arr = s.array("frames")
    assert arr.chunks == (4, 8, 8, 3)
    assert arr.shards == (8, 8, 8, 3)
    codecs = str(zarr.open_array(str(path / "data" / "frames")).metadata.to_dict())
    assert "blosc" in codecs and "zstd" in codecs
    # sharding keeps the number of files small: one per shard, not one per chunk
    n_files = len(list((path / "data" / "frames").rglob("c/*/0/0/0")))
    assert n_files == int(np.ceil(28 / 8))
    assert not list(tmp_path.glob(".s.zarr.tmp-*"))


def test_rewrite_replaces_and_is_byte_identical(tmp_path):
    def files(p):
        return {f.relative_to(p): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}

    a = write_episode_store(tmp_path / "a.zarr", episodes([7, 3]), SMALL)
    first = files(a)
    write_episode_store(tmp_path / "a.zarr", episodes([7, 3]), SMALL)
    assert files(a) == first
    write_episode_store(tmp_path / "a.zarr", episodes([2]), SMALL)
    assert EpisodeStore.open(a).n_frames == 2


def test_mismatched_episode_is_an_error_and_leaves_nothing(tmp_path):
    out = tmp_path / "bad.zarr"
    with pytest.raises(ValueError, match="differ in length"):
        with EpisodeStoreWriter(out, SMALL) as w:
            w.add_episode(frames=np.zeros((3, 2), np.uint8), pos=np.zeros((4, 2), np.float32))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_open_missing_store_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.zarr"):
        EpisodeStore.open(tmp_path / "nope.zarr")


WRITER = """
import sys, time, numpy as np
from pipeline.store import EpisodeStoreWriter, StoreConfig
with EpisodeStoreWriter(sys.argv[1], StoreConfig(chunk_frames=4, shard_chunks=2)) as w:
    for i in range(int(sys.argv[2])):
        w.add_episode(frames=np.full((16, 8, 8), i % 255, np.uint8))
        if i == 3:
            print("writing", flush=True)
        time.sleep(float(sys.argv[3]))
"""


def test_killed_writer_leaves_no_store_and_next_run_rebuilds(tmp_path):
    out = tmp_path / "frames.zarr"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out), "1000", "0.01"], stdout=subprocess.PIPE, env=env, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed writer must not leave a store at the output path"
    assert list(tmp_path.glob(".frames.zarr.tmp-*")), "the partial write stays in a temporary path"
    subprocess.run([sys.executable, "-c", WRITER, str(out), "6", "0"], check=True, env=env)
    s = EpisodeStore.open(out)
    assert s.n_episodes == 6 and s.n_frames == 96
    assert not list(tmp_path.glob(".frames.zarr.tmp-*")), "stale temporary stores are cleaned up"

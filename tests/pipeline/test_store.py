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
    StoreCorrupt,
    write_episode_store,
    writer_stage,
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


def test_frames_of_marks_exactly_the_frames_of_the_given_episodes(tmp_path):
    """Guards an off-by-one at episode boundaries (ends exclusive) and an empty or 1-frame episode."""
    s = EpisodeStore.open(write_episode_store(tmp_path / "s.zarr", episodes([5, 13, 1, 9]), SMALL))
    want = np.zeros(28, dtype=bool)
    want[5:18] = True   # episode 1
    want[18:19] = True  # episode 2
    np.testing.assert_array_equal(s.frames_of([1, 2]), want)
    np.testing.assert_array_equal(s.frames_of(np.array([3])), np.arange(28) >= 19)
    assert not s.frames_of([]).any() and s.frames_of(range(4)).all()


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


# -- damaged stores: refused at open or at the read, naming the store, the array and the fix ------


def _shards(path, name="frames"):
    return sorted(p for p in (path / "data" / name / "c").rglob("*") if p.is_file())


def _damage(shard: Path, how: str) -> None:
    b = bytearray(shard.read_bytes())
    if how == "truncated":
        shard.write_bytes(bytes(b[: len(b) // 2]))
    elif how == "payload-byte":  # inside a compressed chunk
        b[len(b) // 4] ^= 0xFF
        shard.write_bytes(bytes(b))
    elif how == "index-byte":  # the shard index at the end of the file
        b[-8] ^= 0xFF
        shard.write_bytes(bytes(b))
    elif how == "empty":
        shard.write_bytes(b"")
    elif how == "missing":
        shard.unlink()


def _assert_names_store_and_fix(exc: BaseException, path: Path, what: str) -> None:
    msg = str(exc)
    assert str(path) in msg and what in msg, msg
    assert f"dvc checkout --force {path}" in msg and "dvc repro -f -s" in msg, msg


@pytest.mark.parametrize("how", ["truncated", "payload-byte", "index-byte"])
def test_damaged_shard_raises_store_corrupt_on_read(tmp_path, how):
    """Guards issue 7: a shard cut in half stopped the next stage with zarr's raw "Stored and
    computed checksum do not match", naming neither the store nor the way out; a flipped byte in a
    chunk was read back as wrong data without any error (no chunk checksum)."""
    eps = episodes([9, 7])
    path = write_episode_store(tmp_path / "s.zarr", eps, SMALL)
    _damage(_shards(path)[1], how)  # frames 8..15
    s = EpisodeStore.open(path)
    np.testing.assert_array_equal(s.array("frames")[:8], eps[0]["frames"][:8])  # other shards read fine
    with pytest.raises(StoreCorrupt) as info:
        s.array("frames")[:]
    _assert_names_store_and_fix(info.value, path, "array 'frames'")
    assert isinstance(info.value, ValueError)
    np.testing.assert_array_equal(s.array("pos")[:], np.concatenate([e["pos"] for e in eps]))


@pytest.mark.parametrize("how", ["empty", "missing"])
def test_missing_or_empty_shard_is_refused_at_open(tmp_path, how):
    """A lost shard file used to read back as zeros (zarr's fill value), silently."""
    path = write_episode_store(tmp_path / "s.zarr", episodes([9, 7]), SMALL)
    _damage(_shards(path, "pos")[0], how)
    with pytest.raises(StoreCorrupt) as info:
        EpisodeStore.open(path)
    _assert_names_store_and_fix(info.value, path, "array 'pos'")
    assert "shard file" in str(info.value)


def test_store_cut_short_is_refused_at_open_with_both_lengths(tmp_path):
    """Guards issue 7: ``EpisodeStore.open`` did not check each array's length against
    ``meta/episode_ends``, so a store cut short opened and failed (or misread) later."""
    path = write_episode_store(tmp_path / "s.zarr", episodes([5, 13, 9]), SMALL)
    zarr.open_array(str(path / "data" / "pos"), mode="r+").resize((20, 2))  # cut to 20 of 27 frames
    with pytest.raises(StoreCorrupt, match=r"array 'pos'.*has 20 frames, meta/episode_ends says 27 \(3 episodes\)") as info:
        EpisodeStore.open(path)
    _assert_names_store_and_fix(info.value, path, "array 'pos'")


def test_open_reads_no_data(tmp_path):
    """The checks of ``open`` use metadata and file sizes only: with every data chunk damaged the
    store still opens (and each read is refused)."""
    path = write_episode_store(tmp_path / "s.zarr", episodes([9, 7]), SMALL)
    for shard in _shards(path) + _shards(path, "pos"):
        _damage(shard, "payload-byte")
    s = EpisodeStore.open(path)
    assert s.n_frames == 16
    with pytest.raises(StoreCorrupt):
        s.array("pos")[3]


def test_damaged_episode_ends_are_refused_at_open(tmp_path):
    path = write_episode_store(tmp_path / "s.zarr", episodes([9, 7]), SMALL)
    chunk = next(p for p in (path / "meta" / "episode_ends").rglob("*") if p.is_file() and p.name != "zarr.json")
    b = bytearray(chunk.read_bytes())
    b[0] ^= 0x01
    chunk.write_bytes(bytes(b))
    with pytest.raises(StoreCorrupt) as info:
        EpisodeStore.open(path)
    _assert_names_store_and_fix(info.value, path, "meta/episode_ends")


def test_bad_selection_is_not_called_corruption(tmp_path):
    s = EpisodeStore.open(write_episode_store(tmp_path / "s.zarr", episodes([9]), SMALL))
    with pytest.raises(IndexError):
        s.array("frames")[100]
    with pytest.raises(Exception) as info:
        s.array("frames")["x"]
    assert not isinstance(info.value, StoreCorrupt)


def test_message_names_the_stage_that_writes_the_store(tmp_path):
    """The rebuild command names the real stage of dvc.yaml (foreach items included)."""
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    assert writer_stage(tmp_path / "data/mnist/frames.zarr") == "moving_mnist"
    assert writer_stage(tmp_path / "data/gameplay/actions.zarr") == "actions@gameplay"
    assert writer_stage(tmp_path / "data/mnist/latents.zarr/data/latents") == "latents@mnist"
    assert writer_stage(tmp_path / "elsewhere.zarr") is None
    path = write_episode_store(tmp_path / "data/gameplay/actions.zarr", episodes([9]), SMALL)
    _damage(_shards(path)[0], "truncated")
    with pytest.raises(StoreCorrupt, match=r"`dvc repro -f -s actions@gameplay`"):
        EpisodeStore.open(path).array("frames")[:]


def test_format_1_stores_are_still_read(tmp_path):
    """Stores written before chunk checksums (no crc32c, chunks of fill values not written)."""
    path = tmp_path / "v1.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs.update({"format": "episode-store/1", "n_frames": 16, "n_episodes": 2})
    frames = np.zeros((16, 2), np.uint8)
    frames[:8] = 7  # frames 8..15 are all fill value: their shard is never written
    root.require_group("data").create_array("frames", shape=(16, 2), chunks=(4, 2), shards=(8, 2),
                                            dtype=np.uint8, fill_value=0)[:] = frames
    root.require_group("meta").create_array("episode_ends", shape=(2,), chunks=(2,), dtype=np.int64,
                                            fill_value=0)[:] = [9, 16]
    s = EpisodeStore.open(path)
    np.testing.assert_array_equal(s.array("frames")[:], frames)

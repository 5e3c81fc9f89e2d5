"""Stage ``latents``: every frame encoded into an episode store with the frames' layout."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from models.tokenizers import build_tokenizer, pixels
from pipeline import latents as latents_lib
from pipeline.checkpoint import CheckpointError, save_model
from pipeline.store import EpisodeStore, StoreConfig, write_episode_store
from stages import latents as stage

LENGTHS = [5, 12, 3, 9]
TINY_STORE = StoreConfig(chunk_frames=4, shard_chunks=2, clevel=1)
CONFIGS = {
    "quantize": dict(image_size=16, channels=3, size=8, levels=16),
    "cnn": dict(image_size=16, channels=3, latent_size=8, latent_channels=4, width=8, blocks=1),
    "mae": dict(image_size=16, channels=3, patch_size=4, n_latents=4, latent_dim=8, dim=32, heads=2,
                depth=1, decoder_depth=1, max_frames=3),
}


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """A frames store whose episodes straddle chunks and batches; returns (path, all frames)."""
    rng = np.random.default_rng(0)
    all_frames = rng.integers(0, 256, (sum(LENGTHS), 16, 16, 3), dtype=np.uint8)
    bounds = np.cumsum([0, *LENGTHS])
    path = tmp_path_factory.mktemp("data") / "frames.zarr"
    write_episode_store(path, [{"frames": all_frames[a:b]} for a, b in zip(bounds, bounds[1:])], TINY_STORE)
    return path, all_frames


def saved_tokenizer(kind: str, path, window: int = 1):
    torch.manual_seed(0)
    model = build_tokenizer(kind, **CONFIGS[kind]).eval()
    save_model(model, "tokenizer", kind, {
        "latent_shape": list(model.latent_shape),
        "latent_dtype": str(model.latent_dtype).removeprefix("torch."),
        "encode_window": window,
        "frame_shape": [16, 16, 3],
    }, path)
    return model


def test_window_bounds_restart_at_every_episode():
    ends = np.cumsum(LENGTHS)  # 5, 17, 20, 29
    assert latents_lib.window_bounds(ends, 1).tolist() == list(range(30))
    assert latents_lib.window_bounds(ends, 3).tolist() == [0, 3, 5, 8, 11, 14, 17, 20, 23, 26, 29]


@pytest.mark.parametrize("kind", ["quantize", "cnn"])
def test_per_frame_latents_match_the_tokenizer(kind, frames, tmp_path):
    path, all_frames = frames
    model = saved_tokenizer(kind, tmp_path / "tok")
    metrics = latents_lib.run(latents_lib.Config(batch_frames=6), path, tmp_path / "tok", tmp_path / "latents.zarr", TINY_STORE)
    assert metrics["frames"] == sum(LENGTHS) and metrics["episodes"] == 4 and metrics["frames_per_s"] > 0
    out = EpisodeStore.open(tmp_path / "latents.zarr")
    assert out.episode_ends.tolist() == np.cumsum(LENGTHS).tolist()
    got = out.array("latents")[:]
    with torch.no_grad():
        want = model.encode(pixels(torch.from_numpy(all_frames))[:, None]).to(model.latent_dtype)[:, 0].numpy()
    assert got.shape == want.shape == (sum(LENGTHS), *model.latent_shape)
    assert out.attrs["kind"] == kind and out.attrs["latent_shape"] == list(model.latent_shape)
    if kind == "quantize":
        assert got.dtype == np.uint8 and np.array_equal(got, want)
        assert out.attrs["vocab_size"] == 17 and out.attrs["mask_id"] == 16
    else:
        assert got.dtype == np.float16 and np.allclose(got, want, atol=2e-3)


def test_mae_latents_are_encoded_in_windows_from_each_episode_start(frames, tmp_path):
    path, all_frames = frames
    model = saved_tokenizer("mae", tmp_path / "tok", window=3)
    latents_lib.run(latents_lib.Config(batch_frames=4), path, tmp_path / "tok", tmp_path / "latents.zarr", TINY_STORE)
    got = EpisodeStore.open(tmp_path / "latents.zarr").array("latents")[:]
    assert got.dtype == np.float16 and got.shape == (sum(LENGTHS), 4, 8)
    bounds = latents_lib.window_bounds(np.cumsum(LENGTHS), 3)
    with torch.no_grad():
        for a, b in zip(bounds, bounds[1:]):
            want = model.encode(pixels(torch.from_numpy(all_frames[a:b]))[None])[0].half().numpy()
            assert np.allclose(got[a:b], want, atol=2e-3), (a, b)


def test_outputs_are_reproducible_and_refuse_mismatched_frames(frames, tmp_path):
    path, _ = frames
    saved_tokenizer("cnn", tmp_path / "tok")
    for name in ("a.zarr", "b.zarr"):
        latents_lib.run(latents_lib.Config(batch_frames=8), path, tmp_path / "tok", tmp_path / name, TINY_STORE)
    a, b = EpisodeStore.open(tmp_path / "a.zarr"), EpisodeStore.open(tmp_path / "b.zarr")
    assert np.array_equal(a.array("latents")[:], b.array("latents")[:]) and a.attrs == b.attrs

    other = tmp_path / "small.zarr"
    write_episode_store(other, [{"frames": np.zeros((4, 8, 8, 3), np.uint8)}], TINY_STORE)
    with pytest.raises(ValueError, match=r"small.zarr: frames are \(8, 8, 3\) but the tokenizer .* \(16, 16, 3\)"):
        latents_lib.run(latents_lib.Config(), other, tmp_path / "tok", tmp_path / "c.zarr", TINY_STORE)
    assert not (tmp_path / "c.zarr").exists()
    with pytest.raises(CheckpointError, match="no tokenizer model here"):
        latents_lib.run(latents_lib.Config(), path, tmp_path / "missing", tmp_path / "c.zarr", TINY_STORE)


def test_main_reads_params_and_writes_metrics(frames, tmp_path, monkeypatch):
    path, _ = frames
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    (tmp_path / "data" / "gameplay").mkdir(parents=True)
    write_episode_store(tmp_path / "data/gameplay/frames.zarr",
                        [{"frames": EpisodeStore.open(path).array("frames")[:]}], TINY_STORE)
    saved_tokenizer("quantize", tmp_path / "data/gameplay/tokenizer")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"latents": {"batch_frames": 8}, "store": TINY_STORE.model_dump()}))
    stage.main("gameplay")
    metrics = json.loads((tmp_path / "metrics/latents-gameplay.json").read_text())
    assert metrics["frames"] == sum(LENGTHS) and metrics["kind"] == "quantize"
    assert EpisodeStore.open(tmp_path / "data/gameplay/latents.zarr").n_frames == sum(LENGTHS)

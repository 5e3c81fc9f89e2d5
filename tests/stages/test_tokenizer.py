"""Stage ``tokenizer`` on tiny real episode stores: metrics, baselines, checkpoint, LPIPS refusal."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.checkpoint import load_model, load_torch, read_meta
from pipeline.config import ParamsError
from pipeline.evaluation import held_out_windows, reconstruct
from pipeline.image_metrics import lpips_or_reason, psnr
from pipeline.reader import LoaderConfig
from pipeline.store import EpisodeStore, StoreConfig, write_episode_store
from stages import tokenizer as stage
from pipeline.tokenizer import Config

TINY_STORE = StoreConfig(chunk_frames=4, shard_chunks=2, clevel=1)
NO_WORKERS = LoaderConfig(num_workers=0)
TRAIN = {"steps": 40, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "log_every": 10, "eval_every": 20,
         "ckpt_every": 20}
SMALL = {
    "quantize": {"size": 8},
    "cnn": {"latent_size": 8, "latent_channels": 4, "width": 16, "blocks": 1, "train": TRAIN},
    "mae": {"patch_size": 4, "n_latents": 4, "latent_dim": 8, "dim": 32, "heads": 2, "depth": 1,
            "decoder_depth": 1, "window": 2, "stride": 2, "mask_ratio_max": 0.5, "mask_warmup_steps": 10,
            "train": {**TRAIN, "batch_size": 16}},
    "eval": {"val_fraction": 0.25, "max_frames": 16, "probe_frames": 8, "batch_size": 8},
}


def square_episodes(n_episodes: int = 8, length: int = 10, channels: int = 1, size: int = 16) -> list[dict]:
    """Episodes of a bright square moving right over a dim background (uint8 frames)."""
    rng = np.random.default_rng(0)
    episodes = []
    for _ in range(n_episodes):
        frames = np.full((length, size, size, channels), 20, dtype=np.uint8)
        r, c = rng.integers(0, size - 4, 2)
        for t in range(length):
            cc = (c + t) % (size - 4)
            frames[t, r : r + 4, cc : cc + 4] = rng.integers(150, 256, channels)
        episodes.append({"frames": frames})
    return episodes


@pytest.fixture(scope="module")
def frames_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "frames.zarr"
    write_episode_store(path, square_episodes(), TINY_STORE)
    return path


def config(kind: str, **over) -> Config:
    return Config.model_validate({"kind": kind, **SMALL, **over})


def test_quantize_measures_its_reconstruction_against_the_baselines(frames_path, tmp_path):
    metrics = stage.run(config("quantize"), frames_path, tmp_path / "tok", tmp_path / "work", loader=NO_WORKERS)
    for key in ("psnr", "ssim", "psnr_mean_image", "psnr_quantize", "collapsed", "latent_std", "lpips"):
        assert key in metrics
    assert metrics["psnr"] == pytest.approx(metrics["psnr_quantize"])
    assert metrics["psnr"] > metrics["psnr_mean_image"] + 3
    assert metrics["collapsed"] is False and metrics["train_steps"] == 0
    assert metrics["val_episodes"] == 2 and metrics["eval_frames"] == 16
    if lpips_or_reason()[0] is None:
        assert metrics["lpips"] == "n/a" and "lpips" in metrics["lpips_reason"]
    meta = read_meta(tmp_path / "tok", "tokenizer")
    assert meta["kind"] == "quantize" and meta["latent_shape"] == [8, 8] and meta["latent_dtype"] == "uint8"
    assert meta["frame_shape"] == [16, 16, 1] and meta["encode_window"] == 1
    model, _ = load_model(tmp_path / "tok", "tokenizer")
    assert model.vocab_size == 17 and model.mask_id == 16


def test_cnn_trains_saves_and_reloads(frames_path, tmp_path):
    metrics = stage.run(config("cnn"), frames_path, tmp_path / "tok", tmp_path / "work", loader=NO_WORKERS)
    assert metrics["kind"] == "cnn" and metrics["train_steps"] == 40
    assert metrics["psnr"] > metrics["psnr_mean_image"]
    assert metrics["collapsed"] is False and metrics["collapse_ratio"] > 0.3
    assert not (tmp_path / "work").exists()  # resumable state removed once the run completed
    meta = read_meta(tmp_path / "tok", "tokenizer")
    assert meta["latent_shape"] == [8, 8, 4] and meta["latent_dtype"] == "float16"
    assert meta["metrics"]["psnr"] == pytest.approx(metrics["psnr"]) and "train_seconds" not in meta["metrics"]
    # the saved weights are plain tensors and reproduce the measured reconstruction
    state = load_torch(tmp_path / "tok" / "model.pt")
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    model, _ = load_model(tmp_path / "tok", "tokenizer")
    held_out, _ = held_out_windows(EpisodeStore.open(frames_path), np.array(meta["val_episodes"]), 1, 16)
    recon, target, _ = reconstruct(model, held_out, 8, torch.device("cpu"))
    assert psnr(recon, target) == pytest.approx(metrics["psnr"], abs=1e-4)


def test_cnn_outputs_are_byte_reproducible(frames_path, tmp_path):
    cfg = config("cnn", cnn={**SMALL["cnn"], "train": {**TRAIN, "steps": 6, "eval_every": 3}})
    for name in ("a", "b"):
        stage.run(cfg, frames_path, tmp_path / name, tmp_path / f"work-{name}", loader=NO_WORKERS)
    for f in ("model.pt", "tokenizer.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_mae_trains_with_the_mask_curriculum(tmp_path):
    path = tmp_path / "rgb.zarr"
    write_episode_store(path, square_episodes(channels=3), TINY_STORE)
    metrics = stage.run(config("mae"), path, tmp_path / "tok", tmp_path / "work", loader=NO_WORKERS)
    assert metrics["kind"] == "mae" and metrics["train_steps"] == 40
    meta = read_meta(tmp_path / "tok", "tokenizer")
    assert meta["encode_window"] == 2 and meta["latent_shape"] == [4, 8]
    assert metrics["eval_frames"] == 16 and np.isfinite(metrics["psnr"])


def test_lpips_weight_without_lpips_fails_before_training(frames_path, tmp_path):
    if lpips_or_reason()[0] is not None:
        pytest.skip("LPIPS is available on this machine")
    with pytest.raises(ParamsError, match=r"tokenizer\.mnist\.lpips_weight is 0.2 .*Set tokenizer\.mnist\.lpips_weight: 0"):
        stage.run(config("cnn", lpips_weight=0.2), frames_path, tmp_path / "tok", tmp_path / "work",
                  where="tokenizer.mnist", loader=NO_WORKERS)
    assert not (tmp_path / "tok").exists() and not (tmp_path / "work").exists()


def test_bad_params_are_refused_with_the_key():
    with pytest.raises(Exception, match="kind"):
        Config.model_validate({"kind": "vqvae"})
    with pytest.raises(Exception, match="window"):
        Config.model_validate({"kind": "mae", "mae": {"window": 0}})


def test_main_reads_params_and_writes_metrics(frames_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    write_episode_store(tmp_path / "data/mnist/frames.zarr", square_episodes(), TINY_STORE)
    params = {"tokenizer": {"mnist": {"kind": "quantize", **SMALL}}, "loader": {"num_workers": 0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    stage.main("mnist")
    metrics = json.loads((tmp_path / "metrics/tokenizer-mnist.json").read_text())
    assert metrics["kind"] == "quantize" and metrics["collapsed"] is False
    assert (tmp_path / "data/mnist/tokenizer/model.pt").exists()


def test_sizes_that_cannot_fit_the_frames_fail_before_any_work(frames_path, tmp_path, monkeypatch):
    """Guards: a latent size that does not fit the frames failed only after the baselines ran."""
    calls = []
    monkeypatch.setattr(stage, "mean_frame", lambda *a, **k: calls.append(1))
    bad = config("cnn", cnn={**SMALL["cnn"], "latent_size": 5})
    with pytest.raises(ParamsError, match=r"tokenizer.cnn: cnn latent_size 5 must be image_size 16"):
        stage.run(bad, frames_path, tmp_path / "tok", tmp_path / "work", loader=NO_WORKERS)
    assert calls == [] and not (tmp_path / "tok").exists()

"""Stage ``dynamics`` end to end on tiny real stores: both families on both kinds of dataset, the
params checks, reproducibility, the batch schedule and the shuffled-actions control.

Inputs are made the way the pipeline makes them: a frames store, an actions store (``actions``,
``valid``, ``action_class`` as the actions stage writes them, docs/contracts.md), a tokenizer
trained by ``stages.tokenizer.run`` and latents encoded by ``stages.latents.run``. The helpers
``world_inputs`` and ``dynamics_config`` are shared with ``tests/stages/test_policy.py``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import tokenizer as tokenizer_lib
from pipeline import latents as latents_lib
from pipeline import dynamics as dynamics_lib
from pipeline.checkpoint import read_meta
from pipeline.config import ParamsError
from pipeline.evaluation import held_out_windows, horizon_errors, mean_frame
from pipeline.paths import ACTIONS_KEY, LATENTS_KEY
from pipeline.reader import LoaderConfig, WindowDataset
from pipeline.store import EpisodeStore, StoreConfig, write_episode_store
from pipeline.train import TrainConfig
from pipeline.world import World
from stages import dynamics as stage
from stages import tokenizer as tokenizer_stage

TINY_STORE = StoreConfig(chunk_frames=4, shard_chunks=2, clevel=1)
NO_WORKERS = LoaderConfig(num_workers=0)
SIZE, EPISODES, LENGTH, DIGIT = 16, 8, 12, 4
# gameplay-like camera moves in pixels per class: 0 none, 1 left, 2 right, 3 up, 4 down
CAMERA_STEP = 2
MOVES = {0: (0, 0), 1: (-CAMERA_STEP, 0), 2: (CAMERA_STEP, 0), 3: (0, -CAMERA_STEP), 4: (0, CAMERA_STEP)}


# -- tiny datasets -------------------------------------------------------------------------------


def last_invalid(t: int) -> np.ndarray:
    valid = np.ones(t, bool)
    valid[-1] = False
    return valid


def mnist_like(n: int = EPISODES, length: int = LENGTH, seed: int = 0) -> tuple[list[dict], list[dict], dict]:
    """Moving-MNIST-like episodes: one textured ``DIGIT`` x ``DIGIT`` square bouncing on a dark
    ``SIZE`` x ``SIZE`` canvas. Returns (frame episodes with ``positions`` (T, 1, 2) top-left x, y,
    action episodes as the actions stage writes them, the frames store's attrs)."""
    rng = np.random.default_rng(seed)
    frames_eps, actions_eps = [], []
    top = SIZE - DIGIT
    for _ in range(n):
        digit = rng.integers(120, 256, (DIGIT, DIGIT), dtype=np.uint8)
        xy = rng.integers(0, top + 1, 2)
        v = rng.choice([-2, -1, 1, 2], 2)
        pos = np.zeros((length, 2), np.int64)
        for t in range(length):
            pos[t] = xy
            nxt = xy + v
            for k in range(2):                      # bounce off the walls
                if not 0 <= nxt[k] <= top:
                    v[k] = -v[k]
                    nxt[k] = xy[k] + v[k]
            xy = nxt
        frames = np.full((length, SIZE, SIZE, 1), 10, np.uint8)
        for t, (x, y) in enumerate(pos):
            frames[t, y : y + DIGIT, x : x + DIGIT, 0] = digit
        actions = np.zeros((length, 2), np.float32)
        actions[:-1] = np.diff(pos, axis=0) / (SIZE / 2)
        frames_eps.append({"frames": frames, "positions": pos[:, None, :].astype(np.float32)})
        actions_eps.append({"actions": actions, "valid": last_invalid(length)})
    attrs = {"source": "test", "has_positions": True, "canvas": SIZE, "digit_size": DIGIT}
    return frames_eps, actions_eps, attrs


def gameplay_like(n: int = EPISODES, length: int = LENGTH, seed: int = 1) -> tuple[list[dict], list[dict], dict]:
    """Gameplay-like episodes: an RGB camera window of ``SIZE`` x ``SIZE`` over a blocky world,
    moving ``CAMERA_STEP`` pixels per frame in the direction of a random class. Returns (frame
    episodes, action episodes with ``action_class`` (-1 at the last frame), attrs)."""
    rng = np.random.default_rng(seed)
    world = np.kron(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), np.ones((2, 2, 1), np.uint8))  # 64x64
    frames_eps, actions_eps = [], []
    for _ in range(n):
        classes = rng.integers(0, 5, length - 1)
        xy = np.array([24, 24])
        pos = [xy]
        for c in classes:
            xy = xy + MOVES[int(c)]
            pos.append(xy)
        frames = np.stack([world[y : y + SIZE, x : x + SIZE] for x, y in pos])
        actions = np.zeros((length, 2), np.float32)
        actions[:-1] = np.diff(np.array(pos), axis=0) / (SIZE / 2)
        cls = np.full(length, -1, np.int8)
        cls[:-1] = classes
        frames_eps.append({"frames": frames})
        actions_eps.append({"actions": actions, "valid": last_invalid(length), "action_class": cls})
    return frames_eps, actions_eps, {"fps": 10, "width": SIZE, "height": SIZE, "has_truth": False}


TOKENIZER = {
    "quantize": {"size": 8},
    "cnn": {"latent_size": 8, "latent_channels": 4, "width": 8, "blocks": 0,
            "train": {"steps": 6, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "eval_every": 6, "ckpt_every": 6}},
    "eval": {"val_fraction": 0.25, "max_frames": 8, "probe_frames": 4, "batch_size": 16},
}


def world_inputs(root: Path, dataset: str, tokenizer_kind: str) -> dict[str, Path]:
    """Build ``root``'s frames and actions stores of ``dataset`` (``mnist`` or ``gameplay``-like),
    a ``tokenizer_kind`` tokenizer by ``stages.tokenizer.run`` and its latents by
    ``stages.latents.run``. Returns the stage's item paths (frames, actions, tokenizer, latents)."""
    root.mkdir(parents=True, exist_ok=True)
    frames_eps, actions_eps, attrs = (mnist_like if dataset == "mnist" else gameplay_like)()
    paths = {"frames": root / "frames.zarr", "actions": root / "actions.zarr",
             "tokenizer": root / f"tokenizer-{tokenizer_kind}", "latents": root / f"latents-{tokenizer_kind}.zarr"}
    if not paths["frames"].exists():
        write_episode_store(paths["frames"], frames_eps, TINY_STORE, attrs)
        write_episode_store(paths["actions"], actions_eps, TINY_STORE, {"method": "truth"})
    cfg = tokenizer_lib.Config.model_validate({"kind": tokenizer_kind, **TOKENIZER})
    tokenizer_stage.run(cfg, paths["frames"], paths["tokenizer"], root / "work-tokenizer", loader=NO_WORKERS)
    latents_lib.run(latents_lib.Config(batch_frames=32, device="cpu"), paths["frames"], paths["tokenizer"],
                      paths["latents"], TINY_STORE)
    return paths


def dynamics_config(family: str, action_input: str = "continuous", **over) -> dynamics_lib.Config:
    """Shrunk dynamics params: tiny models, a handful of steps, rollouts of 2 -> 2 frames."""
    base = {
        "family": family, "action_input": action_input, "window": 4, "stride": 2,
        "masked": {"patch": 4, "token_dim": 4, "dim": 16, "heads": 2, "depth": 1, "mlp_ratio": 2, "sample_steps": 2},
        "flow": {"patch": 4, "dim": 16, "heads": 2, "depth": 1, "mlp_ratio": 2, "k_max": 4, "sample_steps": 2,
                 "long_window": 6, "long_every": 2},
        "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "ema_decay": 0.9, "log_every": 2,
                  "eval_every": 4, "ckpt_every": 2, "device": "cpu"},
        "eval": {"context_frames": 2, "horizon": 2, "max_sequences": 4, "batch_size": 4, "sweep_sequences": 2},
    }
    for key, value in over.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return dynamics_lib.Config.model_validate(base)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """``inputs(dataset, tokenizer_kind)``: item paths, built once per module."""
    root = tmp_path_factory.mktemp("dynamics-data")
    built: dict[tuple[str, str], dict[str, Path]] = {}

    def get(dataset: str, kind: str) -> dict[str, Path]:
        if (dataset, kind) not in built:
            built[dataset, kind] = world_inputs(root / dataset, dataset, kind)
        return built[dataset, kind]

    return get


# (family, dataset, tokenizer kind, action input): the two defaults, then the swapped pairs
PAIRS = [
    ("masked", "mnist", "quantize", "continuous"),
    ("flow", "gameplay", "cnn", "discrete"),
    ("flow", "mnist", "cnn", "continuous"),
    ("masked", "gameplay", "quantize", "continuous"),
    ("masked", "gameplay", "quantize", "discrete"),
]


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    """``trained(family, dataset, kind, action_input)``: (metrics, rows, out dir, work dir, config)."""
    root = tmp_path_factory.mktemp("dynamics-runs")
    done: dict[tuple, tuple] = {}

    def get(family: str, dataset: str, kind: str, action_input: str):
        key = (family, dataset, kind, action_input)
        if key not in done:
            # MNIST's masked model as in params.yaml: the motion-copy head, the ego copy, the expected decode;
            # gameplay's without the head, sampled by MaskGIT (the code's defaults)
            # gameplay's flow model as in params.yaml: the camera warp
            own = {("masked", "mnist"): {"masked": {"motion_radius": 2, "ego_copy": True, "decode": "expected"}},
                   ("flow", "gameplay"): {"flow": {"camera_warp": True}}}
            cfg = dynamics_config(family, action_input, **own.get((family, dataset), {}))
            name = "-".join(key)
            metrics, rows = stage.run(cfg, inputs(dataset, kind), root / name, root / f"work-{name}",
                                      where=f"dynamics.{dataset}", tokenizer_key=f"tokenizer.{dataset}.kind",
                                      loader=NO_WORKERS)
            done[key] = (metrics, rows, root / name, root / f"work-{name}", cfg)
        return done[key]

    return get


CONTRACT_KEYS = ("mse", "mse_copy_last", "mse_mean_frame", "mse_shuffled_actions", "psnr", "psnr_tokenizer")


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family,dataset,kind,action_input", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_each_family_runs_on_each_dataset(family, dataset, kind, action_input, inputs, trained):
    metrics, rows, out, work, cfg = trained(family, dataset, kind, action_input)
    paths = inputs(dataset, kind)
    c, h = cfg.eval.context_frames, cfg.eval.horizon
    for key in CONTRACT_KEYS + (("speedup_4_vs_64", "psnr_drop_4_vs_64") if family == "flow" else ()):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["family"] == family and metrics["tokenizer_kind"] == kind
    assert metrics["action_input"] == action_input and metrics["train_steps"] == cfg.train.steps
    assert metrics["eval_sequences"] == 4 and metrics["context_frames"] == c and metrics["horizon"] == h
    # per-horizon rows, whose mean is the headline figure
    assert [r["horizon"] for r in rows] == list(range(1, h + 1))
    for key in ("mse", "mse_copy_last", "mse_mean_frame", "mse_shuffled_actions", "mse_tokenizer", "psnr"):
        assert np.mean([r[key] for r in rows]) == pytest.approx(metrics[key], rel=1e-9), key

    # the held-out episodes are the tokenizer's, and the baselines are measured on them
    tok = read_meta(paths["tokenizer"], "tokenizer")
    meta = read_meta(out, "dynamics")
    assert meta["val_episodes"] == tok["val_episodes"] and metrics["val_episodes"] == len(tok["val_episodes"])
    if family == "flow":  # the per-channel statistics the model was trained on travel with it
        assert len(meta["latent_norm"]["mean"]) == len(meta["latent_norm"]["std"]) == tok["latent_shape"][-1]
    else:
        assert meta["latent_norm"] is None
    frames = EpisodeStore.open(paths["frames"])
    truth, _ = held_out_windows(frames, np.array(tok["val_episodes"]), c + h, 4 * (c + h))
    truth = truth.astype(np.float32) / 255
    copy_last = horizon_errors(np.repeat(truth[:, c - 1 : c], h, axis=1), truth[:, c:])
    assert metrics["mse_copy_last"] == pytest.approx(float(copy_last["mse"].mean()), rel=1e-6)
    train_ids = np.setdiff1d(np.arange(EPISODES), tok["val_episodes"])
    mean = np.broadcast_to(mean_frame(frames, train_ids), truth[:, c:].shape)
    assert metrics["mse_mean_frame"] == pytest.approx(float(horizon_errors(mean, truth[:, c:])["mse"].mean()), rel=1e-6)

    # the saved model directory is a world model: it loads, rolls out and decodes frames
    world = World.load(out, paths["tokenizer"])
    assert world.family == family and world.action_input == action_input
    assert meta["metrics"]["mse"] == pytest.approx(metrics["mse"]) and "train_seconds" not in meta["metrics"]
    lat, act = EpisodeStore.open(paths["latents"]), EpisodeStore.open(paths["actions"])
    # continuous actions enter the model at unit scale: 1 / RMS of the training episodes' valid moves
    expected_scale = 1.0
    if action_input == "continuous":
        frame_ep = np.repeat(np.arange(act.n_episodes), act.episode_lengths())
        ok = np.isin(frame_ep, train_ids) & act.array("valid")[:].astype(bool)
        expected_scale = 1.0 / float(np.sqrt(np.mean(act.array(ACTIONS_KEY)[:][ok].astype(np.float64) ** 2)))
        assert expected_scale > 1.5  # the moves are fractions of the half frame: the scale is not a no-op
    assert meta["config"]["action_scale"] == pytest.approx(expected_scale, rel=1e-9)
    if family == "flow":
        # the camera warp's class motions: each class's mean [dx, dy] over the training episodes' valid moves
        assert meta["config"]["camera_warp"] == (dataset == "gameplay")
        if dataset == "gameplay":
            frame_ep = np.repeat(np.arange(act.n_episodes), act.episode_lengths())
            ok = np.isin(frame_ep, train_ids) & act.array("valid")[:].astype(bool)
            moves, classes = act.array(ACTIONS_KEY)[:][ok], act.array("action_class")[:][ok]
            expected = [moves[classes == k].mean(0) for k in range(5)]
            np.testing.assert_allclose(meta["config"]["class_motion"], expected, atol=1e-6)
            assert expected[1][0] < 0 < expected[2][0] and expected[3][1] < 0 < expected[4][1]
        else:
            assert meta["config"]["class_motion"] is None
    if family == "masked":
        assert meta["config"]["motion_radius"] == (2 if dataset == "mnist" else 0)
        assert meta["config"]["ego_copy"] == (dataset == "mnist")
        # both decodes are reported; mse is the one the model rolls out with
        own = "expected" if dataset == "mnist" else "maskgit"
        assert meta["sample"]["decode"] == cfg.masked.decode == own
        assert metrics[f"mse_{own}"] == metrics["mse"] and metrics[f"psnr_{own}"] == metrics["psnr"]
        other = "maskgit" if own == "expected" else "expected"
        assert math.isfinite(metrics[f"mse_{other}"]) and metrics[f"mse_{other}"] != metrics["mse"]
    ep = EpisodeStore.open(paths["latents"]).episode_slice(tok["val_episodes"][0])
    window = slice(ep.start, ep.start + c + h)
    classes = act.array("action_class")[window][None] if "action_class" in act.keys else None
    acts, valid = world.actions(act.array(ACTIONS_KEY)[window][None], classes, act.array("valid")[window][None])
    z = world.rollout(world.latents(lat.array(LATENTS_KEY)[window][None, :c]), acts, valid, h,
                      generator=torch.Generator().manual_seed(0))
    video = world.decode(z)
    channels = 1 if dataset == "mnist" else 3
    assert video.shape == (1, h, SIZE, SIZE, channels) and video.min() >= 0 and video.max() <= 1
    assert not work.exists()  # the resumable state is removed once the outputs are written


@pytest.mark.parametrize("family,dataset,kind,action_input", PAIRS[:2], ids=["-".join(p) for p in PAIRS[:2]])
def test_saved_model_reproduces_the_reported_metrics(family, dataset, kind, action_input, inputs, trained):
    """The model saved is the model evaluated (the EMA weights, the latent normalisation of flow)."""
    metrics, rows, out, _, cfg = trained(family, dataset, kind, action_input)
    paths = inputs(dataset, kind)
    world = World.load(out, paths["tokenizer"])
    lat, act, frames = (EpisodeStore.open(paths[k]) for k in ("latents", "actions", "frames"))
    val = np.array(world.meta["val_episodes"])
    seqs = dynamics_lib.held_out_sequences(cfg, lat, act, frames, val, cfg.eval.max_sequences)
    again, again_rows, _ = dynamics_lib.evaluate(world, cfg, seqs, mean_frame(frames, np.setdiff1d(np.arange(EPISODES), val)))
    for key in CONTRACT_KEYS + (("mse_expected", "mse_maskgit") if family == "masked" else ()):
        assert again[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), key
    assert len(again_rows) == len(rows)
    for a, b in zip(again_rows, rows):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)


def test_flow_step_sweep_runs_k_up_to_k_max(trained):
    """With k_max below 64 the "4 vs 64" figures compare 4 steps with the finest, k_max; the sweep
    runs K = 1, 2, 4, ..., k_max."""
    metrics, *_ , cfg = trained("flow", "gameplay", "cnn", "discrete")
    sweep = metrics["sweep"]
    assert list(sweep) == [str(2**i) for i in range(int(math.log2(cfg.flow.k_max)) + 1)] == ["1", "2", "4"]
    k4, kmax = sweep["4"], sweep[str(cfg.flow.k_max)]
    assert metrics["psnr_drop_4_vs_64"] == pytest.approx(kmax["psnr"] - k4["psnr"])
    assert metrics["speedup_4_vs_64"] == pytest.approx(kmax["seconds_per_frame"] / k4["seconds_per_frame"])
    assert all(math.isfinite(v["psnr"]) and v["seconds_per_frame"] > 0 for v in sweep.values())


def test_outputs_are_byte_reproducible_and_leave_no_checkpoint(inputs, trained, tmp_path):
    """A second run of the same params gives the same bytes (flow: EMA teacher, long windows) and,
    like the first, removes its resumable state; a completed run leaves nothing to resume."""
    _, _, first, work, cfg = trained("flow", "gameplay", "cnn", "discrete")
    stage.run(cfg, inputs("gameplay", "cnn"), tmp_path / "again", work, loader=NO_WORKERS,
              where="dynamics.gameplay", tokenizer_key="tokenizer.gameplay.kind")
    for f in ("model.pt", "dynamics.json"):
        assert (first / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
    assert not work.exists()


# -- params checks -------------------------------------------------------------------------------


@pytest.mark.parametrize("family,kind", [("flow", "quantize"), ("masked", "cnn")])
def test_a_family_the_tokenizer_does_not_feed_is_refused_before_training(family, kind, inputs, tmp_path):
    paths = inputs("mnist", kind)
    with pytest.raises(ParamsError, match=rf"dynamics\.mnist\.family is '{family}' but tokenizer\.mnist\.kind is '{kind}'"):
        stage.run(dynamics_config(family), paths, tmp_path / "out", tmp_path / "work", where="dynamics.mnist",
                  tokenizer_key="tokenizer.mnist.kind", loader=NO_WORKERS)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


@pytest.mark.parametrize("family,kind", [("flow", "quantize"), ("masked", "cnn"), ("masked", "mae")])
def test_params_for_refuses_a_mismatched_family_from_params_yaml(family, kind, tmp_path, monkeypatch):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"dynamics": {"gameplay": {"family": family}},
                                    "tokenizer": {"gameplay": {"kind": kind}}}))
    monkeypatch.setenv("PIPELINE_PARAMS", str(path))
    with pytest.raises(ParamsError) as err:
        stage.params_for("gameplay")
    assert "dynamics.gameplay.family" in str(err.value) and "tokenizer.gameplay.kind" in str(err.value)
    assert str(path) in str(err.value)


def test_params_for_accepts_the_matching_pairs(tmp_path, monkeypatch):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"dynamics": {"mnist": {"family": "flow"}, "gameplay": {"family": "masked"}},
                                    "tokenizer": {"mnist": {"kind": "cnn"}, "gameplay": {"kind": "quantize"}}}))
    monkeypatch.setenv("PIPELINE_PARAMS", str(path))
    assert stage.params_for("mnist")[1] == "cnn" and stage.params_for("mnist")[0].family == "flow"
    assert stage.params_for("gameplay")[1] == "quantize"


def test_discrete_actions_without_action_class_are_refused(inputs, tmp_path):
    with pytest.raises(ParamsError, match=r"dynamics\.mnist\.action_input is 'discrete' .*has no 'action_class'"):
        stage.run(dynamics_config("masked", "discrete"), inputs("mnist", "quantize"), tmp_path / "out",
                  tmp_path / "work", where="dynamics.mnist", loader=NO_WORKERS)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


# -- batches and controls ------------------------------------------------------------------------


def test_alternating_batches_depend_on_the_step_only(inputs):
    """Long windows come at every ``long_every``-th step, ``long_window`` frames long; a run that
    starts (resumes) at any step gets exactly the batches an uninterrupted run gets there."""
    paths = inputs("gameplay", "cnn")
    src = dynamics_lib.sources(paths["latents"], paths["actions"], True)
    short = WindowDataset(src, 4, 1, np.arange(6), NO_WORKERS)
    long = WindowDataset(src, 7, 1, np.arange(6), NO_WORKERS)
    cfg = TrainConfig(steps=12, batch_size=3, warmup_steps=1, seed=3)
    every = 3
    batches = dynamics_lib.alternating_batches(short, long, cfg, every, 2, NO_WORKERS)
    full = list(batches(0))
    assert len(full) == 12
    frames = [b[LATENTS_KEY].shape[1] for b in full]
    assert frames == [7 if (s + 1) % every == 0 else 4 for s in range(12)]
    assert sum(f == 7 for f in frames) == 12 // every                           # the ratio is 1 : long_every
    assert all(b[LATENTS_KEY].shape[0] == (2 if f == 7 else 3) for b, f in zip(full, frames))
    # not all the same window: the orders advance
    assert len({b[LATENTS_KEY].numpy().tobytes() for b, f in zip(full, frames) if f == 4}) > 1
    for start in (1, 2, 3, 5, 8, 11):
        tail = list(batches(start))
        assert len(tail) == 12 - start
        for step, (a, b) in enumerate(zip(full[start:], tail), start):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), (start, step, key)


def test_long_steps_are_counted_from_the_step():
    assert not any(dynamics_lib.is_long_step(s, 0) for s in range(10))                 # long_every 0: never
    assert [dynamics_lib.is_long_step(s, 4) for s in range(8)] == [False, False, False, True] * 2
    assert [dynamics_lib.long_steps_before(s, 4) for s in (0, 3, 4, 7, 8)] == [0, 0, 1, 1, 2]
    assert dynamics_lib.long_steps_before(9, 0) == 0


@pytest.mark.parametrize("n", [2, 3, 4, 5, 9])
def test_derangement_has_no_fixed_point(n):
    for seed in range(20):
        p = dynamics_lib.derangement(n, np.random.default_rng(seed))
        assert sorted(p.tolist()) == list(range(n)) and not np.any(p == np.arange(n)), (n, seed, p)
    assert dynamics_lib.derangement(n, np.random.default_rng(7)).tolist() == dynamics_lib.derangement(n, np.random.default_rng(7)).tolist()


def test_derangement_needs_two_sequences():
    with pytest.raises(ValueError, match="at least 2 held-out sequences"):
        dynamics_lib.derangement(1, np.random.default_rng(0))


@pytest.mark.parametrize("eval_over,message", [
    ({"context_frames": 8, "horizon": 8}, r"dynamics\.mnist\.eval: .*no held-out window of 16 frames"),
    ({"context_frames": 6, "horizon": 6, "max_sequences": 1}, r"dynamics\.mnist\.eval: 1 held-out sequence"),
])
def test_evaluation_that_cannot_run_is_refused_before_training(eval_over, message, inputs, tmp_path):
    """Guards: held-out windows longer than every held-out episode (12 frames), or fewer than the
    2 sequences the shuffled-actions control needs, failed only after the whole training run."""
    cfg = dynamics_config("masked", eval=eval_over, window=4)
    with pytest.raises(ParamsError, match=message):
        stage.run(cfg, inputs("mnist", "quantize"), tmp_path / "out", tmp_path / "work", where="dynamics.mnist",
                  loader=NO_WORKERS)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_ego_copy_without_continuous_actions_is_refused():
    """The ego copy moves tokens by [dx, dy]: a discrete action input is a params error naming both keys."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"masked\.ego_copy .* action_input is 'discrete'"):
        dynamics_config("masked", "discrete", masked={"ego_copy": True})
    assert dynamics_config("masked", "continuous", masked={"ego_copy": True}).masked.ego_copy


def test_step_sweep_times_are_the_median_of_interleaved_rounds(monkeypatch):
    """Each K is timed once per round, the rounds interleaved over K (round 1: K = 1, 2, 4; round
    2: ...), and its seconds per frame are the median of its rounds; PSNR comes from the first."""
    cfg = dynamics_config("flow", eval={"sweep_rounds": 3})
    calls = []
    timings = {1: [3.0, 1.0, 2.0], 2: [9.0, 5.0, 4.0], 4: [0.5, 0.7, 0.6]}
    target = np.full((2, 4, 2, 2, 3), 128, np.uint8)

    def fake_rollout(world, seqs, cfg, steps=None, limit=None):
        calls.append(steps)
        return np.full((limit, 2, 2, 2, 3), 0.5, np.float32), timings[steps][calls.count(steps) - 1]

    monkeypatch.setattr(dynamics_lib, "rollout_frames", fake_rollout)
    sweep = dynamics_lib.step_sweep(None, cfg, {LATENTS_KEY: np.zeros((2, 4)), dynamics_lib.FRAMES_KEY: target})
    assert calls == [1, 2, 4] * 3
    assert {k: v["seconds_per_frame"] for k, v in sweep.items()} == {"1": 2.0, "2": 5.0, "4": 0.6}
    assert all(math.isfinite(v["psnr"]) for v in sweep.values())

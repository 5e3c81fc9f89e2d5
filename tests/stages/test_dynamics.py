"""Stage ``dynamics`` end to end on tiny real stores: both families on both kinds of dataset, the
params checks, reproducibility and the batch schedule. (Its evaluation is the ``evaluate`` stage's:
``tests/stages/test_evaluate.py``.)

Inputs are made the way the pipeline makes them: a frames store, an actions store (``actions``,
``valid``, ``action_class`` as the actions stage writes them, docs/contracts.md), a tokenizer
trained by ``stages.tokenizer.run`` and latents encoded by ``stages.latents.run``. The helpers
``world_inputs`` and ``dynamics_config`` are shared with ``tests/stages/test_policy.py`` and
``tests/stages/test_evaluate.py``.
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
    """Shrunk dynamics params: tiny models, a handful of steps, 8 temporal positions."""
    base = {
        "family": family, "action_input": action_input, "window": 4, "stride": 2,
        "masked": {"patch": 4, "token_dim": 4, "dim": 16, "heads": 2, "depth": 1, "mlp_ratio": 2, "sample_steps": 2},
        "flow": {"patch": 4, "dim": 16, "heads": 2, "depth": 1, "mlp_ratio": 2, "k_max": 4, "sample_steps": 2,
                 "long_window": 6, "long_every": 2},
        "max_frames": 8,
        "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "ema_decay": 0.9, "log_every": 2,
                  "ckpt_every": 2, "device": "cpu"},
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
    """``trained(family, dataset, kind, action_input)``: (metrics, loss rows, out dir, work dir, config)."""
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


CONTRACT_KEYS = ("final_loss", "steps_per_s", "train_seconds")


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family,dataset,kind,action_input", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_each_family_runs_on_each_dataset(family, dataset, kind, action_input, inputs, trained):
    metrics, rows, out, work, cfg = trained(family, dataset, kind, action_input)
    paths = inputs(dataset, kind)
    c, h = 2, 3
    # training health only: the evaluation is the evaluate stage's
    for key in CONTRACT_KEYS:
        assert key in metrics and math.isfinite(metrics[key]), key
    assert not {"mse", "psnr", "mse_copy_last", "sweep"} & set(metrics)
    assert metrics["family"] == family and metrics["tokenizer_kind"] == kind
    assert metrics["action_input"] == action_input and metrics["train_steps"] == cfg.train.steps
    # the loss per logged step (log_every 2), the last one the final loss
    assert [r["step"] for r in rows] == [2, 4] and rows[-1]["loss"] == metrics["final_loss"]
    assert all(math.isfinite(r["loss"]) for r in rows)

    tok = read_meta(paths["tokenizer"], "tokenizer")
    meta = read_meta(out, "dynamics")
    assert meta["val_episodes"] == tok["val_episodes"] and metrics["val_episodes"] == len(tok["val_episodes"])
    assert meta["init_seed"] == cfg.train.seed and meta["config"]["max_frames"] == 8
    if family == "flow":  # the per-channel statistics the model was trained on travel with it
        assert len(meta["latent_norm"]["mean"]) == len(meta["latent_norm"]["std"]) == tok["latent_shape"][-1]
    else:
        assert meta["latent_norm"] is None
    train_ids = np.setdiff1d(np.arange(EPISODES), tok["val_episodes"])

    # the saved model directory is a world model: it loads, rolls out and decodes frames
    world = World.load(out, paths["tokenizer"])
    assert world.family == family and world.action_input == action_input
    assert meta["metrics"]["final_loss"] == metrics["final_loss"] and "train_seconds" not in meta["metrics"]
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
        own = "expected" if dataset == "mnist" else "maskgit"
        assert meta["sample"]["decode"] == cfg.masked.decode == own
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


@pytest.mark.parametrize("over,message", [
    ({"max_frames": 3}, r"max_frames \(3\) is shorter than the longest training window \(4\)"),
    ({"train": {"eval_every": 2}}, r"train\.eval_every does nothing here"),
])
def test_params_that_cannot_work_are_refused(over, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        dynamics_config("masked", **over)


def test_ego_copy_without_continuous_actions_is_refused():
    """The ego copy moves tokens by [dx, dy]: a discrete action input is a params error naming both keys."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"masked\.ego_copy .* action_input is 'discrete'"):
        dynamics_config("masked", "discrete", masked={"ego_copy": True})
    assert dynamics_config("masked", "continuous", masked={"ego_copy": True}).masked.ego_copy

"""Stage ``policy`` end to end on tiny real stores, and the imagination plumbing.

Both kinds: gameplay-like discrete classes with a cnn tokenizer and a flow world model, and
MNIST-like continuous [dx, dy] (discretised) with true digit positions, a quantize tokenizer and a
masked world model. Inputs come from the real stages (``tests/stages/test_dynamics.py``'s helpers).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.policy import ActionDiscretizer, MDLMPolicy
from pipeline.checkpoint import load_model, read_meta
from pipeline.config import ParamsError
from pipeline.ego import GameplayActionsConfig, MnistActionsConfig
from pipeline.paths import ACTION_CLASS_KEY, ACTIONS_KEY, LATENTS_KEY, VALID_KEY
from pipeline.reader import window_index
from pipeline.store import EpisodeStore
from pipeline.world import World
from stages import dynamics as dynamics_stage
from stages import policy as stage
from tests.stages.test_dynamics import NO_WORKERS, dynamics_config, world_inputs

# (dataset, tokenizer kind, dynamics family, dynamics action input, the actions stage's extractor params)
KINDS = {
    "gameplay": ("cnn", "flow", "discrete", GameplayActionsConfig(max_shift=3, tile_px=2.0)),
    "mnist": ("quantize", "masked", "continuous", MnistActionsConfig(tracker_search=4)),
}
POLICY = {
    "state_frames": 2, "horizon": 2,
    "model": {"state_patch": 4, "dim": 16, "heads": 2, "depth": 1, "mlp_ratio": 2},
    "sample": {"steps": 2},
    "mlp": {"hidden": 16, "layers": 1, "token_dim": 2,
            "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "eval_every": 4, "ckpt_every": 2}},
    "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "ema_decay": 0.9, "eval_every": 4, "ckpt_every": 2,
              "device": "cpu"},
    "eval": {"max_windows": 16, "mask_levels": [0.5], "nelbo_points": 2, "batch_size": 16},
    "imagination": {"sequences": 4, "gifs": 2, "batch_size": 4},
}
CONTRACT_KEYS = ("nll", "nll_marginal", "first_action_acc", "first_action_acc_marginal", "first_action_acc_mlp",
                 "action_fidelity", "action_fidelity_shuffled")


def policy_config(**over) -> stage.Config:
    base = dict(POLICY)
    for key, value in over.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return stage.Config.model_validate(base)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Per dataset: the item paths with a world model trained by ``stages.dynamics.run``."""
    root = tmp_path_factory.mktemp("policy-data")
    out = {}
    for ds, (kind, family, action_input, _) in KINDS.items():
        paths = world_inputs(root / ds, ds, kind)
        dynamics_stage.run(dynamics_config(family, action_input), paths, root / ds / "dynamics",
                           root / ds / "work-dynamics", loader=NO_WORKERS)
        out[ds] = {**paths, "dynamics": root / ds / "dynamics"}
    return out


@pytest.fixture(scope="module")
def runs(worlds, tmp_path_factory):
    """Per dataset: (metrics, policy dir, GIF dir, work dir) of one ``stages.policy.run``."""
    root = tmp_path_factory.mktemp("policy-runs")
    out = {}
    for ds in KINDS:
        dirs = (root / ds / "policy", root / ds / "gifs", root / ds / "work")
        metrics = stage.run(policy_config(), ds, worlds[ds], *dirs, where=f"policy.{ds}",
                            extractor_cfg=KINDS[ds][3], loader=NO_WORKERS)
        out[ds] = (metrics, *dirs)
    return out


def gif_frames(path: Path) -> list[tuple[np.ndarray, int]]:
    """(RGB frame, duration ms) of every frame stored in a GIF."""
    with Image.open(path) as im:
        assert im.format == "GIF"
        frames = []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append((np.asarray(im.convert("RGB")), int(im.info["duration"])))
    return frames


def red_border(frame: np.ndarray) -> bool:
    edge = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]])
    return bool((np.abs(edge.astype(int) - (220, 30, 30)) <= 8).all())


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ds", list(KINDS))
def test_policy_trains_measures_imagines_and_saves(ds, worlds, runs):
    metrics, out, gif_dir, work = runs[ds]
    for key in CONTRACT_KEYS:
        assert key in metrics and math.isfinite(metrics[key]), key
    for key in ("first_action_acc", "first_action_acc_marginal", "first_action_acc_mlp", "action_fidelity",
                "action_fidelity_shuffled"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["nll"] > 0 and metrics["nll_marginal"] > 0 and "masked_acc_t50" in metrics
    n_actions = 5 if ds == "gameplay" else 9          # gameplay's classes; 8 direction sectors + still
    assert metrics["n_actions"] == n_actions and metrics["train_steps"] == POLICY["train"]["steps"]
    assert metrics["imagined_sequences"] == 4
    assert sum(metrics["imagined_action_counts"]) == sum(metrics["recovered_action_counts"]) == 4 * POLICY["horizon"]
    assert metrics["action_fidelity_gap"] == pytest.approx(metrics["action_fidelity"] - metrics["action_fidelity_shuffled"])
    assert not work.exists() or not any(work.rglob("*"))   # no resumable state left behind

    # the model directory: the policy loads, its coder and the held-out split travel with it
    model, meta = load_model(out, "policy")
    assert isinstance(model, MDLMPolicy) and meta["kind"] == "mdlm"
    assert meta["val_episodes"] == read_meta(worlds[ds]["tokenizer"], "tokenizer")["val_episodes"]
    assert meta["coder"]["n_actions"] == n_actions and meta["coder"]["discrete"] == (ds == "gameplay")
    assert meta["state_frames"] == POLICY["state_frames"] and meta["horizon"] == POLICY["horizon"]
    assert meta["metrics"]["nll"] == pytest.approx(metrics["nll"]) and "train_seconds" not in meta["metrics"]
    lat = EpisodeStore.open(worlds[ds]["latents"])
    state = stage.state_layout(torch.from_numpy(lat.array(LATENTS_KEY)[0:2][None]), meta["state_kind"])
    ids = stage.sample(model, state, policy_config(), torch.Generator().manual_seed(0))
    assert ids.shape == (1, POLICY["horizon"]) and 0 <= int(ids.min()) and int(ids.max()) < n_actions


@pytest.mark.parametrize("ds", list(KINDS))
def test_gifs_show_the_real_context_then_the_imagined_frames(ds, worlds, runs):
    _, _, gif_dir, _ = runs[ds]
    c = read_meta(worlds[ds]["dynamics"], "dynamics")["context_frames"]
    gifs = sorted(gif_dir.glob("*.gif"))
    assert [g.name for g in gifs] == ["imagined_00.gif", "imagined_01.gif"]
    for g in gifs:
        frames = gif_frames(g)
        # a GIF writer merges identical consecutive frames into one longer frame: count by time
        shown = [f for f, ms in frames for _ in range(round(ms / 200))]
        assert len(shown) == c + POLICY["horizon"], g
        assert shown[0].shape == (3 * 16, 3 * 16, 3)
        assert [red_border(f) for f in shown] == [False] * c + [True] * POLICY["horizon"], g


def test_gifs_keep_the_timing_of_still_frames(tmp_path):
    """An imagined video that stands still: the GIF writer stores repeated frames once, with the
    durations added, so the GIF still plays context + horizon frames of 200 ms."""
    still = np.full((3, 8, 8, 1), 0.5, np.float32)
    clip = np.concatenate([still[:2], still])                    # 2 context frames, 3 identical imagined
    (path,) = stage.save_gifs([clip], 2, tmp_path / "gifs", 1, scale=2)
    frames = gif_frames(path)
    assert sum(ms for _, ms in frames) == 5 * 200
    shown = [f for f, ms in frames for _ in range(round(ms / 200))]
    assert [red_border(f) for f in shown] == [False, False, True, True, True]


def test_saved_coder_inverts_on_its_representatives(runs):
    _, out, _, _ = runs["mnist"]
    coder = read_meta(out, "policy")["coder"]
    disc = ActionDiscretizer.from_state_dict(coder["discretizer"])
    ids = np.arange(coder["n_actions"])
    assert disc.n_classes == coder["n_actions"] == 9
    assert np.array_equal(disc.encode(disc.decode(ids)), ids)
    assert np.array_equal(disc.encode(torch.from_numpy(disc.decode(ids))).numpy(), ids)
    # and the classes cover still plus 8 directions of the training speed
    reps = disc.representatives()
    assert np.allclose(reps[0], 0) and np.allclose(np.hypot(*reps[1:].T), np.hypot(*reps[1])), reps


def test_gameplay_coder_keeps_the_classes(runs):
    coder = read_meta(runs["gameplay"][1], "policy")["coder"]
    assert coder == {"discrete": True, "n_actions": 5, "discretizer": None}


# -- imagination plumbing -------------------------------------------------------------------------


def held_out_windows(worlds, ds: str, length: int) -> np.ndarray:
    lat = EpisodeStore.open(worlds[ds]["latents"])
    val = read_meta(worlds[ds]["tokenizer"], "tokenizer")["val_episodes"]
    return window_index(lat.episode_ends, val, length, length)


@pytest.mark.parametrize("ds", list(KINDS))
def test_extractor_reads_the_transitions_from_the_last_context_frame(ds, worlds):
    """On the true frames, the extractor imagination uses returns the store's actions of the
    transitions c-1 .. c+H-2, discretised as the policy's actions (what the chosen ids mean)."""
    paths = worlds[ds]
    frames, act = EpisodeStore.open(paths["frames"]), EpisodeStore.open(paths["actions"])
    cfg = policy_config()
    val = np.array(read_meta(paths["tokenizer"], "tokenizer")["val_episodes"])
    coder = stage.fit_coder(cfg, act, np.setdiff1d(np.arange(frames.n_episodes), val))
    c, h = 3, 4
    rows = held_out_windows(worlds, ds, c + h)
    clip = np.stack([frames.array("frames")[a:b] for a, b in rows]).astype(np.float32) / 255
    if ds == "gameplay":
        extract = stage.gameplay_extractor(KINDS[ds][3])
        want = np.stack([act.array(ACTION_CLASS_KEY)[a + c - 1 : a + c - 1 + h] for a, _ in rows])
    else:
        extract = stage.mnist_extractor(KINDS[ds][3], frames, coder, 4)
        want = coder.ids(np.stack([act.array(ACTIONS_KEY)[a + c - 1 : a + c - 1 + h] for a, _ in rows]))
    got = extract(clip[:, c - 1 :], rows, c)
    assert got.shape == (len(rows), h)
    assert np.array_equal(got, want)


def action_sensitive(world: World, seed: int = 0) -> World:
    """The world with its dynamics weights redrawn (seeded, large), so that every action shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in world.dynamics.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return world


@pytest.mark.parametrize("ds", list(KINDS))
def test_chosen_actions_drive_the_transitions_from_the_last_context_frame(ds, worlds, runs):
    """Imagination conditions the world model on the real actions of the context and on the
    chosen action j at transition c-1+j (the move out of the last context frame first): its clip
    equals a rollout built that way, and differs from one with the chosen actions a step late."""
    paths = worlds[ds]
    cfg = policy_config()
    model, meta = load_model(runs[ds][1], "policy")
    world = action_sensitive(World.load(paths["dynamics"], paths["tokenizer"]))
    lat, act, frames = (EpisodeStore.open(paths[k]) for k in ("latents", "actions", "frames"))
    val = np.array(meta["val_episodes"])
    coder = stage.fit_coder(cfg, act, np.setdiff1d(np.arange(lat.n_episodes), val))
    c, h = int(world.meta["context_frames"]), cfg.horizon
    seen = []

    def recording_extractor(clip, rows, context):
        seen.append((clip, rows, context))
        return np.zeros((len(clip), h), np.int64)

    imag, clips = stage.imagination(model, coder, cfg, world, lat, act, frames, val, recording_extractor,
                                    meta["state_kind"])
    (clip_seen, rows, context), = seen
    assert context == c and clip_seen.shape[1] == h + 1 and len(clips) == len(rows) == 4
    assert np.array_equal(clip_seen, np.stack(clips)[:, c - 1 :])      # the extractor starts at frame c-1

    # the reference, written from the convention
    gen = torch.Generator().manual_seed(cfg.eval.seed + 1)
    window = lambda key: np.stack([act.array(key)[a:b] for a, b in rows])  # noqa: E731
    latents = np.stack([lat.array(LATENTS_KEY)[a:b] for a, b in rows])
    state = stage.state_layout(torch.from_numpy(latents[:, c - cfg.state_frames : c]), meta["state_kind"])
    ids = stage.sample(model, state, cfg, gen)
    real = torch.from_numpy(window(ACTION_CLASS_KEY)).long() if coder.discrete else torch.from_numpy(window(ACTIONS_KEY))
    chosen = coder.dynamics_input(ids)
    context = world.latents(latents[:, :c])

    def rollout(first: int) -> np.ndarray:
        cond, valid = real.clone(), torch.from_numpy(window(VALID_KEY)).clone()
        cond[:, first : first + h] = chosen[:, : c + h - first]
        valid[:, first : first + h] = True
        g = torch.Generator().manual_seed(0)
        g.set_state(state_after_sampling)
        z = world.rollout(context, cond, valid, h, generator=g)
        return world.decode(torch.cat([context, z], dim=1))

    state_after_sampling = gen.get_state()
    want = rollout(c - 1)
    assert np.array_equal(np.stack(clips), want)
    assert not np.allclose(rollout(c), want, atol=1e-3)      # a step late: another video
    assert imag["imagined_action_counts"] == np.bincount(ids.reshape(-1).numpy(), minlength=coder.n_actions).tolist()


# -- params checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ds,over,message", [
    ("gameplay", {"state_frames": 3}, r"policy\.gameplay\.state_frames \(3\) exceeds the dynamics context \(2 frames\)"),
    ("mnist", {"horizon": 3}, r"policy\.mnist\.horizon \(3\) \+ the dynamics context \(2 frames\) exceed .*max_frames 4"),
])
def test_imagination_that_cannot_run_is_refused_before_training(ds, over, message, worlds, tmp_path):
    """Guards: a state longer than the world model's context, or (masked world models, which do
    not slide) a context + horizon beyond the model's frames, failed only after both models trained."""
    with pytest.raises(ParamsError, match=message):
        stage.run(policy_config(**over), ds, worlds[ds], tmp_path / "policy", tmp_path / "gifs", tmp_path / "work",
                  where=f"policy.{ds}", extractor_cfg=KINDS[ds][3], loader=NO_WORKERS)
    assert not (tmp_path / "work").exists() and not (tmp_path / "policy").exists()
    assert not (tmp_path / "gifs").exists()


@pytest.mark.parametrize("ds", list(KINDS))
def test_training_pairs_take_the_actions_from_the_current_frame_on(ds, worlds):
    """A training pair is the state (frames 0..K-1 of a window; K-1 the current frame) and the ids
    of transitions K-1 .. K+H-2: the first target is the move out of the current frame."""
    paths = worlds[ds]
    cfg = policy_config(state_frames=3, horizon=4, model={"past_actions": 2})
    act = EpisodeStore.open(paths["actions"])
    coder = stage.fit_coder(cfg, act, np.arange(act.n_episodes))
    names = [LATENTS_KEY, ACTIONS_KEY, VALID_KEY] + ([ACTION_CLASS_KEY] if coder.discrete else [])
    rows = window_index(act.episode_ends, [0, 3], cfg.window, 2)
    stores = {LATENTS_KEY: EpisodeStore.open(paths["latents"]), ACTIONS_KEY: act, VALID_KEY: act, ACTION_CLASS_KEY: act}
    batch = {k: torch.from_numpy(np.stack([stores[k].array(k)[a:b] for a, b in rows])) for k in names}
    kind = "tokens" if ds == "mnist" else "continuous"
    state, ids, past = stage.split_batch(batch, cfg, coder, kind)
    assert state.shape[:2] == (len(rows), 3) and ids.shape == (len(rows), 4) and past.shape == (len(rows), 2)
    assert torch.equal(state.float().flatten(2), batch[LATENTS_KEY][:, :3].float().flatten(2))
    for i, (a, _) in enumerate(rows):
        if coder.discrete:
            want = act.array(ACTION_CLASS_KEY)[a + 2 : a + 6]
        else:
            want = coder.ids(act.array(ACTIONS_KEY)[a + 2 : a + 6])
        assert ids[i].tolist() == np.asarray(want).tolist(), (i, a)
        # the past: the moves into the current frame (transitions 0 and 1 of the window)
        if coder.discrete:
            before = np.clip(act.array(ACTION_CLASS_KEY)[a : a + 2], 0, None)
        else:
            before = coder.ids(act.array(ACTIONS_KEY)[a : a + 2])
        assert past[i].tolist() == np.asarray(before).tolist(), (i, a)

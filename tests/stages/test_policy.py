"""Stage ``policy`` end to end on tiny real stores (training and saving), and the policy library's
evaluation on them: held-out pairs and their scores, and imagination inside real world models.

Both kinds: gameplay-like discrete classes with a cnn tokenizer and a flow world model, and
MNIST-like continuous [dx, dy] (discretised) with true digit positions, a quantize tokenizer and a
masked world model. Inputs come from the real stages (``tests/stages/test_dynamics.py``'s helpers).
The library's pure parts are tested in ``tests/pipeline/test_policy.py``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.policy import ActionDiscretizer, MDLMPolicy, MLPPolicy
from pipeline import imagination
from pipeline import policy as lib
from pipeline import train as train_lib
from pipeline.checkpoint import load_model, read_meta
from pipeline.config import ParamsError
from pipeline.ego import GameplayActionsConfig, MnistActionsConfig
from pipeline.evaluation import derangement
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
    "model": {"state_patch": 4, "dim": 16, "heads": 2, "depth": 1, "mlp_ratio": 2, "past_actions": 1},
    "sample": {"steps": 2},
    "mlp": {"hidden": 16, "layers": 1, "token_dim": 2,
            "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "ckpt_every": 2, "eval_every": 2}},
    "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "ema_decay": 0.9, "ckpt_every": 2, "device": "cpu"},
}
EVAL = lib.EvalParams(max_windows=16, mask_levels=[0.5], nelbo_points=2, batch_size=16, imagination_sequences=4,
                      imagination_batch_size=4)
HEALTH_KEYS = {"final_loss", "mlp_final_loss", "steps_per_s", "train_seconds", "mlp_train_seconds", "train_steps",
               "n_params", "n_actions", "train_episodes", "val_episodes", "mlp_best_step", "mlp_val_nll",
               "mlp_val_episodes"}
CONTEXT = 2  # the tiny world models' context (dynamics_config: 2 -> 2 frames)


def policy_config(**over) -> lib.Config:
    base = dict(POLICY)
    for key, value in over.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return lib.Config.model_validate(base)


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
    """Per dataset: (metrics, policy dir, work dir) of one ``stages.policy.run``."""
    root = tmp_path_factory.mktemp("policy-runs")
    out = {}
    for ds in KINDS:
        dirs = (root / ds / "policy", root / ds / "work")
        metrics = stage.run(policy_config(), worlds[ds], *dirs, where=f"policy.{ds}", loader=NO_WORKERS)
        out[ds] = (metrics, *dirs)
    return out


def split(worlds, ds: str) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) episode ids of the tokenizer's split."""
    lat = EpisodeStore.open(worlds[ds]["latents"])
    val = np.array(sorted(read_meta(worlds[ds]["tokenizer"], "tokenizer")["val_episodes"]))
    return np.setdiff1d(np.arange(lat.n_episodes), val), val


# -- the stage: training and saving ---------------------------------------------------------------


@pytest.mark.parametrize("ds", list(KINDS))
def test_policy_trains_and_saves_both_models(ds, worlds, runs):
    metrics, out, work = runs[ds]
    assert set(metrics) == HEALTH_KEYS                                   # training health only
    assert all(math.isfinite(metrics[k]) for k in HEALTH_KEYS)
    n_actions = 5 if ds == "gameplay" else 9          # gameplay's classes; 8 direction sectors + still
    assert metrics["n_actions"] == n_actions and metrics["train_steps"] == POLICY["train"]["steps"]
    train_ids, val_ids = split(worlds, ds)
    assert (metrics["train_episodes"], metrics["val_episodes"]) == (len(train_ids), len(val_ids))
    assert not work.exists() or not any(work.rglob("*"))   # no resumable state left behind

    # the model directory: both models load, the coder and the held-out split travel with them
    assert sorted(p.name for p in out.iterdir()) == ["mlp.pt", "model.pt", "policy.json"]
    model, meta = load_model(out, "policy")
    assert isinstance(model, MDLMPolicy) and meta["kind"] == "mdlm" and "metrics" not in meta
    assert meta["val_episodes"] == val_ids.tolist()
    assert meta["coder"]["n_actions"] == n_actions and meta["coder"]["discrete"] == (ds == "gameplay")
    assert meta["state_frames"] == POLICY["state_frames"] and meta["horizon"] == POLICY["horizon"]
    policy = lib.Policy.load(out, "cpu")
    assert isinstance(policy.mlp, MLPPolicy) and policy.mlp.cfg.horizon == POLICY["horizon"]
    assert policy.mlp.cfg.past_actions == policy.model.cfg.past_actions == 1
    lat = EpisodeStore.open(worlds[ds]["latents"])
    state = lib.state_layout(torch.from_numpy(lat.array(LATENTS_KEY)[0:2][None]), policy.state_kind)
    ids = policy.act(state, torch.Generator().manual_seed(0), past=torch.zeros(1, 1, dtype=torch.long))
    assert ids.shape == (1, POLICY["horizon"]) and 0 <= int(ids.min()) and int(ids.max()) < n_actions

    # the MLP baseline's early stopping: a validation slice of the training episodes (never the held-out
    # ones), evaluated at steps 2 and 4; the saved weights are those of the recorded best NLL there
    _, mlp_val = lib.mlp_split(train_ids, lib.MlpParams().val_fraction, 0)
    assert metrics["mlp_val_episodes"] == len(mlp_val) == 1 and not set(mlp_val) & set(val_ids)
    assert metrics["mlp_best_step"] in (2, 4)
    act = EpisodeStore.open(worlds[ds]["actions"])
    stores = {LATENTS_KEY: lat, ACTIONS_KEY: act, ACTION_CLASS_KEY: act}
    names = [LATENTS_KEY, ACTIONS_KEY] + ([ACTION_CLASS_KEY] if policy.coder.discrete else [])
    rows = window_index(lat.episode_ends, mlp_val, policy_config().window, 1)
    batch = {k: torch.from_numpy(np.stack([stores[k].array(k)[a:b] for a, b in rows])) for k in names}
    v_state, v_ids, v_past = lib.split_batch(batch, policy_config(), policy.coder, policy.state_kind)
    assert lib.mlp_nll(policy.mlp, v_state, v_ids, v_past) == pytest.approx(metrics["mlp_val_nll"], rel=1e-5)


def test_a_killed_run_resumes_to_the_same_bytes(worlds, runs, tmp_path, monkeypatch):
    """A run killed after 2 of its 4 MDLM steps resumes from its checkpoint and writes the same
    bytes as the uninterrupted run (model, MLP baseline and metadata)."""
    real = train_lib.train

    def killed(model, loss_fn, batches, cfg, ckpt_dir, **kw):
        real(model, loss_fn, batches, cfg, ckpt_dir, stop_after=2, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        stage.run(policy_config(), worlds["mnist"], tmp_path / "policy", tmp_path / "work", loader=NO_WORKERS)
    assert not (tmp_path / "policy").exists() and any((tmp_path / "work").rglob("state.pt"))
    monkeypatch.setattr(stage, "train", real)
    metrics = stage.run(policy_config(), worlds["mnist"], tmp_path / "policy", tmp_path / "work", loader=NO_WORKERS)
    assert metrics["resumed_from_step"] == 2 and metrics["train_steps"] == 4
    first = runs["mnist"][1]
    for name in ("model.pt", "mlp.pt", "policy.json"):
        assert (first / name).read_bytes() == (tmp_path / "policy" / name).read_bytes(), name
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("*"))


def test_a_run_killed_in_the_mlp_baseline_keeps_its_best_checkpoint_from_before(worlds, tmp_path, monkeypatch):
    """The MLP's early stopping across a kill: validation scores made up per step (step 2 the best,
    step 4 worse); a run killed after 3 of the MLP's 4 steps (past its checkpoint and evaluation at
    step 2) resumes, and still keeps step 2's weights: the same bytes as the uninterrupted run."""
    real = train_lib.train
    seen: dict[int, dict] = {}   # the MLP's weights at each evaluation

    class StepScored(lib.BestCheckpoint):
        def __init__(self, score, path):
            super().__init__(lambda m: {2: 1.0, 4: 2.0}[self.now], path)

        def __call__(self, model, step):
            self.now = step
            seen[step] = {k: v.clone() for k, v in model.state_dict().items()}
            return super().__call__(model, step)

    def kill_mlp(model, loss_fn, batches, cfg, ckpt_dir, **kw):
        if Path(ckpt_dir).name != "mlp":
            return real(model, loss_fn, batches, cfg, ckpt_dir, **kw)
        real(model, loss_fn, batches, cfg, ckpt_dir, stop_after=3, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "BestCheckpoint", StepScored)
    whole = stage.run(policy_config(), worlds["mnist"], tmp_path / "whole", tmp_path / "work-whole", loader=NO_WORKERS)
    assert whole["mlp_best_step"] == 2 and whole["mlp_val_nll"] == 1.0
    saved = lib.Policy.load(tmp_path / "whole", "cpu").mlp.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in seen[2].items())             # step 2's weights, not the last
    assert not all(torch.equal(saved[k], v) for k, v in seen[4].items())
    monkeypatch.setattr(stage, "train", kill_mlp)
    with pytest.raises(KeyboardInterrupt):
        stage.run(policy_config(), worlds["mnist"], tmp_path / "policy", tmp_path / "work", loader=NO_WORKERS)
    assert any((tmp_path / "work" / "mlp").rglob("best.pt")) and not (tmp_path / "policy").exists()
    monkeypatch.setattr(stage, "train", real)
    metrics = stage.run(policy_config(), worlds["mnist"], tmp_path / "policy", tmp_path / "work", loader=NO_WORKERS)
    assert metrics["mlp_best_step"] == 2 and metrics["resumed_from_step"] == 4     # the MDLM had finished
    for name in ("model.pt", "mlp.pt", "policy.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "policy" / name).read_bytes(), name
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("*"))


def test_saved_coder_inverts_on_its_representatives(runs):
    _, out, _ = runs["mnist"]
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


@pytest.mark.parametrize("ds", list(KINDS))
def test_training_pairs_take_the_actions_from_the_current_frame_on(ds, worlds):
    """A training pair is the state (frames 0..K-1 of a window; K-1 the current frame) and the ids
    of transitions K-1 .. K+H-2: the first target is the move out of the current frame."""
    paths = worlds[ds]
    cfg = policy_config(state_frames=3, horizon=4, model={"past_actions": 2})
    act = EpisodeStore.open(paths["actions"])
    coder = lib.fit_coder(cfg, act, np.arange(act.n_episodes))
    names = [LATENTS_KEY, ACTIONS_KEY, VALID_KEY] + ([ACTION_CLASS_KEY] if coder.discrete else [])
    rows = window_index(act.episode_ends, [0, 3], cfg.window, 2)
    stores = {LATENTS_KEY: EpisodeStore.open(paths["latents"]), ACTIONS_KEY: act, VALID_KEY: act, ACTION_CLASS_KEY: act}
    batch = {k: torch.from_numpy(np.stack([stores[k].array(k)[a:b] for a, b in rows])) for k in names}
    kind = "tokens" if ds == "mnist" else "continuous"
    state, ids, past = lib.split_batch(batch, cfg, coder, kind)
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


# -- the library's evaluation on the trained policy -------------------------------------------------


@pytest.mark.parametrize("ds", list(KINDS))
def test_held_out_pairs_and_items_of_a_trained_policy(ds, worlds, runs):
    """The pairs of the held-out episodes (the repeat-last action counted by hand from the store),
    and one finite score per pair and key."""
    policy = lib.Policy.load(runs[ds][1], "cpu")
    lat, act = EpisodeStore.open(worlds[ds]["latents"]), EpisodeStore.open(worlds[ds]["actions"])
    train_ids, val_ids = split(worlds, ds)
    pairs = lib.held_out_pairs(policy, lat, act, val_ids, EVAL.max_windows)
    n = len(pairs["ids"])
    assert n == EVAL.max_windows and pairs["state"].shape[:2] == (n, 2) and pairs["past"].shape == (n, 1)
    assert set(pairs["episode"]) <= set(val_ids.tolist())
    ends = lat.episode_ends
    starts = pairs["rows"][:, 0]
    assert all(ends[e] >= b and (e == 0 or ends[e - 1] <= a) for e, (a, b) in zip(pairs["episode"], pairs["rows"]))
    coder, every = policy.coder, None
    if coder.discrete:
        every = act.array(ACTION_CLASS_KEY)[:].astype(np.int64)
    else:
        every = coder.ids(act.array(ACTIONS_KEY)[:])
    assert pairs["last"].tolist() == every[starts].tolist()             # the move out of frame 0 into frame 1
    assert pairs["ids"].tolist() == np.stack([every[starts + 1], every[starts + 2]], 1).tolist()
    hand = np.mean([every[a + 1] == every[a] for a in starts])

    probs = lib.repeat_last_probs(act, train_ids, policy)
    items = lib.policy_items(policy, pairs, EVAL, lib.train_action_ids(act, train_ids, coder), probs)
    assert items["first_correct_repeat_last"].mean() == pytest.approx(hand)
    assert probs.shape == (2,) and ((0 < probs) & (probs < 1)).all()
    for key, v in items.items():
        assert v.shape == (n,), key
        assert np.isfinite(v).all(), key
    for key in ("first_correct", "first_correct_marginal", "first_correct_repeat_last", "first_correct_mlp",
                "sample_correct", "exact_match", "exact_match_mlp", "masked_acc_t50"):
        assert ((0 <= items[key]) & (items[key] <= 1)).all(), key
    # the NELBO of one pair may be an exact 0 (no position masked at its few t points): its mean is not
    assert (items["nll"] >= 0).all() and items["nll"].mean() > 0 and (items["nll_mlp"] > 0).all()


@pytest.mark.parametrize("ds", list(KINDS))
def test_extractor_reads_the_transitions_from_the_last_context_frame(ds, worlds):
    """On the true frames, the extractor imagination uses returns the store's actions of the
    transitions c-1 .. c+H-2, discretised as the policy's actions (what the chosen ids mean)."""
    paths = worlds[ds]
    frames, act = EpisodeStore.open(paths["frames"]), EpisodeStore.open(paths["actions"])
    train_ids, val_ids = split(worlds, ds)
    coder = lib.fit_coder(policy_config(), act, train_ids)
    c, h = 3, 4
    rows = window_index(frames.episode_ends, val_ids, c + h, c + h)
    clip = np.stack([frames.array("frames")[a:b] for a, b in rows]).astype(np.float32) / 255
    if ds == "gameplay":
        extract = imagination.gameplay_extractor(KINDS[ds][3])
        want = np.stack([act.array(ACTION_CLASS_KEY)[a + c - 1 : a + c - 1 + h] for a, _ in rows])
    else:
        extract = imagination.mnist_extractor(KINDS[ds][3], frames, coder, 4)
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
def test_imagination_rolls_out_the_chosen_then_the_deranged_actions(ds, worlds, runs):
    """Imagination conditions the world model on the real actions of the context and on the chosen
    action j at transition c-1+j (the move out of the last context frame first): its clips equal
    rollouts built that way, and differ from ones with the chosen actions a step late. The control
    rolls the same states out under the chosen actions of sequence perm[i]: an extractor that
    recognises each reference video recovers exactly the chosen actions from the first pass and
    the deranged ones from the second (in an action-sensitive world the two differ)."""
    paths = worlds[ds]
    policy = lib.Policy.load(runs[ds][1], "cpu")
    world = action_sensitive(World.load(paths["dynamics"], paths["tokenizer"]))
    lat, act = EpisodeStore.open(paths["latents"]), EpisodeStore.open(paths["actions"])
    _, val_ids = split(worlds, ds)
    coder, c, h, seed = policy.coder, CONTEXT, policy.horizon, 3

    # the reference, written from the convention
    rows = window_index(lat.episode_ends, val_ids, c + h, c + h)
    rows = np.unique(rows[np.linspace(0, len(rows) - 1, min(len(rows), 4)).round().astype(int)], axis=0)
    window = lambda key: np.stack([act.array(key)[a:b] for a, b in rows])  # noqa: E731
    latents = np.stack([lat.array(LATENTS_KEY)[a:b] for a, b in rows])
    state = lib.state_layout(torch.from_numpy(latents[:, c - 2 : c]), policy.state_kind)
    real = torch.from_numpy(window(ACTION_CLASS_KEY)).long() if coder.discrete else torch.from_numpy(window(ACTIONS_KEY))
    past = lib.past_ids(window(ACTIONS_KEY), window(ACTION_CLASS_KEY) if coder.discrete else None, c - 1, 1, coder)
    chosen = policy.act(state, torch.Generator().manual_seed(seed), past=past)
    perm = derangement(len(rows), np.random.default_rng(seed))
    context = world.latents(latents[:, :c])

    def rollout(ids: torch.Tensor, first: int) -> np.ndarray:
        cond, valid = real.clone(), torch.from_numpy(window(VALID_KEY)).clone()
        cond[:, first : first + h] = coder.dynamics_input(ids)[:, : c + h - first]
        valid[:, first : first + h] = True
        z = world.rollout(context, cond, valid, h, generator=torch.Generator().manual_seed(seed + 1))
        return world.decode(torch.cat([context, z], dim=1))

    want, want_deranged = rollout(chosen, c - 1), rollout(chosen[perm], c - 1)
    assert not np.allclose(want, want_deranged, atol=1e-3)            # the actions show
    assert not np.allclose(rollout(chosen, c), want, atol=1e-3)       # a step late: another video
    table = {}
    for i in range(len(rows)):
        table[(i, want[i, c - 1 :].tobytes())] = chosen[i].numpy()
        table[(i, want_deranged[i, c - 1 :].tobytes())] = chosen[perm[i]].numpy()

    def recognising_extractor(clip, part, context_frames):
        assert context_frames == c and clip.shape[1] == h + 1         # from the last context frame on
        index = [int(np.flatnonzero((rows == r).all(1))[0]) for r in part]
        return np.stack([table.get((i, x.tobytes()), np.full(h, -1)) for i, x in zip(index, clip)])

    out = imagination.imagine(policy, world, lat, act, val_ids, c, EVAL, recognising_extractor, seed)
    assert np.array_equal(out["rows"], rows) and np.array_equal(out["perm"], perm)
    assert np.array_equal(out["chosen"], chosen.numpy())
    assert np.array_equal(out["clips"], want)
    assert np.array_equal(out["recovered"], out["chosen"])
    assert np.array_equal(out["deranged"], out["chosen"][perm])
    assert np.array_equal(out["recovered_deranged"], out["deranged"])
    assert not np.array_equal(out["recovered_deranged"], out["chosen"])


@pytest.mark.parametrize("ds", list(KINDS))
def test_imagination_that_cannot_run_is_refused(ds, worlds):
    """Guards, before any work, on the real world models: a state longer than the context, and
    (masked world models, which do not slide) a context + horizon beyond the model's frames."""
    world = World.load(worlds[ds]["dynamics"], worlds[ds]["tokenizer"])
    where = f"evaluate.{ds}"
    imagination.check_imagination(policy_config(), world, CONTEXT, where)
    with pytest.raises(ParamsError, match=rf"{where}\.context_frames \(2\) is shorter than the policy's "
                                          rf"state_frames \(3\)"):
        imagination.check_imagination(policy_config(state_frames=3), world, CONTEXT, where)
    max_frames = int(world.dynamics.cfg.max_frames)
    too_long = policy_config(horizon=max_frames - CONTEXT + 1)
    if ds == "mnist":  # masked
        with pytest.raises(ParamsError, match=rf"horizon \({too_long.horizon}\) \+ {where}\.context_frames \(2\) "
                                              rf"exceed the masked world model's max_frames {max_frames}"):
            imagination.check_imagination(too_long, world, CONTEXT, where)
    else:              # flow slides past its max_frames
        imagination.check_imagination(too_long, world, CONTEXT, where)

"""``pipeline/policy.py`` on hand-made stores, tiny untrained models and a stand-in world model: the
repeat-last baseline's fit, the held-out pairs and their per-pair scores against hand counts,
imagination's plumbing (conditioning, the derangement), the imagination guards, saving and
loading a policy, and the params. Fast: no stage runs here (``tests/stages/test_policy.py`` runs
them on real tiny stores and world models)."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models.policy import (
    ActionDiscretizer,
    DiscretizerConfig,
    MDLMPolicy,
    MLPPolicy,
    MLPPolicyConfig,
    PolicyConfig,
)
from pipeline import imagination
from pipeline import policy as lib
from pipeline.checkpoint import CheckpointError, load_model
from pipeline.config import ParamsError, load_section, read_params
from pipeline.evaluation import derangement
from pipeline.paths import ACTION_CLASS_KEY, ACTIONS_KEY, DATASETS, LATENTS_KEY, VALID_KEY
from pipeline.store import EpisodeStore, StoreConfig, write_episode_store

STORE = StoreConfig(chunk_frames=4, shard_chunks=2, clevel=1)
N_ACTIONS = 5
# per class id, a [dx, dy] that a 4-direction discretiser maps back to the same id (0 still, 1 +x, 2 +y, 3 -x, 4 -y)
VEC = np.array([[0, 0], [0.1, 0], [0, 0.1], [-0.1, 0], [0, -0.1]], np.float32)
# two hand-written episodes of action classes (-1: the last frame has no move)
EPISODES = [[1, 1, 2, 2, 0, 3, -1], [4, 4, 4, 1, 1, -1]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_stores(root: Path, episodes: list[list[int]], seed: int = 0) -> tuple[EpisodeStore, EpisodeStore]:
    """(latents, actions) stores of ``episodes`` of classes: 4x4 token latents (ids < 17, seeded),
    ``actions`` the classes' [dx, dy] (``VEC``), ``valid`` false at the last frame, ``action_class``."""
    rng = np.random.default_rng(seed)
    lat_eps, act_eps = [], []
    for classes in episodes:
        cls = np.asarray(classes, np.int8)
        lat_eps.append({LATENTS_KEY: rng.integers(0, 17, (len(cls), 4, 4)).astype(np.uint8)})
        act_eps.append({ACTIONS_KEY: np.where(cls[:, None] >= 0, VEC[np.clip(cls, 0, None)], 0).astype(np.float32),
                        VALID_KEY: cls >= 0, ACTION_CLASS_KEY: cls})
    write_episode_store(root / "latents.zarr", lat_eps, STORE)
    write_episode_store(root / "actions.zarr", act_eps, STORE)
    return EpisodeStore.open(root / "latents.zarr"), EpisodeStore.open(root / "actions.zarr")


def tiny_policy(state_frames: int = 2, horizon: int = 2, past_actions: int = 1, discrete: bool = True,
                seed: int = 0) -> lib.Policy:
    """An untrained tiny Policy over 4x4 token states (MDLM and MLP), as ``Policy.load`` returns one."""
    torch.manual_seed(seed)
    shape = dict(n_actions=N_ACTIONS, horizon=horizon, state_frames=state_frames, state_kind="tokens",
                 state_shape=(4, 4), state_vocab=17, past_actions=past_actions)
    model = MDLMPolicy(PolicyConfig(**shape, state_patch=2, dim=16, heads=2, depth=1, mlp_ratio=2))
    mlp = MLPPolicy(MLPPolicyConfig(**shape, hidden=8, layers=1, token_dim=2))
    if discrete:
        coder = lib.ActionCoder(True, None)
    else:
        coder = lib.ActionCoder(False, ActionDiscretizer(DiscretizerConfig(directions=4, still_speed=0.02)).fit(VEC))
    meta = {"coder": coder.state_dict(), "state_frames": state_frames, "horizon": horizon, "state_kind": "tokens",
            "tokenizer_kind": "quantize", "val_episodes": [], "sample": lib.SampleParams(steps=2).model_dump(),
            "schedule": "linear"}
    return lib.Policy(model.eval(), mlp.eval(), coder, meta)


# -- the repeat-last baseline's fit -----------------------------------------------------------------


@pytest.mark.parametrize("discrete", [True, False])
def test_repeat_last_probs_count_the_training_windows(discrete, tmp_path):
    """p_k over the windows of state_frames + H = 4 frames (stride 1) of the training episodes: the
    last action is the move out of frame 0 (into the current frame 1), position k the move out of
    frame 1 + k; one pseudo-count each way. The same with MNIST-like [dx, dy] through a discretiser."""
    _, act = write_stores(tmp_path, EPISODES)
    policy = tiny_policy(discrete=discrete)
    # episode 0 (1 1 2 2 0 3): windows at 0..3: last 1 -> (1, 2); 1 -> (2, 2); 2 -> (2, 0); 2 -> (0, 3)
    # episode 1 (4 4 4 1 1):   windows at 0..2: last 4 -> (4, 4); 4 -> (4, 1); 4 -> (1, 1)
    # repeats at position 0: windows 0 and 2 of episode 0, 0 and 1 of episode 1; at position 1: window 0 of episode 1
    assert np.allclose(lib.repeat_last_probs(act, np.array([0, 1]), policy), [(4 + 1) / (7 + 2), (1 + 1) / (7 + 2)])
    assert np.allclose(lib.repeat_last_probs(act, np.array([1]), policy), [(2 + 1) / (3 + 2), (1 + 1) / (3 + 2)])


def test_repeat_last_needs_two_state_frames(tmp_path):
    lat, act = write_stores(tmp_path, EPISODES)
    policy = tiny_policy(state_frames=1, past_actions=0)
    with pytest.raises(ValueError, match="repeat-last baseline needs state_frames >= 2"):
        lib.repeat_last_probs(act, np.array([0]), policy)
    with pytest.raises(ValueError, match="repeat-last baseline needs state_frames >= 2"):
        lib.held_out_pairs(policy, lat, act, np.array([0]), 10)


# -- held-out pairs and their scores ------------------------------------------------------------------


def test_held_out_pairs_are_the_windows_of_the_episodes(tmp_path):
    """Every window of state_frames + H frames (stride 1): the state, the true ids from the current
    frame on, the past move(s), the last move and the episode; ``max_windows`` picks evenly."""
    lat, act = write_stores(tmp_path, EPISODES)
    policy = tiny_policy()
    pairs = lib.held_out_pairs(policy, lat, act, np.array([0, 1]), 100)
    assert pairs["ids"].tolist() == [[1, 2], [2, 2], [2, 0], [0, 3], [4, 4], [4, 1], [1, 1]]
    assert pairs["last"].tolist() == [1, 1, 2, 2, 4, 4, 4]
    assert pairs["past"].tolist() == [[1], [1], [2], [2], [4], [4], [4]]      # P = 1: the move into frame 1
    assert pairs["episode"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert pairs["rows"][:, 0].tolist() == [0, 1, 2, 3, 7, 8, 9]
    lats = lat.array(LATENTS_KEY)[:]
    assert pairs["state"].shape == (7, 2, 4, 4) and pairs["state"].dtype == torch.long
    assert all(np.array_equal(pairs["state"][i].numpy(), lats[a : a + 2]) for i, (a, _) in enumerate(pairs["rows"]))
    few = lib.held_out_pairs(policy, lat, act, np.array([1, 0]), 3)  # rows 7 8 9 0 1 2 3 in that order: 0, 3, 6
    assert few["rows"][:, 0].tolist() == [7, 0, 3] and few["episode"].tolist() == [1, 0, 0]
    assert few["ids"].tolist() == [[4, 4], [1, 2], [0, 3]]


def test_policy_items_score_each_pair_beside_the_baselines_by_hand(tmp_path):
    """The state-blind baselines against a hand computation on 7 pairs; the MDLM's and the MLP's
    items against the models' own outputs; one (N,) array per key."""
    lat, act = write_stores(tmp_path, EPISODES)
    policy = tiny_policy()
    pairs = lib.held_out_pairs(policy, lat, act, np.array([0, 1]), 100)
    params = lib.EvalParams(mask_levels=[0.5], nelbo_points=2, batch_size=3)
    train_flat = np.array([0, 0, 1, 2])                          # counts 2 1 1 0 0, + 1 each: 3 2 2 1 1 of 9
    p = [0.75, 0.5]
    items = lib.policy_items(policy, pairs, params, train_flat, np.array(p))
    keys = {"nll", "first_correct", "sample_correct", "exact_match", "masked_nll_t50", "masked_acc_t50",
            "nll_marginal", "first_correct_marginal", "exact_match_marginal", "nll_repeat_last",
            "first_correct_repeat_last", "exact_match_repeat_last", "nll_mlp", "first_correct_mlp", "exact_match_mlp",
            "episode"}
    assert set(items) == keys and all(v.shape == (7,) for v in items.values())

    m = [3 / 9, 2 / 9, 2 / 9, 1 / 9, 1 / 9]
    ids = [[1, 2], [2, 2], [2, 0], [0, 3], [4, 4], [4, 1], [1, 1]]
    last = [1, 1, 2, 2, 4, 4, 4]

    def q(k: int, a: int, b: int) -> float:              # the repeat-last distribution at position k, last b
        return p[k] if a == b else (1 - p[k]) * m[a] / (1 - m[b])

    want_marginal = [-(math.log(m[a0]) + math.log(m[a1])) / 2 for a0, a1 in ids]
    want_repeat = [-(math.log(q(0, a0, b)) + math.log(q(1, a1, b))) / 2 for (a0, a1), b in zip(ids, last)]
    assert np.allclose(items["nll_marginal"], want_marginal)
    assert np.allclose(items["nll_repeat_last"], want_repeat)
    assert items["first_correct_repeat_last"].tolist() == [1, 0, 1, 0, 1, 1, 0]
    assert items["exact_match_repeat_last"].tolist() == [0, 0, 0, 0, 1, 0, 0]
    assert items["first_correct_marginal"].tolist() == [0, 0, 0, 1, 0, 0, 0]     # the mode, 0
    assert items["episode"].tolist() == [0, 0, 0, 0, 1, 1, 1]

    # the MLP: mean NLL over the H positions, argmax at position 0
    with torch.no_grad():
        logp = policy.mlp(pairs["state"], pairs["past"]).log_softmax(-1)
    target = pairs["ids"]
    assert np.allclose(items["nll_mlp"], -logp.gather(-1, target[..., None]).squeeze(-1).mean(1).numpy(), atol=1e-6)
    assert items["first_correct_mlp"].tolist() == (logp[:, 0].argmax(-1) == target[:, 0]).double().tolist()
    assert items["exact_match_mlp"].tolist() == (logp.argmax(-1) == target).all(1).double().tolist()
    # the MDLM: argmax of the first position with every position masked
    with torch.no_grad():
        first = policy.model(torch.full_like(target, policy.model.mask_id), pairs["state"], past=pairs["past"])[:, 0]
    assert items["first_correct"].tolist() == (first.argmax(-1) == target[:, 0]).double().tolist()
    assert (items["nll"] > 0).all() and np.isfinite(items["masked_nll_t50"]).all()
    assert set(np.unique(items["masked_acc_t50"])) <= {0.0, 0.5, 1.0}
    assert np.array_equal(lib.policy_items(policy, pairs, params, train_flat, np.array(p))["nll"], items["nll"])


# -- imagination ------------------------------------------------------------------------------------


class StandInWorld:
    """A world model whose imagined frame j is the conditioning of transition c-1+j written into
    every pixel ((id + 1) / 8), and whose context frames are the stored token ids / 16; it records
    what it was given."""

    family, action_input = "flow", "discrete"
    device = torch.device("cpu")

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def latents(self, stored):
        return torch.as_tensor(np.asarray(stored)).float()[..., None] / 16

    def rollout(self, context, actions, valid, horizon, generator=None):
        self.calls.append((context.clone(), actions.clone(), valid.clone()))
        c = context.shape[1]
        moves = actions[:, c - 1 : c - 1 + horizon].float()
        return ((moves + 1) / 8)[:, :, None, None, None].expand(-1, -1, *context.shape[2:]).clone()

    def decode(self, z):
        return z.numpy().copy()


def reading_extractor(seen: list):
    """Reads the ids back from the stand-in world's imagined frames; records what it was shown."""

    def extract(clip, rows, c):
        seen.append((clip, rows, c))
        return np.round(clip[:, 1:, 0, 0, 0] * 8 - 1).astype(np.int64)

    return extract


def test_imagine_conditions_on_the_chosen_then_the_deranged_actions(tmp_path):
    """From the last context frame on the world gets the policy's choices (valid there), before it
    the context's real moves; the extractor sees the clip from the last context frame; the control
    rolls the same contexts out under the choices of sequence perm[i], perm the seeded derangement."""
    rng = np.random.default_rng(3)
    episodes = [list(rng.integers(0, 5, 11)) + [-1] for _ in range(3)]          # 12 frames: 2 windows of 5 each
    lat, act = write_stores(tmp_path, episodes)
    policy = tiny_policy()
    world, seen = StandInWorld(), []
    c, h = 3, 2
    params = lib.EvalParams(imagination_sequences=6, imagination_batch_size=4)
    out = imagination.imagine(policy, world, lat, act, np.array([0, 1, 2]), c, params, reading_extractor(seen), seed=5)
    n = 6
    assert out["rows"][:, 0].tolist() == [0, 5, 12, 17, 24, 29] and out["episode"].tolist() == [0, 0, 1, 1, 2, 2]
    perm = derangement(n, np.random.default_rng(5))
    assert out["perm"].tolist() == perm.tolist() and not (perm == np.arange(n)).any()
    assert np.array_equal(out["deranged"], out["chosen"][perm])
    assert np.array_equal(out["recovered"], out["chosen"])
    assert np.array_equal(out["recovered_deranged"], out["deranged"])
    assert not np.array_equal(out["chosen"], out["deranged"])                     # the control is another video

    # the choices: the policy's own samples from the last state_frames context latents and the past move
    lats, classes = lat.array(LATENTS_KEY)[:], act.array(ACTION_CLASS_KEY)[:].astype(np.int64)
    starts = out["rows"][:, 0]
    state = torch.from_numpy(np.stack([lats[a + c - 2 : a + c] for a in starts])).long()
    past = torch.from_numpy(np.stack([classes[a + c - 2 : a + c - 1] for a in starts]))
    g = torch.Generator().manual_seed(5)                       # one generator over the batches of 4 and 2
    want = torch.cat([policy.act(state[:4], g, past=past[:4]), policy.act(state[4:], g, past=past[4:])])
    assert np.array_equal(out["chosen"], want.numpy())

    # what the world was given: batches of 4 and 2, the chosen pass, then the deranged pass
    assert [len(x[0]) for x in world.calls] == [4, 2, 4, 2]
    for pass_ids, calls in ((out["chosen"], world.calls[:2]), (out["deranged"], world.calls[2:])):
        context = torch.cat([x[0] for x in calls])
        cond = torch.cat([x[1] for x in calls])
        valid = torch.cat([x[2] for x in calls])
        assert torch.equal(context[..., 0] * 16, torch.from_numpy(np.stack([lats[a : a + c] for a in starts])).float())
        assert cond[:, : c - 1].tolist() == [classes[a : a + c - 1].tolist() for a in starts]
        assert cond[:, c - 1 : c - 1 + h].tolist() == pass_ids.tolist()
        assert valid[:, c - 1 :].all()
    # the extractor's view starts at the last context frame
    clip0, rows0, c0 = seen[0]
    assert c0 == c and clip0.shape[1] == h + 1 and np.array_equal(rows0, out["rows"][:4])
    assert np.allclose(clip0[:, 0, ..., 0] * 16, np.stack([lats[a + c - 1] for a in starts[:4]]))
    # the clips: the real context decoded, then the frames imagined under the chosen actions
    assert out["clips"].shape == (n, c + h, 4, 4, 1)
    assert np.allclose(out["clips"][:, :c, ..., 0] * 16, np.stack([lats[a : a + c] for a in starts]))
    assert np.allclose(out["clips"][:, c:, 0, 0, 0], (out["chosen"] + 1) / 8)


def test_imagine_needs_two_windows_and_the_state_in_the_context(tmp_path):
    lat, act = write_stores(tmp_path, EPISODES)
    params = lib.EvalParams(imagination_sequences=4)
    with pytest.raises(ValueError, match="fewer than 2 held-out windows of 5 frames"):
        imagination.imagine(tiny_policy(), StandInWorld(), lat, act, np.array([0]), 3, params, reading_extractor([]), 0)
    with pytest.raises(ValueError, match=r"context_frames \(1\) is shorter than the policy's state_frames \(2\)"):
        imagination.imagine(tiny_policy(), StandInWorld(), lat, act, np.array([0, 1]), 1, params, reading_extractor([]), 0)


def stand_in(family: str, action_input: str, max_frames: int) -> SimpleNamespace:
    return SimpleNamespace(family=family, action_input=action_input,
                           dynamics=SimpleNamespace(cfg=SimpleNamespace(max_frames=max_frames)))


@pytest.mark.parametrize("spec,world,context,message", [
    (dict(state_frames=3), stand_in("flow", "discrete", 4), 2,
     r"evaluate\.x\.context_frames \(2\) is shorter than the policy's state_frames \(3\)"),
    (dict(horizon=3), stand_in("masked", "discrete", 4), 2,
     r"horizon \(3\) \+ evaluate\.x\.context_frames \(2\) exceed the masked world model's max_frames 4"),
    (dict(discrete=False), stand_in("flow", "discrete", 4), 2, r"policy's actions are \[dx, dy\] but the world model "
     r"is conditioned on discrete actions"),
])
def test_imagination_that_cannot_run_is_refused(spec, world, context, message):
    policy = tiny_policy(**{"past_actions": 0, **spec})
    with pytest.raises(ParamsError, match=message):
        imagination.check_imagination(policy, world, context, "evaluate.x")


def test_imagination_guard_lets_what_runs_pass():
    imagination.check_imagination(tiny_policy(horizon=8), stand_in("flow", "discrete", 4), 2, "evaluate.x")  # flow slides
    imagination.check_imagination(tiny_policy(horizon=2), stand_in("masked", "discrete", 4), 2, "evaluate.x")
    imagination.check_imagination(lib.Config(state_frames=2, horizon=2), stand_in("masked", "continuous", 4), 2, "e")


# -- the MLP baseline's early stopping -------------------------------------------------------------


def test_the_mlp_validation_slice_is_carved_from_the_training_episodes():
    """``round(n * fraction)`` whole training episodes, seeded, disjoint from the rest, whatever the
    order given; none when that rounds to 0 or nothing would be left to train on."""
    train = np.array([0, 2, 3, 5, 7, 8, 9, 11, 12, 13])
    fit, val = lib.mlp_split(train, 0.2, seed=0)
    assert len(val) == 2 and len(fit) == 8 and not set(fit) & set(val) and set(fit) | set(val) == set(train)
    assert list(fit) == sorted(fit) and list(val) == sorted(val)
    again = lib.mlp_split(train[::-1], 0.2, seed=0)
    assert np.array_equal(again[0], fit) and np.array_equal(again[1], val)
    assert any(not np.array_equal(lib.mlp_split(train, 0.2, seed)[1], val) for seed in (1, 2, 3))
    for ids, fraction in ((train, 0.0), (train, 0.04), (np.array([4]), 0.5)):
        fit, val = lib.mlp_split(ids, fraction, 0)
        assert len(val) == 0 and np.array_equal(fit, np.sort(ids))
    assert [len(x) for x in lib.mlp_split(np.array([1, 2]), 0.9, 0)] == [1, 1]     # at most n - 1


def test_best_checkpoint_keeps_the_weights_of_the_lowest_validation_score(tmp_path):
    """Early stopping: the weights of the evaluation with the lowest score (the first of equal ones),
    a copy that later training does not change; rebuilt from its file (a resumed run) it remembers
    that best, and only a lower score replaces it."""
    model = torch.nn.Linear(2, 1)
    scores = iter([3.0, 1.0, 1.0, 2.0])
    path = tmp_path / "run" / "best.pt"
    best = lib.BestCheckpoint(lambda m: next(scores), path)
    assert best.best_step is None and best.state is None
    for step in (10, 20, 30, 40):
        with torch.no_grad():
            model.weight.fill_(step)                                   # "training" between evaluations
        row = best(model, step)
    assert row == {"val_nll": 2.0, "best_step": 20}
    assert (best.best_step, best.best_score) == (20, 1.0) and torch.all(best.state["weight"] == 20)
    resumed = lib.BestCheckpoint(lambda m: 1.0, path)
    assert (resumed.best_step, resumed.best_score) == (20, 1.0) and torch.all(resumed.state["weight"] == 20)
    resumed(model, 50)
    assert resumed.best_step == 20
    lower = lib.BestCheckpoint(lambda m: 0.5, path)
    lower(model, 50)
    assert lower.best_step == 50 and torch.all(lower.state["weight"] == 40)
    assert lib.BestCheckpoint(lambda m: 9.0, path).best_step == 50


def test_mlp_nll_is_the_held_out_score_of_the_mlp():
    """``mlp_nll`` (the early-stopping score) is the mean of ``policy_items``' ``nll_mlp``, in eval
    mode whatever the model's mode, which it leaves as it was."""
    policy = tiny_policy(past_actions=1)
    g = torch.Generator().manual_seed(0)
    state = torch.randint(0, 17, (7, 2, 4, 4), generator=g)
    ids = torch.randint(0, N_ACTIONS, (7, 2), generator=g)
    past = torch.randint(0, N_ACTIONS, (7, 1), generator=g)
    with torch.no_grad():
        logp = policy.mlp(state, past).log_softmax(-1)
    want = float(-logp.gather(-1, ids[..., None]).mean())
    policy.mlp.train()
    assert lib.mlp_nll(policy.mlp, state, ids, past, batch_size=3) == pytest.approx(want, rel=1e-6)
    assert policy.mlp.training


# -- saving and loading ---------------------------------------------------------------------------


def test_a_saved_policy_loads_back_with_its_baseline(tmp_path):
    """One directory: model.pt, mlp.pt, policy.json; ``Policy.load`` gives both models' weights and
    the coder; ``load_model`` reads the MDLM alone; the bytes are reproducible; without its MLP
    baseline a directory is refused."""
    policy = tiny_policy(discrete=False)
    lib.save_policy(policy.model, policy.mlp, policy.meta, tmp_path / "a")
    lib.save_policy(policy.model, policy.mlp, policy.meta, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["mlp.pt", "model.pt", "policy.json"]
    for name in ("mlp.pt", "model.pt", "policy.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    back = lib.Policy.load(tmp_path / "a", "cpu")
    for mine, theirs in ((policy.model, back.model), (policy.mlp, back.mlp)):
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
    assert back.meta["mlp"]["horizon"] == 2 and not back.mlp.training and not back.model.training
    assert (back.state_frames, back.horizon, back.state_kind, back.n_actions) == (2, 2, "tokens", N_ACTIONS)
    assert np.array_equal(back.coder.discretizer.representatives(), policy.coder.discretizer.representatives())
    model, meta = load_model(tmp_path / "a", "policy")
    assert isinstance(model, MDLMPolicy) and meta["coder"]["discrete"] is False
    (tmp_path / "a" / "mlp.pt").unlink()
    with pytest.raises(CheckpointError, match="mlp.pt: no such checkpoint file"):
        lib.Policy.load(tmp_path / "a", "cpu")


# -- params ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ds", DATASETS)
def test_the_shipped_params_load(ds):
    """params.yaml's ``policy.<ds>`` is a training Config; ``evaluate.<ds>.policy`` an EvalParams."""
    cfg = load_section("policy", lib.Config, item=ds)
    assert cfg.window == cfg.state_frames + cfg.horizon and cfg.state_frames >= 2   # repeat-last needs 2
    lib.EvalParams.model_validate(read_params()["evaluate"][ds]["policy"])


def test_params_are_checked():
    with pytest.raises(ValueError, match="mask_levels must lie in"):
        lib.EvalParams(mask_levels=[0.5, 1.0])
    with pytest.raises(ValueError, match=r"past_actions \(2\) must be at most state_frames - 1 \(1\)"):
        lib.Config(state_frames=2, model={"past_actions": 2})
    with pytest.raises(ValueError, match="eval"):
        lib.Config.model_validate({"eval": {"max_windows": 4}})                 # evaluation params moved out

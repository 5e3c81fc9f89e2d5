"""MDLM policy: the masked-diffusion forward process, the NELBO, both samplers, the fix guide's
sanity checks (overfit one trajectory, MASK embedding, positions, states), the action discretiser
and the baselines. Tiny shapes throughout (a few seconds on CPU)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.policy import (
    ActionDiscretizer,
    DiscretizerConfig,
    MDLMPolicy,
    MLPPolicy,
    MLPPolicyConfig,
    PolicyConfig,
    alpha,
    alpha_prime,
    ancestral_step,
    curriculum_t_max,
    marginal_frequencies,
    marginal_metrics,
    mask_actions,
    mask_ratio,
    maskgit_n_keep,
    mdlm_loss,
    mlp_policy_loss,
    nelbo,
    nelbo_weight,
    sample_ancestral,
    sample_maskgit,
    sample_t,
    select_masked,
    sequence_metrics,
    training_loss,
)

H = 8
N_ACTIONS = 5
TINY = dict(n_actions=N_ACTIONS, horizon=H, state_frames=2, state_kind="tokens", state_shape=(8, 8),
            state_vocab=17, state_patch=4, dim=32, heads=2, depth=2, mlp_ratio=2)
TRAJ = torch.tensor([0, 1, 2, 3, 4, 3, 2, 1])     # every action, every position distinct from a neighbour


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops run fastest on one thread (and far faster than two on a shared, loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**kw) -> MDLMPolicy:
    torch.manual_seed(kw.pop("seed", 0))
    return MDLMPolicy(PolicyConfig(**{**TINY, **kw}))


def states(b: int, seed: int = 0, frames: int = 2, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 17, (b, frames, size, size), generator=g)


def train(model: MDLMPolicy, actions: torch.Tensor, state: torch.Tensor, steps: int, lr: float = 3e-3,
          weighting: str = "uniform", seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss, _ = training_loss(model, actions, state, weighting=weighting, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()


def masked_accuracy(model: MDLMPolicy, actions: torch.Tensor, state: torch.Tensor, seed: int = 1) -> float:
    """Argmax accuracy on masked positions over fresh random masks at t ~ U(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        t = sample_t(actions.shape[0], (0.0, 1.0), generator=g)
        z, masked = mask_actions(actions, t, model.mask_id, ensure_masked=True, generator=g)
        pred = model(z, state, mask_ratio(z, model.mask_id)).argmax(-1)
    return float((pred == actions)[masked].float().mean())


# -- config and shapes ---------------------------------------------------------------------------


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown conditioning 'concat'"):
        PolicyConfig(conditioning="concat")
    with pytest.raises(ValueError, match="unknown state_kind 'pixels'"):
        PolicyConfig(state_kind="pixels")
    with pytest.raises(ValueError, match="state_patch 5 must divide the state grid 32x32"):
        PolicyConfig(state_patch=5)
    with pytest.raises(ValueError, match=r"state_shape \(32, 32\) must have 3 dims"):
        PolicyConfig(state_kind="continuous", state_shape=(32, 32))
    cfg = PolicyConfig(**TINY)
    assert PolicyConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"unknown PolicyConfig keys \['width'\]"):
        PolicyConfig.from_dict({"width": 3})


@pytest.mark.parametrize("conditioning", ["cross_attention", "add"])
@pytest.mark.parametrize("kind", ["tokens", "continuous"])
def test_forward_shapes(conditioning, kind):
    if kind == "tokens":
        model, state = tiny(conditioning=conditioning), states(3)
    else:
        model = tiny(conditioning=conditioning, state_kind="continuous", state_shape=(4, 4, 8), state_patch=2)
        state = torch.rand(3, 2, 4, 4, 8) * 2 - 1
    ids = torch.randint(0, N_ACTIONS + 1, (3, H))
    logits = model(ids, state, mask_ratio(ids, model.mask_id))
    assert logits.shape == (3, H, N_ACTIONS)
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match=r"state of shape \(3, 3, 8, 8\) does not match \(B, 2, 8, 8\)"):
        tiny()(ids, states(3, frames=3))
    with pytest.raises(ValueError, match="state ids span"):
        tiny()(ids, states(3) + 17)


# -- MASK token ----------------------------------------------------------------------------------


def test_mask_is_its_own_input_id_and_never_an_output():
    """Guards the missing-MASK bug of the fix guide (MASK aliased to an action or absent): MASK is
    id n_actions, its embedding differs from every action's, it changes the output, and the head
    has n_actions classes only."""
    model = tiny()
    assert model.mask_id == N_ACTIONS
    emb = model.action_emb.weight
    assert emb.shape == (N_ACTIONS + 1, 32)
    assert model.head.out_features == N_ACTIONS
    for a in range(N_ACTIONS):
        assert (emb[N_ACTIONS] - emb[a]).abs().max() > 1e-3
    state, t = states(1), torch.full((1,), 1 / H)
    with_mask = TRAJ[None].clone()
    with_mask[0, 3] = model.mask_id
    out_mask = model(with_mask, state, t)[0, 3]
    for a in range(N_ACTIONS):
        with_a = TRAJ[None].clone()
        with_a[0, 3] = a
        assert (model(with_a, state, t)[0, 3] - out_mask).abs().max() > 1e-4, a


def test_mask_actions_uses_the_mask_id_not_noise():
    """Guards the fix guide's core bug: masked positions must hold the discrete MASK id (the input
    stays integer ids), never Gaussian noise; unmasked positions keep their ids."""
    g = torch.Generator().manual_seed(0)
    actions = torch.randint(0, N_ACTIONS, (64, H), generator=g)
    z, masked = mask_actions(actions, torch.full((64,), 0.5), N_ACTIONS, generator=g)
    assert z.dtype == torch.long and masked.dtype == torch.bool
    assert (z[masked] == N_ACTIONS).all()
    assert torch.equal(z[~masked], actions[~masked])
    assert 0 < masked.sum() < masked.numel()


@pytest.mark.parametrize("schedule,t,expected", [("linear", 0.2, 0.2), ("linear", 0.9, 0.9),
                                                  ("cosine", 0.5, math.sin(math.pi / 4)), ("cosine", 0.2, math.sin(0.1 * math.pi))])
def test_masking_rate_is_one_minus_alpha(schedule, t, expected):
    """Guards a signal/noise convention mix-up (masking with probability alpha_t instead of 1 - alpha_t)."""
    g = torch.Generator().manual_seed(0)
    actions = torch.zeros(4000, H, dtype=torch.long)
    _, masked = mask_actions(actions, torch.full((4000,), t), N_ACTIONS, schedule, generator=g)
    assert abs(float(masked.float().mean()) - expected) < 0.01


# -- schedule and NELBO weight -------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_nelbo_weight_matches_numerical_derivative(schedule):
    """The weight is MDLM's -alpha'_t / (1 - alpha_t), checked against a central difference of
    alpha_t (guards an inverted or sign-flipped weight, e.g. t instead of 1/t)."""
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    h = 1e-6
    numeric = -(alpha(t + h, schedule) - alpha(t - h, schedule)) / (2 * h)
    assert torch.allclose(alpha_prime(t, schedule), -numeric, rtol=1e-6, atol=1e-8)
    assert torch.allclose(nelbo_weight(t, schedule), numeric / (1 - alpha(t, schedule)), rtol=1e-6)
    ends = alpha(torch.tensor([0.0, 1.0], dtype=torch.float64), schedule)
    assert torch.allclose(ends, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12)
    assert (alpha(t[1:], schedule) < alpha(t[:-1], schedule)).all()
    if schedule == "linear":
        assert torch.allclose(nelbo_weight(t, schedule), 1 / t)


def test_loss_values_follow_the_formulas():
    """nelbo: mean over rows of w(t) * sum of masked CE / H; uniform: mean CE over masked tokens."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, H, N_ACTIONS, generator=g)
    targets = torch.randint(0, N_ACTIONS, (4, H), generator=g)
    masked = torch.rand(4, H, generator=g) < 0.5
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    ce = -logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    for schedule in ("linear", "cosine"):
        want = (nelbo_weight(t, schedule) * (ce * masked).sum(1) / H).mean()
        loss, parts = mdlm_loss(logits, targets, masked, t, schedule, "nelbo")
        assert torch.allclose(loss, want) and torch.allclose(parts["nelbo"], want)
    loss, parts = mdlm_loss(logits, targets, masked, t, "linear", "uniform")
    assert torch.allclose(loss, ce[masked].mean())
    acc = (logits.argmax(-1) == targets)[masked].float().mean()
    assert torch.allclose(parts["masked_accuracy"], acc)


@pytest.mark.parametrize("weighting", ["nelbo", "uniform"])
def test_loss_ignores_unmasked_positions(weighting):
    """Guards a loss over all positions: changing the logits of unmasked positions changes nothing
    (value and gradient), changing a masked position's logits does."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, H, N_ACTIONS, generator=g)
    targets = torch.randint(0, N_ACTIONS, (6, H), generator=g)
    masked = torch.rand(6, H, generator=g) < 0.5
    masked[:, 0] = True
    masked[:, 1] = False
    t = torch.rand(6, generator=g) * 0.9 + 0.05
    base, _ = mdlm_loss(logits, targets, masked, t, "linear", weighting)
    changed = torch.where(masked[..., None], logits, 100 * torch.randn(logits.shape, generator=g))
    same, _ = mdlm_loss(changed, targets, masked, t, "linear", weighting)
    assert torch.equal(base, same)
    x = logits.clone().requires_grad_(True)
    mdlm_loss(x, targets, masked, t, "linear", weighting)[0].backward()
    assert (x.grad[~masked] == 0).all() and (x.grad[masked].abs().sum(-1) > 0).all()
    moved = logits.clone()
    moved[:, 0] += 5 * F.one_hot(targets[:, 0], N_ACTIONS)
    assert not torch.allclose(mdlm_loss(moved, targets, masked, t, "linear", weighting)[0], base)


def test_empty_masks_give_no_nan_and_ensure_masked_masks_one():
    model = tiny()
    state, actions = states(4), TRAJ.repeat(4, 1)
    for weighting in ("nelbo", "uniform"):
        loss, parts = training_loss(model, actions, state, weighting=weighting, t_range=(0.0, 0.0),
                                    ensure_masked=False)
        assert float(loss.detach()) == 0.0 and float(parts["mask_fraction"]) == 0.0
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    g = torch.Generator().manual_seed(0)
    _, masked = mask_actions(actions.repeat(50, 1), torch.full((200,), 1e-4), N_ACTIONS, ensure_masked=True, generator=g)
    assert (masked.sum(1) == 1).all()
    loss, parts = training_loss(model, actions, state, weighting="uniform", t_range=(0.0, 0.0))
    assert float(parts["mask_fraction"]) == 1 / H and float(loss.detach()) > 0


def test_t_sampling_and_curriculum():
    g = torch.Generator().manual_seed(0)
    t = sample_t(64, (1e-3, 1.0), stratified=True, generator=g)
    # stratified: exactly one point per 1/64 stratum of [0, 1) before scaling
    strata = torch.floor((t - 1e-3) / (1 - 1e-3) * 64).long().sort().values
    assert torch.equal(strata, torch.arange(64))
    assert curriculum_t_max(0, 100, 0.25) == 0.25
    assert curriculum_t_max(50, 100, 0.25) == pytest.approx(0.625)
    assert curriculum_t_max(100, 100, 0.25) == 1.0 and curriculum_t_max(5, 0) == 1.0
    hi = curriculum_t_max(10, 100, 0.2)
    model = tiny()
    _, parts = training_loss(model, TRAJ.repeat(32, 1), states(32), t_range=(1e-3, hi), generator=g)
    assert float(parts["t_mean"]) <= hi
    with pytest.raises(ValueError, match=r"t_range \(0.5, 0.2\)"):
        sample_t(4, (0.5, 0.2))


# -- the fix guide's sanity checks ---------------------------------------------------------------


@pytest.mark.parametrize("conditioning", ["cross_attention", "add"])
def test_overfits_one_trajectory(conditioning):
    """Fix guide check 1: one state, one action sequence (H=8): masked accuracy > 0.95 over fresh
    random masks within the step budget; both samplers then return the trajectory greedily, and
    the NELBO falls far below the uniform log(n)."""
    model = tiny(conditioning=conditioning)
    state, actions = states(1).repeat(16, 1, 1, 1), TRAJ.repeat(16, 1)
    assert masked_accuracy(model, actions, state) < 0.6
    train(model, actions, state, steps=40)
    assert masked_accuracy(model, actions.repeat(16, 1), state.repeat(16, 1, 1, 1)) > 0.95
    for sample in (sample_maskgit(model, state[:4], H, temperature=0.0),
                   sample_ancestral(model, state[:4], 4, temperature=0.0)):
        assert torch.equal(sample, actions[:4])
    assert float(nelbo(model, actions, state, n_t=8).mean()) < 0.2 * math.log(N_ACTIONS)


def test_positions_give_different_outputs():
    """Fix guide check 3: with an all-MASK input the logits differ between positions (learned
    position embeddings), before any training."""
    model = tiny()
    ids = torch.full((1, H), model.mask_id)
    logits = model(ids, states(1), torch.ones(1))[0]
    for i in range(H):
        for j in range(i + 1, H):
            assert (logits[i] - logits[j]).abs().max() > 1e-4, (i, j)


@pytest.mark.parametrize("conditioning", ["cross_attention", "add"])
def test_states_give_different_outputs(conditioning):
    """Fix guide check 4: two states whose action sequences differ: after brief training the
    all-MASK predictions differ between the states and follow each state's sequence (fails if the
    state does not reach the action tokens)."""
    model = tiny(conditioning=conditioning)
    s = states(2, seed=3)
    seqs = torch.stack([TRAJ, TRAJ.flip(0)])
    state, actions = s.repeat(8, 1, 1, 1), seqs.repeat(8, 1)
    train(model, actions, state, steps=60, lr=5e-3)
    with torch.no_grad():
        logits = model(torch.full((2, H), model.mask_id), s, torch.ones(2))
    assert (logits[0] - logits[1]).abs().mean() > 0.5
    assert torch.equal(logits.argmax(-1), seqs)


@pytest.mark.parametrize("conditioning", ["cross_attention", "add"])
def test_where_a_state_patch_is_matters(conditioning):
    """Two states holding the same patches in different places (a blob top-left or bottom-right)
    map to different sequences after brief training. Guards state position embeddings too small
    for the state encoder's LayerNorm (init std 0.02: both states looked alike, accuracy 0.5)."""
    model = tiny(conditioning=conditioning)
    s = torch.zeros(2, 2, 8, 8, dtype=torch.long)
    s[0, 1, :4, :4] = 15
    s[1, 1, 4:, 4:] = 15
    seqs = torch.stack([TRAJ, TRAJ.flip(0)])
    train(model, seqs.repeat(8, 1), s.repeat(8, 1, 1, 1), steps=60, lr=5e-3)
    with torch.no_grad():
        logits = model(torch.full((2, H), model.mask_id), s, torch.ones(2))
    assert torch.equal(logits.argmax(-1), seqs)


# -- sampling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["maskgit", "ancestral"])
def test_mask_is_never_sampled(sampler):
    """Many draws at a high temperature: every id is an action (0..n-1), never MASK."""
    model = tiny()
    g = torch.Generator().manual_seed(0)
    state = states(256)
    if sampler == "maskgit":
        out = sample_maskgit(model, state, 3, temperature=10.0, generator=g)
    else:
        out = sample_ancestral(model, state, 3, temperature=10.0, generator=g)
    assert out.min() >= 0 and out.max() < N_ACTIONS
    assert len(out.unique()) == N_ACTIONS      # the draws do spread over all actions


@pytest.mark.parametrize("sampler", ["maskgit", "ancestral"])
@pytest.mark.parametrize("steps", [1, 3, H])
def test_samplers_complete_and_keep_fixed_tokens(sampler, steps):
    model = tiny()
    g = torch.Generator().manual_seed(0)
    state = states(64)
    fixed = torch.full((64, H), model.mask_id)
    given = torch.rand(64, H, generator=g) < 0.4
    values = torch.randint(0, N_ACTIONS, (64, H), generator=g)
    fixed[given] = values[given]
    fixed[0] = values[0]                     # a row fully given
    for f in (None, fixed):
        if sampler == "maskgit":
            out = sample_maskgit(model, state, steps, fixed=f, temperature=1.0, top_k=3, generator=g)
        else:
            out = sample_ancestral(model, state, steps, schedule="cosine", fixed=f, temperature=1.0, top_k=3,
                                   generator=g)
        assert out.shape == (64, H) and out.min() >= 0 and out.max() < N_ACTIONS
        if f is not None:
            assert torch.equal(out[given], values[given]) and torch.equal(out[0], values[0])
    with pytest.raises(ValueError, match="steps 0 must be >= 1"):
        sample_maskgit(model, state, 0)


def test_select_masked_keeps_the_least_confident():
    conf = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.05]])
    masked = torch.tensor([[True, True, True, True, False, True, True, False]])
    still = select_masked(conf, masked, torch.tensor([2]))
    # masked confidences: 0.9, 0.1, 0.5, 0.3, 0.2, 0.7 -> keep 0.1 and 0.2 masked
    assert still.tolist() == [[False, True, False, False, False, True, False, False]]
    assert not (still & ~masked).any()      # an unmasked position is never re-masked (0.05 stays revealed)
    assert not select_masked(conf, masked, torch.tensor([0])).any()


def test_maskgit_reveals_on_a_cosine_schedule():
    """The number still masked after step k of K is floor(n0 cos(pi/2 k/K)) (not a linear ramp),
    at least one fewer each step, none after the last."""
    n0 = torch.tensor([8])
    counts, count = [], n0
    for k in range(1, 5):
        count = maskgit_n_keep(n0, count, k, 4)
        counts.append(int(count))
    assert counts == [7, 5, 3, 0]
    counts, count = [], n0
    for k in range(1, 9):
        count = maskgit_n_keep(n0, count, k, 8)
        counts.append(int(count))
    assert counts == [7, 6, 5, 4, 3, 2, 1, 0]


@pytest.mark.parametrize("schedule,t,s", [("linear", 0.8, 0.5), ("cosine", 1.0, 0.6), ("linear", 1.0, 0.9)])
def test_ancestral_step_reveals_with_mdlm_probability(schedule, t, s):
    """From t to s a masked token is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t)
    (guards the complement (1 - alpha_s) / (1 - alpha_t), the probability of staying masked)."""
    model = tiny()
    g = torch.Generator().manual_seed(0)
    z = torch.full((1500, H), model.mask_id)
    z[:, 0] = 2                             # an unmasked token is carried over
    out = ancestral_step(model, z, states(1500, seed=1), t, s, schedule=schedule, generator=g)
    a = lambda v: float(alpha(torch.tensor(v, dtype=torch.float64), schedule))
    want = (a(s) - a(t)) / (1 - a(t))
    got = float((out[:, 1:] != model.mask_id).float().mean())
    assert abs(got - want) < 0.015, (got, want)
    assert (out[:, 0] == 2).all()
    assert (ancestral_step(model, z, states(1500, seed=1), t, 0.0, generator=g) != model.mask_id).all()


# -- action discretiser --------------------------------------------------------------------------


def mnist_like_actions(n: int = 2000, seed: int = 0) -> np.ndarray:
    """[dx, dy] of constant speed 0.1125 (3.6 px / 32) in uniform directions, some still frames."""
    rng = np.random.default_rng(seed)
    ang = rng.uniform(0, 2 * np.pi, n)
    speed = np.where(rng.random(n) < 0.1, 0.0, 0.1125 * rng.uniform(0.5, 1.5, n))
    return np.stack([speed * np.cos(ang), speed * np.sin(ang)], 1).astype(np.float32)


@pytest.mark.parametrize("cfg", [DiscretizerConfig(mode="bins", directions=8, speed_bins=2),
                                 DiscretizerConfig(mode="bins", directions=4, speed_bins=1),
                                 DiscretizerConfig(mode="codebook", codebook_size=12, seed=3)])
def test_discretizer_round_trips(cfg):
    train_a = mnist_like_actions()
    d = ActionDiscretizer(cfg).fit(train_a)
    n = d.n_classes
    if cfg.mode == "bins":
        assert n == 1 + cfg.directions * cfg.speed_bins
    ids = np.arange(n)
    rep = d.decode(ids)
    assert rep.shape == (n, 2) and rep.dtype == np.float32
    assert np.array_equal(d.encode(rep), ids)                      # encode(decode(i)) == i for every id
    assert np.array_equal(d.decode(d.encode(rep)), rep)            # decode . encode . decode == decode
    codes = d.encode(train_a)
    assert codes.shape == (len(train_a),) and codes.min() >= 0 and codes.max() < n
    # torch in, torch out, the same ids
    t_ids = d.encode(torch.from_numpy(train_a))
    assert isinstance(t_ids, torch.Tensor) and np.array_equal(t_ids.numpy(), codes)
    assert torch.equal(d.decode(t_ids), torch.from_numpy(d.decode(codes)))
    # decoded actions are closer to the truth than the mean action is
    err = np.linalg.norm(d.decode(codes) - train_a, axis=1).mean()
    assert err < 0.6 * np.linalg.norm(train_a - train_a.mean(0), axis=1).mean()
    # JSON round trip of the state dict: the same codes
    back = ActionDiscretizer.from_state_dict(json.loads(json.dumps(d.state_dict())))
    assert np.array_equal(back.encode(train_a), codes) and np.array_equal(back.decode(ids), rep)


def test_discretizer_bins_semantics():
    d = ActionDiscretizer(DiscretizerConfig(mode="bins", directions=4, speed_bins=1, still_speed=0.02))
    d.fit(mnist_like_actions())
    a = np.array([[0.0, 0.0], [0.01, 0.0], [0.1, 0.0], [0.0, 0.1], [-0.1, 0.01], [0.0, -0.1]])
    assert d.encode(a).tolist() == [0, 0, 1, 2, 3, 4]   # still, still, +x, +y, -x, -y
    assert np.allclose(d.decode(np.array([0])), 0.0)


def test_discretizer_codebook_is_seeded_and_checked():
    a = mnist_like_actions()
    c1 = ActionDiscretizer(DiscretizerConfig(mode="codebook", codebook_size=8, seed=1)).fit(a).codebook
    c2 = ActionDiscretizer(DiscretizerConfig(mode="codebook", codebook_size=8, seed=1)).fit(a).codebook
    assert np.array_equal(c1, c2)
    with pytest.raises(ValueError, match="codebook_size 9 must be in 1..3"):
        ActionDiscretizer(DiscretizerConfig(mode="codebook", codebook_size=9)).fit(a[:3])
    with pytest.raises(RuntimeError, match="not fitted"):
        ActionDiscretizer().encode(a)
    with pytest.raises(ValueError, match="unknown discretizer mode 'grid'"):
        ActionDiscretizer(DiscretizerConfig(mode="grid"))


# -- baselines -----------------------------------------------------------------------------------


def test_marginal_baseline():
    train_a = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 0]])          # counts 4, 3, 1, 0
    p = marginal_frequencies(train_a, 4, smoothing=0.0)
    assert torch.allclose(p, torch.tensor([0.5, 0.375, 0.125, 0.0]))
    test_a = torch.tensor([[1, 0, 0, 2], [0, 1, 1, 1]])
    m = marginal_metrics(train_a, test_a, 4, smoothing=0.0)
    want = -(3 * math.log(0.5) + 4 * math.log(0.375) + math.log(0.125)) / 8
    assert m["nll"] == pytest.approx(want, rel=1e-6)
    assert m["first_action_acc"] == 0.5                        # argmax 0; first actions 1, 0
    assert math.isfinite(marginal_metrics(train_a, torch.tensor([[3, 3, 3, 3]]), 4)["nll"])


def test_mlp_policy_predicts_each_position_from_the_state():
    """One distribution per horizon position: from the same state, position 0 is always action 1
    and position 1 always action 2 (a single distribution repeated over the horizon could not fit
    both); across states the positions follow the state. Trained with cross-entropy on all H
    positions; its config survives JSON."""
    cfg = MLPPolicyConfig(n_actions=N_ACTIONS, horizon=4, state_frames=2, state_shape=(8, 8), hidden=64)
    torch.manual_seed(0)
    model = MLPPolicy(MLPPolicyConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))))
    s = states(4, seed=5)
    actions = torch.tensor([[1, 2, 1, 1], [1, 2, 2, 2], [4, 4, 0, 0], [3, 0, 3, 1]])
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        loss, parts = mlp_policy_loss(model, actions, s)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(parts["accuracy"]) == 1.0
    seq = model.sequence_logits(s, 4)
    assert seq.shape == (4, 4, N_ACTIONS) and torch.equal(seq, model(s))
    assert torch.equal(model.predict(s, 4), actions)          # every position, every state
    m = sequence_metrics(seq, actions)
    assert m["first_action_acc"] == 1.0 and m["nll"] < 0.1
    with pytest.raises(ValueError, match="predicts horizon 4 positions, asked for 3"):
        model.sequence_logits(s, 3)
    with pytest.raises(ValueError, match=r"must be \(B, horizon=4\)"):
        mlp_policy_loss(model, actions[:, :3], s)
    cont = MLPPolicy(MLPPolicyConfig(n_actions=3, horizon=2, state_kind="continuous", state_frames=2,
                                     state_shape=(4, 4, 8)))
    assert cont(torch.zeros(2, 2, 4, 4, 8)).shape == (2, 2, 3)


def test_mlp_projects_the_state_before_the_past_actions_join_it():
    """``state_dim``: the flattened state goes through a linear map to ``state_dim`` features and a
    LayerNorm before the one-hot past actions are concatenated (0: no projection, the raw state
    straight into the hidden layers); dropout acts in training mode only."""
    shape = dict(n_actions=N_ACTIONS, horizon=2, state_frames=2, state_shape=(8, 8), token_dim=4, hidden=32,
                 past_actions=2)
    torch.manual_seed(0)
    proj = MLPPolicy(MLPPolicyConfig(**shape, state_dim=6, dropout=0.5))
    assert proj.net[0].in_features == 6 + 2 * N_ACTIONS                        # the past actions are not drowned
    assert proj.state_proj[0].in_features == 2 * 8 * 8 * 4
    raw = MLPPolicy(MLPPolicyConfig(**shape, state_dim=0))
    assert not hasattr(raw, "state_proj") and raw.net[0].in_features == 2 * 8 * 8 * 4 + 2 * N_ACTIONS
    s, past = states(3, seed=1), torch.tensor([[0, 1], [2, 3], [4, 4]])
    proj.eval()
    assert torch.equal(proj(s, past), proj(s, past))                            # no dropout in eval mode
    assert not torch.allclose(proj(s, past), proj(s, torch.tensor([[1, 1], [3, 3], [0, 0]])))
    proj.train()
    assert not torch.equal(proj(s, past), proj(s, past))                        # dropout while training
    with pytest.raises(ValueError, match="dropout"):
        MLPPolicyConfig(dropout=1.0)
    with pytest.raises(ValueError, match="state_dim"):
        MLPPolicyConfig(state_dim=-1)


def test_mlp_loss_is_the_mean_cross_entropy_over_all_positions():
    """The loss the MLP trains on is what it is scored on: the mean NLL over the H positions."""
    torch.manual_seed(0)
    model = MLPPolicy(MLPPolicyConfig(n_actions=N_ACTIONS, horizon=3, state_frames=2, state_shape=(8, 8), hidden=16))
    s = states(5, seed=2)
    actions = torch.randint(0, N_ACTIONS, (5, 3), generator=torch.Generator().manual_seed(1))
    loss, _ = mlp_policy_loss(model, actions, s)
    logp = model(s).detach().log_softmax(-1)
    want = -np.mean([float(logp[b, k, actions[b, k]]) for b in range(5) for k in range(3)])
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(sequence_metrics(model(s), actions)["nll"], rel=1e-5)


def test_stacked_state_tokens_see_every_frame_at_their_position():
    """``state_stack``: one token per patch position holding all of its frames (so motion, a
    difference between frames, is a linear read-out); an earlier frame changes its position's token."""
    from models.policy import StateEncoder

    torch.manual_seed(0)
    cfg = PolicyConfig(n_actions=5, horizon=4, state_frames=3, state_kind="continuous", state_shape=(8, 8, 2),
                       state_patch=4, dim=32, heads=4, depth=1, state_stack=True)
    enc = StateEncoder(cfg)
    s = torch.randn(2, 3, 8, 8, 2)
    out = enc(s)
    assert out.shape == (2, 4, 32)
    s2 = s.clone()
    s2[:, 0, :4, :4] += 1.0  # the first frame, top-left patch only
    out2 = enc(s2)
    assert (out2[:, 0] - out[:, 0]).abs().max() > 1e-3
    torch.testing.assert_close(out2[:, 1:], out[:, 1:])
    unstacked = StateEncoder(PolicyConfig(**{**cfg.to_dict(), "state_stack": False}))
    assert unstacked(s).shape == (2, 12, 32)


# --------------------------------------------------------------------------------------------
# past actions in the state
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conditioning", ["cross_attention", "add"])
def test_past_actions_condition_the_policy_and_are_required(conditioning):
    """With ``past_actions`` the moves into the state's last frame change the logits (same latents);
    they must be given, as integer ids in range; a model without them refuses them."""
    model = tiny(past_actions=2, conditioning=conditioning, seed=1).eval()
    with torch.no_grad():  # open the AdaLN-Zero gates (zero at init), so the conditioning reaches the logits
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    st = states(3, seed=2)
    ids = torch.full((3, H), model.mask_id)
    a = model(ids, st, past=torch.tensor([[0, 1], [2, 3], [4, 4]]))
    b = model(ids, st, past=torch.tensor([[1, 1], [3, 3], [0, 0]]))
    assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="past actions must be integer ids"):
        model(ids, st)
    with pytest.raises(ValueError, match="outside 0..4"):
        model(ids, st, past=torch.tensor([[0, 5], [0, 0], [0, 0]]))
    with pytest.raises(ValueError, match="past_actions = 0"):
        tiny()(ids, st, past=torch.zeros(3, 2, dtype=torch.long))
    out = sample_maskgit(model, st, 4, past=torch.tensor([[0, 1], [2, 3], [4, 4]]),
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, H) and int(out.max()) < N_ACTIONS


def test_policy_learns_to_repeat_the_last_move_from_past_actions():
    """The state's latents say nothing; the next actions repeat the last past move: with past
    actions the policy learns it (masked accuracy of the first action > 0.9), the MLP baseline too."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    last = torch.randint(0, N_ACTIONS, (64,), generator=g)
    past = torch.stack([torch.randint(0, N_ACTIONS, (64,), generator=g), last], dim=1)
    actions = last[:, None].expand(-1, H).clone()
    st = torch.zeros(64, 2, 8, 8, dtype=torch.long)
    model = tiny(past_actions=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(150):
        loss, _ = training_loss(model, actions, st, weighting="uniform", generator=g, past=past)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        first = model.eval()(torch.full((64, H), model.mask_id), st, past=past)[:, 0].argmax(-1)
    assert (first == last).float().mean() > 0.9
    mlp = MLPPolicy(MLPPolicyConfig(n_actions=N_ACTIONS, horizon=H, state_frames=2, state_shape=(8, 8), hidden=32,
                                    past_actions=2))
    opt = torch.optim.AdamW(mlp.parameters(), lr=1e-2)
    for _ in range(100):
        loss, _ = mlp_policy_loss(mlp, actions, st, past=past)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (mlp(st, past)[:, 0].argmax(-1) == last).float().mean() > 0.9

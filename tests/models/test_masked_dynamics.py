"""Masked-token dynamics: temporal masks, objectives, the masked-only loss, MaskGIT sampling and its
key/value cache, action conditioning, and overfitting a tiny batch."""
from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from models.common import frame_actions
from models.masked_dynamics import (
    OBJECTIVES,
    TEMPORAL_KINDS,
    MaskedConfig,
    MaskedDynamics,
    MaskedLossConfig,
    ego_source,
    expected_levels,
    masked_after_step,
    masked_loss,
    masked_objective_batch,
    maskgit_unmask,
    motion_copy,
    rollout,
    sample_next_frame,
    sample_objectives,
    temporal_mask,
)

SMALL = {"grid": 8, "patch": 2, "token_dim": 8, "dim": 32, "heads": 2, "depth": 2, "max_frames": 8}
# the copy heads: none, the motion-copy head, and the ego copy beside it
COPIES = {"plain": {}, "motion": {"motion_radius": 2}, "ego": {"motion_radius": 2, "ego_copy": True}}
MASK = 16


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster and steadier than two on a shared, loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(seed: int = 0, **overrides) -> MaskedDynamics:
    torch.manual_seed(seed)
    return MaskedDynamics(MaskedConfig(**{**SMALL, **overrides})).eval()


def tokens(b: int, t: int, grid: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 16, (b, t, grid, grid), generator=torch.Generator().manual_seed(seed))


def moves(b: int, t: int, seed: int = 0) -> torch.Tensor:
    """Per-transition continuous actions (B, T, 2), std 0.1 like the MNIST [dx, dy]."""
    return 0.1 * torch.randn(b, t, 2, generator=torch.Generator().manual_seed(seed))


def expected_mask(kind: str, t: int) -> torch.Tensor:
    """The frame-to-frame visibility each name means, written out independently of ``temporal_mask``."""
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    return {"causal": j <= i, "bidirectional": (i >= 0) & (j >= 0), "identity": i == j}[kind]


def dependence(model: MaskedDynamics, ids, cond, has, temporal) -> torch.Tensor:
    """(B, T, T) bool: [b, i, j] True when changing frame j's tokens changes frame i's logits."""
    b, t = ids.shape[:2]
    with torch.no_grad():
        base = model(ids, cond, has, temporal)
        dep = torch.zeros(b, t, t, dtype=torch.bool)
        for j in range(t):
            other = ids.clone()
            other[:, j] = (other[:, j] + 1) % 16
            diff = (model(other, cond, has, temporal) - base).abs().amax(dim=(2, 3, 4))  # (B, T)
            dep[:, :, j] = diff > 1e-5
    return dep


# ---- config and inputs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"grid": 30, "patch": 4}, "patch 4 must divide grid 30"),
        ({"dim": 30, "heads": 4}, "dim 30 must be a multiple of heads 4"),
        ({"action_kind": "joystick"}, "unknown action_kind 'joystick'"),
        ({"levels": 1}, "levels must be >= 2, got 1"),
        ({"depth": 0}, "depth must be >= 1, got 0"),
        ({"motion_radius": -1}, "motion_radius must be >= 0, got -1"),
        ({"action_scale": 0.0}, "action_scale must be finite and > 0, got 0.0"),
    ],
)
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        MaskedConfig(**bad)


def test_loss_config_rejects_bad_values():
    with pytest.raises(ValueError, match="joint_temporal 'full' must be one of"):
        MaskedLossConfig(joint_temporal="full")
    with pytest.raises(ValueError, match="objective weights"):
        MaskedLossConfig(future_weight=-1)
    with pytest.raises(ValueError, match="future_min_ratio"):
        MaskedLossConfig(future_min_ratio=0.9, future_max_ratio=0.5)


def test_forward_shape_excludes_mask_class_and_rejects_bad_ids():
    model = small_model()
    ids = tokens(2, 3)
    ids[:, :, 0, 0] = MASK  # MASK is a valid input
    cond, has = frame_actions(moves(2, 3))
    logits = model(ids, cond, has)
    assert logits.shape == (2, 3, 8, 8, 16)  # 16 levels: MASK is never a predicted class
    with pytest.raises(ValueError, match=r"token ids must lie in 0..16 \(MASK = 16\), got 0..17"):
        model(torch.full_like(ids, 17).index_fill_(1, torch.tensor([0]), 0), cond, has)
    with pytest.raises(ValueError, match=r"continuous actions must be \(B, T, 2\)"):
        model(ids, cond[..., :1], has)
    with pytest.raises(ValueError, match="temporal mask must let every frame attend to itself"):
        model(ids, cond, has, torch.zeros(3, 3, dtype=torch.bool))


# ---- temporal masks ---------------------------------------------------------------------------


@pytest.mark.parametrize("copies", COPIES)
@pytest.mark.parametrize("kind", TEMPORAL_KINDS)
def test_temporal_mask_names_what_frames_see(kind, copies):
    """Guards a leaking or missing temporal mask: with "causal" a later frame never changes an
    earlier frame's logits (and earlier frames do change later ones); with "bidirectional" every
    frame changes every other; with "identity" no frame sees any other frame (with the
    motion-copy head too: it reads the previous frame only where the mask lets a frame see it)."""
    model = small_model(**COPIES[copies])
    ids = tokens(2, 4)
    cond, has = frame_actions(moves(2, 4))
    dep = dependence(model, ids, cond, has, kind)
    expected = expected_mask(kind, 4).expand(2, 4, 4)
    assert torch.equal(temporal_mask(kind, 4), expected[0])
    assert torch.equal(dep, expected), f"{kind}: frame i depends on frame j\n{dep[0].int()}"


@pytest.mark.parametrize("copies", COPIES)
def test_per_sequence_mask_equals_separate_forwards(copies):
    """Guards a per-sequence (B, T, T) mask applied to the wrong sequence (a batch mixing
    objectives): each sequence's logits equal a forward of that sequence with its own mask."""
    model = small_model(**COPIES[copies])
    ids = tokens(3, 4)
    cond, has = frame_actions(moves(3, 4))
    kinds = ["causal", "bidirectional", "identity"]
    masks = torch.stack([expected_mask(k, 4) for k in kinds])
    with torch.no_grad():
        mixed = model(ids, cond, has, masks)
        for i, k in enumerate(kinds):
            alone = model(ids[i : i + 1], cond[i : i + 1], has[i : i + 1], k)
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(dependence(model, ids, cond, has, masks), masks)


def test_objective_masks_default_to_the_copilot4d_recipe():
    lc = MaskedLossConfig()
    assert (lc.future_temporal, lc.joint_temporal, lc.individual_temporal) == ("causal", "causal", "identity")
    assert lc.weights == (0.5, 0.4, 0.1)


@pytest.mark.parametrize("copies", COPIES)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("kind", TEMPORAL_KINDS)
def test_each_objective_applies_the_mask_its_params_name(objective, kind, copies):
    """Guards an objective that ignores its temporal-mask param (e.g. joint denoise hard-wired to
    causal, or to bidirectional): the batch carries the configured mask for every sequence, and the
    model run with it has exactly that frame-to-frame dependence."""
    lc = MaskedLossConfig(**{f"{objective}_temporal": kind})
    ids = tokens(2, 4)
    inp, _, temporal = masked_objective_batch(ids, objective, torch.Generator().manual_seed(0), lc)
    assert temporal.shape == (2, 4, 4) and temporal.dtype == torch.bool
    assert torch.equal(temporal, expected_mask(kind, 4).expand(2, 4, 4))
    cond, has = frame_actions(moves(2, 4))
    assert torch.equal(dependence(small_model(**COPIES[copies]), inp, cond, has, temporal), temporal)


def test_mixed_batch_carries_each_sequences_mask():
    lc = MaskedLossConfig(future_temporal="causal", joint_temporal="bidirectional", individual_temporal="identity")
    names = ["joint", "future", "individual", "joint"]
    _, _, temporal = masked_objective_batch(tokens(4, 5), names, torch.Generator().manual_seed(0), lc)
    expected = {"future": "causal", "joint": "bidirectional", "individual": "identity"}
    for i, name in enumerate(names):
        assert torch.equal(temporal[i], expected_mask(expected[name], 5)), name


# ---- objectives -------------------------------------------------------------------------------


def test_future_prediction_masking():
    """Guards masked context frames, an empty context or future, and future mask ratios outside
    [0.5, 1]: a clean prefix of 1..T-1 frames, then every frame masked with ratio in [0.5, 1]."""
    t, n = 6, 64
    ids = tokens(64, t)
    g = torch.Generator().manual_seed(0)
    seen_context = set()
    for _ in range(4):
        inp, loss_mask, _ = masked_objective_batch(ids, "future", g, MaskedLossConfig())
        assert torch.equal(loss_mask, inp == MASK)
        assert torch.equal(inp[~loss_mask], ids[~loss_mask].long())  # unmasked tokens untouched
        ratio = loss_mask.flatten(2).float().mean(-1)  # (B, T)
        for row in ratio:
            context = int((row == 0).long().cumprod(0).sum())
            assert 1 <= context <= t - 1
            assert (row[:context] == 0).all()  # context frames hold no MASK
            assert ((row[context:] >= 0.5) & (row[context:] <= 1.0)).all(), row
            seen_context.add(context)
        assert ratio[ratio > 0].min() < 0.6 and (ratio == 1).any()  # the range is used, not one value
    assert seen_context == set(range(1, t))
    assert n == 64


@pytest.mark.parametrize("objective", ["joint", "individual"])
def test_denoise_masking_uses_the_cosine_schedule_per_frame(objective):
    """Guards a denoise objective that leaves frames unmasked, masks whole sequences with one
    ratio, or uses a uniform ratio instead of MaskGIT's cosine: every frame holds >= 1 MASK, ratios
    differ within a sequence, and their mean is E[cos(π/2·u)] = 2/π (uniform would give 0.5)."""
    ids = tokens(256, 4)
    inp, loss_mask, _ = masked_objective_batch(ids, objective, torch.Generator().manual_seed(1), MaskedLossConfig())
    assert torch.equal(loss_mask, inp == MASK)
    ratio = loss_mask.flatten(2).float().mean(-1)
    assert (ratio > 0).all()
    assert (ratio.std(dim=1) > 0).float().mean() > 0.9  # per frame, not per sequence
    assert abs(ratio.mean().item() - 2 / math.pi) < 0.03


def test_objectives_are_drawn_per_sequence_with_the_weights():
    names = sample_objectives(5000, torch.Generator().manual_seed(0), MaskedLossConfig())
    freq = [names.count(o) / len(names) for o in OBJECTIVES]
    assert all(abs(f - w) < 0.03 for f, w in zip(freq, (0.5, 0.4, 0.1))), freq
    only_joint = MaskedLossConfig(future_weight=0, joint_weight=1, individual_weight=0)
    assert set(sample_objectives(50, torch.Generator().manual_seed(0), only_joint)) == {"joint"}
    # None draws one objective per sequence: a batch mixes masks
    lc = MaskedLossConfig(joint_temporal="bidirectional")
    _, _, temporal = masked_objective_batch(tokens(32, 3), None, torch.Generator().manual_seed(0), lc)
    assert len({tuple(m.flatten().tolist()) for m in temporal}) == 3


def test_future_prediction_needs_two_frames():
    with pytest.raises(ValueError, match="future prediction needs T >= 2 frames"):
        masked_objective_batch(tokens(2, 1), "future", None, MaskedLossConfig())


# ---- loss -------------------------------------------------------------------------------------


def test_loss_counts_masked_positions_only():
    """Guards a loss over all positions (or the unmasked ones): perturbing logits where the input
    was not masked leaves the loss unchanged; perturbing them where it was masked changes it; the
    value is the mean cross-entropy over the masked tokens."""
    ids = tokens(2, 3)
    _, loss_mask, _ = masked_objective_batch(ids, "joint", torch.Generator().manual_seed(0), MaskedLossConfig())
    assert loss_mask.any() and (~loss_mask).any()
    logits = torch.randn(2, 3, 8, 8, 16, generator=torch.Generator().manual_seed(1))
    loss, parts = masked_loss(logits, ids, loss_mask)
    noise = 5 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    off = masked_loss(logits + noise * (~loss_mask)[..., None], ids, loss_mask)[0]
    on = masked_loss(logits + noise * loss_mask[..., None], ids, loss_mask)[0]
    assert off.item() == loss.item()
    assert abs(on.item() - loss.item()) > 1e-3
    manual = -(logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0])[loss_mask].mean()
    torch.testing.assert_close(loss, manual)
    assert parts["masked_fraction"] == loss_mask.float().mean().item()
    leaf = logits.clone().requires_grad_()
    masked_loss(leaf, ids, loss_mask)[0].backward()
    assert (leaf.grad[~loss_mask] == 0).all() and (leaf.grad[loss_mask] != 0).any()


def test_loss_parts_per_objective():
    ids = tokens(2, 2)
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    logits = torch.zeros(2, 2, 8, 8, 16)
    logits[1] = F.one_hot(ids[1], 16).float() * 10  # sequence 1 predicted perfectly
    _, parts = masked_loss(logits, ids, loss_mask, ["future", "joint"])
    assert parts["ce_future"] == pytest.approx(math.log(16), rel=1e-5)
    assert parts["ce_joint"] < 1e-3


# ---- sampling ---------------------------------------------------------------------------------


def test_cosine_schedule():
    n = 64
    after = [masked_after_step(k, 20, n) for k in range(20)]
    assert after == [math.floor(n * math.cos(math.pi / 2 * (k + 1) / 20)) for k in range(19)] + [0]
    assert after == sorted(after, reverse=True)
    assert masked_after_step(0, 1, n) == 0  # K = 1 unmasks everything at once


@pytest.mark.parametrize("steps", [1, 3, 20])
def test_unmasking_fixes_tokens_and_follows_the_schedule(steps):
    """Guards re-sampling tokens that were already fixed, a wrong count of tokens left masked per
    step (MaskGIT: floor(N·cos(π/2·(k+1)/K)), revealing at least one token a step), and a final
    step that leaves MASK behind (e.g. ceil of cos(π/2)·N = 1)."""
    n, b = 64, 3
    seen: list[torch.Tensor] = []
    g = torch.Generator().manual_seed(0)

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:  # fresh random logits every call
        seen.append(ids.clone())
        return torch.randn(b, n, 16, generator=g)

    out = maskgit_unmask(logits_fn, b, n, MASK, steps, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert out.shape == (b, n) and (out != MASK).all() and out.max() < 16
    assert (seen[0] == MASK).all()
    left = n
    for k in range(1, len(seen)):
        left = max(0, min(masked_after_step(k - 1, steps, n), left - 1))  # >= 1 token revealed per step
        assert ((seen[k] == MASK).sum(1) == left).all()
        fixed = seen[k - 1] != MASK
        assert torch.equal(seen[k][fixed], seen[k - 1][fixed])
    fixed = seen[-1] != MASK
    assert torch.equal(out[fixed], seen[-1][fixed])
    assert len(seen) == steps


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_tokens_follow_the_tempered_softmax(temperature):
    """Guards a sampler that ignores the temperature or draws from the wrong distribution: with
    K = 1, token frequencies match softmax(logits / temperature)."""
    n = 20000
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    out = maskgit_unmask(lambda ids: logits.expand(1, n, 4), 1, n, mask_id=4, steps=1, temperature=temperature,
                         generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(out[0], minlength=4).float() / n
    torch.testing.assert_close(freq, (logits / temperature).softmax(-1), atol=0.015, rtol=0)


@pytest.mark.parametrize("steps", [1, 20])
@pytest.mark.parametrize("cache", [True, False])
def test_rollout_returns_tokens_never_mask(steps, cache):
    model = small_model()
    ctx = tokens(2, 2)
    out = rollout(model, ctx, moves(2, 5), None, horizon=3, steps=steps, generator=torch.Generator().manual_seed(0),
                  cache=cache)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.long
    assert out.min() >= 0 and out.max() <= 15


@pytest.mark.parametrize("copies", COPIES)
def test_forward_cached_matches_forward(copies):
    """Guards a key/value cache that shifts time positions or drops frames (or, with the
    motion-copy head, the previous frame): frames appended one at a time after a prefilled context
    give the causal forward's logits."""
    model = small_model(**COPIES[copies])
    ids = tokens(2, 5)
    cond, has = frame_actions(moves(2, 5))
    with torch.no_grad():
        full = model(ids, cond, has, "causal")
        logits, cache = model.forward_cached(ids[:, :2], cond[:, :2], has[:, :2])
        parts = [logits]
        for t in range(2, 5):
            step, cache = model.forward_cached(ids[:, t : t + 1], cond[:, t : t + 1], has[:, t : t + 1], cache)
            parts.append(step)
    assert cache.frames == 5 and cache.kv[0][0].shape[-2] == 5
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("copies", COPIES)
@pytest.mark.parametrize("temperature,choice_noise", [(1.0, 0.0), (1.0, 2.0), (0.0, 0.0)])
def test_cached_rollout_equals_uncached(temperature, choice_noise, copies):
    model = small_model(seed=3, **COPIES[copies])
    ctx = tokens(2, 3, seed=4)
    acts, valid = moves(2, 7, seed=5), torch.ones(2, 7, dtype=torch.bool)
    valid[1, 3] = False
    runs = [
        rollout(model, ctx, acts, valid, horizon=4, steps=8, temperature=temperature,
                generator=torch.Generator().manual_seed(7), cache=cache, choice_noise=choice_noise)
        for cache in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])


def test_expected_levels_is_the_rounded_mean_level():
    """Guards an argmax (the mode, not the mean) or a mean over the wrong axis: probabilities
    written out by hand give sum_i p_i * i, rounded to the nearest level."""
    p = torch.tensor([[0.5, 0.0, 0.0, 0.5],      # mean 1.5 -> 2 (mode 0)
                      [0.9, 0.1, 0.0, 0.0],      # mean 0.1 -> 0
                      [0.0, 0.2, 0.2, 0.6],      # mean 2.4 -> 2 (mode 3)
                      [0.1, 0.1, 0.1, 0.7]])     # mean 2.4 -> 2
    assert expected_levels(torch.log(p + 1e-30)).tolist() == [2, 0, 2, 2]


def test_expected_decode_beats_samples_in_squared_error():
    """The point of the expected decode: for a bimodal token the mean level's squared error,
    averaged over draws from the distribution, is below that of a draw itself."""
    logits = torch.log(torch.tensor([0.5, 1e-9, 1e-9, 1e-9, 0.5]))
    draws = maskgit_unmask(lambda ids: logits.expand(1, 4000, 5), 1, 4000, mask_id=5, steps=1,
                           generator=torch.Generator().manual_seed(0))[0].float()
    point = float(expected_levels(logits))
    sample = draws[torch.randperm(4000, generator=torch.Generator().manual_seed(1))]
    assert point == 2.0
    assert ((draws - point) ** 2).mean() < 0.6 * ((draws - sample) ** 2).mean()


@pytest.mark.parametrize("copies", COPIES)
def test_expected_decode_rolls_out_each_frames_mean_level(copies):
    """Guards an expected decode that reads another frame's logits or feeds back something other
    than the frame it returns: each rolled-out frame equals the rounded mean level of the causal
    forward's logits for that frame (all MASK) given the frames before it; cached equals uncached;
    no generator is needed and the result does not depend on the sampling settings."""
    model = small_model(seed=2, **COPIES[copies])
    ctx, acts = tokens(2, 3, seed=1), moves(2, 6, seed=2)
    runs = [rollout(model, ctx, acts, None, horizon=3, steps=steps, temperature=temp, cache=cache, decode="expected")
            for cache, steps, temp in ((True, 20, 1.0), (False, 3, 0.5))]
    assert torch.equal(runs[0], runs[1])
    cond, has = frame_actions(acts)
    frames = ctx.long()
    for i in range(3):
        inp = torch.cat([frames, torch.full_like(frames[:, :1], MASK)], 1)
        anchor = (torch.arange(inp.shape[1]) - 1).expand(2, -1).clone()
        anchor[:, -1] = ctx.shape[1] - 1  # the ego copy: every new frame copies the last context frame
        with torch.no_grad():
            logits = model(inp, cond[:, : inp.shape[1]], has[:, : inp.shape[1]], "causal", anchor=anchor)[:, -1]
        want = expected_levels(logits)
        assert torch.equal(runs[0][:, i], want), i
        frames = torch.cat([frames, want[:, None]], 1)
    with pytest.raises(ValueError, match="unknown decode 'mean'"):
        rollout(model, ctx, acts, None, horizon=1, decode="mean")


def test_temperature_zero_is_deterministic_and_temperature_one_is_not():
    model = small_model()
    ctx, acts = tokens(2, 2), moves(2, 4)
    greedy = [rollout(model, ctx, acts, None, 2, steps=5, temperature=0.0, generator=torch.Generator().manual_seed(s))
              for s in (0, 1)]
    assert torch.equal(greedy[0], greedy[1])
    sampled = [rollout(model, ctx, acts, None, 2, steps=5, temperature=1.0, generator=torch.Generator().manual_seed(s))
               for s in (0, 1)]
    assert not torch.equal(sampled[0], sampled[1])


def test_sample_next_frame_checks_its_cache():
    model = small_model()
    ids = tokens(1, 3)
    cond, has = frame_actions(moves(1, 4))
    _, cache = model.forward_cached(ids[:, :2], cond[:, :2], has[:, :2])
    with pytest.raises(ValueError, match="cache holds 2 frames but past_ids has 3"):
        sample_next_frame(model, ids, cond, has, steps=2, cache=cache)


def test_rollout_rejects_too_few_actions_and_too_many_frames():
    model = small_model()
    with pytest.raises(ValueError, match="need >= 4"):
        rollout(model, tokens(1, 2), moves(1, 3), None, horizon=3)
    with pytest.raises(ValueError, match="exceed max_frames 8"):
        rollout(model, tokens(1, 2), moves(1, 9), None, horizon=7)


# ---- actions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("action_kind", ["continuous", "discrete"])
def test_action_of_transition_t_conditions_frame_t_plus_1(action_kind):
    """Guards an off-by-one action alignment, an ignored action and an ignored ``has``: changing
    the action of transition t (frame t -> t+1) changes the logits of frame t+1 and never those of
    frames <= t under the causal mask; an action marked invalid changes nothing; "no action" gets
    its own embedding, not that of a zero move / class 0."""
    model = small_model(action_kind=action_kind)
    b, t = 2, 5
    ids = tokens(b, t)
    if action_kind == "continuous":
        acts = moves(b, t)
    else:
        acts = torch.randint(0, 5, (b, t), generator=torch.Generator().manual_seed(0))

    def logits(a, valid=None):
        cond, has = frame_actions(a, valid)
        with torch.no_grad():
            return model(ids, cond, has, "causal")

    base = logits(acts)
    for k in range(t - 1):
        other = acts.clone()
        other[:, k] = other[:, k] + 0.5 if action_kind == "continuous" else (other[:, k] + 1) % 5
        diff = (logits(other) - base).abs().amax(dim=(0, 2, 3, 4))  # per frame
        assert (diff[: k + 1] == 0).all(), f"action {k} leaked into frames <= {k}: {diff}"
        assert diff[k + 1] > 1e-4, f"action {k} did not change frame {k + 1}: {diff}"
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[:, 2] = False
    other = acts.clone()
    other[:, 2] = other[:, 2] + 0.5 if action_kind == "continuous" else (other[:, 2] + 1) % 5
    assert torch.equal(logits(acts, valid), logits(other, valid))
    assert not torch.equal(logits(acts, valid), base)  # no-action embedding differs from action 2's
    # "no action" is not the zero move (continuous) or class 0 (discrete)
    zero = torch.zeros_like(acts)
    cond, has = frame_actions(zero)
    with torch.no_grad():
        none = model(ids, cond, torch.zeros_like(has), "causal")
        zeros = model(ids, cond, torch.ones_like(has), "causal")
    assert (none - zeros).abs().amax() > 1e-4


@pytest.mark.parametrize("cache", [True, False])
def test_rollout_conditions_frame_c_plus_i_on_transition_c_plus_i_minus_1(cache):
    """Guards an off-by-one in rollout's action alignment: predicted frame C+i is conditioned on
    per-transition action C+i-1 (the move into it); the first predicted frame does not depend on
    action C (the move out of it) and no frame depends on actions past the horizon."""
    model = small_model(seed=1)
    c, horizon = 2, 2
    ctx, acts = tokens(2, c), moves(2, c + horizon)

    def run(a):
        return rollout(model, ctx, a, None, horizon, steps=4, temperature=0.0, cache=cache)

    base = run(acts)
    changed = {}
    for k in range(c + horizon):
        other = acts.clone()
        other[:, k] += 2.0
        changed[k] = (run(other) != base).flatten(2).any(-1).any(0).tolist()  # per predicted frame
    assert changed[c - 1][0], "the first predicted frame ignores the move into it"
    assert changed[c] == [False, True]
    assert changed[c + 1] == [False, False]


# ---- overfit ----------------------------------------------------------------------------------


def scrolling_tokens(b: int, t: int, grid: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token images scrolled by the action (a shift in {-1, 0, 1}^2) at each transition."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 16, (b, grid, grid), generator=g)
    shifts = torch.randint(-1, 2, (b, t, 2), generator=g)
    pos = torch.cat([torch.zeros(b, 1, 2, dtype=torch.long), shifts[:, :-1].cumsum(1)], 1)
    frames = [[base[i].roll((int(pos[i, s, 0]), int(pos[i, s, 1])), (0, 1)) for s in range(t)] for i in range(b)]
    return torch.stack([torch.stack(f) for f in frames]), shifts.float()


@pytest.mark.parametrize("copies", COPIES)
def test_overfits_one_small_batch(copies):
    """Guards a model/loss/masking stack that cannot fit one batch (e.g. logits paired with the
    wrong targets, a cut gradient path):
    on one batch (B=2, T=4, grid 8, patch 2, dim 64) future-prediction masked-token accuracy
    exceeds 0.9 after 150 steps (measured: >= 0.99 on 4 seeds; 2-12 s on one thread, by machine load)."""
    torch.manual_seed(0)
    ids, acts = scrolling_tokens(2, 4, 8, seed=0)
    model = MaskedDynamics(MaskedConfig(grid=8, patch=2, token_dim=8, dim=64, heads=4, depth=2, max_frames=4,
                                        **COPIES[copies]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cond, has = frame_actions(acts)
    g, lc = torch.Generator().manual_seed(0), MaskedLossConfig()
    start = time.perf_counter()
    for _ in range(150):
        inp, loss_mask, temporal = masked_objective_batch(ids, "future", g, lc)
        loss, _ = masked_loss(model(inp, cond, has, temporal), ids, loss_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - start
    model.eval()
    hit = total = 0
    with torch.no_grad():
        eg = torch.Generator().manual_seed(123)
        for _ in range(10):
            inp, loss_mask, temporal = masked_objective_batch(ids, "future", eg, lc)
            pred = model(inp, cond, has, temporal).argmax(-1)
            hit += int(((pred == ids) & loss_mask).sum())
            total += int(loss_mask.sum())
    assert hit / total > 0.9, f"masked-token accuracy {hit / total:.3f} after 150 steps ({elapsed:.1f} s)"


# --------------------------------------------------------------------------------------------
# future prediction with context copies
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("copies", COPIES)
def test_context_copies_predict_each_frame_as_a_rollout_step(copies):
    """``forward_with_context``: frame t's logits equal the causal forward of the clean frames < t
    followed by masked frame t (a rollout's unmasking step), whatever the other masked frames hold."""
    model = small_model(2, **COPIES[copies])
    b, t = 2, 5
    clean, masked = tokens(b, t, seed=1), tokens(b, t, seed=2)
    masked[:, :, :4] = MASK
    cond, has = frame_actions(moves(b, t))
    with torch.no_grad():
        both = model.forward_with_context(masked, clean, cond, has)
        for i in range(t):
            seq = torch.cat([clean[:, :i], masked[:, i:i + 1]], dim=1)
            alone = model(seq, cond[:, :i + 1], has[:, :i + 1], "causal")[:, i]
            torch.testing.assert_close(both[:, i], alone, atol=2e-5, rtol=1e-4)
        other = masked.clone()
        other[:, 3:] = tokens(b, 2, seed=9)
        changed = model.forward_with_context(other, clean, cond, has)
    torch.testing.assert_close(changed[:, :3], both[:, :3], atol=1e-6, rtol=0)


def test_future_copies_mask_every_frame_after_the_first_and_train():
    """``future_copies``: future rows keep frame 0 clean and mask every later frame; the batch's
    logits route future rows through the copies and the other rows through their temporal masks."""
    from models.masked_dynamics import objective_logits

    cfg = MaskedLossConfig(future_copies=True)
    ids = tokens(4, 6, seed=4)
    names = ["future", "joint", "future", "individual"]
    inp, loss_mask, temporal = masked_objective_batch(ids, names, torch.Generator().manual_seed(0), cfg, MASK)
    fut = torch.tensor([n == "future" for n in names])
    assert not loss_mask[fut, 0].any() and loss_mask[fut, 1:].flatten(2).any(-1).all()
    model = small_model(0)
    cond, has = frame_actions(moves(4, 6))
    logits = objective_logits(model, inp, ids, cond, has, temporal, names, cfg)
    with torch.no_grad():
        torch.testing.assert_close(logits[fut], model.forward_with_context(inp[fut], ids[fut], cond[fut], has[fut]))
        torch.testing.assert_close(logits[~fut], model(inp[~fut], cond[~fut], has[~fut], temporal[~fut]))
    loss, _ = masked_loss(logits, ids, loss_mask, names)
    loss.backward()
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------------------------
# temporal offsets (time_shift)
# --------------------------------------------------------------------------------------------


def test_per_sequence_offsets_equal_separate_forwards():
    """``t0`` as (B,) offsets places each sequence at its own temporal positions: the same logits
    as forwarding each sequence alone from its offset, for plain and context-copy forwards."""
    model = small_model(3)
    b, t = 3, 4
    ids, clean = tokens(b, t, seed=5), tokens(b, t, seed=6)
    ids[:, 2:, :3] = MASK
    cond, has = frame_actions(moves(b, t))
    t0 = torch.tensor([0, 4, 2])
    with torch.no_grad():
        both = model(ids, cond, has, "causal", t0)
        copies = model.forward_with_context(ids, clean, cond, has, t0)
        for i in range(b):
            s = slice(i, i + 1)
            torch.testing.assert_close(both[s], model(ids[s], cond[s], has[s], "causal", int(t0[i])))
            torch.testing.assert_close(copies[s], model.forward_with_context(ids[s], clean[s], cond[s], has[s],
                                                                             int(t0[i])))
        assert (model(ids, cond, has, "causal", 1) - model(ids, cond, has, "causal", 0)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="max_frames 8"):
        model(ids, cond, has, "causal", torch.tensor([0, 5, 0]))  # 5 + 4 frames > 8


def test_time_offsets_cover_every_start():
    from models.masked_dynamics import time_offsets

    t0 = time_offsets(4000, 3, 8, torch.Generator().manual_seed(0))
    assert t0.dtype == torch.long and set(t0.tolist()) == set(range(6))  # 0 .. 8 - 3
    counts = torch.bincount(t0, minlength=6).float()
    assert counts.min() > 0.8 * counts.mean()
    with pytest.raises(ValueError, match="exceed max_frames 8"):
        time_offsets(2, 9, 8)


@pytest.mark.parametrize("time_shift", [False, True])
def test_time_shift_trains_the_positions_a_rollout_reaches(time_shift):
    """Windows of T frames train temporal positions 0..T-1 only; rollouts from C context frames
    reach C + horizon > T. With ``time_shift`` the stage's loss trains every position up to
    max_frames; without it the positions past the window get no gradient (the bug it fixes)."""
    from pipeline.dynamics import Config, loss_function

    torch.manual_seed(0)
    cfg = Config.model_validate({
        "family": "masked", "action_input": "continuous", "window": 3,
        "masked": {"patch": 2, "token_dim": 8, "dim": 32, "heads": 2, "depth": 1,
                   "objectives": {"future_copies": True, "time_shift": time_shift}},
        "train": {"steps": 10, "warmup_steps": 1},
        "max_frames": 8,
    })
    model = MaskedDynamics(MaskedConfig(**{**SMALL, "depth": 1, "max_frames": cfg.positions}))
    assert cfg.positions == 8
    ids = tokens(64, 3, seed=7)
    batch = {"latents": ids.to(torch.uint8), "actions": moves(64, 3), "valid": torch.ones(64, 3, dtype=torch.bool)}
    loss, _ = loss_function(cfg, MASK)(model, batch, 0)
    loss.backward()
    reached = model.pos_time.grad.abs().sum(-1) > 0
    assert bool(reached[:3].all())
    assert bool(reached[3:].all()) == time_shift and bool(reached[3:].any()) == time_shift


# --------------------------------------------------------------------------------------------
# motion-copy head and action scale
# --------------------------------------------------------------------------------------------


def test_motion_copy_moves_the_previous_frame_by_the_kernels_displacement():
    """``motion_copy``: a one-hot kernel at displacement (dy, dx) gives each pixel q the class of
    prev[q + (dy, dx)], written out here with explicit indices; pixels whose source lies outside the
    frame or is MASK put their weight in the last class; a two-point kernel splits it."""
    prev = tokens(1, 1, seed=3)[:, 0]  # (1, 8, 8) in 0..15
    prev[0, 2, 5] = MASK
    r, k = 2, 5
    for dy, dx in [(1, -1), (-2, 0), (0, 2)]:
        kern = torch.zeros(1, 8, 8, k * k)
        kern[..., (dy + r) * k + (dx + r)] = 1.0
        out = motion_copy(prev, kern, r, MASK)
        assert out.shape == (1, 8, 8, MASK + 1)
        for y in range(8):
            for x in range(8):
                sy, sx = y + dy, x + dx
                src = int(prev[0, sy, sx]) if 0 <= sy < 8 and 0 <= sx < 8 else MASK
                assert out[0, y, x, src] == 1.0 and out[0, y, x].sum() == 1.0
    kern = torch.zeros(1, 8, 8, k * k)
    kern[..., r * k + r] = 0.25  # displacement (0, 0)
    kern[..., r * k + r + 1] = 0.75  # displacement (0, 1)
    out = motion_copy(prev, kern, r, MASK)
    y, x = 4, 3
    expected = torch.zeros(MASK + 1)
    expected[prev[0, y, x]] += 0.25
    expected[prev[0, y, x + 1]] += 0.75
    torch.testing.assert_close(out[0, y, x], expected)


def test_motion_head_gives_log_probabilities_and_can_move_the_previous_frame():
    """The head's outputs are normalised log-probabilities; with its displacement set to (1, -1)
    tokens, a narrow kernel and the gate open, the prediction of a fully masked frame is the previous
    frame moved by that displacement (each pixel from prev[y + 1, x - 1]), whatever the rest of the
    model says: guards a per-pixel layout or a (dy, dx) order that does not match ``motion_copy``."""
    model = small_model(seed=1, motion_radius=2)
    p2 = model.cfg.patch**2
    with torch.no_grad():
        model.motion.weight.zero_()
        model.motion.bias.copy_(torch.tensor([1.0, -1.0, math.log(0.05), 20.0]).repeat(p2))
    ids = tokens(2, 3, seed=5)
    inp = ids.clone()
    inp[:, 2] = MASK
    cond, has = frame_actions(moves(2, 3))
    with torch.no_grad():
        logp = model(inp, cond, has, "causal")
    torch.testing.assert_close(logp.logsumexp(-1), torch.zeros(2, 3, 8, 8), atol=1e-5, rtol=0)
    pred = logp[:, 2].argmax(-1)
    assert torch.equal(pred[:, :7, 1:], ids[:, 1, 1:, :7])
    with torch.no_grad():  # with the gate shut, the head alone
        model.motion.bias.copy_(torch.tensor([1.0, -1.0, math.log(0.05), -50.0]).repeat(p2))
        shut = model(inp, cond, has, "causal")
    assert not torch.equal(shut[:, 2].argmax(-1)[:, :7, 1:], ids[:, 1, 1:, :7])


def test_continuous_action_scale_multiplies_the_actions():
    """``action_scale`` s on actions a equals scale 1 on s * a, in both families' embeddings."""
    from models.flow_dynamics import FlowConfig, FlowDynamics

    a = moves(2, 3)
    has = torch.ones(2, 3, dtype=torch.bool)
    for build in (lambda s: small_model(seed=0, action_scale=s),
                  lambda s: (torch.manual_seed(0), FlowDynamics(FlowConfig(latent_shape=(4, 4, 2), patch=2, dim=16,
                                                                           heads=2, depth=1, action_scale=s)))[1]):
        scaled, plain = build(12.5), build(1.0)
        with torch.no_grad():
            torch.testing.assert_close(scaled.action_embedding(a, has), plain.action_embedding(12.5 * a, has))
            assert not torch.allclose(plain.action_embedding(a, has), plain.action_embedding(12.5 * a, has))


# --------------------------------------------------------------------------------------------
# ego copy: the anchor frame moved by the actions since it
# --------------------------------------------------------------------------------------------


def cells(dx: float, dy: float, grid: int = 8) -> list[float]:
    """A [dx, dy] action in half-image units that moves content by (dx, dy) cells of a grid-wide frame."""
    return [dx * 2 / grid, dy * 2 / grid]


def open_ego_gate(model: MaskedDynamics, logit: float = 50.0) -> MaskedDynamics:
    with torch.no_grad():
        model.ego_gate.weight.zero_()
        model.ego_gate.bias.fill_(logit)
    return model


def test_ego_source_sums_the_moves_since_the_anchor():
    """Guards a shift that counts the anchor's own move, misses the frame's, or forgets the
    half-image units: frame t's shift is the sum of the moves of frames anchor+1..t, in cells
    (grid / 2 per unit); an invalid move on the way, or no anchor, turns the copy off."""
    acts = torch.tensor([[cells(1, 0), cells(0, 2), cells(-3, 1), cells(1, 1), cells(0, 0)]])  # per transition
    valid = torch.ones(1, 5, dtype=torch.bool)
    cond, has = frame_actions(acts, valid)
    frames = tokens(1, 5)
    src = ego_source(frames, cond, has, torch.tensor([[-1, 0, 0, 1, 1]]), 8)
    want = torch.tensor([[[0, 0], [1, 0], [1, 2], [-3, 3], [-2, 4]]], dtype=torch.float32)
    torch.testing.assert_close(src.shift, want)
    assert src.ok.tolist() == [[False, True, True, True, True]]
    assert torch.equal(src.ids[0, 2], frames[0, 0]) and torch.equal(src.ids[0, 4], frames[0, 1])
    valid[0, 2] = False  # the move from frame 2 to 3 is unknown: frames 3 and 4 cannot copy frame 1
    cond, has = frame_actions(acts, valid)
    src = ego_source(frames, cond, has, torch.tensor([[-1, 0, 1, 2, 3]]), 8)
    assert src.ok.tolist() == [[False, True, True, False, True]]
    with pytest.raises(ValueError, match="anchor must be an earlier frame"):
        ego_source(frames, cond, has, torch.tensor([[-1, 0, 2, 2, 3]]), 8)


def test_ego_copy_moves_the_anchor_by_the_actions():
    """With the ego gate open, a fully masked frame's prediction is its anchor moved by the moves
    since (content at p - shift lands on p), whatever the rest of the model says; a half-cell move
    splits each token between its two neighbours; with the gate shut the copy is gone. Guards an
    (x, y) swap, a shift of the wrong sign or size, and a gate that does not reach the output."""
    model = open_ego_gate(small_model(seed=1, motion_radius=2, ego_copy=True))
    ids = tokens(2, 3, seed=5)
    inp = ids.clone()
    inp[:, 2] = MASK
    acts = torch.tensor([[cells(2, -1), cells(1, 0), [0.0, 0.0]]]).expand(2, 3, 2)
    cond, has = frame_actions(acts)
    anchor = torch.tensor([[-1, 0, 0]]).expand(2, 3)  # frame 2 copies frame 0, moved (3, -1) cells
    with torch.no_grad():
        logp = model(inp, cond, has, "causal", anchor=anchor)
    torch.testing.assert_close(logp.logsumexp(-1), torch.zeros(2, 3, 8, 8), atol=1e-5, rtol=0)
    pred = logp[:, 2].argmax(-1)
    assert torch.equal(pred[:, :7, 3:], ids[:, 0, 1:, :5])  # pred[y, x] = frame0[y + 1, x - 3]
    ego = model.ego_copy(ego_source(ids, cond, has, anchor, 8))
    assert torch.all(ego[:, 2, 7, :, -1] == 1) and torch.all(ego[:, 2, :, :3, -1] == 1)  # entered: unknown
    half = torch.tensor([[cells(0.5, 0), [0.0, 0.0], [0.0, 0.0]]]).expand(2, 3, 2)
    hc, hh = frame_actions(half)
    src = ego_source(ids, hc, hh, torch.tensor([[-1, 0, 1]]).expand(2, 3), 8)
    p = model.ego_copy(src)[:, 1, 4, 5]
    want = 0.5 * F.one_hot(ids[:, 0, 4, 5], MASK + 1) + 0.5 * F.one_hot(ids[:, 0, 4, 4], MASK + 1)
    torch.testing.assert_close(p, want.float())
    with torch.no_grad():
        shut = open_ego_gate(model, -50.0)(inp, cond, has, "causal", anchor=anchor)
    assert not torch.equal(shut[:, 2].argmax(-1)[:, :7, 3:], ids[:, 0, 1:, :5])


@pytest.mark.parametrize("cache", [True, False])
def test_rollout_frames_copy_the_last_context_frame(cache):
    """A rollout's every new frame copies the last context frame moved by all the moves since it,
    not its own previous (predicted) frame: with the gate open, horizon frame i is the last context
    frame moved by the sum of moves 1..i, each cell exact where that sum is whole. Guards a rollout
    that chains one-step copies (two half-cell moves blur twice instead of moving one cell) or
    skips a move."""
    model = open_ego_gate(small_model(seed=4, motion_radius=2, ego_copy=True))
    ctx = tokens(1, 2, seed=6)
    acts = torch.tensor([[cells(0, 0), cells(0.5, 0), cells(0.5, 0), cells(1, 1), [0.0, 0.0]]])
    out = rollout(model, ctx, acts, None, horizon=3, cache=cache, decode="expected")
    last = ctx[0, 1]
    # half a cell, then 1 and (2, 1) cells in all: chained copies would blur twice by then
    for i, (dx, dy) in ((1, (1, 0)), (2, (2, 1))):
        assert torch.equal(out[0, i, dy:, dx:], last[: 8 - dy, : 8 - dx]), i
    assert not torch.equal(out[0, 0, :, 1:], last[:, :7])  # half a cell: each token between two


def test_rollout_anchors_read_windows_as_rollouts():
    """Training anchors: per sequence a context of c frames (every c in 1..T-1 drawn), frames
    before c copy their predecessor and the rest the last context frame; ``forward_with_context``
    with them gives each frame what a rollout from that context gives it."""
    from models.masked_dynamics import rollout_anchors

    a = rollout_anchors(400, 5, torch.Generator().manual_seed(0))
    c = a[:, -1] + 1
    assert set(c.tolist()) == {1, 2, 3, 4}
    t = torch.arange(5)
    assert torch.equal(a, torch.minimum(t - 1, c[:, None] - 1))
    model = small_model(2, motion_radius=2, ego_copy=True)
    clean, masked = tokens(2, 5, seed=1), tokens(2, 5, seed=2)
    masked[:, :, :4] = MASK
    cond, has = frame_actions(moves(2, 5))
    anchor = a[:2]
    with torch.no_grad():
        both = model.forward_with_context(masked, clean, cond, has, anchor=anchor)
        for i in range(1, 5):
            seq = torch.cat([clean[:, :i], masked[:, i:i + 1]], dim=1)
            want = (t[: i + 1] - 1).expand(2, -1).clone()
            want[:, i] = anchor[:, i]
            alone = model(seq, cond[:, :i + 1], has[:, :i + 1], "causal", anchor=want)[:, i]
            torch.testing.assert_close(both[:, i], alone, atol=2e-5, rtol=1e-4)


def test_ego_copy_needs_continuous_moves():
    with pytest.raises(ValueError, match="ego_copy moves tokens by continuous"):
        MaskedConfig(**SMALL, ego_copy=True, action_kind="discrete")

"""Flow dynamics: the paper's equations (tau = signal level), causality, actions, cached rollouts,
and overfitting one batch. Each bug-guarding test names the bug in its docstring."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from models.common import frame_actions
from models.flow_dynamics import (
    FlowConfig,
    FlowDynamics,
    FlowLossConfig,
    Levels,
    euler_sample,
    flow_loss_at,
    noisy,
    ramp_weight,
    rollout,
    sample_levels,
    sample_next_frame,
    shortcut_forcing_loss,
)

TINY = dict(latent_shape=(4, 4, 4), patch=2, dim=32, heads=2, depth=2, max_frames=8, k_max=8)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from threads, and two threads on a shared 2-core machine
    slow these tests down twentyfold: run them on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0, **overrides) -> FlowDynamics:
    """A tiny model whose AdaLN-Zero gates and output layer (zero at init) are randomised, so
    every path (attention across frames, conditioning) is live; in eval mode (deterministic)."""
    torch.manual_seed(seed)
    model = FlowDynamics(FlowConfig(**{**TINY, **overrides}))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def latents(b: int, t: int, seed: int = 0, shape=(4, 4, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, *shape, generator=g).tanh()


# --------------------------------------------------------------------------------------------
# config and shapes
# --------------------------------------------------------------------------------------------


def test_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="patch 3 must divide the latent grid 4x4"):
        FlowConfig(latent_shape=(4, 4, 4), patch=3)
    with pytest.raises(ValueError, match="dim 30 must be a positive multiple of heads 4"):
        FlowConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="k_max 48 must be a power of 2"):
        FlowConfig(k_max=48)
    with pytest.raises(ValueError, match="action_kind must be"):
        FlowConfig(action_kind="joystick")
    with pytest.raises(ValueError, match="k_max 12 must be a power of 2"):
        FlowLossConfig(k_max=12)


def test_forward_shapes_and_clear_errors():
    model = tiny_model()
    z = latents(2, 3)
    tau, d = torch.rand(2, 3), torch.full((2, 3), 1 / 8)
    a, has = frame_actions(torch.randn(2, 3, 2))
    assert model(z, tau, d, a, has).shape == z.shape
    with pytest.raises(ValueError, match="step size 0.1 is not on the grid"):
        model(z, tau, torch.full((2, 3), 0.1), a, has)
    with pytest.raises(ValueError, match="exceed max_frames 8"):
        model(latents(1, 9), torch.rand(1, 9), torch.full((1, 9), 1 / 8), *frame_actions(torch.randn(1, 9, 2)))
    with pytest.raises(ValueError, match=r"continuous actions must be \(B, T, 2\)"):
        model(z, tau, d, torch.randn(2, 3, 3), has)
    assert model.num_params() > 0 and model.flops_per_frame(8) > 6 * model.num_params()


def test_noise_embedding_is_per_frame():
    """Guards the seed's step-embedding bug: a (B, D) step embedding added to a per-frame
    (B, T, D) time embedding. With its own step size per frame, the sum stays (B, T, D) and
    changing one frame's step changes that frame's embedding only."""
    model = tiny_model()
    tau = torch.tensor([[0.0, 0.25, 0.5], [0.5, 0.75, 0.0]])
    d = torch.tensor([[1 / 8, 1 / 4, 1 / 2], [1 / 2, 1 / 4, 1.0]])
    emb = model.noise_embedding(tau, d)
    assert emb.shape == (2, 3, TINY["dim"])
    d2 = d.clone()
    d2[0, 1] = 1 / 8
    diff = (model.noise_embedding(tau, d2) - emb).abs().amax(-1)
    assert diff[0, 1] > 0
    diff[0, 1] = 0
    assert diff.max() == 0
    a, has = frame_actions(torch.randn(2, 3, 2))
    assert model.condition(tau, d, a, has).shape == (2, 3, TINY["dim"])


# --------------------------------------------------------------------------------------------
# training loss
# --------------------------------------------------------------------------------------------


def test_ramp_weight_grows_with_signal_level():
    """Guards the inverted ramp weight (1 - 0.9 tau, a tau = 0 clean convention): with tau the
    signal level, w(tau) = 0.9 tau + 0.1, so clean inputs weigh 1 and pure noise 0.1."""
    tau = torch.linspace(0, 1, 11)
    w = ramp_weight(tau)
    torch.testing.assert_close(w, 0.9 * tau + 0.1)
    assert w[0].item() == pytest.approx(0.1) and w[-1].item() == pytest.approx(1.0)
    assert (w.diff() > 0).all()


def test_levels_lie_on_the_grid_of_their_step():
    """Guards signal levels sampled independently of the step size: every target frame's tau
    is a multiple of its d with tau <= 1 - d, and each grid value occurs."""
    cfg = FlowLossConfig(k_max=64, tau_ctx=0.9, bootstrap_fraction=0.5)
    b, t = 512, 8
    lv = sample_levels(b, t, cfg, torch.Generator().manual_seed(0))
    tau, d, target, boot = lv.tau.double(), lv.d.double(), lv.target, lv.bootstrap
    assert boot.sum() == b // 2
    # context: a prefix of 1 .. t-1 frames at tau_ctx with the finest step
    n_ctx = (~target).sum(1)
    assert n_ctx.min() >= 1 and n_ctx.max() <= t - 1
    assert (target == (torch.arange(t) >= n_ctx[:, None])).all()
    assert torch.allclose(tau[~target], torch.tensor(0.9, dtype=torch.float64))
    assert (d[~target] == 1 / 64).all()
    # steps: 1/k_max in flow rows, larger in bootstrap rows; all on 2**i / k_max
    i = torch.log2(d * 64)
    assert (i == i.round()).all() and i.min() >= 0 and i.max() <= 6
    assert (d[target & ~boot[:, None]] == 1 / 64).all()
    assert (d[target & boot[:, None]] > 1 / 64).all()
    # levels: on the grid of their step
    ratio = tau[target] / d[target]
    assert (ratio == ratio.round()).all()
    assert (tau[target] <= 1 - d[target] + 1e-12).all() and (tau[target] >= 0).all()
    for step in (1.0, 0.5, 0.25, 0.125):
        sel = target & (d == step)
        assert set((tau[sel] / step).round().long().tolist()) == set(range(int(1 / step)))


def _hand_loss(student, teacher, z, eps, tau, d, target, boot, a, has, k_max, variant="paper"):
    """The paper's shortcut objective, written out frame by frame (tau = signal level).

    variant: "paper"; "second_clean" (the seed's target: the teacher's second clean
    prediction); "tau_squared" (velocity loss scaled by tau^2); "renoise" (the teacher's midpoint
    re-noised with the true noise instead of its own Euler step)."""
    def f(x):
        return x.reshape(*x.shape, 1, 1, 1)

    z_t = noisy(z, eps, tau)
    z_hat = student(z_t, tau, d, a, has)
    total, count = 0.0, 0
    with torch.no_grad():
        moving = target & boot[:, None]  # the teacher steps the bootstrap rows' target frames
        half = torch.where(moving, d / 2, 1 / k_max)
        x1 = teacher(z_t, tau, half, a, has)
        v1 = (x1 - z_t) / f(1 - tau)
        if variant == "renoise":
            z_mid = torch.where(f(moving), noisy(x1, eps, tau + half), z_t)
        else:
            z_mid = torch.where(f(moving), z_t + f(half) * v1, z_t)
        tau_mid = torch.where(moving, tau + half, tau)
        x2 = teacher(z_mid, tau_mid, half, a, has)
        v2 = (x2 - z_mid) / f(1 - tau_mid)
        b_bar = (v1 + v2) / 2
    for r in range(z.shape[0]):
        for c in range(z.shape[1]):
            if not target[r, c]:
                continue
            s = tau[r, c]
            if not boot[r]:
                err = (z_hat[r, c] - z[r, c]).pow(2).mean()
            elif variant == "second_clean":
                err = (z_hat[r, c] - x2[r, c]).pow(2).mean()
            else:
                v_hat = (z_hat[r, c] - z_t[r, c]) / (1 - s)
                scale = s ** 2 if variant == "tau_squared" else (1 - s) ** 2
                err = scale * (v_hat - b_bar[r, c]).pow(2).mean()
            total = total + (0.9 * s + 0.1) * err
            count += 1
    return total / count


def test_bootstrap_loss_matches_the_paper():
    """Guards the shortcut bootstrap bugs: the target taken as the teacher's second clean
    prediction, the velocity loss scaled by tau^2 instead of (1 - tau)^2, and the teacher's
    midpoint re-noised with the true noise instead of its own Euler step. The loss must equal
    the paper's (1 - tau)^2 |v_hat - b_bar|^2 (b_bar the mean of the teacher's two half-step
    velocities, computed here by hand), ramp-weighted, over target frames only; flow rows use
    |z_hat - z|^2; the teacher (an EMA stand-in) and not the student makes the targets."""
    k_max = 8
    student, teacher = tiny_model(0), tiny_model(5)
    z, eps = latents(3, 3, seed=1), latents(3, 3, seed=2)
    tau = torch.tensor([[0.9, 0.25, 0.0], [0.9, 0.75, 0.0], [0.9, 0.9, 0.375]])
    d = torch.tensor([[1 / 8, 1 / 4, 1 / 2], [1 / 8, 1 / 4, 1.0], [1 / 8, 1 / 8, 1 / 8]])
    target = torch.tensor([[False, True, True], [False, True, True], [False, False, True]])
    boot = torch.tensor([True, True, False])
    a, has = frame_actions(torch.randn(3, 3, 2, generator=torch.Generator().manual_seed(3)))
    levels = Levels(tau=tau, d=d, target=target, bootstrap=boot)

    loss, parts = flow_loss_at(student, teacher, z, eps, levels, a, has, k_max)
    expected = _hand_loss(student, teacher, z, eps, tau, d, target, boot, a, has, k_max)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    assert parts["loss"] == pytest.approx(loss.item())
    for bug in ("second_clean", "tau_squared", "renoise"):
        wrong = _hand_loss(student, teacher, z, eps, tau, d, target, boot, a, has, k_max, variant=bug)
        assert abs(wrong.item() - loss.item()) > 1e-3 * loss.item(), bug
    # teacher=None: the student makes its own targets (without gradient)
    own, _ = flow_loss_at(student, None, z, eps, levels, a, has, k_max)
    torch.testing.assert_close(own, _hand_loss(student, student, z, eps, tau, d, target, boot, a, has, k_max),
                               rtol=1e-5, atol=1e-7)
    # gradients reach the student only
    loss.backward()
    assert student.out.weight.grad is not None and teacher.out.weight.grad is None


def test_shortcut_forcing_loss_runs_and_reports_parts():
    model = tiny_model()
    z = latents(8, 4)
    actions = torch.randn(8, 4, 2)
    valid = torch.ones(8, 4, dtype=torch.bool)
    cfg = FlowLossConfig(k_max=8, bootstrap_fraction=0.25)
    loss, parts = shortcut_forcing_loss(model, copy.deepcopy(model), z, actions, valid, cfg,
                                        torch.Generator().manual_seed(0))
    assert loss.requires_grad and math.isfinite(loss.item())
    assert set(parts) >= {"loss", "flow", "bootstrap", "flow_mse", "tau_mean"}
    assert parts["bootstrap_rows"] == 2 and all(isinstance(v, float) for v in parts.values())
    again, _ = shortcut_forcing_loss(model, None, z, actions, valid, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, loss)  # same generator, same draws; the EMA copy equals the model


def test_loss_conditions_frames_through_frame_actions():
    """The loss conditions frame t on actions[t-1] (``frame_actions``): the window's last
    transition leads out of the window and cannot change the loss, an earlier one does, and an
    invalid transition's action is ignored."""
    model = tiny_model()
    z = latents(4, 4)
    actions = torch.randn(4, 4, 2)
    valid = torch.ones(4, 4, dtype=torch.bool)
    cfg = FlowLossConfig(k_max=8, bootstrap_fraction=0.25)

    def loss(a, v=valid):
        return shortcut_forcing_loss(model, None, z, a, v, cfg, torch.Generator().manual_seed(0))[0]

    base = loss(actions)
    last, mid = actions.clone(), actions.clone()
    last[:, 3] += 1.0
    mid[:, 2] += 1.0
    torch.testing.assert_close(loss(last), base, rtol=0, atol=0)
    assert abs(loss(mid).item() - base.item()) > 1e-6
    invalid = valid.clone()
    invalid[:, 2] = False
    torch.testing.assert_close(loss(mid, invalid), loss(actions, invalid), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16, 32, 64])
def test_oracle_sampling_recovers_the_clean_latent(steps):
    """A denoiser that always returns the true clean latent is recovered exactly by K Euler steps."""
    z = latents(2, 1, seed=3)
    noise = latents(2, 1, seed=4) * 3
    seen = []

    def oracle(x, tau, d):
        seen.append((tau, d))
        return z

    torch.testing.assert_close(euler_sample(oracle, noise, steps), z, rtol=0, atol=1e-6)
    assert seen == [(k / steps, 1 / steps) for k in range(steps)]


def test_euler_step_follows_the_flow_equation():
    """Guards the sampling step re-noised with the initial noise ((1 - tau') eps + tau' z_hat):
    each step is x <- x + d (z_hat - x) / (1 - tau), from tau = 0 to 1."""
    def denoise(x, tau, d):  # a state-dependent denoiser, so the two rules part ways
        return 0.5 * x + 1.0 + tau

    noise = torch.tensor([2.0, -1.0])
    x, renoised = noise.clone(), noise.clone()
    for k in range(4):
        tau, d = k / 4, 1 / 4
        x = x + d * (denoise(x, tau, d) - x) / (1 - tau)
        renoised = noisy(denoise(renoised, tau, d), noise, tau + d)
    got = euler_sample(denoise, noise, 4)
    torch.testing.assert_close(got, x)
    assert (got - renoised).abs().min() > 1e-3


# --------------------------------------------------------------------------------------------
# causality and actions
# --------------------------------------------------------------------------------------------


def _predict(model, z, actions, valid=None, tau=None):
    b, t = z.shape[:2]
    tau = torch.full((b, t), 0.5) if tau is None else tau
    cond, has = frame_actions(actions, valid)
    return model(z, tau, torch.full((b, t), 1 / 8), cond, has)


def test_temporal_attention_is_causal():
    """A frame's prediction ignores later frames (their latents, levels, actions) and depends on
    earlier ones."""
    model = tiny_model()
    z, actions = latents(2, 5), torch.randn(2, 5, 2)
    base = _predict(model, z, actions)
    z2 = z.clone()
    z2[:, 3] = latents(2, 1, seed=9)[:, 0]
    tau2 = torch.full((2, 5), 0.5)
    tau2[:, 4] = 0.0
    a2 = actions.clone()
    a2[:, 3] = -5.0  # the action into frame 4
    out = _predict(model, z2, a2, tau=tau2)
    torch.testing.assert_close(out[:, :3], base[:, :3], rtol=0, atol=1e-6)
    assert (out[:, 3:] - base[:, 3:]).abs().amax(dim=(2, 3, 4)).min() > 1e-3
    z3 = z.clone()
    z3[:, 0] = latents(2, 1, seed=10)[:, 0]
    later = _predict(model, z3, actions)
    assert (later[:, 1:] - base[:, 1:]).abs().amax(dim=(2, 3, 4)).min() > 1e-4


@pytest.mark.parametrize("kind", ["continuous", "discrete"])
def test_action_of_transition_t_changes_frame_t_plus_1_only_onwards(kind):
    """Changing actions[t] (frame t -> t+1) changes the prediction of frame t+1 (and later), not
    frames <= t; an invalid transition's action is ignored (the learned no-action embedding)."""
    model = tiny_model(action_kind=kind)
    z = latents(2, 5)
    if kind == "continuous":
        actions = torch.randn(2, 5, 2)
        changed = actions.clone()
        changed[:, 2] = actions[:, 2] + 1.0
    else:
        actions = torch.tensor([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]])
        changed = actions.clone()
        changed[:, 2] = (actions[:, 2] + 1) % 5
    base, out = _predict(model, z, actions), _predict(model, z, changed)
    torch.testing.assert_close(out[:, :3], base[:, :3], rtol=0, atol=1e-6)
    assert (out[:, 3] - base[:, 3]).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[:, 2] = False
    torch.testing.assert_close(_predict(model, z, changed, valid), _predict(model, z, actions, valid))


# --------------------------------------------------------------------------------------------
# rollouts
# --------------------------------------------------------------------------------------------


BASES = {"plain": {}, "residual": {"residual": True}, "camera_warp": {"residual": True, "camera_warp": True}}


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("max_frames,context,horizon", [(8, 3, 4), (4, 3, 4), (4, 5, 2)])
def test_cached_rollout_equals_uncached(max_frames, context, horizon, base):
    """The key/value cache (past frames computed once, one new frame per step) gives the same
    frames as recomputing the window at every step, also once the window slides (and with the
    residual base, which the cached step takes from the last cached frame; with the camera warp,
    whose input enters the cached keys: frames appended to the cache take theirs from the frame
    before them)."""
    model = tiny_model(max_frames=max_frames, **BASES[base])
    ctx = latents(2, context, seed=5)
    actions = torch.randn(2, context + horizon, 2)
    lengths = []
    hook = model.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    cached = rollout(model, ctx, actions, None, horizon, steps=4, tau_ctx=0.9,
                     generator=torch.Generator().manual_seed(7), cache=True)
    n_cached = list(lengths)
    lengths.clear()
    full = rollout(model, ctx, actions, None, horizon, steps=4, tau_ctx=0.9,
                   generator=torch.Generator().manual_seed(7), cache=False)
    hook.remove()
    assert cached.shape == (2, horizon, 4, 4, 4)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
    assert n_cached.count(1) >= 4 * horizon  # every denoising step runs the new frame alone
    assert min(lengths) >= 2  # the uncached mode runs the window with the new frame
    assert not torch.equal(cached[:, 0], cached[:, -1])


def test_rollout_corrupts_context_to_tau_ctx():
    """Guards clean context at inference for a model trained on context at tau_ctx: the first
    rolled-out frame equals sampling after the context corrupted once to tau_ctx (noise drawn
    first from the same generator), and differs from sampling after the clean context."""
    model = tiny_model()
    ctx, actions = latents(2, 3, seed=6), torch.randn(2, 4, 2)
    got = rollout(model, ctx, actions, None, 1, steps=4, tau_ctx=0.8, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    eps = torch.cat([torch.randn(2, 1, 4, 4, 4, generator=g) for _ in range(3)], dim=1)
    noise = torch.randn(2, 1, 4, 4, 4, generator=g)
    cond, has = frame_actions(actions)
    want = sample_next_frame(model, noisy(ctx, eps, 0.8), cond, has, noise, 4, 0.8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    clean = sample_next_frame(model, ctx, cond, has, noise, 4, 0.8)
    assert (clean - got).abs().max() > 1e-3


def test_rollout_rejects_short_actions():
    model = tiny_model()
    with pytest.raises(ValueError, match="actions must cover context \\+ horizon = 5"):
        rollout(model, latents(1, 3), torch.randn(1, 4, 2), None, 2)


# --------------------------------------------------------------------------------------------
# learning
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("context_copies", [False, True])
def test_overfits_one_batch(context_copies):
    """The flow loss on one fixed batch (B=4, T=4, 4x4x4 latents) falls below 20% of its start
    within 150 Adam steps (measured 2-4% over six seeds of model and data; 7-14% after 100),
    with a context prefix and with context copies."""
    torch.manual_seed(0)
    model = FlowDynamics(FlowConfig(**{**TINY, "max_frames": 4}))
    z, actions = latents(4, 4, seed=100), torch.randn(4, 4, 2, generator=torch.Generator().manual_seed(1))
    cfg = FlowLossConfig(k_max=8, bootstrap_fraction=0.0, context_copies=context_copies)

    def evaluate():
        with torch.no_grad():
            return sum(shortcut_forcing_loss(model, None, z, actions, None, cfg, torch.Generator().manual_seed(9 + k))[1]
                       ["flow_mse"] for k in range(8)) / 8

    start = evaluate()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss, _ = shortcut_forcing_loss(model, None, z, actions, None, cfg, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert evaluate() < 0.2 * start


def test_residual_model_starts_as_a_copy_of_the_denoised_previous_frame():
    """With ``residual`` the network predicts a correction of the previous frame's posterior-mean
    estimate ``mmse(z~[t-1], tau[t-1])`` (zero for a window's first frame): at initialisation (its
    output layer is zero, AdaLN-Zero) the prediction is exactly that base; with a cache the base
    of the first new frame comes from ``prev``."""
    from models.flow_dynamics import mmse

    torch.manual_seed(0)
    model = FlowDynamics(FlowConfig(latent_shape=(4, 4, 4), patch=2, dim=32, heads=4, depth=2, max_frames=8,
                                    residual=True))
    z = latents(2, 4, seed=3)
    tau = torch.tensor([[0.9, 0.5, 0.0, 1.0], [0.25, 0.9, 0.9, 0.5]])
    d = torch.full((2, 4), 1 / 64)
    acts, has = torch.zeros(2, 4, 2), torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        out = model(z, tau, d, acts, has)
        torch.testing.assert_close(out[:, 0], torch.zeros_like(out[:, 0]))
        for t in range(1, 4):
            expect = z[:, t - 1] * (tau[:, t - 1] / (tau[:, t - 1] ** 2 + (1 - tau[:, t - 1]) ** 2))[:, None, None, None]
            torch.testing.assert_close(out[:, t], expect)
        torch.testing.assert_close(mmse(z, torch.ones(2, 4)), z)  # clean input: itself
        assert float(mmse(z, torch.zeros(2, 4)).abs().max()) == 0.0  # pure noise: the prior mean
        _, kv = model(z[:, :2], tau[:, :2], d[:, :2], acts[:, :2], has[:, :2], return_kv=True)
        step = model(z[:, 2:3], tau[:, 2:3], d[:, 2:3], acts[:, 2:3], has[:, 2:3], past=kv,
                     prev=(z[:, 1:2], tau[:, 1:2]))
    torch.testing.assert_close(step, out[:, 2:3])


# --------------------------------------------------------------------------------------------
# camera warp: the residual base moved against the camera's motion
# --------------------------------------------------------------------------------------------


def test_warp_moves_content_by_the_shift():
    """``warp`` moves content by (dx, dy) cells, +x right, +y down: integer shifts move cells
    exactly (the border repeated where content enters), a half-cell shift averages neighbours,
    and a zero shift returns the input."""
    from models.flow_dynamics import warp

    z = torch.randn(1, 2, 6, 6, 3, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([[[2.0, -1.0], [0.0, 0.0]]])
    out = warp(z, shift)
    # frame 0: out[y, x] = z[y + 1, x - 2] (content 2 right, 1 up), inside the grid
    torch.testing.assert_close(out[0, 0, :5, 2:], z[0, 0, 1:, :4])
    torch.testing.assert_close(out[0, 0, :5, 0], z[0, 0, 1:, 0])  # entering on the left: the border column
    torch.testing.assert_close(out[0, 1], z[0, 1])
    half = warp(z[:, :1], torch.tensor([[[0.5, 0.0]]]))
    torch.testing.assert_close(half[0, 0, :, 1:], 0.5 * (z[0, 0, :, 1:] + z[0, 0, :, :-1]))


def test_camera_warp_model_starts_as_the_moved_previous_frame():
    """With ``camera_warp`` a fresh model (output layer zero) predicts its base: the previous frame's
    posterior mean moved AGAINST the camera's motion under the frame's action (discrete class k:
    ``class_motion[k]`` half-images; 0.5 of a 4-cell grid is one cell), unmoved without an action.
    A base moved with the camera, or by the action of the wrong frame, fails."""
    torch.manual_seed(0)
    motion = ((0.0, 0.0), (-0.5, 0.0), (0.5, 0.0), (0.0, -0.5), (0.0, 0.5))  # none, left, right, up, down
    model = FlowDynamics(FlowConfig(latent_shape=(4, 4, 2), patch=2, dim=16, heads=2, depth=1, max_frames=8,
                                    residual=True, camera_warp=True, action_kind="discrete", class_motion=motion))
    z = latents(1, 5, seed=4, shape=(4, 4, 2))
    tau = torch.ones(1, 5)  # clean: each base is the previous frame itself
    d = torch.full((1, 5), 1 / 64)
    per_transition = torch.tensor([[2, 1, 4, 3, 0]])  # right, left, down, up, (last: unused)
    cond, has = frame_actions(per_transition)
    with torch.no_grad():
        out = model(z, tau, d, cond, has)
    torch.testing.assert_close(out[0, 1, :, :3], z[0, 0, :, 1:])  # camera right: content one cell left
    torch.testing.assert_close(out[0, 2, :, 1:], z[0, 1, :, :3])  # camera left: content right
    torch.testing.assert_close(out[0, 3, :3], z[0, 2, 1:])        # camera down: content up
    torch.testing.assert_close(out[0, 4, 1:], z[0, 3, :3])        # camera up: content down
    _, no_action = frame_actions(per_transition, torch.tensor([[True, False, True, True, True]]))
    with torch.no_grad():
        still = model(z, tau, d, cond, no_action)
    torch.testing.assert_close(still[0, 2], z[0, 1])  # frame 2 has no action: an unmoved copy
    # continuous actions are the camera's motion itself
    cont = FlowDynamics(FlowConfig(latent_shape=(4, 4, 2), patch=2, dim=16, heads=2, depth=1, max_frames=8,
                                   residual=True, camera_warp=True, action_scale=7.0))
    moves = torch.tensor([[[0.0, 0.0], [0.5, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    cond, has = frame_actions(moves)
    with torch.no_grad():
        out = cont(z, tau, d, cond, has)
    torch.testing.assert_close(out[0, 2, :, :3], z[0, 1, :, 1:])


def test_camera_warp_config_errors():
    with pytest.raises(ValueError, match="needs residual"):
        FlowConfig(**{**TINY, "camera_warp": True})
    with pytest.raises(ValueError, match="needs class_motion"):
        FlowConfig(**{**TINY, "residual": True, "camera_warp": True, "action_kind": "discrete"})
    with pytest.raises(ValueError, match="each of the 5 classes"):
        FlowConfig(**{**TINY, "residual": True, "camera_warp": True, "action_kind": "discrete",
                      "class_motion": [[0, 0], [1, 0]]})


# --------------------------------------------------------------------------------------------
# context copies: every frame a target beside a lightly corrupted copy of its past
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", list(BASES))
def test_context_copies_give_each_frame_the_prediction_of_a_rollout_step(base):
    """With context copies, target frame t is predicted exactly as a rollout predicts a new frame:
    from the context copies of frames < t and itself (the plain causal forward of
    ``ctx[:t] + [z~_t]``), whatever the other target frames hold. A mask that let targets see
    each other, or their own context copy, fails."""
    model = tiny_model(3, **BASES[base])
    b, t = 2, 5
    z_t, z_c = latents(b, t, seed=1), latents(b, t, seed=2)
    g = torch.Generator().manual_seed(0)
    tau = (torch.randint(0, 8, (b, t), generator=g) / 8).float()
    d = torch.full((b, t), 1 / 8)
    tau_c, d_c = torch.full((b, t), 0.9), torch.full((b, t), 1 / 8)
    a = torch.randn(b, t, 2, generator=g)
    cond, has = frame_actions(a)
    with torch.no_grad():
        both = model(z_t, tau, d, cond, has, ctx=(z_c, tau_c, d_c))
        for i in range(t):
            seq = torch.cat([z_c[:, :i], z_t[:, i:i + 1]], dim=1)
            taus = torch.cat([tau_c[:, :i], tau[:, i:i + 1]], dim=1)
            ds = torch.cat([d_c[:, :i], d[:, i:i + 1]], dim=1)
            alone = model(seq, taus, ds, cond[:, :i + 1], has[:, :i + 1])[:, i]
            torch.testing.assert_close(both[:, i], alone, atol=2e-5, rtol=1e-4)
        other = z_t.clone()
        other[:, 3:] = latents(b, 2, seed=7)
        changed = model(other, tau, d, cond, has, ctx=(z_c, tau_c, d_c))
    torch.testing.assert_close(changed[:, :3], both[:, :3], atol=1e-6, rtol=0)


def test_context_copies_make_every_frame_after_min_context_a_target():
    """``context_copies``: no context prefix; frames >= min_context are all targets; the loss runs
    (with bootstrap rows, whose teacher sees the same copies) and is differentiable."""
    cfg = FlowLossConfig(k_max=8, bootstrap_fraction=0.5, min_context=2, context_copies=True)
    lv = sample_levels(4, 6, cfg, torch.Generator().manual_seed(0))
    assert lv.target[:, :2].sum() == 0 and lv.target[:, 2:].all()
    model = tiny_model(0)
    model.train()
    z = latents(4, 6, seed=3)
    loss, parts = shortcut_forcing_loss(model, copy.deepcopy(model), z, torch.randn(4, 6, 2), None, cfg,
                                        torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and parts["target_share"] == pytest.approx(4 / 6)
    assert parts["bootstrap_rows"] == 2
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_the_window_slides_by_half_its_length():
    """A long rollout keeps between max_frames // 2 and max_frames - 1 past frames, and its window
    (so its cache) moves once every max_frames // 2 frames, not at every frame."""
    from models.flow_dynamics import window_start

    starts, start = [], 0
    for now in range(3, 40):
        start = window_start(now, start, 8)
        starts.append(start)
        assert 4 <= now - start <= 7 or (start == 0 and now <= 7), (now, start)
    assert starts[:5] == [0] * 5                                     # frames 3..7: the window from 0 holds them
    assert starts[5] == 4 and starts[8] == 4 and starts[9] == 8      # frame 8 slides to 4; frame 12 to 8
    assert len(set(starts)) == 1 + (39 - 8) // 4 + 1                  # one move per 4 frames
    assert window_start(5, 0, 2) == 4 and window_start(9, 0, 1) == 8  # tiny windows still move forward

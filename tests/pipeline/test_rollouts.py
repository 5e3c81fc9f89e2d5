"""The evaluation's arithmetic: the validation/test split, per-episode bootstrap intervals, the
per-frame scores (capped PSNR, OpenSTL's sum, SSIM, sharpness), action agreement, the windows,
the summaries of scores into metrics and per-horizon rows, and the sampling-steps sweep's timing."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline import rollouts
from pipeline.evaluation import derangement, episode_resamples, interval, resampled_sums, split_held_out
from pipeline.paths import FRAMES_KEY, LATENTS_KEY
from pipeline.store import EpisodeStore, StoreConfig, write_episode_store

# -- the split and the intervals -----------------------------------------------------------------


def test_split_is_disjoint_seeded_and_sized():
    held = np.array([3, 9, 11, 20, 21, 30, 35])
    val, test = split_held_out(held, 0.5, 0, "tok")
    assert len(test) == 4 and len(val) == 3                                   # round(3.5) = 4
    assert sorted(np.concatenate([val, test]).tolist()) == held.tolist()
    assert not set(val) & set(test)
    again = split_held_out(held[::-1], 0.5, 0, "tok")                          # order of the record does not matter
    assert [a.tolist() for a in again] == [val.tolist(), test.tolist()]
    assert split_held_out(held, 0.5, 1, "tok")[1].tolist() != test.tolist() or True  # another seed may differ
    # both splits keep at least one episode
    assert [len(x) for x in split_held_out(held, 0.01, 0, "tok")] == [6, 1]
    assert [len(x) for x in split_held_out(held, 0.99, 0, "tok")] == [1, 6]
    with pytest.raises(ValueError, match="tok: 1 held-out episode"):
        split_held_out(np.array([4]), 0.5, 0, "tok")


@pytest.mark.parametrize("n", [2, 3, 4, 5, 9])
def test_derangement_has_no_fixed_point(n):
    for seed in range(20):
        p = derangement(n, np.random.default_rng(seed))
        assert sorted(p.tolist()) == list(range(n)) and not np.any(p == np.arange(n)), (n, seed, p)
    assert derangement(n, np.random.default_rng(7)).tolist() == derangement(n, np.random.default_rng(7)).tolist()
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, np.random.default_rng(0))


def test_bootstrap_resamples_episodes_not_items():
    groups = np.array([5, 5, 5, 8, 9, 9])
    counts, index = episode_resamples(groups, 200, 0)
    assert counts.shape == (200, 3) and np.all(counts.sum(1) == 3)             # 3 episodes drawn per resample
    assert index.tolist() == [0, 0, 0, 1, 2, 2]
    values = np.array([1.0, 1.0, 1.0, 10.0, 4.0, np.nan])
    sums, ns = resampled_sums(values, index, counts)
    # a resample that drew each episode once is the plain mean of the measured items
    ones = np.all(counts == 1, axis=1)
    assert ones.any()
    np.testing.assert_allclose((sums / ns)[ones], np.nanmean(values))
    # an episode drawn twice weighs its items twice
    c = np.array([[2.0, 1.0, 0.0]])
    s, m = resampled_sums(values, index, c)
    assert float(s[0] / m[0]) == pytest.approx((2 * 3 + 10) / 7)
    lo, hi = interval(sums / ns)
    assert lo <= np.nanmean(values) <= hi and lo < hi


def test_one_episode_gives_a_point_interval():
    counts, index = episode_resamples(np.zeros(4, int), 50, 0)
    sums, ns = resampled_sums(np.array([1.0, 2.0, 3.0, 6.0]), index, counts)
    lo, hi = interval(sums / ns)
    assert lo == hi == 3.0


# -- scores --------------------------------------------------------------------------------------


def test_frame_scores_cap_psnr_and_sum_like_openstl():
    rng = np.random.default_rng(0)
    target = rng.random((2, 3, 8, 8, 1)).astype(np.float32)
    pred = target.copy()
    pred[0, 1] += 0.1                                                          # one frame off by 0.1 everywhere
    s = rollouts.frame_scores(np.clip(pred, 0, 1), target, psnr_cap=60.0)
    assert s["mse"].shape == (2, 3)
    assert s["psnr"][1].tolist() == [60.0, 60.0, 60.0]                          # exact copies: the cap, not 100 or inf
    off = ((np.clip(pred[0, 1], 0, 1) - target[0, 1]) ** 2).astype(np.float64)
    assert s["mse"][0, 1] == pytest.approx(off.mean())
    assert s["mse_frame_sum"][0, 1] == pytest.approx(off.sum())                 # OpenSTL: summed over the frame
    assert s["psnr"][0, 1] == pytest.approx(-10 * math.log10(off.mean()))
    assert s["ssim"][1] == pytest.approx(np.ones(3)) and s["ssim"][0, 1] < 1


def test_sharpness_is_below_one_for_blur_and_above_for_noise():
    rng = np.random.default_rng(1)
    truth = np.kron(rng.random((4, 4)), np.ones((4, 4)))[None, None, :, :, None]  # blocky 16x16
    blur = (truth + np.roll(truth, 1, 2) + np.roll(truth, 1, 3) + np.roll(truth, -1, 2)) / 4
    noisy = np.clip(truth + rng.normal(0, 0.2, truth.shape), 0, 1)
    g = rollouts.sq_gradient(truth)
    assert g.shape == (1, 1)
    assert rollouts.sq_gradient(blur)[0, 0] / g[0, 0] < 0.8
    assert rollouts.sq_gradient(noisy)[0, 0] / g[0, 0] > 1.2
    assert rollouts.sq_gradient(np.full((1, 1, 5, 5, 3), 0.3))[0, 0] == 0
    ramp = np.tile(np.arange(5.0), (5, 1))[None, None, :, :, None] / 10         # +0.1 per column, 0 per row
    assert rollouts.sq_gradient(ramp)[0, 0] == pytest.approx(0.01)


def test_agreement_counts_valid_transitions_only():
    a = rollouts.agreement(np.array([[1, 2, 0]]), np.array([[1, 3, 0]]), np.array([[True, True, False]]))
    assert a[0, :2].tolist() == [1.0, 0.0] and math.isnan(a[0, 2])


# -- windows -------------------------------------------------------------------------------------


def test_eval_windows_stride_cap_and_episodes(tmp_path):
    eps = [{"latents": np.zeros((n, 2), np.float32)} for n in (10, 7, 12)]
    write_episode_store(tmp_path / "lat.zarr", eps, StoreConfig(chunk_frames=4, shard_chunks=2, clevel=1))
    lat = EpisodeStore.open(tmp_path / "lat.zarr")
    rows, ep = rollouts.eval_windows(lat, np.array([0, 2]), 6, 2, 100)
    assert rows.tolist() == [[0, 6], [2, 8], [4, 10], [17, 23], [19, 25], [21, 27], [23, 29]]
    assert ep.tolist() == [0, 0, 0, 2, 2, 2, 2]
    rows, ep = rollouts.eval_windows(lat, np.array([0, 2]), 6, None, 100)         # non-overlapping
    assert rows.tolist() == [[0, 6], [17, 23], [23, 29]] and ep.tolist() == [0, 2, 2]
    rows, _ = rollouts.eval_windows(lat, np.array([0, 2]), 6, 2, 3)               # evenly picked
    assert rows.tolist() == [[0, 6], [17, 23], [23, 29]]
    with pytest.raises(ValueError, match="no window of 8 frames"):
        rollouts.eval_windows(lat, np.array([1]), 8, 1, 10)


# -- summaries -----------------------------------------------------------------------------------


def fake_scores(n: int, h: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def frame(level):
        mse = level * (1 + rng.random((n, h)))
        return {"mse": mse, "mse_frame_sum": mse * 64, "psnr": -10 * np.log10(mse), "ssim": 1 - mse,
                "grad": np.full((n, h), level)}

    out = {name: frame(level) for name, level in [("model", 0.01), ("sample", 0.02), ("copy_last", 0.03),
                                                   ("copy_last_recon", 0.031), ("mean_frame", 0.05),
                                                   ("prior_only", 0.04), ("shuffled_actions", 0.035),
                                                   ("tokenizer", 0.001)]}
    for name in ("model", "sample", "prior_only", "shuffled_actions"):
        out[name]["fidelity"] = (rng.random((n, h)) < 0.8).astype(float)
        out[name]["fidelity_moves"] = out[name]["fidelity"].copy()
    out["truth"] = {"grad": np.full((n, h), 0.02), "fidelity": np.ones((n, h))}
    return out


def test_summary_reports_the_selected_windows_with_intervals():
    n, h = 12, 5
    scores = fake_scores(n, h)
    episode = np.repeat(np.arange(6), 2)
    test = episode >= 3
    metrics, rows = rollouts.summarize(scores, test, episode, {"sample": "sample"}, 300, 0)
    assert metrics["windows"] == 6 and metrics["episodes"] == 3
    assert metrics["mse"] == pytest.approx(scores["model"]["mse"][test].mean())
    assert metrics["psnr_of_mean_mse"] == pytest.approx(-10 * math.log10(metrics["mse"]))
    assert metrics["sharpness"] == pytest.approx(0.5) and metrics["sharpness_sample"] == pytest.approx(1.0)
    assert metrics["mse_gain_vs_copy_last"] == pytest.approx(1 - metrics["mse"] / metrics["mse_copy_last"])
    assert metrics["delta_psnr"] == pytest.approx(metrics["psnr"] - metrics["psnr_shuffled_actions"])
    for key in ("mse", "mse_copy_last", "mse_prior_only", "delta_psnr", "world_action_fidelity"):
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"], key
    assert metrics["mse_ci_low"] < metrics["mse_ci_high"]
    # per horizon: the contract's rows, whose mean over horizons is the headline figure
    assert [r["horizon"] for r in rows] == list(range(1, h + 1))
    for key in ("mse", "mse_copy_last", "mse_mean_frame", "mse_prior_only", "mse_shuffled_actions", "psnr", "ssim",
                "sharpness", "mse_sample", "sharpness_sample", "action_fidelity"):
        assert all(r[key] is not None for r in rows), key
    assert np.mean([r["mse"] for r in rows]) == pytest.approx(metrics["mse"])
    assert all(r["mse_ci_low"] <= r["mse"] <= r["mse_ci_high"] for r in rows)
    # the validation windows do not enter the test figures
    changed = fake_scores(n, h)
    changed["model"]["mse"][~test] = 99.0
    again, _ = rollouts.summarize(changed, test, episode, {"sample": "sample"}, 300, 0)
    assert again["mse"] == metrics["mse"] and again["mse_ci_high"] == metrics["mse_ci_high"]


def test_aliases_name_the_sampled_decode():
    scores = fake_scores(4, 2)
    scores["maskgit"] = scores.pop("sample")
    metrics, rows = rollouts.summarize(scores, np.ones(4, bool), np.arange(4), {"sample": "maskgit",
                                                                                "expected": "model"}, 50, 0)
    assert metrics["mse_sample"] == metrics["mse_maskgit"] and metrics["mse_expected"] == metrics["mse"]
    assert rows[0]["sharpness_sample"] == rows[0]["sharpness_maskgit"]


# -- the sweep -----------------------------------------------------------------------------------


def test_step_sweep_times_are_the_median_of_interleaved_rounds(monkeypatch):
    """Each K is timed once per round, the rounds interleaved over K (round 1: K = 1, 2, 4; round
    2: ...), its seconds per frame the median of its rounds; the quality comes from the first."""
    cfg = rollouts.Config(context_frames=1, horizon=2, sweep={"horizon": 2, "rounds": 3})
    calls = []
    timings = {1: [3.0, 1.0, 2.0], 2: [9.0, 5.0, 4.0], 4: [0.5, 0.7, 0.6]}

    def fake(world, seqs, cfg, steps, horizon, decode):
        calls.append((steps, decode))
        pred = np.full((2, horizon, 16, 16, 3), 0.5, np.float32) if decode else None
        return pred, timings[steps][sum(c[0] == steps for c in calls) - 1]

    monkeypatch.setattr(rollouts, "timed_rollouts", fake)
    world = SimpleNamespace(dynamics=SimpleNamespace(cfg=SimpleNamespace(k_max=4)))
    seqs = {LATENTS_KEY: np.zeros((2, 3)), FRAMES_KEY: np.full((2, 3, 16, 16, 3), 128, np.uint8)}
    sweep = rollouts.step_sweep(world, seqs, cfg)
    assert [c[0] for c in calls] == [1, 2, 4] * 3 and [c[1] for c in calls] == [True] * 3 + [False] * 6
    assert {k: v["seconds_per_frame"] for k, v in sweep.items()} == {"1": 2.0, "2": 5.0, "4": 0.6}
    assert all(math.isfinite(v["psnr"]) and math.isfinite(v["mse"]) for v in sweep.values())


def test_sweep_longer_than_the_horizon_is_refused():
    with pytest.raises(ValueError, match=r"sweep.horizon \(9\) exceeds horizon \(8\)"):
        rollouts.Config(context_frames=2, horizon=8, sweep={"horizon": 9})


# -- the rollouts' plumbing: which actions each variant is given and scored against ---------------


class ActionPainter:
    """A stand-in world model whose every predicted frame shows the action that led to it (its
    grey level is class / 10) and whose untrained copy shows nothing: the extractor below reads the
    class back, so the fidelity of each variant tells which actions it was given."""

    family, device = "flow", torch.device("cpu")

    def __init__(self, paint: bool = True):
        self.meta = {"sample": {"steps": 1, "tau_ctx": 0.9}, "kind": "flow"}
        self.paint = paint

    def latents(self, stored):
        return torch.as_tensor(np.asarray(stored), dtype=torch.float32)

    def actions(self, actions, action_class, valid):
        return torch.as_tensor(np.asarray(action_class)).long(), torch.as_tensor(np.asarray(valid)).bool()

    def rollout(self, context, actions, valid, horizon, steps=None, generator=None, decode=None):
        c = context.shape[1]
        level = actions[:, c - 1 : c - 1 + horizon].float() / 10 if self.paint else torch.zeros(len(actions), horizon)
        return level[:, :, None, None, None].expand(-1, -1, 16, 16, 1).clone()

    def decode(self, z):
        return z.numpy().astype(np.float32)


def read_class(clip, rows, c):
    return np.rint(clip[:, 1:].mean(axis=(2, 3, 4)) * 10).astype(np.int64)


def test_each_variant_is_scored_against_the_actions_it_was_given():
    n, c, h = 5, 2, 3
    rng = np.random.default_rng(0)
    classes = rng.integers(1, 5, (n, c + h)).astype(np.int64)
    seqs = {LATENTS_KEY: np.zeros((n, c + h, 16, 16, 1), np.float32), FRAMES_KEY: np.zeros((n, c + h, 16, 16, 1), np.uint8),
            "actions": np.zeros((n, c + h, 2), np.float32), "valid": np.ones((n, c + h), bool), "action_class": classes}
    cfg = rollouts.Config(context_frames=c, horizon=h, batch_size=2, sample_steps=1)
    world, prior = ActionPainter(), ActionPainter(paint=False)
    scores, kept, facts = rollouts.score_windows(world, prior, seqs, cfg, np.zeros((16, 16, 1), np.float32), read_class,
                                                 lambda a, k: k, np.zeros((n, 2), int), np.array([1, 3]))
    perm = facts["perm"]
    assert not np.any(perm == np.arange(n))
    assert np.all(scores["model"]["fidelity"] == 1)                     # the true actions, read back
    assert np.all(scores["shuffled_actions"]["fidelity"] == 1)          # scored against the deranged actions it got
    given = classes[:, c - 1 : c - 1 + h]
    assert np.any(given[perm] != given)                                 # ... which differ from the true ones
    assert np.all(scores["prior_only"]["fidelity"] == 0)                # the untrained copy shows no action
    # the frames kept for pictures are those of the windows asked for, under the true actions
    assert kept["model"].shape == (2, h, 16, 16, 1)
    np.testing.assert_allclose(kept["model"][:, :, 0, 0, 0], given[[1, 3]] / 10, rtol=1e-6)
    np.testing.assert_allclose(kept["shuffled_actions"][:, :, 0, 0, 0], given[perm][[1, 3]] / 10, rtol=1e-6)

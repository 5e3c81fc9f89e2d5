"""Image metrics (scikit-image PSNR/SSIM, LPIPS availability) and the collapse guard."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.image_metrics import (
    MAX_PSNR,
    CollapseGuard,
    LpipsUnavailable,
    collapse_ratio,
    image_grid,
    load_lpips,
    lpips_or_reason,
    psnr,
    spread,
    ssim,
    to_images,
)


def images(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, 16, 16, 3)).astype(np.float32)


def test_psnr_matches_its_definition_and_caps_exact_copies():
    x = np.full((2, 8, 8, 1), 0.5, dtype=np.float32)
    y = x + 0.1  # MSE 0.01 -> 20 dB
    assert psnr(y, x) == pytest.approx(20.0, abs=1e-4)
    assert psnr(x, x) == MAX_PSNR
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        psnr(x[0], x[0])


def test_ssim_is_one_for_copies_and_lower_for_noise():
    x = images()
    noisy = np.clip(x + np.random.default_rng(1).normal(0, 0.2, x.shape), 0, 1).astype(np.float32)
    assert ssim(x, x) == pytest.approx(1.0)
    assert ssim(noisy, x) < 0.9


def test_to_images_goes_channels_last_and_clamps():
    t = torch.rand(2, 3, 1, 8, 8) * 2 - 0.5
    out = to_images(t)
    assert out.shape == (6, 8, 8, 1) and out.min() >= 0 and out.max() <= 1


def test_lpips_reports_why_it_is_unavailable():
    distance, reason = lpips_or_reason("vgg")
    if distance is not None:
        pytest.skip("LPIPS is available on this machine")
    assert "lpips" in reason
    with pytest.raises(LpipsUnavailable):
        load_lpips("vgg")


# -- collapse ----------------------------------------------------------------------------------


class MeanImage(nn.Module):
    """The collapsed tokenizer of the DreamerV4 notes: the same (mean) image whatever the input."""

    def __init__(self, mean: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean.expand_as(x)


class Blur(nn.Module):
    """A healthy, lossy autoencoder: a 3x3 box blur."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def moving_squares(n: int) -> torch.Tensor:
    x = torch.zeros(n, 1, 16, 16)
    for i in range(n):
        x[i, 0, i % 12 : i % 12 + 4, (3 * i) % 12 : (3 * i) % 12 + 4] = 1.0
    return x


def test_mean_image_model_is_flagged_and_a_healthy_one_is_not(caplog):
    x = moving_squares(16)
    collapsed, healthy = MeanImage(x.mean(0)), Blur()
    guards = {"collapsed": CollapseGuard(0.3, 3), "healthy": CollapseGuard(0.3, 3)}
    ratios = {}
    with caplog.at_level(logging.WARNING, logger="pipeline.image_metrics"):
        for step in (100, 200, 300):
            for name, model in (("collapsed", collapsed), ("healthy", healthy)):
                ratios[name] = collapse_ratio(model(x), x)
                guards[name].update(ratios[name], step)
    assert ratios["collapsed"] == pytest.approx(0.0, abs=1e-6)
    assert ratios["healthy"] > 0.5
    assert guards["collapsed"].collapsed and guards["collapsed"].first_flagged_step == 300
    assert not guards["healthy"].collapsed and guards["healthy"].first_flagged_step is None
    assert "COLLAPSE at step 300" in caplog.text


def test_guard_needs_a_streak_and_judges_short_runs_on_all_evaluations():
    guard = CollapseGuard(threshold=0.3, patience=3)
    assert not guard.collapsed  # no evaluation yet
    for step, ratio in enumerate([0.1, 0.1, 0.8, 0.1, 0.1]):
        assert not guard.update(ratio, step)  # the streak is broken at 0.8
    assert not guard.collapsed
    assert guard.update(0.2, 5) and guard.collapsed
    assert guard.update(0.9, 6) is False and not guard.collapsed  # recovered
    one = CollapseGuard(threshold=0.3, patience=3)
    one.update(0.05, 0)  # a single (final) evaluation of an untrained tokenizer
    assert one.collapsed


def test_replay_gives_the_state_of_the_live_guard(caplog):
    evals = [(100, 0.1), (200, 0.5), (300, 0.1), (400, 0.1), (500, 0.15)]
    live = CollapseGuard(0.3, 3)
    for step, ratio in evals:
        live.update(ratio, step)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.image_metrics"):
        replayed = CollapseGuard.replay(0.3, 3, evals)
    assert replayed == live and replayed.collapsed and replayed.first_flagged_step == 500
    assert caplog.text == ""  # quiet: the live guard already warned


def test_spread_of_tensors_and_arrays_agree():
    x = images(8)
    assert spread(torch.from_numpy(x)) == pytest.approx(spread(x), rel=1e-5)
    assert spread(np.repeat(x[:1], 8, axis=0)) == 0.0


def test_image_grid_stacks_rows_as_rgb_uint8():
    grid = image_grid([np.zeros((10, 4, 5, 1)), np.ones((10, 4, 5, 1))], n=3)
    assert grid.shape == (8, 15, 3) and grid.dtype == np.uint8
    assert grid[:4].max() == 0 and grid[4:].min() == 255

"""Stage ``evaluate`` end to end on tiny real stores and models, both kinds of dataset.

Gameplay-like: discrete classes, a cnn tokenizer, a flow world model (the sampling-steps sweep);
MNIST-like: continuous [dx, dy] with true digit positions, a quantize tokenizer, a masked world
model (both decodes). The world models and policies are trained by their own stages
(``tests/stages/test_dynamics.py``'s helpers). Checked: the contract's keys and rows, the split into
validation and test episodes, baselines measured on exactly the test frames, intervals, the media,
the params refused before any work, and reproducibility.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import policy as policy_lib
from pipeline.config import ParamsError
from pipeline.ego import GameplayActionsConfig, MnistActionsConfig
from pipeline.evaluation import mean_frame, split_held_out
from pipeline.paths import FRAMES_KEY
from pipeline.rollouts import Config, eval_windows, untrained_copy
from pipeline.checkpoint import read_meta
from pipeline.store import EpisodeStore
from pipeline.world import World
from stages import dynamics as dynamics_stage
from stages import evaluate as stage
from stages import policy as policy_stage
from tests.stages.test_dynamics import EPISODES, NO_WORKERS, dynamics_config, world_inputs

# (tokenizer kind, dynamics family, action input, the actions stage's extractor params)
KINDS = {
    "gameplay": ("cnn", "flow", "discrete", GameplayActionsConfig(max_shift=3, tile_px=2.0)),
    "mnist": ("quantize", "masked", "continuous", MnistActionsConfig(tracker_search=4)),
}
POLICY = {
    "state_frames": 2, "horizon": 2,
    "model": {"state_patch": 4, "dim": 16, "heads": 2, "depth": 1, "mlp_ratio": 2},
    "sample": {"steps": 2},
    "mlp": {"hidden": 16, "layers": 1, "token_dim": 2,
            "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "ckpt_every": 2}},
    "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "ema_decay": 0.9, "ckpt_every": 2, "device": "cpu"},
}
EVAL = {
    "context_frames": 2, "horizon": 4, "stride": 2, "max_windows": 8, "batch_size": 3, "sample_steps": 4,
    "bootstrap": 50, "speed_frames": 3, "device": "cpu",
    "media": {"windows": 2, "scale": 2, "fps": 4.0, "contact_horizons": [1, 2, 4, 8], "imagined": 2},
    "policy": {"max_windows": 16, "mask_levels": [0.5], "nelbo_points": 2, "batch_size": 16,
               "imagination_sequences": 4, "imagination_batch_size": 4},
}
CONTRACT = ("mse", "psnr", "ssim", "mse_copy_last", "mse_mean_frame", "mse_prior_only", "mse_shuffled_actions",
            "psnr_tokenizer", "sharpness", "mse_sample", "sharpness_sample", "imagine_fps", "nll", "nll_marginal",
            "first_action_acc", "first_action_acc_marginal", "first_action_acc_repeat_last", "first_action_acc_mlp",
            "action_fidelity", "action_fidelity_shuffled", "action_fidelity_deranged")
ROW_KEYS = ("horizon", "mse", "mse_copy_last", "mse_mean_frame", "mse_prior_only", "mse_shuffled_actions", "psnr",
            "ssim", "sharpness", "mse_sample", "sharpness_sample", "action_fidelity")


def eval_config(ds: str, **over) -> Config:
    base = {**EVAL, "sweep": {"horizon": 2, "rounds": 2} if ds == "gameplay" else None, **over}
    return Config.model_validate(base)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Per dataset: the item paths, with a world model and a policy trained by their stages."""
    root = tmp_path_factory.mktemp("evaluate-data")
    out = {}
    for ds, (kind, family, action_input, _) in KINDS.items():
        paths = world_inputs(root / ds, ds, kind)
        own = {"gameplay": {"flow": {"camera_warp": True}},
               "mnist": {"masked": {"motion_radius": 2, "ego_copy": True, "decode": "expected"}}}[ds]
        dynamics_stage.run(dynamics_config(family, action_input, **own), paths, root / ds / "dynamics",
                           root / ds / "work-dynamics", loader=NO_WORKERS)
        paths = {**paths, "dynamics": root / ds / "dynamics", "policy": root / ds / "policy"}
        policy_stage.run(policy_lib.Config.model_validate(POLICY), paths, paths["policy"], root / ds / "work-policy",
                         where=f"policy.{ds}", loader=NO_WORKERS)
        out[ds] = paths
    return out


@pytest.fixture(scope="module")
def evaluated(worlds, tmp_path_factory):
    """Per dataset: (metrics, rows, reports dir) of one ``stages.evaluate.run``."""
    root = tmp_path_factory.mktemp("evaluate-runs")
    out = {}
    for ds in KINDS:
        metrics, rows = stage.run(eval_config(ds), ds, worlds[ds], root / ds, where=f"evaluate.{ds}",
                                  extractor_cfg=KINDS[ds][3])
        out[ds] = (metrics, rows, root / ds)
    return out


@pytest.mark.parametrize("ds", list(KINDS))
def test_evaluate_writes_the_contract(ds, evaluated):
    metrics, rows, reports = evaluated[ds]
    for key in CONTRACT:
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert metrics["lpips"] == "n/a" and metrics["lpips_reason"]
    # 8 episodes, 2 held out: one validates, one is the test episode; 4 windows of 2 + 4 frames each
    assert metrics["test_episodes"] == 1 and metrics["test_windows"] == 4
    assert metrics["val"]["episodes"] == 1 and metrics["val"]["windows"] == 4 and math.isfinite(metrics["val"]["mse"])
    for key in ("mse", "mse_copy_last", "mse_prior_only", "sharpness", "first_action_acc", "action_fidelity_deranged"):
        assert metrics[f"{key}_ci_low"] <= metrics[key] + 1e-12 and metrics[key] <= metrics[f"{key}_ci_high"] + 1e-12
    assert [r["horizon"] for r in rows] == [1, 2, 3, 4]
    for key in ROW_KEYS:
        assert all(r[key] is not None for r in rows), key
    assert np.mean([r["mse"] for r in rows]) == pytest.approx(metrics["mse"])
    # the sampled decode is another rollout than the default one
    assert metrics["mse_sample"] != metrics["mse"]
    if ds == "gameplay":  # flow: K = 4 beside the posterior mean at the model's own K; the sweep K = 1 .. k_max
        assert list(metrics["sweep"]) == ["1", "2", "4"]
        assert metrics["speedup_4_vs_kmax"] == pytest.approx(
            metrics["sweep"]["4"]["seconds_per_frame"] / metrics["sweep"]["4"]["seconds_per_frame"])
        assert metrics["psnr_drop_4_vs_kmax"] == pytest.approx(0.0)  # k_max is 4 here
    else:  # masked: both decodes, named
        assert metrics["mse_expected"] == metrics["mse"] and metrics["mse_maskgit"] == metrics["mse_sample"]
        assert "sweep" not in metrics
    # the media
    index = json.loads((reports / "media.json").read_text())
    assert len(index["rollouts"]) == 2 and len(index["imagined"]) == 2 and index["contact_sheet"]
    names = [n for r in index["rollouts"] for n in r] + [index["contact_sheet"], *index["imagined"],
                                                          *index["plots"].values()]
    assert sorted(names) == sorted(p.name for p in reports.iterdir() if p.name != "media.json")
    assert {"mse", "sharpness", "action_fidelity", "delta_psnr"} <= set(index["plots"])


@pytest.mark.parametrize("ds", list(KINDS))
def test_baselines_are_measured_on_the_test_frames(ds, worlds, evaluated):
    """Copy-last and the mean training frame, recomputed by hand on the test windows."""
    metrics, rows, _ = evaluated[ds]
    cfg = eval_config(ds)
    tok = read_meta(worlds[ds]["tokenizer"], "tokenizer")
    frames = EpisodeStore.open(worlds[ds]["frames"])
    val, test = split_held_out(np.array(tok["val_episodes"]), cfg.test_fraction, cfg.split_seed, "t")
    win, _ = eval_windows(EpisodeStore.open(worlds[ds]["latents"]), test, cfg.length, cfg.stride, cfg.max_windows)
    truth = np.stack([frames.array(FRAMES_KEY)[a:b] for a, b in win]).astype(np.float64) / 255
    c = cfg.context_frames
    target = truth[:, c:]
    copy = np.repeat(truth[:, c - 1 : c], cfg.horizon, axis=1)
    assert metrics["mse_copy_last"] == pytest.approx(float(((copy - target) ** 2).mean()), rel=1e-6)
    per_h = ((copy - target) ** 2).reshape(*target.shape[:2], -1).mean(-1).mean(0)
    assert [r["mse_copy_last"] for r in rows] == pytest.approx(per_h.tolist(), rel=1e-6)
    train_ids = np.setdiff1d(np.arange(EPISODES), tok["val_episodes"])
    mean = mean_frame(frames, train_ids).astype(np.float64)
    assert metrics["mse_mean_frame"] == pytest.approx(float(((mean - target) ** 2).mean()), rel=1e-6)
    # the validation episode gives other figures
    assert metrics["val"]["mse_copy_last"] != metrics["mse_copy_last"]


@pytest.mark.parametrize("ds", list(KINDS))
def test_prior_only_is_the_network_before_training(ds, worlds, evaluated):
    metrics, _, _ = evaluated[ds]
    world = World.load(worlds[ds]["dynamics"], worlds[ds]["tokenizer"])
    prior = untrained_copy(world, world.meta["init_seed"])
    again = untrained_copy(world, world.meta["init_seed"])
    trained, before = world.dynamics.state_dict(), prior.dynamics.state_dict()
    assert trained.keys() == before.keys()
    assert any(not torch.equal(trained[k], before[k]) for k in trained)             # training moved the weights
    assert all(torch.equal(before[k], again.dynamics.state_dict()[k]) for k in before)  # the same start, always
    assert metrics["mse_prior_only"] != metrics["mse"]


def test_evaluation_is_reproducible(worlds, evaluated, tmp_path):
    """Same models, same params: the same figures (timings aside) and the same media bytes."""
    metrics, rows, reports = evaluated["gameplay"]
    again, again_rows = stage.run(eval_config("gameplay"), "gameplay", worlds["gameplay"], tmp_path / "r",
                                  where="evaluate.gameplay", extractor_cfg=KINDS["gameplay"][3])
    assert again_rows == rows
    timing = set(stage.RUN_FACTS) | {"sweep"}
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in metrics.items() if k not in timing}
    for f in sorted(reports.iterdir()):
        assert (tmp_path / "r" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("ds,over,message", [
    ("mnist", {"horizon": 7}, r"evaluate\.mnist: context_frames \+ horizon \(2 \+ 7\) exceed the masked world "
                              r"model's 8 temporal positions"),
    ("mnist", {"sweep": {"horizon": 2}}, r"evaluate\.mnist\.sweep: the masked family has no sampling-steps sweep"),
    ("gameplay", {"context_frames": 6, "horizon": 8}, r"evaluate\.gameplay: .*no window of 14 frames"),
    ("gameplay", {"context_frames": 1}, r"evaluate\.gameplay\.context_frames \(1\) is shorter than the policy's "
                                        r"state_frames \(2\)"),
])
def test_evaluation_that_cannot_run_is_refused_before_any_work(ds, over, message, worlds, tmp_path):
    with pytest.raises(ParamsError, match=message):
        stage.run(eval_config(ds, **over), ds, worlds[ds], tmp_path / "r", where=f"evaluate.{ds}",
                  extractor_cfg=KINDS[ds][3])
    assert not (tmp_path / "r").exists()


def test_models_trained_on_other_held_out_episodes_are_refused(worlds, tmp_path):
    import shutil

    paths = dict(worlds["mnist"])
    moved = tmp_path / "dynamics"
    shutil.copytree(paths["dynamics"], moved)
    meta_path = moved / "dynamics.json"
    meta = json.loads(meta_path.read_text())
    meta["val_episodes"] = [0, 1]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"trained with other held-out episodes .* rerun the dynamics stage"):
        stage.run(eval_config("mnist"), "mnist", {**paths, "dynamics": moved}, tmp_path / "r", where="evaluate.mnist",
                  extractor_cfg=KINDS["mnist"][3])


def test_reports_dir_is_replaced_as_a_whole(worlds, tmp_path):
    """A stale file from an earlier run (say more windows) does not survive a rerun."""
    out = tmp_path / "r"
    out.mkdir()
    (out / "rollout_07.gif").write_bytes(b"old")
    stage.run(eval_config("mnist"), "mnist", worlds["mnist"], out, where="evaluate.mnist",
              extractor_cfg=KINDS["mnist"][3])
    assert not (out / "rollout_07.gif").exists() and (out / "media.json").exists()

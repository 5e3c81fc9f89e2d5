"""Stage ``evaluate`` (foreach dataset): the world model and the policy, rolled out and scored honestly.

Reads the tokenizer, the dynamics model, the policy and the held-out episodes (the tokenizer's
``val_episodes``, which no model has trained on). Those episodes are split once more, seeded
(``evaluate.<ds>.test_fraction``): **validation** episodes, for choosing designs and settings, and
**test** episodes, which every reported figure comes from. Windows of ``context_frames + horizon``
frames of both are rolled out and scored per horizon (``pipeline/rollouts.py``):

- the world model's default decode and its sampled decode (flow: the posterior mean at its own K and
  ``sample_steps`` shortcut steps; masked: ``expected`` and ``maskgit``), against copy-last (of the
  true frame and of its tokenizer reconstruction), the mean training frame, the tokenizer's ceiling,
  the prior alone (the same model with its network untrained), and the model under deranged actions
  (Genie's ΔPSNR and the interventional action control);
- MSE, PSNR (per-frame mean capped at ``psnr_cap``, and the PSNR of the mean MSE), OpenSTL's
  per-frame-sum MSE, SSIM, sharpness, action fidelity by the actions stage's own extractor;
  LPIPS is "n/a" with its reason where it cannot run;
- flow: the sampling-steps sweep (K = 1 .. k_max) on the test windows, with its time per frame;
- imagination speed of one stream (batch 1, the model's own K, cache on), with and without decoding;
- the policy (``pipeline/policy.py``): NLL and first-action accuracy beside the marginal, repeating the
  last action and the MLP; its imagination inside the world model, its chosen actions recovered by
  the extractor, and the same states under deranged actions (the interventional control).

Headline figures carry per-episode bootstrap 95 % intervals (``<key>_ci_low``, ``<key>_ci_high``);
the validation split's figures are under ``val``.

Outputs: ``metrics/evaluate-<ds>.json``, ``plots/evaluate-<ds>.json`` (one row per horizon, the
test split) and ``reports/<ds>/``: side-by-side videos of test windows (GIF, and MP4 where smaller),
a contact sheet, per-horizon plots, the policy's imagined episodes, and ``media.json`` listing them.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import media
from pipeline.atomic import atomic_path, dumps_json, write_json
from pipeline.cli import run_stage
from pipeline.config import ParamsError, StrictModel, load_section
from pipeline.ego import GameplayActionsConfig, MnistActionsConfig, resolve_tile_px
from pipeline.evaluation import episode_resamples, held_out_split, interval, mean_frame, resampled_sums, split_held_out
from pipeline.image_metrics import NA, lpips_or_reason
from pipeline.paths import (
    DATASETS,
    actions_store,
    dynamics_dir,
    frames_store,
    latents_store,
    metrics_path,
    policy_dir,
    tokenizer_dir,
)
from pipeline.imagination import check_imagination, gameplay_extractor, imagine, mnist_extractor
from pipeline.policy import Policy, held_out_pairs, policy_items, repeat_last_probs, train_action_ids
from pipeline.rollouts import (
    Config,
    aliases,
    eval_windows,
    imagination_speed,
    load_windows,
    score_windows,
    step_sweep,
    summarize,
    untrained_copy,
)
from pipeline.store import EpisodeStore
from pipeline.tracking import stage_run
from pipeline.train import resolve_device
from pipeline.world import World

log = logging.getLogger(__name__)

# facts of one run (timings), beside the measured figures
RUN_FACTS = ("eval_seconds", "rollout_seconds_per_frame", "imagine_fps", "imagine_fps_decoded", "speedup_4_vs_kmax")
# the validation split's figures (for choosing), under "val"
VAL_KEYS = ("mse", "psnr", "ssim", "sharpness", "mse_sample", "sharpness_sample", "mse_copy_last", "mse_mean_frame",
            "mse_prior_only", "mse_shuffled_actions", "delta_psnr", "world_action_fidelity", "windows", "episodes")
# the policy's per-pair scores by metric name
POLICY_NAMES = {"first_correct": "first_action_acc", "exact_match": "seq_exact_match", "sample_correct": "sample_action_acc"}
POLICY_HEADLINE = ("nll", "nll_marginal", "nll_repeat_last", "nll_mlp", "first_action_acc", "first_action_acc_marginal",
                   "first_action_acc_repeat_last", "first_action_acc_mlp")


def _policy_name(key: str) -> str:
    for a, b in POLICY_NAMES.items():
        if key.startswith(a):
            return b + key[len(a):]
    return key


def mean_with_interval(values: np.ndarray, episode: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """Mean of per-item ``values`` (N, ...) (NaN: not measured) and its per-episode bootstrap 95 % interval."""
    v = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    counts, index = episode_resamples(episode, n_boot, seed)
    sums, ns = resampled_sums(v, index, counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        lo, hi = interval(sums.sum(-1) / ns.sum(-1))
        return float(np.nanmean(v)), float(lo), float(hi)


def policy_metrics(items: dict[str, np.ndarray], test: np.ndarray, n_boot: int, seed: int) -> tuple[dict, dict]:
    """(test metrics with intervals, validation metrics) of the per-pair policy scores."""
    episode = items["episode"]
    out, val = {}, {}
    for key, v in items.items():
        if key == "episode":
            continue
        name = _policy_name(key)
        with np.errstate(invalid="ignore"):
            val[name] = float(np.nanmean(v[~test])) if (~test).any() else None
        if name in POLICY_HEADLINE:
            m, lo, hi = mean_with_interval(v[test], episode[test], n_boot, seed)
            out[name], out[f"{name}_ci_low"], out[f"{name}_ci_high"] = m, lo, hi
        else:
            out[name] = float(np.nanmean(v[test]))
    out["nll_gain_vs_marginal"] = out["nll_marginal"] - out["nll"]
    out["nll_gain_vs_repeat_last"] = out["nll_repeat_last"] - out["nll"]
    out["nll_gain_vs_mlp"] = out["nll_mlp"] - out["nll"]
    out["policy_pairs"] = int(test.sum())
    return out, val


def imagination_metrics(im: dict, n_boot: int, seed: int) -> dict:
    """Action fidelity of the policy's imagination: its chosen actions recovered from the imagined
    frames (``action_fidelity``, also on moves only and on the first action), the same states rolled
    out under deranged actions and those recovered (``action_fidelity_deranged``: the
    interventional control), and the recovered actions against another sequence's choices
    (``action_fidelity_shuffled``: the chance level of a world model that ignores its actions)."""
    chosen, rec, der, rec_der = (im[k] for k in ("chosen", "recovered", "deranged", "recovered_deranged"))
    ep = im["episode"]
    hits = {
        "action_fidelity": (chosen == rec).astype(float),
        "action_fidelity_moves": np.where(chosen != 0, (chosen == rec).astype(float), np.nan),
        "action_fidelity_deranged": (der == rec_der).astype(float),
        "action_fidelity_deranged_moves": np.where(der != 0, (der == rec_der).astype(float), np.nan),
        "action_fidelity_shuffled": (der == rec).astype(float),
    }
    out = {}
    for name, v in hits.items():
        m, lo, hi = mean_with_interval(v, ep, n_boot, seed)
        out[name], out[f"{name}_ci_low"], out[f"{name}_ci_high"] = m, lo, hi
    out["action_fidelity_first"] = float((chosen[:, 0] == rec[:, 0]).mean())
    out["action_fidelity_gap"] = out["action_fidelity_deranged"] - out["action_fidelity_shuffled"]
    out["imagined_sequences"] = int(len(chosen))
    n_actions = int(max(chosen.max(), rec.max(), rec_der.max())) + 1
    out["imagined_action_counts"] = np.bincount(chosen.reshape(-1), minlength=n_actions).tolist()
    out["recovered_action_counts"] = np.bincount(rec.reshape(-1), minlength=n_actions).tolist()
    return out


# -- pictures ------------------------------------------------------------------------------------

PLOTS = {  # file: (y keys, y label, log scale)
    "mse": (["mse", "mse_sample", "mse_copy_last", "mse_copy_last_recon", "mse_mean_frame", "mse_prior_only",
             "mse_shuffled_actions", "mse_tokenizer"], "MSE per pixel", True),
    "psnr": (["psnr", "psnr_sample", "psnr_copy_last", "psnr_copy_last_recon", "psnr_mean_frame", "psnr_prior_only",
              "psnr_shuffled_actions", "psnr_tokenizer"], "PSNR (dB, per-frame mean, capped)", False),
    "ssim": (["ssim", "ssim_sample", "ssim_copy_last", "ssim_mean_frame", "ssim_prior_only", "ssim_shuffled_actions",
              "ssim_tokenizer"], "SSIM", False),
    "sharpness": (["sharpness", "sharpness_sample", "sharpness_prior_only", "sharpness_tokenizer"],
                  "sharpness (predicted / true squared gradient)", False),
    "action_fidelity": (["action_fidelity", "action_fidelity_deranged", "action_fidelity_truth",
                         "action_fidelity_prior_only"], "action fidelity (extractor)", False),
    "delta_psnr": (["delta_psnr"], "ΔPSNR true vs deranged actions (dB)", False),
}


def decode_labels(world: World, cfg: Config, al: dict[str, str]) -> dict[str, str]:
    """Row labels of the model's decodes in pictures."""
    if world.family == "flow":
        own = world.meta["sample"]["steps"]
        out = {"model": f"model K={own}"}
        if al["sample"] == "sample":
            out["sample"] = f"model K={cfg.sample_steps}"
        return out
    own = world.meta["sample"].get("decode", "maskgit")
    other = "expected" if own == "maskgit" else "maskgit"
    return {"model": f"model {own}", other: f"model {other}"}


def write_media(out_dir: Path, cfg: Config, kept: dict[str, np.ndarray], labels: dict[str, str], plot_rows: list[dict],
                clips: np.ndarray, title: str) -> dict:
    """Side-by-side videos, the contact sheet, per-horizon plots and imagined episodes into
    ``out_dir`` (replaced as a whole); returns the index written as ``media.json``."""
    c, m = cfg.context_frames, cfg.media
    index: dict = {"rollouts": [], "contact_sheet": None, "plots": {}, "imagined": []}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        context = kept.get("context")
        n = 0 if context is None else len(context)
        for i in range(n):
            def seq(x):
                return np.concatenate([context[i], x[i]])
            rows = [("truth", seq(kept["truth"]))]
            rows += [(label, seq(kept[name])) for name, label in labels.items()]
            rows.append(("copy-last", seq(kept["copy_last"])))
            rows.append(("|error| model", seq(np.abs(kept["model"] - kept["truth"]))))
            frames = media.side_by_side(rows, c, m.scale, title=f"{title}: test window {i + 1}")
            paths = media.write_animation(frames, tmp / f"rollout_{i:02d}", m.fps)
            index["rollouts"].append([p.name for p in paths])
        if n:
            sheet_rows = []
            for i in range(n):
                sheet_rows.append((f"truth {i + 1}", np.concatenate([context[i], kept["truth"][i]])))
                sheet_rows += [(f"{label} {i + 1}", np.concatenate([context[i], kept[name][i]]))
                               for name, label in labels.items()]
                sheet_rows.append((f"copy-last {i + 1}", np.concatenate([context[i], kept["copy_last"][i]])))
            sheet = media.contact_sheet(sheet_rows, c, m.contact_horizons, scale=max(1, m.scale - 1))
            index["contact_sheet"] = media.write_png(sheet, tmp / "contact_sheet.png").name
        for name, (keys, ylabel, log_y) in PLOTS.items():
            path = media.horizon_plot(plot_rows, keys, tmp / f"{name}.png", f"{title}: {name} per horizon (test)",
                                      ylabel, log_y=log_y)
            index["plots"][name] = path.name
        for i, clip in enumerate(clips[: m.imagined]):
            path = media.write_gif(media.imagined_frames(clip, c, m.scale), tmp / f"imagined_{i:02d}.gif", m.fps)
            index["imagined"].append(path.name)
        (tmp / "media.json").write_text(dumps_json(index))
    return index


# -- the stage -----------------------------------------------------------------------------------


def run(cfg: Config, item: str, paths: dict[str, Path], reports_dir: Path | str, *, where: str = "evaluate",
        extractor_cfg: StrictModel | None = None, tracker=None) -> tuple[dict, list[dict]]:
    """Evaluate the world model and policy of ``paths`` (``latents``, ``actions``, ``frames``,
    ``tokenizer``, ``dynamics``, ``policy``); write the media to ``reports_dir``. Returns (metrics,
    per-horizon rows of the test split)."""
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    world = World.load(paths["dynamics"], paths["tokenizer"], device)
    policy = Policy.load(paths["policy"], device)
    lat, act, frames = (EpisodeStore.open(paths[k]) for k in ("latents", "actions", "frames"))
    for other in (act, frames):
        if not np.array_equal(other.episode_ends, lat.episode_ends):
            raise ValueError(f"{other.path}: episodes differ from {lat.path}; rerun the stages that write them")
    train_ids, held = held_out_split(lat.n_episodes, world.tok_meta["val_episodes"], str(paths["tokenizer"]))
    for name, meta in (("dynamics", world.meta), ("policy", policy.meta)):
        if sorted(meta.get("val_episodes", [])) != held.tolist():
            raise ValueError(f"{paths[name]}: trained with other held-out episodes than {paths['tokenizer']}; "
                             f"rerun the {name} stage")
    c, h = cfg.context_frames, cfg.horizon
    if world.family == "masked" and c + h > int(world.dynamics.cfg.max_frames):
        raise ParamsError(f"{where}: context_frames + horizon ({c} + {h}) exceed the masked world model's "
                          f"{world.dynamics.cfg.max_frames} temporal positions (dynamics max_frames); shorten them "
                          f"or retrain the dynamics model with a larger max_frames")
    if world.family != "flow" and cfg.sweep is not None:
        raise ParamsError(f"{where}.sweep: the {world.family} family has no sampling-steps sweep; set it to null")
    check_imagination(policy, world, c, where)
    try:
        val_ids, test_ids = split_held_out(held, cfg.test_fraction, cfg.split_seed, str(paths["tokenizer"]))
        rows_v, ep_v = eval_windows(lat, val_ids, cfg.length, cfg.stride, cfg.max_windows)
        rows_t, ep_t = eval_windows(lat, test_ids, cfg.length, cfg.stride, cfg.max_windows)
    except ValueError as exc:
        raise ParamsError(f"{where}: {exc} (context_frames + horizon = {cfg.length})") from None
    rows = np.concatenate([rows_v, rows_t])
    episode = np.concatenate([ep_v, ep_t])
    test = np.concatenate([np.zeros(len(rows_v), bool), np.ones(len(rows_t), bool)])
    log.info("%s: %s world model; %d validation windows (%d episodes), %d test windows (%d episodes) of %d + %d frames",
             where, world.family, len(rows_v), len(val_ids), len(rows_t), len(test_ids), c, h)

    if item == "gameplay":
        try:
            extractor = gameplay_extractor(resolve_tile_px(extractor_cfg or GameplayActionsConfig(), frames.attrs,
                                                           "actions.gameplay", str(frames.path)))
        except ValueError as exc:
            raise ParamsError(str(exc)) from None
    else:
        extractor = mnist_extractor(extractor_cfg or MnistActionsConfig(), frames, policy.coder,
                                    int(frames.attrs.get("digit_size", 28)))

    def label(actions, classes):
        return np.asarray(policy.coder.ids(actions, classes))

    seqs = load_windows(rows, lat, act, frames)
    prior = untrained_copy(world, int(world.meta.get("init_seed", 0)))
    test_pos = np.flatnonzero(test)
    keep = np.unique(test_pos[np.linspace(0, len(test_pos) - 1, min(cfg.media.windows, len(test_pos))).round()
                              .astype(int)]) if cfg.media.windows else np.zeros(0, int)
    lpips_fn, lpips_reason = lpips_or_reason(cfg.lpips_net, device)
    scores, kept, facts = score_windows(world, prior, seqs, cfg, mean_frame(frames, train_ids), extractor, label,
                                        rows, keep, lpips_fn)
    al = aliases(world, cfg)
    metrics, plot_rows = summarize(scores, test, episode, al, cfg.bootstrap, cfg.seed)
    val_metrics, _ = summarize(scores, ~test, episode, al, cfg.bootstrap, cfg.seed, intervals=False)
    metrics["test_windows"], metrics["test_episodes"] = metrics.pop("windows"), metrics.pop("episodes")
    metrics.update(family=world.family, context_frames=c, horizon=h,
                   rollout_seconds_per_frame=facts["rollout_seconds_per_frame"])
    if "lpips" not in metrics:
        metrics["lpips"], metrics["lpips_reason"] = NA, lpips_reason
    if cfg.sweep is not None:
        sub = {k: v[test] for k, v in seqs.items()}
        sweep = step_sweep(world, sub, cfg)
        metrics["sweep"] = sweep
        k4, kmax = sweep.get("4"), sweep.get(str(world.dynamics.cfg.k_max))
        if k4 and kmax:
            metrics["speedup_4_vs_kmax"] = kmax["seconds_per_frame"] / max(k4["seconds_per_frame"], 1e-12)
            metrics["psnr_drop_4_vs_kmax"] = kmax["psnr"] - k4["psnr"]
    metrics.update(imagination_speed(world, {k: v[test] for k, v in seqs.items()}, cfg))

    # the policy
    pairs = held_out_pairs(policy, lat, act, held, cfg.policy.max_windows)
    items = policy_items(policy, pairs, cfg.policy, train_action_ids(act, train_ids, policy.coder),
                         repeat_last_probs(act, train_ids, policy))
    pol, pol_val = policy_metrics(items, np.isin(items["episode"], test_ids), cfg.bootstrap, cfg.seed)
    metrics.update(pol)
    im = imagine(policy, world, lat, act, test_ids, c, cfg.policy, extractor, cfg.seed)
    metrics.update(imagination_metrics(im, cfg.bootstrap, cfg.seed))
    metrics["val"] = {**{k: val_metrics.get(k) for k in VAL_KEYS},
                      **{k: pol_val.get(k) for k in ("nll", "first_action_acc", "first_action_acc_repeat_last")}}

    index = write_media(Path(reports_dir), cfg, kept, decode_labels(world, cfg, al), plot_rows, im["clips"], item)
    metrics["eval_seconds"] = time.perf_counter() - t_start
    log.info("%s: test mse %.5f [%.5f, %.5f] (copy-last %.5f, mean frame %.5f, prior only %.5f, deranged actions "
             "%.5f); sharpness %.2f; sampled mse %.5f sharpness %.2f; policy first-action acc %.3f (repeat-last %.3f), "
             "action fidelity %.3f (deranged %.3f)", where, metrics["mse"], metrics["mse_ci_low"],
             metrics["mse_ci_high"], metrics["mse_copy_last"], metrics["mse_mean_frame"], metrics["mse_prior_only"],
             metrics["mse_shuffled_actions"], metrics["sharpness"], metrics["mse_sample"], metrics["sharpness_sample"],
             metrics["first_action_acc"], metrics["first_action_acc_repeat_last"], metrics["action_fidelity"],
             metrics["action_fidelity_deranged"])
    if tracker is not None:
        for row in plot_rows:
            tracker.log_metrics({f"horizon/{k}": v for k, v in row.items() if k != "horizon" and v is not None},
                                step=row["horizon"])
        tracker.log_artifact(Path(reports_dir), f"reports/{item}")
    log.info("%s: wrote %d side-by-side videos, %d plots, %d imagined episodes to %s", where, len(index["rollouts"]),
             len(index["plots"]), len(index["imagined"]), reports_dir)
    return metrics, plot_rows


def main(item: str) -> None:
    cfg = load_section("evaluate", Config, item=item)
    extractor_cfg = load_section("actions", GameplayActionsConfig if item == "gameplay" else MnistActionsConfig,
                                 item=item)
    paths = {"latents": latents_store(item), "actions": actions_store(item), "frames": frames_store(item),
             "tokenizer": tokenizer_dir(item), "dynamics": dynamics_dir(item), "policy": policy_dir(item)}
    torch.manual_seed(cfg.seed)
    with stage_run("evaluate", item, cfg) as r:
        metrics, rows = run(cfg, item, paths, Path("reports") / item, where=f"evaluate.{item}",
                            extractor_cfg=extractor_cfg, tracker=r)
        write_json(metrics_path("evaluate", item), metrics)
        write_json(Path("plots") / f"evaluate-{item}.json", rows)
        r.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, (list, str))})


if __name__ == "__main__":
    run_stage(main, foreach=DATASETS)

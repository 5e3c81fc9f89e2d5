"""Dynamics: shortcut rollouts, the key/value cache, training throughput (and a GPU profile).

The ``shortcut`` and ``cache`` sections (and the ``gpu`` section's imagined frames) roll out the
evaluate stage's **test windows**, the frames its headline figures come from, built as
``stages/evaluate.py`` builds them, through the same library calls: the tokenizer's held-out
episodes (``pipeline.evaluation.held_out_split``) split by ``test_fraction`` / ``split_seed``
(``split_held_out``: the test part), windows of ``context_frames + horizon`` frames ``stride``
apart, at most ``max_windows`` evenly picked (``pipeline.rollouts.eval_windows``), read by
``pipeline.rollouts.load_windows``. Their params are ``evaluate.<item>`` of params.yaml
(``pipeline.rollouts.Config``: context, horizon, batch size, seed, ``psnr_cap``, ``sweep``,
``device``); the world model is ``World.load`` of ``<data-root>/<item>/dynamics`` and its tokenizer.

Four sections, in one run (``--sections``, default all), per dataset (``--item``, default both;
the family is the trained model's, else ``dynamics.<item>.family`` of params.yaml):

- ``shortcut`` (flow models; a masked model records why it is skipped): the trained model rolls
  out every test window over its first ``sweep.horizon`` predicted frames (the stage's
  sampling-steps sweep; the whole horizon where ``sweep`` is null) through
  ``pipeline.rollouts.timed_rollouts`` at K = 4 and K = k_max Euler steps per frame, in
  ``--rounds`` rounds interleaved over K: seconds per generated frame (the rollout only, decoding
  not timed; median of the rounds) and PSNR of the decoded frames against the true frames
  (``pipeline.rollouts.frame_scores``, per frame capped at ``psnr_cap``, the mean; the rollouts
  are seeded, so the first round's). ``speedup_4_vs_<k_max>`` (goal >= 10) and
  ``psnr_drop_4_vs_<k_max>`` (goal <= 0.5 dB). Needs the trained model: the benchmark never
  trains one, and exits with 2 when it is missing.
- ``cache`` (either family, every item whose trained model exists): ``World.rollout`` of one
  batch (the first ``batch_size`` test windows, ``context_frames`` given, ``min(horizon,
  --cache-horizon)`` predicted: the uncached rollout is slow on a CPU) with the key/value cache
  against without, the same generator seeded with ``seed``; seconds per frame, their ratio, and
  whether the outputs agree (flow: allclose at atol 1e-4, masked: equal token ids) with the
  largest difference.
- ``train`` (either family; data only, no trained model needed): latent tokens/s (frames x patch
  tokens per frame) of the stage's own path, ``pipeline.train.train`` driving
  ``pipeline.dynamics.loss_function`` over ``pipeline.dynamics.alternating_batches`` of the real
  ``WindowDataset`` (``loader`` params), against a bare loop: forward + loss + backward + AdamW
  step of the same model (same seed) on the same batches held on the device (same shapes, the
  same long/short alternation, the same loss function and teacher). The stage path also does what
  its loop does per step (reading windows, lr schedule, gradient clipping, EMA update, the
  finite-loss check); its ratio shows their cost. ``--warmup`` steps, then ``--steps`` timed;
  medians over ``--rounds`` interleaved rounds; the default params' sizes. For flow also the
  model FLOPs per step (``FlowDynamics.flops_per_frame``: forward + backward, nanoGPT style; the
  teacher's no-grad half steps of the bootstrap rows are not counted) and the achieved FLOP/s.
- ``gpu`` (only where ``torch.cuda.is_available()``): the GPU profile of ``scripts/gpu_profile.sh``
  (dynamics: patch 1, dim 384, depth 6, heads 6, batch 32): the ``train``
  measurement on CUDA (bf16 autocast, as ``pipeline.train``), the flow model's FLOPs utilisation
  against the card's dense bf16 peak, and imagined frames per second at 64x64 (``World.rollout``
  with the cache at the default ``sample_steps``, plus decoding through the tokenizer, of
  ``--gpu-batch`` sequences; the untrained GPU-profile model: its speed does not depend on its
  weights; the test windows, ``context_frames`` -> ``horizon``, of ``evaluate.<item>``). Without
  CUDA: ``"gpu": "not available on this machine"``.

Every timed region also gives the process tree's CPU time (user + system, DataLoader workers
included) per wall second; the load average is recorded before and after: this machine is shared.

Run from the repository root::

    .venv/bin/python -m bench.bench_dynamics [--item gameplay|mnist] [--rounds 3] [--steps 20]
        [--warmup 3] [--sections shortcut,cache,train,gpu] [--data-root data] [--threads 0]
        [--cache-horizon 16]

On a 2-core machine shared with other jobs, torch's default of 2 intra-op threads can make the
small ops of these models many times slower (each parallel op waits for a thread that another job
holds off the core); ``--threads 1`` shows it, the JSON records the setting.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the training loop's progress bar: not wanted here

import numpy as np
import torch

from bench.common import report, tree_cpu_seconds
from pipeline.checkpoint import load_model, read_meta
from pipeline.config import load_section
from pipeline.evaluation import held_out_split, split_held_out
from pipeline.paths import (
    ACTION_CLASS_KEY,
    ACTIONS_KEY,
    DATA,
    DATASETS,
    FRAMES_KEY,
    LATENTS_KEY,
    VALID_KEY,
    actions_store,
    dynamics_dir,
    frames_store,
    latents_store,
    tokenizer_dir,
)
from pipeline import dynamics as dyn
from pipeline import rollouts
from pipeline.reader import LoaderConfig, WindowDataset
from pipeline.store import EpisodeStore
from pipeline.train import resolve_device, train, use_bf16
from pipeline.world import World, latent_norm

SECTIONS = ("shortcut", "cache", "train", "gpu")
SPEEDUP_GOAL = 10.0
PSNR_DROP_GOAL = 0.5
FLOW_ATOL = 1e-4
# the GPU profile of scripts/gpu_profile.sh (the seed notes' sizes)
GPU_PROFILE = {"patch": 1, "dim": 384, "depth": 6, "heads": 6}
GPU_BATCH_SIZE = 32
# dense bf16 peak FLOP/s by device name (most specific first); others: no MFU, FLOP/s only
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12),
             ("A100", 312e12))


# -- helpers -------------------------------------------------------------------------------------


class Clock:
    """Wall and process-tree CPU seconds of a region (CUDA synchronised at both ends)."""

    def __init__(self, device: torch.device):
        self.device = device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> "Clock":
        self._sync()
        self.w0, self.c0 = time.perf_counter(), tree_cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.wall, self.cpu = time.perf_counter() - self.w0, tree_cpu_seconds() - self.c0


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def rnd(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def paths_for(root: Path, item: str) -> dict[str, Path]:
    """The stage's inputs and output of ``item`` under ``root`` (the repository's ``data/`` layout)."""

    def under(p: Path) -> Path:
        return root / p.relative_to(DATA)

    return {"latents": under(latents_store(item)), "actions": under(actions_store(item)),
            "frames": under(frames_store(item)), "tokenizer": under(tokenizer_dir(item)),
            "dynamics": under(dynamics_dir(item))}


def has_model(paths: dict[str, Path]) -> bool:
    return (paths["dynamics"] / "dynamics.json").exists()


def family_of(cfg: dyn.Config, paths: dict[str, Path]) -> str:
    """The trained model's family when there is one, else the params'."""
    return read_meta(paths["dynamics"], "dynamics")["kind"] if has_model(paths) else cfg.family


def stores(paths: dict[str, Path]) -> tuple[EpisodeStore, EpisodeStore, EpisodeStore]:
    return (EpisodeStore.open(paths["latents"]), EpisodeStore.open(paths["actions"]),
            EpisodeStore.open(paths["frames"]))


def test_windows(ecfg: rollouts.Config, tok_meta: dict, paths: dict[str, Path],
                 dyn_meta: dict | None = None) -> dict[str, np.ndarray]:
    """The evaluate stage's test windows (as ``stages/evaluate.run`` builds them): the tokenizer's
    held-out episodes, their test part (``split_held_out``), windows of ``context_frames +
    horizon`` frames (``eval_windows``), read by ``load_windows``. With ``dyn_meta`` (a trained
    model's) its held-out episodes must be the tokenizer's, as the stage checks."""
    lat, act, frames = stores(paths)
    where = str(paths["tokenizer"])
    _, held = held_out_split(lat.n_episodes, tok_meta["val_episodes"], where)
    if dyn_meta is not None and sorted(dyn_meta.get("val_episodes", [])) != held.tolist():
        fail(f"{paths['dynamics']}: trained with other held-out episodes than {where}; rerun the dynamics stage")
    _, test_ids = split_held_out(held, ecfg.test_fraction, ecfg.split_seed, where)
    rows, _ = rollouts.eval_windows(lat, test_ids, ecfg.length, ecfg.stride, ecfg.max_windows)
    return rollouts.load_windows(rows, lat, act, frames)


def batch_inputs(world: World, seqs: dict[str, np.ndarray], c: int, idx: np.ndarray
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Context latents (model layout) and per-transition actions/valid of sequences ``idx``."""
    classes = seqs.get(ACTION_CLASS_KEY)
    acts, valid = world.actions(seqs[ACTIONS_KEY][idx], None if classes is None else classes[idx],
                                seqs[VALID_KEY][idx])
    return world.latents(seqs[LATENTS_KEY][idx, :c]), acts, valid


def warm_up(world: World, seqs: dict[str, np.ndarray], c: int, n: int, steps: int | None = None) -> None:
    """One untimed one-frame rollout of the first ``n`` windows, with the cache and without: the
    first call's one-off costs (allocations, thread start-up) fall on no timed region (they made
    the first timed rollout of a run up to 10x slower)."""
    context, acts, valid = batch_inputs(world, seqs, c, np.arange(min(n, len(seqs[LATENTS_KEY]))))
    for cache in (True, False):
        gen = torch.Generator(device=world.device).manual_seed(0)
        world.rollout(context, acts, valid, 1, steps=steps, generator=gen, cache=cache)


def tokens_per_frame(model: torch.nn.Module) -> int:
    cfg = model.cfg
    return int(cfg.tokens_per_frame if hasattr(cfg, "tokens_per_frame") else cfg.patches)


# -- 1. shortcut: K = 4 against K = k_max ------------------------------------------------------


def shortcut_horizon(ecfg: rollouts.Config) -> int:
    """The predicted frames the shortcut section scores: the stage's sweep's, else the horizon."""
    return ecfg.sweep.horizon if ecfg.sweep is not None else ecfg.horizon


def bench_shortcut(world: World, ecfg: rollouts.Config, seqs: dict[str, np.ndarray], rounds: int) -> dict:
    k_max = int(world.dynamics.cfg.k_max)
    ks = sorted({min(4, k_max), k_max})
    c, h = ecfg.context_frames, shortcut_horizon(ecfg)
    n = len(seqs[LATENTS_KEY])
    target = seqs[FRAMES_KEY][:, c : c + h].astype(np.float32) / 255
    secs: dict[int, list[float]] = {k: [] for k in ks}
    cpu: dict[int, list[float]] = {k: [] for k in ks}
    psnr: dict[int, float] = {}
    warm_up(world, seqs, c, ecfg.batch_size, steps=ks[0])
    for r in range(rounds):
        for k in ks if r % 2 == 0 else ks[::-1]:
            with Clock(world.device) as clock:
                pred, sec = rollouts.timed_rollouts(world, seqs, ecfg, k, h, decode=k not in psnr)
            secs[k].append(sec)
            cpu[k].append(clock.cpu / clock.wall)
            if pred is not None:  # the generator is seeded: the same frames every round
                psnr[k] = float(rollouts.frame_scores(pred, target, ecfg.psnr_cap)["psnr"].mean())
    lo, hi = ks[0], ks[-1]
    speedup = median(secs[hi]) / median(secs[lo])
    drop = psnr[hi] - psnr[lo]
    return {
        "sequences": n, "context_frames": c, "horizon": h, "k_max": k_max, "batch_size": ecfg.batch_size,
        "psnr_cap": ecfg.psnr_cap,
        "seconds_per_frame": {str(k): rnd(median(v)) for k, v in secs.items()},
        "seconds_per_frame_rounds": {str(k): [rnd(s) for s in v] for k, v in secs.items()},
        "cpu_per_wall": {str(k): rnd(median(v), 3) for k, v in cpu.items()},
        "psnr": {str(k): rnd(v, 5) for k, v in psnr.items()},
        f"speedup_{lo}_vs_{hi}": rnd(speedup),
        f"psnr_drop_{lo}_vs_{hi}": rnd(drop),
        "goal": {"speedup": SPEEDUP_GOAL, "psnr_drop_db": PSNR_DROP_GOAL},
        "ok": bool(speedup >= SPEEDUP_GOAL and drop <= PSNR_DROP_GOAL),
    }


# -- 2. cached against uncached rollout --------------------------------------------------------


def bench_cache(world: World, ecfg: rollouts.Config, seqs: dict[str, np.ndarray], rounds: int,
                max_horizon: int) -> dict:
    c, h = ecfg.context_frames, min(ecfg.horizon, max_horizon)
    if world.family == "masked":  # no sliding window: at most its temporal positions
        h = min(h, int(world.dynamics.cfg.max_frames) - c)
    n = min(ecfg.batch_size, len(seqs[LATENTS_KEY]))
    context, acts, valid = batch_inputs(world, seqs, c, np.arange(n))
    secs: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    out: dict[bool, torch.Tensor] = {}
    warm_up(world, seqs, c, n)
    for r in range(rounds):
        for cache in (True, False) if r % 2 == 0 else (False, True):
            gen = torch.Generator(device=world.device).manual_seed(ecfg.seed)
            with Clock(world.device) as clock:
                z = world.rollout(context, acts, valid, h, generator=gen, cache=cache)
            secs[cache].append(clock.wall / (n * h))
            cpu[cache].append(clock.cpu / clock.wall)
            out.setdefault(cache, z)
    a, b = out[True], out[False]
    if world.family == "flow":
        diff = float((a.float() - b.float()).abs().max())
        agree = {"allclose": bool(torch.allclose(a, b, rtol=0, atol=FLOW_ATOL)), "atol": FLOW_ATOL,
                 "max_abs_diff": rnd(diff, 3)}
    else:
        differ = (a != b).flatten(2).any(-1)  # (B, horizon): frames with a differing token
        first = [int(row.nonzero()[0]) for row in differ if row.any()]
        agree = {"identical": bool(torch.equal(a, b)), "differing_tokens": int((a != b).sum()),
                 "tokens": int(a.numel()), "max_abs_id_diff": int((a.long() - b.long()).abs().max()),
                 "sequences_differing": len(first), "first_differing_frame": min(first) if first else None}
    return {
        "family": world.family, "sequences": n, "context_frames": c, "horizon": h,
        "evaluate_horizon": ecfg.horizon, "seed": ecfg.seed,
        "steps": int(world.meta["sample"]["steps"]),
        **({"decode": world.meta["sample"].get("decode", "maskgit")} if world.family == "masked" else {}),
        "seconds_per_frame": {"cached": rnd(median(secs[True])), "uncached": rnd(median(secs[False]))},
        "seconds_per_frame_rounds": {"cached": [rnd(s) for s in secs[True]],
                                     "uncached": [rnd(s) for s in secs[False]]},
        "cpu_per_wall": {"cached": rnd(median(cpu[True]), 3), "uncached": rnd(median(cpu[False]), 3)},
        "speedup_cached": rnd(median(secs[False]) / median(secs[True])),
        **agree,
    }


# -- 3. training throughput --------------------------------------------------------------------


class TrainingSetup:
    """What ``stages.dynamics.run`` builds before it calls ``pipeline.train.train``: the model (of
    the params' sizes), the loss function, and the alternating short/long window datasets of the
    training episodes (the tokenizer's held-out episodes left out)."""

    def __init__(self, cfg: dyn.Config, paths: dict[str, Path], loader: LoaderConfig, where: str):
        self.cfg, self.loader, self.where = cfg, loader, where
        self.tok_meta = read_meta(paths["tokenizer"], "tokenizer")
        lat, act, _ = stores(paths)
        train_ids, _ = held_out_split(lat.n_episodes, self.tok_meta["val_episodes"], str(paths["tokenizer"]))
        src = dyn.sources(lat.path, act.path, cfg.action_input == "discrete")
        self.short = WindowDataset(src, cfg.window, cfg.stride, train_ids, loader)
        self.long, self.long_batch = None, 0
        self.every = cfg.flow.long_every if cfg.family == "flow" else 0
        if self.every:
            try:
                self.long = WindowDataset(src, cfg.flow.long_window, cfg.stride, train_ids, loader)
                self.long_batch = max(1, cfg.train.batch_size * cfg.window // cfg.flow.long_window)
            except ValueError:  # as the stage: no episode holds a long window
                self.every = 0
        self.mask_id = self.tok_meta["config"]["levels"] if cfg.family == "masked" else None
        self.norm = None
        is_train = lat.frames_of(train_ids)
        if cfg.family == "flow":
            self.norm = latent_norm(lat.array(LATENTS_KEY)[:][is_train])
        self.model_cfg = dyn.model_config_from_data(cfg, self.tok_meta, act, is_train)  # as the stage builds it
        self.loss_fn = dyn.loss_function(cfg, self.mask_id, self.norm)

    def model(self, device: torch.device) -> torch.nn.Module:
        torch.manual_seed(self.cfg.train.seed)
        return dyn.build(self.cfg, self.tok_meta, self.where, self.model_cfg).to(device)

    def batches(self, tcfg) -> Callable:
        return dyn.alternating_batches(self.short, self.long, tcfg, self.every, self.long_batch, self.loader)


def stage_run(setup: TrainingSetup, tcfg, first: int, last: int, device: torch.device) -> tuple[float, float]:
    """Wall and CPU seconds of steps ``first .. last - 1`` of ``pipeline.train.train`` (a fresh
    run in a temporary checkpoint directory): from the request of step ``first``'s batch to the
    request of step ``last``'s, i.e. whole steps, reading the windows included."""
    inner = setup.batches(tcfg)
    stamps: dict[int, tuple[float, float]] = {}

    def batches(start: int):
        it = iter(inner(start))
        for step in range(start, tcfg.steps):
            if step in (first, last):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                stamps[step] = (time.perf_counter(), tree_cpu_seconds())
            yield next(it)

    with tempfile.TemporaryDirectory() as ckpt:
        train(setup.model(device), setup.loss_fn, batches, tcfg, Path(ckpt), config={"bench": "dynamics"},
              desc="bench")
    (w0, c0), (w1, c1) = stamps[first], stamps[last]
    return w1 - w0, c1 - c0


def bare_run(setup: TrainingSetup, tcfg, held: list[dict], first: int, device: torch.device) -> tuple[float, float]:
    """Wall and CPU seconds of steps ``first ..`` of a bare loop over the in-memory ``held``
    batches: forward + loss + backward + AdamW step, the same loss function and teacher."""
    model = setup.model(device).train()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay)
    bf16 = use_bf16(tcfg, device)
    clock = Clock(device)
    for step, batch in enumerate(held):
        if step == first:
            clock.__enter__()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = setup.loss_fn(model, batch, step, ema=teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clock.__exit__()
    return clock.wall, clock.cpu


def bench_train(setup: TrainingSetup, warmup: int, steps: int, rounds: int, device: torch.device) -> dict:
    cfg = setup.cfg
    n_steps = warmup + steps + 1  # the last step only ends the timed span of the stage's path
    tcfg = cfg.train.model_copy(update={"steps": n_steps, "warmup_steps": min(cfg.train.warmup_steps, n_steps - 1),
                                        "device": device.type})
    # the batches of the timed steps, once, held on the device for the bare loop
    held = []
    stream = iter(setup.batches(tcfg)(0))
    for _ in range(warmup + steps):
        held.append({k: torch.as_tensor(v).to(device) for k, v in next(stream).items()})
    stream.close()  # ends its loaders' workers
    probe = setup.model(torch.device("cpu"))
    tpf = tokens_per_frame(probe)
    shapes = [tuple(b[LATENTS_KEY].shape[:2]) for b in held[warmup:]]
    frames = sum(b * t for b, t in shapes)
    tokens = frames * tpf
    flops = None
    if cfg.family == "flow":
        flops = sum(probe.flops_per_frame(t) * b * t for b, t in shapes)
    got: dict[str, list[tuple[float, float]]] = {"stage": [], "bare": []}
    for r in range(rounds):
        for name in ("stage", "bare") if r % 2 == 0 else ("bare", "stage"):
            if name == "stage":
                got[name].append(stage_run(setup, tcfg, warmup, warmup + steps, device))
            else:
                got[name].append(bare_run(setup, tcfg, held, warmup, device))
    wall = {k: median([w for w, _ in v]) for k, v in got.items()}
    out = {
        "family": cfg.family, "device": str(device), "bf16": use_bf16(tcfg, device),
        "torch_threads": torch.get_num_threads(), "n_params": int(sum(p.numel() for p in probe.parameters())),
        "model": {k: v for k, v in setup.model_cfg.items() if k in
                  ("patch", "dim", "heads", "depth", "latent_shape", "grid", "max_frames")},
        "tokens_per_frame": tpf, "batch_size": cfg.train.batch_size, "window": cfg.window,
        "long_window": cfg.flow.long_window if setup.every else None, "long_every": setup.every or None,
        "long_batch": setup.long_batch or None,
        "warmup_steps": warmup, "timed_steps": steps, "timed_batch_shapes": sorted(set(shapes)),
        "tokens_per_step": rnd(tokens / steps, 6),
        "tokens_per_s": {k: rnd(tokens / v) for k, v in wall.items()},
        "steps_per_s": {k: rnd(steps / v) for k, v in wall.items()},
        "round_tokens_per_s": {k: [rnd(tokens / w) for w, _ in v] for k, v in got.items()},
        "cpu_per_wall": {k: rnd(median([c / w for w, c in v]), 3) for k, v in got.items()},
        "ratio": rnd(wall["bare"] / wall["stage"], 3),  # stage tokens/s over bare tokens/s
    }
    if flops is not None:
        out["flops_per_step"] = rnd(flops / steps)
        out["flops_per_s"] = {k: rnd(flops / v) for k, v in wall.items()}
        out["flops_note"] = ("FlowDynamics.flops_per_frame: 6 x weights x tokens + attention, forward + "
                             "backward; the teacher's no-grad bootstrap half steps not counted")
        peak = peak_bf16(device)
        if peak is not None and out["bf16"]:
            out["peak_bf16_flops"] = peak
            out["mfu"] = {k: rnd(flops / v / peak, 3) for k, v in wall.items()}
    return out


# -- 4. GPU profile ----------------------------------------------------------------------------


def peak_bf16(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def gpu_profile(cfg: dyn.Config) -> dyn.Config:
    """The params' block with the GPU profile's sizes (scripts/gpu_profile.sh)."""
    fam = cfg.family
    sizes = getattr(cfg, fam).model_copy(update=GPU_PROFILE)
    return cfg.model_copy(update={fam: sizes, "train": cfg.train.model_copy(update={"batch_size": GPU_BATCH_SIZE})})


def imagined_fps(setup: TrainingSetup, ecfg: rollouts.Config, paths: dict[str, Path], rounds: int, batch: int,
                 device: torch.device) -> dict:
    """Frames/s of ``World.rollout`` (cache on, the params' sample steps) plus decoding to pixels,
    ``batch`` test windows at once (repeated when fewer), ``context_frames`` -> ``horizon`` of
    ``ecfg`` (masked: at most its temporal positions), the untrained GPU-profile model."""
    cfg = setup.cfg
    tokenizer, tok_meta = load_model(paths["tokenizer"], "tokenizer", device)
    meta = {"kind": cfg.family, "action_input": cfg.action_input, "sample": dyn.sample_settings(cfg),
            "latent_norm": setup.norm}
    world = World(setup.model(device).eval(), meta, tokenizer, tok_meta, device)
    seqs = test_windows(ecfg, tok_meta, paths)
    idx = np.resize(np.arange(len(seqs[LATENTS_KEY])), batch)
    c, h = ecfg.context_frames, ecfg.horizon
    if world.family == "masked":  # no sliding window: at most its temporal positions
        h = min(h, int(world.dynamics.cfg.max_frames) - c)
    context, acts, valid = batch_inputs(world, seqs, c, idx)

    def once() -> np.ndarray:
        gen = torch.Generator(device=device).manual_seed(0)
        return world.decode(world.rollout(context, acts, valid, h, generator=gen))

    once()  # warm-up
    walls = []
    for _ in range(rounds):
        with Clock(device) as clock:
            pixels = once()
        walls.append(clock.wall)
    return {"batch": batch, "context_frames": c, "horizon": h, "steps": int(meta["sample"]["steps"]),
            "frame_shape": list(pixels.shape[2:]), "frames_per_s": rnd(batch * h / median(walls)),
            "round_frames_per_s": [rnd(batch * h / w) for w in walls]}


def bench_gpu(items: list[str], root: Path, loader: LoaderConfig, args) -> dict | str:
    if not torch.cuda.is_available():
        return "not available on this machine"
    device = torch.device("cuda")
    out: dict = {"device_name": torch.cuda.get_device_name(device), "profile": {**GPU_PROFILE, "batch_size": GPU_BATCH_SIZE}}
    for item in items:
        cfg = gpu_profile(load_section("dynamics", dyn.Config, item=item))
        ecfg = load_section("evaluate", rollouts.Config, item=item)
        setup = TrainingSetup(cfg, paths_for(root, item), loader, f"dynamics.{item}")
        out[item] = {"train": bench_train(setup, args.warmup, args.steps, args.rounds, device),
                     "imagination": imagined_fps(setup, ecfg, paths_for(root, item), args.rounds, args.gpu_batch,
                                                 device)}
    return out


# -- main --------------------------------------------------------------------------------------


def progress(item: str, section: str, figures: dict | str) -> None:
    """One line on stderr as each section ends (a long run on a shared machine)."""
    if isinstance(figures, dict):
        keys = ("tokens_per_s", "seconds_per_frame", "speedup_cached", "psnr")
        figures = {k: v for k, v in figures.items() if k in keys or k.startswith(("speedup_", "psnr_drop_"))}
    print(f"bench_dynamics: {item} {section}: {figures}", file=sys.stderr, flush=True)


def fail(msg: str) -> None:
    print(f"bench_dynamics: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--item", choices=DATASETS, action="append", help="dataset (repeatable; default: all)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each timed measure (median)")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps before them")
    ap.add_argument("--gpu-batch", type=int, default=32, help="sequences rolled out at once for imagined frames/s")
    ap.add_argument("--cache-horizon", type=int, default=16,
                    help="cache section: at most this many predicted frames (the uncached rollout is slow on a CPU)")
    ap.add_argument("--data-root", type=Path, default=DATA,
                    help="directory laid out as the repository's data/ (e.g. /work/main/data)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default, as the stage runs)")
    ap.add_argument("--name", default="dynamics", help="result name: bench/results/<name>.json")
    args = ap.parse_args()
    items = args.item or list(DATASETS)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        fail(f"--sections {args.sections!r}: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    if min(args.rounds, args.steps, args.cache_horizon) < 1 or args.warmup < 0:
        fail(f"--rounds ({args.rounds}), --steps ({args.steps}) and --cache-horizon ({args.cache_horizon}) must be "
             f">= 1, --warmup ({args.warmup}) >= 0")

    if args.threads < 0:
        fail(f"--threads ({args.threads}) must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.data_root
    loader = load_section("loader", LoaderConfig)
    cfgs = {item: load_section("dynamics", dyn.Config, item=item) for item in items}
    ecfgs = {item: load_section("evaluate", rollouts.Config, item=item) for item in items}
    paths = {item: paths_for(root, item) for item in items}
    # check the inputs before any work
    for item in items:
        missing = [str(p) for k, p in paths[item].items() if k != "dynamics" and not p.exists()]
        if missing:
            fail(f"{item}: missing {', '.join(missing)}; run the stages up to `dvc repro latents@{item}`, "
                 f"or point --data-root at a data directory that has them (e.g. /work/main/data)")
    families = {item: family_of(cfgs[item], paths[item]) for item in items}
    if "shortcut" in sections:
        flow_items = [i for i in items if families[i] == "flow"]
        if not flow_items:
            fail(f"shortcut: no flow-family dataset among {items} (families {families}); add --item gameplay "
                 f"or leave the section out with --sections")
        for item in flow_items:
            if not has_model(paths[item]):
                fail(f"shortcut: no trained dynamics model at {paths[item]['dynamics']} (dynamics.json); the "
                     f"benchmark measures the trained model and never trains one: run `dvc repro dynamics@{item}`, "
                     f"point --data-root at a data directory that has it (e.g. /work/main/data), or leave the "
                     f"section out with --sections")
    if "cache" in sections and not any(has_model(paths[i]) for i in items):
        fail(f"cache: no trained dynamics model under {root} for {items}; run `dvc repro dynamics@<item>`, "
             f"or point --data-root at a data directory that has one")

    figures: dict = {"load_before": [round(x, 2) for x in os.getloadavg()], "data_root": str(root),
                     "items": items, "sections": sections, "rounds": args.rounds,
                     "torch_threads": torch.get_num_threads()}
    t_start = time.perf_counter()
    for item in items:
        cfg, ecfg, p = cfgs[item], ecfgs[item], paths[item]
        got: dict = {"family": families[item]}
        if "shortcut" in sections and families[item] != "flow":
            got["shortcut"] = f"skipped: the {families[item]} family has no shortcut steps (flow only)"
        if ("shortcut" in sections and families[item] == "flow") or "cache" in sections:
            if has_model(p):
                device = resolve_device(ecfg.device)  # as the evaluate stage
                world = World.load(p["dynamics"], p["tokenizer"], device)
                try:
                    seqs = test_windows(ecfg, world.tok_meta, p, world.meta)
                except ValueError as exc:
                    fail(f"{item}: the evaluate stage's test windows: {exc} (evaluate.{item}: context_frames + "
                         f"horizon = {ecfg.length})")
                got["model"] = {"path": str(p["dynamics"]), "device": str(device),
                                "config": {k: v for k, v in world.meta["config"].items()
                                           if k in ("patch", "dim", "heads", "depth", "k_max")}}
                got["test_windows"] = {"windows": int(len(seqs[LATENTS_KEY])), "context_frames": ecfg.context_frames,
                                       "horizon": ecfg.horizon, "stride": ecfg.stride,
                                       "max_windows": ecfg.max_windows, "test_fraction": ecfg.test_fraction,
                                       "split_seed": ecfg.split_seed, "params": f"evaluate.{item}"}
                if "shortcut" in sections and families[item] == "flow":
                    got["shortcut"] = bench_shortcut(world, ecfg, seqs, args.rounds)
                    progress(item, "shortcut", got["shortcut"])
                if "cache" in sections:
                    got["cache"] = bench_cache(world, ecfg, seqs, args.rounds, args.cache_horizon)
                    progress(item, "cache", got["cache"])
            elif "cache" in sections:
                got["cache"] = f"no trained model at {p['dynamics']}"
        if "train" in sections:
            setup = TrainingSetup(cfg, p, loader, f"dynamics.{item}")
            got["train"] = bench_train(setup, args.warmup, args.steps, args.rounds,
                                       resolve_device(cfg.train.device))
            progress(item, "train", got["train"])
        figures[item] = got
    if "gpu" in sections:
        figures["gpu"] = bench_gpu(items, root, loader, args)
    figures["seconds"] = round(time.perf_counter() - t_start, 1)
    figures["load_after"] = [round(x, 2) for x in os.getloadavg()]
    report(args.name, figures)


if __name__ == "__main__":
    main()

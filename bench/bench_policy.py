"""Time of one MDLM policy training step (``training_loss`` + backward + AdamW step).

Setup: B=64, H=8, 5 actions, state (3, 32, 32) token ids (vocab 17), patch 8, dim 128, heads 4,
depth 2 (the ``PolicyConfig`` defaults otherwise), both conditioning modes, torch threads 1 and 2.
Median and minimum wall time and the median process CPU time per step over ``--steps`` timed steps
after 3 warm-up steps. On a shared machine the wall figures swing; CPU time is steadier.

    .venv/bin/python -m bench.bench_policy [--steps 10] [--state-depth 0]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from bench.common import report
from models.policy import MDLMPolicy, PolicyConfig, training_loss


def time_steps(conditioning: str, threads: int, steps: int, state_depth: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    b = 64
    state = torch.randint(0, 17, (b, 3, 32, 32))
    actions = torch.randint(0, 5, (b, 8))
    model = MDLMPolicy(PolicyConfig(n_actions=5, horizon=8, state_frames=3, state_shape=(32, 32), state_patch=8,
                                    dim=128, heads=4, depth=2, conditioning=conditioning,
                                    state_depth=state_depth))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        loss, _ = training_loss(model, actions, state)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    wall, cpu = [], []
    for _ in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    wall.sort()
    cpu.sort()
    return {"median_ms": round(1000 * wall[len(wall) // 2], 1), "min_ms": round(1000 * wall[0], 1),
            "cpu_median_ms": round(1000 * cpu[len(cpu) // 2], 1),
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--state-depth", type=int, default=0)
    args = ap.parse_args()
    figures: dict = {"load_before": round(os.getloadavg()[0], 2), "state_depth": args.state_depth}
    for conditioning in ("cross_attention", "add"):
        for threads in (1, 2):
            figures[f"{conditioning}_threads{threads}"] = time_steps(conditioning, threads, args.steps,
                                                                     args.state_depth)
    figures["load_after"] = round(os.getloadavg()[0], 2)
    report("policy", figures)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The GPU profile: the seed notes' model sizes (1,024 tokens per frame, 384 wide, 6 layers; the MAE
# tokenizer with LPIPS), run as one DVC experiment on top of params.yaml. Needs a CUDA machine, and
# the `lpips` extra (pip install -e '.[lpips]', which downloads its backbone weights on first use).
#
#   bash scripts/gpu_profile.sh                 # queue nothing: run the experiment now
#   bash scripts/gpu_profile.sh --queue         # or queue it (then: dvc exp run --run-all)
#   bash scripts/gpu_profile.sh -n gpu-big      # any other `dvc exp run` option passes through
set -euo pipefail
cd "$(dirname "$0")/.."
exec dvc exp run "$@" \
  -S tokenizer.gameplay.kind=mae -S tokenizer.gameplay.lpips_weight=0.2 \
  -S tokenizer.gameplay.mae.dim=256 -S tokenizer.gameplay.mae.depth=6 -S tokenizer.gameplay.mae.decoder_depth=6 \
  -S tokenizer.gameplay.mae.mask_ratio_max=0.9 -S tokenizer.gameplay.mae.mask_warmup_steps=5000 \
  -S tokenizer.gameplay.mae.train.steps=20000 -S tokenizer.gameplay.mae.train.batch_size=256 \
  -S dynamics.mnist.masked.patch=1 -S dynamics.mnist.masked.dim=384 -S dynamics.mnist.masked.depth=6 \
  -S dynamics.mnist.masked.heads=6 -S dynamics.mnist.train.steps=20000 -S dynamics.mnist.train.batch_size=32 \
  -S dynamics.gameplay.flow.patch=1 -S dynamics.gameplay.flow.dim=384 -S dynamics.gameplay.flow.depth=6 \
  -S dynamics.gameplay.flow.heads=6 -S dynamics.gameplay.train.steps=20000 -S dynamics.gameplay.train.batch_size=32

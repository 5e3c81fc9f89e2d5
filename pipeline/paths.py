"""Where everything lives: the one definition of the datasets, the output paths and store keys.

Stages run at the repository root (DVC's working directory), so data paths are relative to it.
"""
from __future__ import annotations

from pathlib import Path

# The foreach items of dvc.yaml: the datasets every per-dataset stage runs on.
DATASETS = ("mnist", "gameplay")

# Array keys of the episode stores (docs/contracts.md).
FRAMES_KEY = "frames"
LATENTS_KEY = "latents"
ACTIONS_KEY = "actions"
ACTION_CLASS_KEY = "action_class"
VALID_KEY = "valid"

DATA = Path("data")
MNIST_DIGITS = DATA / "mnist" / "digits.zarr"
GAMEPLAY_VIDEOS = DATA / "gameplay" / "videos"
GAMEPLAY_FRAMES_MANIFEST = DATA / "gameplay" / "frames_manifest.csv"
VIDEOS_MANIFEST = "manifest.csv"   # inside GAMEPLAY_VIDEOS
CHECKPOINTS = Path("checkpoints")  # resumable training state, outside DVC's outputs


def check_dataset(item: str) -> str:
    if item not in DATASETS:
        raise ValueError(f"unknown dataset {item!r}; expected one of {DATASETS}")
    return item


def frames_store(item: str) -> Path:
    return DATA / check_dataset(item) / "frames.zarr"


def actions_store(item: str) -> Path:
    return DATA / check_dataset(item) / "actions.zarr"


def tokenizer_dir(item: str) -> Path:
    return DATA / check_dataset(item) / "tokenizer"


def latents_store(item: str) -> Path:
    return DATA / check_dataset(item) / "latents.zarr"


def dynamics_dir(item: str) -> Path:
    return DATA / check_dataset(item) / "dynamics"


def policy_dir(item: str) -> Path:
    return DATA / check_dataset(item) / "policy"


def checkpoint_dir(stage: str, item: str | None = None) -> Path:
    """Resumable training state of a stage run: ``<repo root>/checkpoints/<stage>[-<item>]``.

    Under the main repository's root, also from a ``dvc exp run --temp``/``--queue`` workspace, so
    a killed experiment resumes when it is run again.
    """
    return repo_root() / CHECKPOINTS / (stage if item is None else f"{stage}-{item}")


def repo_root(start: Path | None = None) -> Path:
    """The directory holding ``.dvc`` (or ``.git``) above ``start`` (default: the cwd).

    Inside a ``dvc exp run --temp`` workspace (``<root>/.dvc/tmp/exps/...``) this returns the
    main repository's root, so that shared stores (the MLflow database, checkpoints) stay in one place.
    """
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    if ".dvc" in parts:
        i = parts.index(".dvc")
        if parts[i + 1 : i + 3] == ("tmp", "exps"):
            return Path(*parts[:i])
    for p in (here, *here.parents):
        if (p / ".dvc").is_dir() or (p / ".git").exists():
            return p
    return here


def metrics_path(stage: str, item: str | None = None) -> Path:
    """The metrics file of a stage (and foreach item), as declared in dvc.yaml."""
    name = stage if item is None else f"{stage}-{item}"
    return Path("metrics") / f"{name}.json"

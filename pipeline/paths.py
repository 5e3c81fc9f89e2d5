"""Repository paths. Stages run at the repository root (DVC's working directory)."""
from __future__ import annotations

from pathlib import Path


def repo_root(start: Path | None = None) -> Path:
    """The directory holding ``.dvc`` (or ``.git``) above ``start`` (default: the cwd).

    Inside a ``dvc exp run --temp`` workspace (``<root>/.dvc/tmp/exps/...``) this returns the
    main repository's root, so that shared stores (the MLflow database) stay in one place.
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

"""Saved weights: plain state dicts written atomically, read back with ``weights_only=True``.

- ``save_torch``/``load_torch``: one file of tensors and plain containers (the training loop's
  resumable state); a file that cannot be read as one raises ``CheckpointError`` naming it.
- ``save_model``/``load_model``: a model directory that later stages read, e.g.
  ``data/<dataset>/tokenizer/``: ``model.pt`` (the state dict) and ``<family>.json`` (family, kind,
  the model's config fields and whatever the stage adds: shapes, held-out episodes, metrics). The
  model is rebuilt from the metadata through ``models.registry``: this module knows no model family.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models import registry
from pipeline.atomic import atomic_path, dumps_json, write_bytes

MODEL_FILE = "model.pt"


class CheckpointError(RuntimeError):
    """A checkpoint or model directory is missing, unreadable or of the wrong kind."""


def save_torch(obj: Any, path: Path | str) -> None:
    """``torch.save`` to ``path`` atomically, with byte-identical output for identical input."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def load_torch(path: Path | str, map_location: str | torch.device = "cpu") -> Any:
    """Load a file written by ``save_torch``: plain tensors and containers only (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holds objects weights_only refuses
        raise CheckpointError(f"{path}: not a readable checkpoint ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    """One line saying why torch.load failed (its weights_only message is a page long)."""
    text = str(exc)
    for line in text.splitlines():
        if "WeightsUnpickler error" in line:
            return f"weights_only refuses it: {line.split('error:', 1)[1].strip()}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}"


def meta_file(family: str) -> str:
    return f"{family}.json"


def save_model(model: nn.Module, family: str, kind: str, meta: dict, out_dir: Path | str) -> None:
    """Write ``model.pt`` and ``<family>.json`` into ``out_dir`` atomically (a complete directory
    or the previous one, never a mix)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    record = {"family": family, "kind": kind, "config": registry.config_of(model), **meta}
    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        (tmp / MODEL_FILE).write_bytes(buf.getvalue())
        (tmp / meta_file(family)).write_text(dumps_json(record))


def read_meta(path: Path | str, family: str) -> dict:
    """The metadata of the ``family`` model saved in directory ``path``."""
    meta_path = Path(path) / meta_file(family)
    if not meta_path.exists():
        raise CheckpointError(f"{meta_path}: no {family} model here; run its stage first "
                              f"(`dvc repro {family}@<dataset>`)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc}); rerun the {family} stage") from None
    if meta.get("family", family) != family or "kind" not in meta or "config" not in meta:
        raise CheckpointError(f"{meta_path}: not the metadata of a {family} model")
    return meta


def load_model(path: Path | str, family: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The ``family`` model saved in directory ``path``, in eval mode on ``device``, and its metadata."""
    meta = read_meta(path, family)
    try:
        model = registry.build(family, meta["kind"], meta["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{Path(path) / meta_file(family)}: {exc}") from None
    state = load_torch(Path(path) / MODEL_FILE)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{Path(path) / MODEL_FILE}: does not fit its {meta_file(family)} ({exc})") from None
    return model.to(device).eval(), meta

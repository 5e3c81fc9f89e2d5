"""Saved weights: plain state dicts written atomically, read back with ``weights_only=True``.

``save_torch``/``load_torch`` serve the training loop's resumable state; ``save_tokenizer`` and
``load_tokenizer`` the tokenizer directory that later stages read (``data/<dataset>/tokenizer/``:
``model.pt``, the state dict, and ``tokenizer.json``: kind, model config, latent shape and dtype,
encode window, frame shape, held-out episodes and metrics).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from models.tokenizers import KINDS, Tokenizer, build_tokenizer
from pipeline.store import clean_stale, replace_dir, write_json

MODEL_FILE = "model.pt"
META_FILE = "tokenizer.json"


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically, with byte-identical output for identical input."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def load_torch(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a file written by ``save_torch``: plain tensors and containers only (weights_only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def save_tokenizer(model: Tokenizer, kind: str, meta: dict, out_dir: Path) -> None:
    """Write ``model.pt`` and ``tokenizer.json`` to a temporary sibling, then rename into place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch(state, tmp / MODEL_FILE)
    write_json(tmp / META_FILE, {"kind": kind, "config": dataclasses.asdict(model.cfg), **meta})
    replace_dir(tmp, out_dir)


def read_tokenizer_meta(path: Path | str) -> dict:
    meta_path = Path(path) / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: no tokenizer here; run `dvc repro tokenizer@<dataset>` first")
    return json.loads(meta_path.read_text())


def load_tokenizer(path: Path | str, device: str | torch.device = "cpu") -> Tokenizer:
    """The tokenizer saved in ``path`` (a ``data/<dataset>/tokenizer`` directory), in eval mode."""
    meta = read_tokenizer_meta(path)
    if meta.get("kind") not in KINDS:
        raise ValueError(f"{Path(path) / META_FILE}: unknown tokenizer kind {meta.get('kind')!r}")
    model = build_tokenizer(meta["kind"], **meta["config"])
    model.load_state_dict(load_torch(Path(path) / MODEL_FILE))
    return model.to(device).eval()

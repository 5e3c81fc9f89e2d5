"""Saved weights: atomic, byte-reproducible, weights_only; model directories of any family."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from models.tokenizers import build_tokenizer
from pipeline.checkpoint import (
    CheckpointError,
    load_model,
    load_torch,
    read_meta,
    save_model,
    save_torch,
)


def test_save_torch_is_byte_reproducible_and_weights_only(tmp_path):
    torch.manual_seed(0)
    state = {"model": nn.Linear(3, 2).state_dict(), "step": 3, "history": [{"loss": 0.5}]}
    save_torch(state, tmp_path / "a.pt")
    save_torch(state, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    back = load_torch(tmp_path / "a.pt")
    assert back["step"] == 3 and torch.equal(back["model"]["weight"], state["model"]["weight"])
    assert not list(tmp_path.glob(".*tmp*"))


def test_load_torch_refuses_pickled_objects(tmp_path):
    torch.save({"module": nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a whole module, not a state dict
    with pytest.raises(CheckpointError, match=r"pickled.pt: not a readable checkpoint \(weights_only refuses it: Unsupported global"):
        load_torch(tmp_path / "pickled.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04 truncated zip"])
def test_unreadable_checkpoint_files_are_named(tmp_path, content):
    """Guards: a file that is not a checkpoint surfaced as a bare KeyError/UnpicklingError."""
    (tmp_path / "state.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"state.pt: not a readable checkpoint"):
        load_torch(tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match=r"missing.pt: no such checkpoint file"):
        load_torch(tmp_path / "missing.pt")


def test_model_directory_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_tokenizer("cnn", image_size=16, channels=1, latent_size=8, latent_channels=2, width=8, blocks=1)
    save_model(model, "tokenizer", "cnn", {"encode_window": 1}, tmp_path / "tok")
    first = (tmp_path / "tok" / "model.pt").read_bytes()
    save_model(model, "tokenizer", "cnn", {"encode_window": 1}, tmp_path / "tok")  # replaces in place
    assert (tmp_path / "tok" / "model.pt").read_bytes() == first
    meta = read_meta(tmp_path / "tok", "tokenizer")
    assert meta["kind"] == "cnn" and meta["config"]["latent_channels"] == 2 and meta["encode_window"] == 1
    back, meta2 = load_model(tmp_path / "tok", "tokenizer")
    assert meta2 == meta and not back.training
    x = torch.rand(2, 1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_bad_model_directories_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere/tokenizer.json: no tokenizer model here"):
        load_model(tmp_path / "nowhere", "tokenizer")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "tokenizer.json").write_text('{"kind": "vqvae", "config": {}}')
    with pytest.raises(CheckpointError, match=r"odd/tokenizer.json: unknown tokenizer kind 'vqvae'"):
        load_model(tmp_path / "odd", "tokenizer")
    (tmp_path / "odd" / "tokenizer.json").write_text('{"kind": "cnn", "config": {"image_size": 16, "channels": 1, '
                                                     '"latent_size": 8, "latent_channels": 2, "width": 8, "blocks": 1}}')
    (tmp_path / "odd" / "model.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"odd/model.pt: not a readable checkpoint"):
        load_model(tmp_path / "odd", "tokenizer")

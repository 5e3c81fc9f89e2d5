"""Saved weights: atomic, byte-reproducible, weights_only; the tokenizer directory round trip."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from models.tokenizers import build_tokenizer
from pipeline.checkpoint import (
    META_FILE,
    load_tokenizer,
    load_torch,
    read_tokenizer_meta,
    save_tokenizer,
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
    with pytest.raises(Exception, match="weights_only"):
        load_torch(tmp_path / "pickled.pt")


def test_tokenizer_directory_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_tokenizer("cnn", image_size=16, channels=1, latent_size=8, latent_channels=2, width=8, blocks=1)
    save_tokenizer(model, "cnn", {"encode_window": 1}, tmp_path / "tok")
    save_tokenizer(model, "cnn", {"encode_window": 1}, tmp_path / "tok")  # replaces in place
    meta = read_tokenizer_meta(tmp_path / "tok")
    assert meta["kind"] == "cnn" and meta["config"]["latent_channels"] == 2 and meta["encode_window"] == 1
    back = load_tokenizer(tmp_path / "tok")
    assert not back.training
    x = torch.rand(2, 1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_bad_tokenizer_directories_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere/tokenizer.json: no tokenizer here"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / META_FILE).write_text('{"kind": "vqvae", "config": {}}')
    with pytest.raises(ValueError, match=r"odd/tokenizer.json: unknown tokenizer kind 'vqvae'"):
        load_tokenizer(tmp_path / "odd")

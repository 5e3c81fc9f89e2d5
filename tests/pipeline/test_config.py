"""Params validation: unknown keys and bad values fail before any work, naming file and key path."""
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from pipeline.config import ParamsError, StrictModel, flatten, load_section, read_params
from pipeline.store import StoreConfig

ROOT = Path(__file__).resolve().parents[2]


class Inner(StrictModel):
    rate: float = Field(0.5, ge=0, le=1)


class Section(StrictModel):
    count: int = 3
    inner: Inner = Inner()


def write(tmp_path, data) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_valid_section_and_defaults(tmp_path):
    p = write(tmp_path, {"actions": {"gameplay": {"count": 5}}})
    cfg = load_section("actions", Section, item="gameplay", path=p)
    assert cfg.count == 5 and cfg.inner.rate == 0.5


def test_unknown_key_names_file_and_key_path(tmp_path):
    p = write(tmp_path, {"actions": {"gameplay": {"inner": {"rate": 0.1, "rte": 2}}}})
    with pytest.raises(ParamsError) as exc:
        load_section("actions", Section, item="gameplay", path=p)
    msg = str(exc.value)
    assert str(p) in msg and "actions.gameplay.inner.rte" in msg and "unknown key" in msg


def test_bad_value_names_key_path_and_value(tmp_path):
    p = write(tmp_path, {"store": {"clevel": 42}})
    with pytest.raises(ParamsError) as exc:
        load_section("store", StoreConfig, path=p)
    msg = str(exc.value)
    assert "store.clevel" in msg and "42" in msg and "less than or equal to 9" in msg


def test_unknown_section_lists_allowed(tmp_path):
    p = write(tmp_path, {"stroe": {}})
    with pytest.raises(ParamsError, match=r"unknown section\(s\) \['stroe'\].*allowed sections"):
        read_params(p)


def test_missing_foreach_item(tmp_path):
    p = write(tmp_path, {"actions": {"mnist": {}}})
    with pytest.raises(ParamsError, match=r"actions.gameplay' is missing"):
        load_section("actions", Section, item="gameplay", path=p)


def test_repository_params_have_only_known_sections():
    data = read_params(ROOT / "params.yaml")
    assert "store" in data
    StoreConfig.model_validate(data["store"])


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": 1, "a.c": [1, 2], "d": "x"}


class Train(StrictModel):
    steps: int = 10
    ema_decay: float | None = None
    lr: float = 1e-3


class Family(StrictModel):
    train: Train = Train(steps=99, ema_decay=0.5)   # this family's own defaults
    width: int = 4


class Outer(StrictModel):
    family: Family = Family(width=8)


def test_partial_block_keeps_the_fields_own_defaults():
    """Guards: a partial `train` block fell back to the generic class defaults (ema_decay None),
    not to the stage's own (0.5 here; 0.995 for the tokenizer's mae)."""
    cfg = Family.model_validate({"train": {"lr": 0.1}})
    assert cfg.train == Train(steps=99, ema_decay=0.5, lr=0.1)
    nested = Outer.model_validate({"family": {"train": {"steps": 3}}})
    assert nested.family.width == 8 and nested.family.train == Train(steps=3, ema_decay=0.5)
    with pytest.raises(Exception, match="unknown key|Extra inputs"):
        Family.model_validate({"train": {"nope": 1}})


def test_tokenizer_partial_train_block_keeps_mae_defaults():
    from pipeline.tokenizer import Config

    cfg = Config.model_validate({"kind": "mae", "mae": {"train": {"steps": 100}}})
    assert cfg.mae.train.ema_decay == 0.995 and cfg.mae.train.steps == 100
    assert cfg.mae.train.lr == Config().mae.train.lr and cfg.cnn.train.ema_decay is None


def test_warmup_must_be_shorter_than_training():
    from pipeline.train import TrainConfig

    with pytest.raises(Exception, match=r"warmup_steps \(50\) must be smaller than steps \(50\)"):
        TrainConfig(steps=50, warmup_steps=50)
    assert TrainConfig(steps=1, warmup_steps=0).steps == 1

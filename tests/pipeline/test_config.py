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

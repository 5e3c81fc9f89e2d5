"""Typed, validated params: each stage reads its section of ``params.yaml`` into a pydantic model.

Unknown keys are errors (``extra="forbid"``); a bad value fails before any work with a message that
names the file, the key path and what is allowed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

# The top-level sections that params.yaml may hold: one per stage, plus shared ones.
SECTIONS = (
    "mlflow",
    "store",
    "loader",
    "mnist_digits",
    "moving_mnist",
    "gameplay_videos",
    "gameplay_frames",
    "actions",
    "tokenizer",
    "latents",
    "dynamics",
    "policy",
    "evaluate",
    "report",
)


class ParamsError(ValueError):
    """A params file is missing, malformed or does not validate."""


class StrictModel(BaseModel):
    """Base for every config: unknown keys are refused, values are validated, instances frozen.

    One source of truth for defaults: a block given in part keeps the defaults of the field it fills
    for every key it leaves out. When a field's default is itself a config (e.g. the tokenizer's
    ``mae.train``, whose default has ``ema_decay: 0.995``), a partial block is merged over that
    default, not over the generic defaults of the block's class.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _partial_blocks_keep_field_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            default = field.default
            given = out.get(name, out.get(field.alias) if field.alias else None)
            if isinstance(default, BaseModel) and isinstance(given, dict):
                key = name if name in out else field.alias
                out[key] = deep_merge(default.model_dump(by_alias=True), given)
        return out


def deep_merge(base: dict, update: dict) -> dict:
    """``base`` with ``update``'s keys laid over it, recursively for nested mappings."""
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


M = TypeVar("M", bound=BaseModel)


def params_path() -> Path:
    """``params.yaml`` of the current directory (DVC runs stages at the repository root)."""
    return Path(os.environ.get("PIPELINE_PARAMS", "params.yaml"))


def read_params(path: Path | None = None) -> dict[str, Any]:
    path = Path(path) if path is not None else params_path()
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    from pipeline.params_check import check_roundtrip  # imports this module's ParamsError

    check_roundtrip(path)  # params DVC's `-S` writer would corrupt are refused before any work
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ParamsError(
            f"{path}: unknown section(s) {unknown}; allowed sections: {list(SECTIONS)}"
        )
    return data


def _format_error(path: Path, prefix: str, exc: ValidationError) -> str:
    lines = [f"{path}: invalid params in section '{prefix}':"]
    for err in exc.errors():
        loc = ".".join([prefix, *[str(p) for p in err["loc"]]])
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = err["msg"]
        value = err.get("input")
        shown = "" if kind == "missing" or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  - {loc}: {msg}{shown}")
    return "\n".join(lines)


def validate(model: type[M], data: Any, *, where: str, path: Path | str = "params.yaml") -> M:
    """Validate ``data`` against ``model``; errors name the file and the dotted key path."""
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise ParamsError(_format_error(Path(path), where, exc)) from None


def load_section(section: str, model: type[M], item: str | None = None, path: Path | None = None) -> M:
    """Read ``section`` (or ``section.item`` for foreach stages) of params.yaml into ``model``."""
    path = Path(path) if path is not None else params_path()
    data = read_params(path)
    if section not in data:
        raise ParamsError(f"{path}: section '{section}' is missing")
    sub = data[section]
    where = section
    if item is not None:
        if not isinstance(sub, dict) or item not in sub:
            have = list(sub) if isinstance(sub, dict) else []
            raise ParamsError(f"{path}: '{section}.{item}' is missing (have: {have})")
        sub = sub[item]
        where = f"{section}.{item}"
    return validate(model, sub, where=where, path=path)


def dig(params: dict, dotted: str) -> Any:
    """The value at the dotted key ``dotted`` of nested ``params`` (``"dynamics.mnist.family"``), or
    None where a part is missing."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts/models to dotted keys (for MLflow params)."""
    if isinstance(d, BaseModel):
        d = d.model_dump(mode="json")
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    out[prefix[:-1]] = d
    return out

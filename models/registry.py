"""Build any model of the project from its family, kind and config fields (as saved in a model
directory's metadata): the one place that maps names to classes. No file I/O here."""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch.nn as nn

# family -> kind -> (module, config class, model class)
_KINDS: dict[str, dict[str, tuple[str, str, str]]] = {
    "tokenizer": {
        "quantize": ("models.tokenizers", "QuantizeConfig", "QuantizeTokenizer"),
        "cnn": ("models.tokenizers", "CNNConfig", "CNNTokenizer"),
        "mae": ("models.tokenizers", "MAEConfig", "MAETokenizer"),
    },
    "dynamics": {
        "flow": ("models.flow_dynamics", "FlowConfig", "FlowDynamics"),
        "masked": ("models.masked_dynamics", "MaskedConfig", "MaskedDynamics"),
    },
    "policy": {
        "mdlm": ("models.policy", "PolicyConfig", "MDLMPolicy"),
        "mlp": ("models.policy", "MLPPolicyConfig", "MLPPolicy"),
    },
}


def kinds(family: str) -> list[str]:
    if family not in _KINDS:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(_KINDS)}")
    return sorted(_KINDS[family])


def _classes(family: str, kind: str) -> tuple[type, type]:
    if kind not in kinds(family):
        raise ValueError(f"unknown {family} kind {kind!r}; expected one of {kinds(family)}")
    module, config_cls, model_cls = _KINDS[family][kind]
    mod = importlib.import_module(module)
    return getattr(mod, config_cls), getattr(mod, model_cls)


def build(family: str, kind: str, config: dict[str, Any]) -> nn.Module:
    """A fresh model of ``family``/``kind`` from its config dataclass fields."""
    config_cls, model_cls = _classes(family, kind)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"{family} {kind}: unknown config field(s) {unknown}; expected {sorted(fields)}")
    cfg = config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    return model_cls(cfg)


def config_of(model: nn.Module) -> dict[str, Any]:
    """The config dataclass fields of a model built by ``build`` (its ``cfg`` attribute)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not dataclasses.is_dataclass(cfg):
        raise TypeError(f"{type(model).__name__} has no dataclass `cfg`")
    return dataclasses.asdict(cfg)

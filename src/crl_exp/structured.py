"""A typed config from a Hydra node: the one conversion every ``*_config`` helper uses (unknown keys refused with
their group's name, the dataclass's ``__post_init__`` validating)."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from crl_exp.errors import CRLConfigError

T = TypeVar("T")


def to_dataclass(cls: type[T], node: Any, group: str | None = None) -> T:
    """``cls`` from a config node, a plain mapping or an instance of ``cls`` (returned as is)."""
    if isinstance(node, cls):
        return node
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    data = dict(node or {})
    names = {f.name for f in fields(cls)} if is_dataclass(cls) else set()
    unknown = sorted(set(data) - names)
    if unknown:
        raise CRLConfigError(f"Unknown {group or cls.__name__} keys: {unknown}")
    return cls(**data)

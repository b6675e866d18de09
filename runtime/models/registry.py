"""The architecture registry: which model families exist and how a checkpoint names them.

Each family module (runtime/models/<family>.py) registers its model class with
`@register(...)`: its name, the Hugging Face `architectures` entries and
`model_type`s it serves, an optional config.json hook that reads the family's own
keys into ModelConfig fields, and what it was checked against (listed in docs).
Adding a family is one decorated class plus one import line in
runtime/models/__init__.py. Lookups that miss raise UnsupportedModelError naming
every supported architecture.

This module imports nothing else from the package, so config.py can use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class UnsupportedModelError(ValueError):
    """The config describes an architecture or feature this engine does not implement."""


@dataclass(frozen=True)
class Family:
    name: str
    """Our family name (ModelConfig.arch)."""
    model_cls: type
    """The nn.Module built for it: `model_cls(model_config, ops)`."""
    architectures: tuple[str, ...]
    """HF `architectures` entries of config.json served by this family."""
    model_types: tuple[str, ...]
    """HF `model_type` values (used when a config has no `architectures`)."""
    parse_hf: Callable[[dict[str, Any]], dict[str, Any]] | None
    """config.json dict -> ModelConfig fields that differ from the generic parse (None: none)."""
    checked_against: str
    """What its correctness tests compare with (shown in the docs)."""


FAMILIES: dict[str, Family] = {}
"""family name -> Family, in registration order."""


def register(
    name: str,
    *,
    architectures: tuple[str, ...],
    model_types: tuple[str, ...] = (),
    parse_hf: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    checked_against: str = "",
):
    """Class decorator: make `cls` the model of family `name` (one line per new family)."""

    def deco(cls):
        if name in FAMILIES:
            raise ValueError(f"model family {name!r} registered twice")
        FAMILIES[name] = Family(
            name, cls, tuple(architectures), tuple(model_types) or (name,), parse_hf, checked_against
        )
        return cls

    return deco


def supported_architectures() -> list[str]:
    return sorted(a for f in FAMILIES.values() for a in f.architectures)


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(f"unknown model family {name!r}; supported: {sorted(FAMILIES)}") from None


def family_of_hf_config(cfg: dict[str, Any]) -> Family:
    """The family serving a config.json: by `architectures`, else by `model_type`."""
    archs = cfg.get("architectures") or []
    for a in archs:
        for f in FAMILIES.values():
            if a in f.architectures:
                return f
    if not archs:
        for f in FAMILIES.values():
            if cfg.get("model_type") in f.model_types:
                return f
    raise UnsupportedModelError(
        f"unsupported model architecture {archs or cfg.get('model_type')!r}; "
        f"supported: {', '.join(supported_architectures())}"
    )

"""The dotted keys a sweep axis, a per-method override or a command-line override may name, and how
one is applied to a run's plain config. Owned by the spec (its sections are the schema's); the planner's
sweep expansion (launcher.plan.sweep) and the spec's checks both use them.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from launcher.spec.schema import (
    DataSpec,
    EvalSpec,
    FreezeMethod,
    FullMethod,
    JobSpec,
    LoraMethod,
    MethodSpec,
    ModelSpec,
    PtuningMethod,
    ResourcesSpec,
    TokenizerSpec,
    TrainingSpec,
)

SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelSpec,
    "tokenizer": TokenizerSpec,
    "data": DataSpec,
    "training": TrainingSpec,
    "eval": EvalSpec,
    "resources": ResourcesSpec,
}
METHOD_CLASSES: tuple[type[BaseModel], ...] = (FreezeMethod, PtuningMethod, LoraMethod, FullMethod)
_NOT_SWEEPABLE_METHOD_FIELDS = {"method", "name", "overrides", "resources"}


def valid_dotted_keys() -> list[str]:
    """Every key a sweep axis or an override may name."""
    keys = ["template"]
    for section, model in SECTIONS.items():
        keys += [f"{section}.{name}" for name in model.model_fields]
    method_fields: list[str] = []
    for cls in METHOD_CLASSES:
        for name in cls.model_fields:
            if name not in _NOT_SWEEPABLE_METHOD_FIELDS and f"method.{name}" not in method_fields:
                method_fields.append(f"method.{name}")
    return keys + method_fields


def method_has_field(method: MethodSpec, dotted: str) -> bool:
    return dotted.startswith("method.") and dotted.split(".", 1)[1] in type(method).model_fields


def applies_to(method: MethodSpec, dotted: str) -> bool:
    """A ``method.*`` axis applies only to methods with that parameter; every other axis to all."""
    return not dotted.startswith("method.") or method_has_field(method, dotted)


def set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = copy.deepcopy(value)


def base_config(spec: JobSpec) -> dict[str, Any]:
    return {
        "model": spec.model.model_dump(mode="json"),
        "tokenizer": spec.tokenizer.model_dump(mode="json"),
        "data": spec.data.model_dump(mode="json"),
        "template": spec.template,
        "training": spec.training.model_dump(mode="json"),
        "eval": spec.eval.model_dump(mode="json"),
    }

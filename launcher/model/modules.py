"""What a causal LM's modules are, read from the model itself rather than from a table of families: the
modules LoRA can wrap, the transformer layer list, a parameter's size under ZeRO-3.

The planner (launcher.plan.archs, on a meta-device model) and the ranks (launcher.train.adapters, on the
real one) read the model through these same functions, so what the plan shows is what training wraps.
Torch and transformers are imported inside the functions: the planner's CLI path loads them only when
it instantiates a model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

LAYER_RE = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


def lora_module_types() -> tuple[type, ...]:
    """The module types LoRA can wrap, as peft's ``all-linear`` sees them: ``nn.Linear`` and transformers'
    ``Conv1D`` (GPT-2 and its relatives keep their projections in Conv1D, weight stored (in, out))."""
    from torch import nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def linear_modules(model: Any) -> Iterator[tuple[str, int, int]]:
    """(full module name, in_features, out_features) of every module LoRA can wrap."""
    from torch import nn

    types = lora_module_types()
    for name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        if isinstance(module, nn.Linear):
            yield name, int(module.in_features), int(module.out_features)
        else:  # Conv1D: weight is (in_features, out_features)
            fan_in, fan_out = module.weight.shape  # type: ignore[attr-defined]
            yield name, int(fan_in), int(fan_out)


def transposed_module_names(model: Any) -> list[str]:
    """Full names of the Conv1D modules among them (weight stored (in, out): peft's ``fan_in_fan_out``)."""
    from torch import nn

    types = lora_module_types()
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, types) and not isinstance(module, nn.Linear)
    ]


def linear_module_names(model: Any) -> list[str]:
    """Full names of the modules LoRA can wrap (the one list the planner and training both use)."""
    return [name for name, _, _ in linear_modules(model)]


def layer_list_prefix(named_sizes: Iterable[tuple[str, int]]) -> str | None:
    """The parameter-name prefix of the transformer layer list (``model.layers``, ``transformer.h``):
    the numbered list that holds the most parameters. Read from the names, not from a table of families."""
    by_prefix: dict[str, int] = {}
    for pname, numel in named_sizes:
        m = LAYER_RE.match(pname)
        if m:
            by_prefix[m.group(1)] = by_prefix.get(m.group(1), 0) + numel
    return max(by_prefix, key=lambda k: by_prefix[k]) if by_prefix else None


def param_numel(param: Any) -> int:
    """Elements of a parameter; under ZeRO-3 a partitioned one is an empty tensor whose size is ds_numel."""
    numel = int(param.numel())
    return int(getattr(param, "ds_numel", numel)) if numel == 0 else numel

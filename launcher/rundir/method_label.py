"""How a run's method is named in the comparison table: the method, plus the LoRA variant when it is
one (``lora r8 dora``, ``lora r8 pissa``, ``lora r8 lora+16``); plain methods keep their bare name.

It reads the ``method`` section as run.yaml holds it (plain data), so the trainer (result.json), the
collector (runs without a result) and the plan agree on one spelling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def lora_variant_labels(method: Mapping[str, Any]) -> list[str]:
    """What sets a LoRA run apart from plain LoRA, in peft's words; empty for plain LoRA."""
    if method.get("method") != "lora":
        return []
    labels = []
    if method.get("use_dora"):
        labels.append("dora")
    if method.get("use_rslora"):
        labels.append("rslora")
    init = method.get("init_lora_weights", True)
    if init is not True:
        labels.append(str(init))
    ratio = method.get("loraplus_lr_ratio")
    if ratio is not None:
        labels.append(f"lora+{ratio:g}")
    return labels


def method_label(method: Mapping[str, Any]) -> str:
    """The table's method cell: ``lora`` for plain LoRA, ``lora r8 dora`` for a variant."""
    name = str(method.get("method") or "-")
    variants = lora_variant_labels(method)
    if not variants:
        return name
    return " ".join([f"{name} r{method.get('r')}", *variants])

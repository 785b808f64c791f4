"""The registry of fine-tuning methods: what each one trains and the resources it gets by default.

Defaults follow common practice for 6B-class models: Freeze, P-Tuning and LoRA train a small fraction
of the weights and fit one GPU with ZeRO-2; full fine-tuning needs ZeRO-3 with optimizer and parameter
offload over 4 GPUs, with gradient checkpointing on.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.rundir.method_label import lora_variant_labels
from launcher.spec.schema import FreezeMethod, FullMethod, LoraMethod, MethodSpec, PtuningMethod


@dataclass(frozen=True)
class ResourceChoice:
    """One way to run a method: a method's default, or a candidate the resource policy weighs."""

    nodes: int
    gpus_per_node: int
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    gradient_checkpointing: bool

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    defaults: ResourceChoice


_ADAPTER_DEFAULTS = ResourceChoice(1, 1, 2, False, False, False)
_FULL_DEFAULTS = ResourceChoice(1, 4, 3, True, True, True)

METHODS: dict[str, MethodInfo] = {
    "freeze": MethodInfo(
        "freeze", "train the last N layers (or parameters matching patterns)", _ADAPTER_DEFAULTS
    ),
    "ptuning": MethodInfo(
        "ptuning", "P-Tuning: v1 prompt encoder on the input, v2 deep prefix per layer", _ADAPTER_DEFAULTS
    ),
    "lora": MethodInfo("lora", "low-rank adapters on the chosen linear layers", _ADAPTER_DEFAULTS),
    "full": MethodInfo("full", "every weight trains", _FULL_DEFAULTS),
}


def method_info(method: MethodSpec | str) -> MethodInfo:
    name = method if isinstance(method, str) else method.method
    return METHODS[name]


def run_name_base(method: MethodSpec) -> str:
    """The prefix of a method's run names: its ``name`` or the method itself."""
    return method.name or method.method


def supports_gradient_checkpointing(method: MethodSpec) -> bool:
    """peft refuses prefix tuning (P-Tuning v2) together with gradient checkpointing."""
    return not (isinstance(method, PtuningMethod) and method.version == "v2")


def describe(method: MethodSpec) -> str:
    """A short label for tables: ``lora r16/a64``, ``lora r8/a32 dora pissa``, ``ptuning v2 p16``,
    ``freeze last 4``."""
    if isinstance(method, LoraMethod):
        alpha = f"{method.lora_alpha:g}"
        variants = lora_variant_labels(method.model_dump(mode="json"))
        return " ".join([f"lora r{method.r}/a{alpha}", *variants])
    if isinstance(method, PtuningMethod):
        return f"ptuning {method.version} p{method.pre_seq_len}"
    if isinstance(method, FreezeMethod):
        if method.trainable_layers is not None:
            return f"freeze last {method.trainable_layers}"
        return "freeze patterns"
    assert isinstance(method, FullMethod)
    return "full"

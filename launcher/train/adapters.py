"""Apply a fine-tuning method to a loaded model: the one place that decides which parameters train.

Freeze (last N layers and/or name patterns), P-Tuning v1 (peft PromptEncoder), P-Tuning v2 (peft
PrefixTuning), LoRA (peft) and full fine-tuning. User mistakes (a pattern that matches nothing, an
unknown LoRA target, prefix tuning with gradient checkpointing) raise ``UserError`` naming the real
parameter / module names, before anything is trained.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from launcher.errors import UserError
from launcher.model.modules import layer_list_prefix, linear_module_names, param_numel
from launcher.spec.schema import (
    MUTATING_LORA_INITS,
    FreezeMethod,
    FullMethod,
    LoraMethod,
    MethodSpec,
    PtuningMethod,
)

# Freeze with neither layers nor patterns: train the last 2 blocks (LLaMA-Factory's default).
_NAMES_SHOWN = 12
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParamCounts:
    trainable: int
    total: int

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def describe(self) -> str:
        """peft's log line, so numbers compare with other tools' logs."""
        return (
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
            f"|| trainable%: {self.trainable_pct:.4f}"
        )


def count_params(model: nn.Module) -> ParamCounts:
    trainable = total = 0
    for param in model.parameters():  # shared (tied) parameters are yielded once
        n = param_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return ParamCounts(trainable=trainable, total=total)


def is_gradient_checkpointing(model: nn.Module) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag) or any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def check_method_compat(method: MethodSpec, *, gradient_checkpointing: bool) -> None:
    """Combinations peft refuses, reported in the spec's terms (the plan can call this too)."""
    if isinstance(method, PtuningMethod) and method.version == "v2" and gradient_checkpointing:
        raise UserError(
            "ptuning v2 (prefix tuning) does not work with gradient checkpointing (peft refuses it: the "
            "prefix key/value cache is not recomputed). Fix: set `gradient_checkpointing: false` for this "
            "method (resources.gradient_checkpointing or training.gradient_checkpointing), or use "
            "`version: v1`."
        )


def apply_method(
    model: nn.Module, method: MethodSpec, *, gradient_checkpointing: bool = False
) -> tuple[nn.Module, ParamCounts]:
    """Make only the method's parameters trainable; returns the (possibly peft-wrapped) model.

    ``gradient_checkpointing=True`` enables it on the base model first (non-reentrant), in the order
    peft needs; a model that already has it enabled counts as True.
    """
    checkpointing = gradient_checkpointing or is_gradient_checkpointing(model)
    check_method_compat(method, gradient_checkpointing=checkpointing)
    if gradient_checkpointing and not is_gradient_checkpointing(model):
        # transformers 5 renamed it (the old name warns); remote-code models may only have the old one.
        # Non-reentrant checkpointing gives gradients even when the inputs' embeddings are frozen.
        kwargs = {"use_reentrant": False}
        hf_model: Any = model
        if hasattr(hf_model, "activation_checkpointing_enable"):
            hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(hf_model, "gradient_checkpointing_enable"):
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise UserError(f"{type(model).__name__} does not support gradient checkpointing; turn it off.")
    if isinstance(method, FullMethod):
        for param in model.parameters():
            param.requires_grad_(True)
    elif isinstance(method, FreezeMethod):
        _apply_freeze(model, method)
    elif isinstance(method, LoraMethod):
        model = _apply_lora(model, method)
    elif isinstance(method, PtuningMethod):
        model = _apply_ptuning(model, method)
    else:  # pragma: no cover - the spec's discriminated union makes this unreachable
        raise UserError(f"unknown method {getattr(method, 'method', method)!r}")
    counts = count_params(model)
    if counts.trainable == 0:
        raise UserError(f"method {method.method!r} left no trainable parameters ({counts.describe()})")
    return model, counts


# --- freeze --------------------------------------------------------------------------------------


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks, found as the planner finds it
    (``launcher.model.modules.layer_list_prefix``): the numbered module list holding the most parameters."""
    path = layer_list_prefix((name, param_numel(p)) for name, p in model.named_parameters())
    found = model.get_submodule(path) if path is not None else None
    if not isinstance(found, nn.ModuleList) or len(found) == 0:
        raise UserError(
            f"could not find the transformer layer list of {type(model).__name__} for `trainable_layers`; "
            "use `trainable_patterns` (regexes over parameter names) instead"
        )
    return str(path), found


def _sample_names(names: list[str]) -> str:
    shown = names[:_NAMES_SHOWN]
    more = f" ... ({len(names) - len(shown)} more)" if len(names) > len(shown) else ""
    return ", ".join(shown) + more


def _apply_freeze(model: nn.Module, method: FreezeMethod) -> None:
    names = [name for name, _ in model.named_parameters()]
    selected: set[str] = set()
    layers = method.trainable_layers  # validation requires it or trainable_patterns
    if layers is not None:
        path, blocks = find_layer_list(model)
        if layers > len(blocks):
            raise UserError(
                f"freeze: trainable_layers={layers} but the model has only {len(blocks)} layers ({path})"
            )
        prefixes = tuple(f"{path}.{i}." for i in range(len(blocks) - layers, len(blocks)))
        selected.update(n for n in names if n.startswith(prefixes))
    for pattern in method.trainable_patterns or []:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise UserError(f"freeze: trainable_patterns: {pattern!r} is not a valid regex: {exc}") from exc
        matched = [n for n in names if regex.search(n)]
        if not matched:
            raise UserError(
                f"freeze: trainable_patterns: {pattern!r} matches no parameter of the model. "
                f"Parameter names look like: {_sample_names(_spread(names))}"
            )
        selected.update(matched)
    for name, param in model.named_parameters():
        param.requires_grad_(name in selected)


def _spread(names: list[str]) -> list[str]:
    """A few names from the start, middle and end, so the user sees every kind of parameter."""
    if len(names) <= _NAMES_SHOWN:
        return names
    step = len(names) / _NAMES_SHOWN
    return [names[int(i * step)] for i in range(_NAMES_SHOWN)] + names[_NAMES_SHOWN:]


# --- LoRA ----------------------------------------------------------------------------------------


def check_lora_targets(model: nn.Module, targets: list[str] | str) -> None:
    """peft matches a target by module-name suffix; every target must hit at least one Linear."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return
        targets = [targets]
    linear = linear_module_names(model)
    short = sorted({name.rsplit(".", 1)[-1] for name in linear})
    if not targets:
        raise UserError(f"lora: target_modules is empty; valid Linear module names: {', '.join(short)}")
    for target in targets:
        hits = [n for n in linear if n == target or n.endswith("." + target)]
        if not hits:
            raise UserError(
                f"lora: target_modules: {target!r} is not a Linear module of {type(model).__name__}. "
                f'Valid names: {", ".join(short)} (or "all-linear")'
            )


def _apply_lora(model: nn.Module, method: LoraMethod) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    check_lora_targets(model, method.target_modules)
    targets: Any = (
        method.target_modules if isinstance(method.target_modules, str) else list(method.target_modules)
    )
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=method.r,
        lora_alpha=method.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
        lora_dropout=method.lora_dropout,
        target_modules=targets,
        use_dora=method.use_dora,
        use_rslora=method.use_rslora,
        init_lora_weights=method.init_lora_weights,
    )
    if method.init_lora_weights in MUTATING_LORA_INITS and is_quantized(model):
        raise UserError(
            f"lora: init_lora_weights: {method.init_lora_weights} rewrites the base weights, which a "
            "quantized base (model.quantization) cannot hold; use init_lora_weights: true"
        )
    if is_quantized(model):
        from launcher.train.quantization import keep_training_layout

        keep_training_layout(model)
    wrapped = get_peft_model(model, config)  # type: ignore[arg-type]
    names = {name.rsplit(".", 1)[-1] for name in wrapped.targeted_module_names}
    log.info("lora wraps %d modules: %s", len(wrapped.targeted_module_names), ", ".join(sorted(names)))
    return wrapped


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False))


def optimizer_param_groups(
    model: nn.Module, method: MethodSpec, learning_rate: float
) -> tuple[list[dict[str, Any]], list[float]]:
    """The trainable parameters as optimizer groups, and each group's share of the learning rate.

    One group at the learning rate, except for LoRA+ (``loraplus_lr_ratio``): its B matrices form a
    second group at ratio x the rate, as peft's ``create_loraplus_optimizer`` does (Hayou et al., 2024)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ratio = method.loraplus_lr_ratio if isinstance(method, LoraMethod) else None
    if ratio is None:
        return [{"params": [p for _, p in named]}], [1.0]
    b_params = [p for n, p in named if ".lora_B." in n]
    rest = [p for n, p in named if ".lora_B." not in n]
    groups = [{"params": rest, "lr": learning_rate}, {"params": b_params, "lr": learning_rate * ratio}]
    log.info("LoRA+: %d B matrices at %g x the learning rate", len(b_params), ratio)
    return groups, [1.0, float(ratio)]


# --- P-Tuning ------------------------------------------------------------------------------------


def _apply_ptuning(model: nn.Module, method: PtuningMethod) -> nn.Module:
    from peft import PrefixTuningConfig, PromptEncoderConfig, TaskType, get_peft_model

    config: Any
    if method.version == "v1":
        # P-Tuning v1: virtual tokens at the input only, produced by an MLP prompt encoder.
        config = PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=method.pre_seq_len,
            encoder_hidden_size=method.encoder_hidden_size,  # type: ignore[arg-type]  # None: model width
        )
    else:
        # P-Tuning v2: a trained key/value prefix in every layer (ChatGLM's pre_seq_len).
        kwargs: dict[str, Any] = {"prefix_projection": method.prefix_projection}
        if method.encoder_hidden_size is not None:
            kwargs["encoder_hidden_size"] = method.encoder_hidden_size
        config = PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=method.pre_seq_len, **kwargs
        )
    return get_peft_model(model, config)  # type: ignore[arg-type]

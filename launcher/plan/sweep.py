"""Sweep expansion: a pure function from a JobSpec to the list of runs it describes (no I/O).

Axes are dotted keys into the per-run config: ``training.*``, ``eval.*``, ``data.*``, ``model.*``,
``tokenizer.*``, ``template``, ``resources.*`` and ``method.*`` (a method parameter; the axis only applies
to the methods that have that parameter). ``grid`` axes form a cartesian product, ``zip`` axes vary
together, ``seeds`` repeats every configuration. Per-method ``overrides`` use the same keys.

Run names are readable (method name + the values that vary: ``lora-lr1e-4-src1024``); run ids are a
short hash of the fully resolved config (launcher.rundir.identity), so planning the same spec twice gives the
same ids.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from launcher.plan.methods import run_name_base
from launcher.spec.keys import applies_to, base_config, set_dotted
from launcher.spec.schema import JobSpec, MethodSpec, ResourcesSpec

ABBREVIATIONS: dict[str, str] = {
    "training.learning_rate": "lr",
    "training.max_source_length": "src",
    "training.max_target_length": "tgt",
    "training.max_length": "len",
    "training.per_device_batch_size": "bs",
    "training.gradient_accumulation_steps": "ga",
    "training.global_batch_size": "gbs",
    "training.num_epochs": "ep",
    "training.max_steps": "steps",
    "training.warmup_ratio": "wu",
    "training.weight_decay": "wd",
    "training.seed": "seed",
    "training.precision": "",
    "training.lr_scheduler": "",
    "training.gradient_checkpointing": "gc",
    "method.r": "r",
    "method.lora_alpha": "alpha",
    "method.lora_dropout": "drop",
    "method.pre_seq_len": "psl",
    "method.trainable_layers": "last",
    "method.version": "",
    "method.target_modules": "",
    "resources.zero_stage": "z",
    "resources.gpus_per_node": "g",
    "resources.nodes": "n",
    "resources.offload_optimizer": "offopt",
    "resources.offload_param": "offparam",
    "data.max_train_examples": "ntrain",
    "eval.max_new_tokens": "newtok",
    "template": "",
}


@dataclass
class RunPlan:
    """One expanded run before resources are chosen."""

    name: str
    method_index: int
    method: MethodSpec
    swept: dict[str, Any]
    config: dict[str, Any]
    """model, tokenizer, data, template, training, eval as plain data, overrides and sweep applied."""
    resources: dict[str, Any] = field(default_factory=dict)
    """The explicit resource fields for this run (spec level, then method level, then overrides/sweep)."""
    auto: bool = True
    """Whether fields not given explicitly are chosen by the memory model (``resources: auto``)."""


def format_value(value: Any) -> str:
    """Short, filesystem-safe rendering of a swept value: 1e-4, 0.5, 1024, on/off, q+v."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-2:
            mantissa, exponent = f"{value:.3e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            return f"{mantissa}e{int(exponent)}"
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "+".join(format_value(v) for v in value)
    if value is None:
        return "none"
    return re.sub(r"[^A-Za-z0-9.+_]", "", str(value))


def name_part(dotted: str, value: Any) -> str:
    abbr = ABBREVIATIONS.get(dotted, dotted.rsplit(".", 1)[-1].replace("_", ""))
    return f"{abbr}{format_value(value)}"


def _combos(spec: JobSpec, method: MethodSpec) -> list[dict[str, Any]]:
    """The swept assignments for one method, in a fixed order: grid product, then zip rows, then seeds."""
    grid = [(k, v) for k, v in spec.sweep.grid.items() if applies_to(method, k)]
    zipped = [(k, v) for k, v in spec.sweep.zip.items() if applies_to(method, k)]
    grid_rows = [
        dict(zip([k for k, _ in grid], values, strict=True))
        for values in itertools.product(*[v for _, v in grid])
    ]
    n_zip = min((len(v) for _, v in zipped), default=0)
    zip_rows = [{k: v[i] for k, v in zipped} for i in range(n_zip)] or [{}]
    seeds: list[int | None] = [*spec.sweep.seeds] if spec.sweep.seeds else [None]
    out = []
    for g in grid_rows:
        for z in zip_rows:
            for seed in seeds:
                row = {**g, **z}
                if seed is not None:
                    row["training.seed"] = seed
                out.append(row)
    return out


def _varying_keys(spec: JobSpec, method: MethodSpec) -> list[str]:
    keys = [k for k, v in spec.sweep.grid.items() if applies_to(method, k) and len(v) > 1]
    keys += [k for k, v in spec.sweep.zip.items() if applies_to(method, k) and len(set(map(repr, v))) > 1]
    if spec.sweep.seeds and len(spec.sweep.seeds) > 1:
        keys.append("training.seed")
    return keys


def _resource_fields(value: Any) -> tuple[bool | None, dict[str, Any]]:
    """(auto flag or None when unset, explicit fields) of a ``resources`` value."""
    if value is None:
        return None, {}
    if value == "auto":
        return True, {}
    assert isinstance(value, ResourcesSpec)
    return False, value.model_dump(exclude_none=True)


def expand(spec: JobSpec) -> list[RunPlan]:
    """Every run of the spec, in order: methods as listed, then the sweep's combinations."""
    runs: list[RunPlan] = []
    base = base_config(spec)
    spec_auto, spec_fields = _resource_fields(spec.resources)
    for index, method in enumerate(spec.methods):
        method_auto, method_fields = _resource_fields(method.resources)
        varying = _varying_keys(spec, method)
        for combo in _combos(spec, method):
            config = copy.deepcopy(base)
            method_data = method.model_dump(mode="json", exclude={"overrides", "resources"})
            resources = {} if method_auto else dict(spec_fields)
            resources.update(method_fields)
            config["method"] = method_data
            config["resources"] = resources
            for key, value in {**method.overrides, **combo}.items():
                set_dotted(config, key, value)
            name = "-".join([run_name_base(method), *(name_part(k, combo[k]) for k in varying if k in combo)])
            runs.append(
                RunPlan(
                    name=name,
                    method_index=index,
                    method=type(method).model_validate(config.pop("method")),
                    swept=combo,
                    config=config,
                    resources=config.pop("resources"),
                    auto=bool(method_auto) if method_auto is not None else bool(spec_auto),
                )
            )
    return runs

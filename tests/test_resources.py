"""The resource policy: method defaults, `auto` (fewest GPUs, then least offload), errors with the fix."""

from __future__ import annotations

from typing import Any

import pytest

from launcher.plan.archs import bundled_arch
from launcher.plan.resources import ResourceProblem, resolve_resources
from launcher.spec.schema import ClusterSpec, TrainingSpec


def _resolve(
    method: dict[str, Any], explicit: dict[str, Any], auto: bool, mem: float = 80, **training: Any
) -> Any:
    from pydantic import TypeAdapter

    from launcher.spec.schema import MethodSpec

    m = TypeAdapter(MethodSpec).validate_python(method)
    return resolve_resources(
        method=m,
        explicit=explicit,
        auto=auto,
        training=TrainingSpec(**training),  # type: ignore[arg-type]
        cluster=ClusterSpec(gpu_mem_gib=mem, max_gpus_per_node=8),
        arch=bundled_arch("chatglm-6b"),
    )


def test_method_defaults_and_auto_policy() -> None:
    lora = _resolve({"method": "lora"}, {}, auto=False)
    assert (lora.world_size, lora.zero_stage, lora.offload_optimizer) == (1, 2, False)
    full = _resolve({"method": "full"}, {}, auto=False, mem=200)
    assert (full.world_size, full.zero_stage, full.offload_optimizer, full.offload_param) == (
        4,
        3,
        True,
        True,
    )
    assert full.gradient_checkpointing
    # auto: a 6B full fine-tune does not fit one 24 GiB GPU without offload; fewest GPUs come first.
    auto = _resolve({"method": "full"}, {}, auto=True, mem=24, max_source_length=512, max_target_length=128)
    assert auto.fits and auto.est_mem_gib <= 24
    bigger = _resolve({"method": "full"}, {}, auto=True, mem=80, max_source_length=512, max_target_length=128)
    assert bigger.world_size <= auto.world_size
    assert (bigger.offload_optimizer, bigger.offload_param) <= (
        auto.offload_optimizer,
        auto.offload_param,
    ) or bigger.world_size < auto.world_size
    explicit = _resolve({"method": "full"}, {"gpus_per_node": 8, "zero_stage": 3}, auto=True)
    assert explicit.gpus_per_node == 8 and explicit.zero_stage == 3


def test_policy_errors_say_what_to_change() -> None:
    with pytest.raises(ResourceProblem, match="offload_optimizer: true"):
        _resolve(
            {"method": "full"},
            {"gpus_per_node": 1, "zero_stage": 2, "offload_optimizer": False},
            auto=False,
            mem=24,
        )
    with pytest.raises(ResourceProblem, match="peft refuses"):
        _resolve({"method": "ptuning", "version": "v2"}, {"gradient_checkpointing": True}, auto=True)
    with pytest.raises(ResourceProblem, match="zero_stage: 3"):
        _resolve({"method": "full"}, {"zero_stage": 2, "offload_param": True}, auto=True)


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
@pytest.mark.parametrize(("offload_optimizer", "offload_param"), [(True, False), (True, True), (False, True)])
def test_validation_and_policy_share_the_zero_offload_rules(
    zero_stage: int, offload_optimizer: bool, offload_param: bool
) -> None:
    """What the spec's checks refuse is what the resource policy refuses, with the same message; what
    they accept, the policy runs at exactly that stage and offload."""
    from launcher.spec.check import _check_resource_block
    from launcher.spec.schema import ResourcesSpec
    from launcher.spec.yaml_source import Problems

    asked = {"zero_stage": zero_stage, "offload_optimizer": offload_optimizer, "offload_param": offload_param}
    problems = Problems(None, "spec.yaml")
    _check_resource_block(ResourcesSpec(**asked), ("resources",), problems)  # type: ignore[arg-type]
    refused = [e for e in problems.errors if "offload" in e]
    try:
        chosen = _resolve({"method": "lora"}, {**asked, "gpus_per_node": 1}, auto=False)
    except ResourceProblem as exc:
        assert refused and str(exc) in refused[0]
    else:
        assert not refused
        assert (chosen.zero_stage, chosen.offload_optimizer, chosen.offload_param) == (
            zero_stage,
            offload_optimizer,
            offload_param,
        )

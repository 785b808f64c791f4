"""Which ZeRO stages each DeepSpeed offload works with: one table for the spec's checks
(launcher.spec.check) and the resource policy (launcher.plan.resources).

Optimizer offload (ZeRO-Offload) needs a partitioned optimizer, so any stage from 1; parameter offload
(ZeRO-Infinity) needs partitioned parameters, so stage 3.
"""

from __future__ import annotations

# offload key -> (the ZeRO stages it works with, how the stages are named in a message)
OFFLOAD_STAGES: dict[str, tuple[frozenset[int], str]] = {
    "offload_optimizer": (frozenset({1, 2, 3}), "zero_stage 1, 2 or 3"),
    "offload_param": (frozenset({3}), "zero_stage: 3"),
}
_WHAT = {"offload_optimizer": "optimizer offload", "offload_param": "parameter offload"}


def offload_works(offload: str, zero_stage: int) -> bool:
    return zero_stage in OFFLOAD_STAGES[offload][0]


def offload_conflicts(
    zero_stage: int | None, *, offload_optimizer: bool | None, offload_param: bool | None
) -> list[tuple[str, str]]:
    """(offload key, message) for every offload asked for at a ZeRO stage it does not work with; an
    unset stage conflicts with nothing (the policy picks one that works)."""
    if zero_stage is None:
        return []
    asked = {"offload_optimizer": offload_optimizer, "offload_param": offload_param}
    return [
        (key, f"{_WHAT[key]} needs {OFFLOAD_STAGES[key][1]} (got {zero_stage})")
        for key, on in asked.items()
        if on and not offload_works(key, zero_stage)
    ]

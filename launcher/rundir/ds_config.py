"""The run directory's ``ds_config.json``: the planner writes the scheduler's step counts as "auto",
and the rank that knows the real number of steps fills them in, by this one rule.
"""

from __future__ import annotations

import copy
import math
from typing import Any

AUTO = "auto"


def fill_scheduler_auto(
    ds_config: dict[str, Any], total_num_steps: int, warmup_ratio: float
) -> dict[str, Any]:
    """A copy with the scheduler's "auto" step counts filled (called by train before deepspeed.initialize)."""
    cfg = copy.deepcopy(ds_config)
    params = cfg.get("scheduler", {}).get("params", {})
    total = max(int(total_num_steps), 1)
    if (
        cfg.get("scheduler", {}).get("type") == "WarmupDecayLR"
        and params.get("total_num_steps") == params.get("warmup_num_steps") == AUTO
        and math.ceil(total * warmup_ratio) < 1
    ):
        _linear_decay_from_the_first_step(params, total)
        return cfg
    if params.get("total_num_steps") == AUTO:
        params["total_num_steps"] = total
    if params.get("warmup_num_steps") == AUTO:
        warmup = math.ceil(total * warmup_ratio)
        if warmup < 1:
            # DeepSpeed rejects warmup_num_steps 0; one "warm-up" step that starts at the full rate is
            # the same as no warm-up.
            warmup = 1
            if "warmup_max_lr" in params:
                params["warmup_min_lr"] = params["warmup_max_lr"]
            if "warmup_min_ratio" in params:
                params["warmup_min_ratio"] = 1.0
        params["warmup_num_steps"] = warmup
    return cfg


def _linear_decay_from_the_first_step(params: dict[str, Any], total: int) -> None:
    """WarmupDecayLR without warm-up: step s (0-based) at ``min + (max - min) * (total - s) / total``, as
    transformers' linear schedule without warm-up.

    DeepSpeed keeps at least 2 warm-up steps, starting from ``warmup_min_lr``, and decays towards
    ``warmup_min_lr``, so setting min = max to skip the warm-up also froze the rate for the whole run.
    Instead the scheduler starts past its warm-up (``last_batch_iteration`` 1: it leaves the optimizer's
    own rate, the peak, for the first step) and decays over one step more, from a peak scaled so that
    step s+1 gets ``(total - s) / total`` of the way."""
    low, high = params.get("warmup_min_lr", 0.0), params["warmup_max_lr"]
    share = (total - 1) / total
    if isinstance(high, list):
        lows = low if isinstance(low, list) else [low] * len(high)
        params["warmup_max_lr"] = [lo + (hi - lo) * share for lo, hi in zip(lows, high, strict=True)]
    else:
        params["warmup_max_lr"] = low + (high - low) * share
    params["warmup_num_steps"] = 2  # DeepSpeed's least
    params["total_num_steps"] = total + 1
    params["last_batch_iteration"] = 1

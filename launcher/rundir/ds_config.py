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

"""The filled ds_config's linear schedule, run through DeepSpeed's own scheduler class, gives the rates of
transformers' linear schedule: from the peak at the first step down to peak / total at the last."""

from __future__ import annotations

import pytest
import torch

from launcher.rundir.ds_config import fill_scheduler_auto


def rates_per_step(make_scheduler, steps: int, peak: float) -> list[float]:
    """The rate each optimizer step runs at (optimizer.step, then scheduler.step, as the engine does)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=peak)
    scheduler = make_scheduler(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def _planned(peak: float) -> dict:
    # what launcher.plan.dsconfig writes for lr_scheduler: linear
    params = {
        "warmup_num_steps": "auto",
        "total_num_steps": "auto",
        "warmup_min_lr": 0.0,
        "warmup_max_lr": peak,
    }
    return {"scheduler": {"type": "WarmupDecayLR", "params": {**params, "warmup_type": "linear"}}}


@pytest.mark.parametrize("total", [1, 2, 37])
def test_linear_without_warmup_decays_like_transformers(total: int) -> None:
    from deepspeed.runtime.lr_schedules import WarmupDecayLR
    from transformers import get_linear_schedule_with_warmup

    peak = 5e-4
    params = fill_scheduler_auto(_planned(peak), total, 0.0)["scheduler"]["params"]
    ours = rates_per_step(lambda opt: WarmupDecayLR(opt, **params), total, peak)
    reference = rates_per_step(lambda opt: get_linear_schedule_with_warmup(opt, 0, total), total, peak)
    assert ours == pytest.approx(reference, rel=1e-9, abs=1e-15)
    assert ours[0] == peak and ours[-1] == pytest.approx(peak / total)


def test_group_rates_keep_their_ratio() -> None:
    """LoRA+ scales the bounds per parameter group after the fill: the decay stays proportional."""
    params = fill_scheduler_auto(_planned(1e-3), 10, 0.0)["scheduler"]["params"]
    assert params["warmup_min_lr"] == 0.0 and params["warmup_max_lr"] == pytest.approx(0.9e-3)
    with_warmup = fill_scheduler_auto(_planned(1e-3), 10, 0.2)["scheduler"]["params"]
    assert with_warmup["warmup_num_steps"] == 2 and with_warmup["total_num_steps"] == 10
    assert "last_batch_iteration" not in with_warmup and with_warmup["warmup_max_lr"] == 1e-3

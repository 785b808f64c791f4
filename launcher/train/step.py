"""One optimizer step whose loss and gradient are the mean over every target token of the global batch.

A global batch is split into micro-batches (``per_device_batch_size``), accumulation steps and ranks.
Averaging per-micro-batch means - what ``loss.mean()`` per micro-batch and DeepSpeed's averaging give -
weighs the tokens of a short micro-batch more than those of a long one, so the same examples would train
differently under another split (the gradient-accumulation defect). Here every micro-batch contributes
(sum of its token losses) / (target tokens of the whole global batch), counted before the first forward
and summed over ranks, so the step's gradient is that of the global token-weighted mean whatever the
split: micro-batch size, accumulation, ranks, nodes, packing.

DeepSpeed's ``engine.backward`` divides a loss by the accumulation steps unless told not to
(``scale_wrt_gas``), and ZeRO-2/3 average gradients over the data-parallel ranks (they divide the
reduced sum by the rank count). Our share is already the right fraction of the global mean, so the
accumulation division is switched off and the rank average is undone by multiplying by the rank count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from launcher.train.checkpoint import TrainState
from launcher.train.distributed import all_reduce_sum
from launcher.train.target_loss import TargetOnlyLoss, target_count

Batch = dict[str, torch.Tensor]


@dataclass
class StepTotals:
    """What all ranks agree on after an optimizer step."""

    loss: float
    """Mean loss per target token over the global batch (every rank, every micro-batch)."""
    tokens: int
    """Real (non-pad) tokens of the global batch."""
    targets: int
    """Target tokens of the global batch."""
    stop_votes: int
    """Ranks that asked to stop (a preemption signal arrived)."""
    grad_norm: float | None
    """Norm of the global gradient before clipping, when the engine reports it."""


class BatchCursor:
    """The next micro-batches of a batch order, epoch after epoch, from where ``state`` stands.

    An epoch's order is built once, not per micro-batch. Moving to the next epoch is lazy (when a batch
    is asked for past the end), so a state saved at the end of an epoch reads as that epoch complete."""

    def __init__(self, order: Any) -> None:
        self._order = order
        self._epoch = -1
        self._batches: list[Any] = []

    def take(self, state: TrainState, count: int) -> list[Any]:
        """The next ``count`` batches (example indices), advancing ``state`` past them."""
        taken: list[Any] = []
        while len(taken) < count:
            if self._epoch != state.epoch:
                self._epoch, self._batches = state.epoch, self._order.batches(state.epoch)
            if state.batches_done >= len(self._batches):
                state.epoch += 1
                state.batches_done = 0
                continue
            taken.append(self._batches[state.batches_done])
            state.batches_done += 1
            state.micro_steps += 1
        return taken


def data_parallel_ranks(engine: Any, default: int) -> int:
    """The rank count DeepSpeed averages gradients over."""
    return int(getattr(engine, "dp_world_size", default) or default)


def optimizer_step(
    engine: Any,
    loss_fn: TargetOnlyLoss,
    micro_batches: Sequence[Batch],
    *,
    real_tokens: int,
    device: torch.device,
    ranks: int,
    stop_requested: bool,
    to_device: Callable[[Batch], Batch],
) -> StepTotals:
    """Forward, backward and ``engine.step()`` for each of this rank's micro-batches of one optimizer
    step (host tensors, all of them: their targets are counted first), then one all_reduce of the step's
    loss, tokens and stop votes. ``ranks``: the data-parallel rank count (``data_parallel_ranks``)."""
    local_targets = sum(target_count(batch) for batch in micro_batches)  # host tensors: no device sync
    (global_targets,) = all_reduce_sum([float(local_targets)], device)
    denominator = max(1.0, global_targets)
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    for i, cpu_batch in enumerate(micro_batches):
        share = loss_fn.loss_sum(engine, to_device(cpu_batch)) / denominator
        engine.backward(share * ranks, scale_wrt_gas=False)
        if engine.is_gradient_accumulation_boundary() != (i == len(micro_batches) - 1):  # before step()
            raise RuntimeError(
                f"{len(micro_batches)} micro-batches per optimizer step, but DeepSpeed accumulates "
                f"{engine.gradient_accumulation_steps()}"
            )
        engine.step()
        loss_total += share.detach().double()
    loss, tokens, stop_votes = all_reduce_sum(
        [float(loss_total.item()), float(real_tokens), 1.0 if stop_requested else 0.0], device
    )
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    return StepTotals(
        loss=loss,
        tokens=int(tokens),
        targets=int(global_targets),
        stop_votes=int(stop_votes),
        grad_norm=float(norm) if norm is not None else None,
    )

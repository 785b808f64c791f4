"""What the phases of a training run share on one rank (launcher/train/loop.py, finish.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from launcher.data.templates import ChatFormat
from launcher.rundir.paths import RunPaths
from launcher.rundir.run_config import RunConfig
from launcher.train import checkpoint as ckpt
from launcher.train.distributed import DistEnv
from launcher.train.loggers import MetricLoggers
from launcher.train.memory import combine_peaks, peak_memory_all_ranks
from launcher.train.setup import TrainData
from launcher.train.target_loss import TargetOnlyLoss


@dataclass
class TrainingRun:
    """What the phases of one run share on one rank."""

    cfg: RunConfig
    paths: RunPaths
    env: DistEnv
    device: torch.device
    tokenizer: Any
    template_used: str
    """What ``template`` (``auto`` resolved for this model) the run trains with, as result.json says."""
    chat: ChatFormat
    """The run's chat format, built once: training data, eval prompts and the export use it."""
    data: TrainData
    engine: Any
    loss_fn: TargetOnlyLoss
    total_steps: int
    batches_per_epoch: int
    state: ckpt.TrainState = field(default_factory=ckpt.TrainState)
    trackers: MetricLoggers | None = None
    """Opened when the run resumes (they continue at its step)."""

    @property
    def rank0(self) -> bool:
        return self.env.is_rank0

    @property
    def exclude_frozen(self) -> bool:
        return self.cfg.method.method != "full"  # frozen weights come back from the base model

    @property
    def loggers(self) -> MetricLoggers:
        if self.trackers is None:
            raise RuntimeError("the metric loggers are opened when the run resumes")
        return self.trackers

    def epoch_progress(self) -> float:
        return self.state.epoch + self.state.batches_done / max(1, self.batches_per_epoch)

    def save(self) -> None:
        state = self.state
        state.peak_memory = asdict(combine_peaks(peak_memory_all_ranks(self.device), state.peak_memory))
        ckpt.save_checkpoint(
            self.engine,
            self.paths.checkpoints,
            state,
            rank=self.env.rank,
            keep=self.cfg.training.save_total_limit,
            exclude_frozen=self.exclude_frozen,
        )

    def eval_loss(self) -> float:
        from launcher.train.evaluate import eval_loss

        data = self.data
        batch_size = self.cfg.training.per_device_batch_size
        return eval_loss(self.engine, data.eval_features, data.pad_token_id, batch_size, self.loss_fn)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

"""Metric loggers behind one small interface: TensorBoard always, W&B and MLflow when the spec asks.

Rank 0 writes TensorBoard event files to ``<run>/tensorboard/`` in every run (``tensorboard --logdir
runs/EXP`` shows all runs of an experiment). ``logging.wandb`` / ``logging.mlflow`` in the spec add
those trackers; their packages are optional extras, imported only when configured.

The same scalar names go to every tracker: ``train/loss``, ``train/lr``, ``train/tokens_per_s``,
``train/epoch``, ``eval/loss``, ``eval/bleu``, ``eval/chrf``, ``eval/bleu4_chatglm``, ``eval/rouge1``,
``eval/rouge2``, ``eval/rougeL``, ``memory/peak_gib`` (the run's peak over all ranks, logged at the
end) and ``memory/rank0_peak_gib`` (rank 0's peak so far, logged with each training record).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from launcher.errors import UserError
from launcher.rundir.paths import RunState
from launcher.spec.trackers import missing_tracker_packages
from launcher.train.memory import peak_memory

if TYPE_CHECKING:
    from launcher.rundir.paths import RunPaths
    from launcher.rundir.run_config import RunConfig
    from launcher.spec.schema import MlflowSpec, WandbSpec
    from launcher.train.result import TrainOutcome

log = logging.getLogger(__name__)

# metrics.jsonl keys -> scalar names (one record per logging step).
TRAIN_TAGS: dict[str, str] = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "epoch": "train/epoch",
}


class MetricLogger(Protocol):
    """What the training loop needs from a tracker; each one is opened and used on rank 0 only."""

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def log_dict(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self, state: str) -> None:
        """``state``: the run's final RunState value (COMPLETED, PREEMPTED, FAILED)."""


class TensorBoardLogger:
    """Event files through torch's SummaryWriter, flushed at every call: a killed rank loses nothing."""

    def __init__(self, log_dir: str, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops the earlier files' events from this step on, so a run resumed
        # from a checkpoint shows each step once (the steps after the checkpoint are trained again).
        self._writer = SummaryWriter(log_dir=log_dir, purge_step=start_step + 1)

    def log_config(self, config: Mapping[str, Any]) -> None:
        import yaml

        text = yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True)
        self._writer.add_text("run.yaml", f"```yaml\n{text}```", global_step=0)
        self._writer.flush()

    def log_dict(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()

    def close(self, state: str) -> None:
        self._writer.close()


class WandbLogger:
    """One W&B run per launcher run; a requeued attempt resumes it (same id)."""

    def __init__(self, spec: WandbSpec, cfg: RunConfig, run_dir: str) -> None:
        import wandb

        self._run = wandb.init(
            project=spec.project,
            entity=spec.entity,
            mode=spec.mode,
            group=spec.group or cfg.experiment,
            tags=spec.tags or None,
            name=cfg.name,
            id=cfg.run_id,  # a hash of the run's config, experiment and name: unique per run
            resume="allow",
            dir=run_dir,
        )

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._run.config.update(dict(config), allow_val_change=True)

    def log_dict(self, metrics: Mapping[str, float], step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self, state: str) -> None:
        if state == RunState.PREEMPTED.value:
            self._run.mark_preempting()
        self._run.finish(exit_code=0 if state in (RunState.COMPLETED.value, RunState.PREEMPTED.value) else 1)


_MLFLOW_STATUS = {RunState.COMPLETED.value: "FINISHED", RunState.PREEMPTED.value: "KILLED"}
_MLFLOW_RUN_TAG = "launcher.run_id"
_MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on a parameter value


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:_MLFLOW_PARAM_CHARS]
    return out


class MlflowLogger:
    """One MLflow run per launcher run, found again by its tag when a requeued attempt resumes."""

    def __init__(self, spec: MlflowSpec, cfg: RunConfig) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self._client = MlflowClient(tracking_uri=spec.tracking_uri)
        name = spec.experiment_name or cfg.experiment
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self._client.create_experiment(name)
            except MlflowException:  # created meanwhile by a concurrent run of the same experiment
                found = self._client.get_experiment_by_name(name)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        else:
            experiment_id = experiment.experiment_id
        runs = self._client.search_runs(
            [experiment_id], filter_string=f"tags.`{_MLFLOW_RUN_TAG}` = '{cfg.run_id}'", max_results=1
        )
        if runs:
            self._run_id = runs[0].info.run_id
            self._client.update_run(self._run_id, status="RUNNING")
        else:
            tags = {_MLFLOW_RUN_TAG: cfg.run_id, "launcher.experiment": cfg.experiment}
            self._run_id = self._client.create_run(experiment_id, run_name=cfg.name, tags=tags).info.run_id

    def log_config(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in _flatten(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(self._run_id, params=params[start : start + 100])

    def log_dict(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        batch = [Metric(name, float(value), now_ms, step) for name, value in metrics.items()]
        self._client.log_batch(self._run_id, metrics=batch)

    def close(self, state: str) -> None:
        self._client.set_terminated(self._run_id, status=_MLFLOW_STATUS.get(state, "FAILED"))


class MetricLoggers:
    """Every configured tracker at once; on ranks other than 0 it holds none and every call is a no-op."""

    def __init__(self, loggers: list[MetricLogger]) -> None:
        self.loggers = loggers
        self._closed = False

    def log_dict(self, metrics: Mapping[str, float | None], step: int) -> None:
        finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if not finite:
            return
        for logger in self.loggers:
            logger.log_dict(finite, step)

    def log_train_record(self, record: Mapping[str, Any], step: int) -> None:
        """One metrics.jsonl record, plus rank 0's peak memory so far."""
        if not self.loggers:
            return
        scalars = {tag: record.get(key) for key, tag in TRAIN_TAGS.items()}
        scalars["memory/rank0_peak_gib"] = peak_memory().peak_mem_gib
        self.log_dict(scalars, step)

    def log_final(self, outcome: TrainOutcome) -> None:
        """The end-of-run numbers of result.json, at the last step."""
        peak = outcome.peak
        scalars: dict[str, float | None] = {
            "eval/loss": outcome.eval_loss,
            "memory/peak_gib": peak.peak_mem_gib,
            "memory/peak_reserved_gib": peak.peak_mem_reserved_gib,
        }
        scalars.update({f"eval/{name}": value for name, value in outcome.scores.items()})
        self.log_dict(scalars, outcome.steps)

    def close(self, state: str) -> None:
        if self._closed:
            return
        self._closed = True
        for logger in self.loggers:
            logger.close(state)


def open_metric_loggers(cfg: RunConfig, paths: RunPaths, *, start_step: int, rank0: bool) -> MetricLoggers:
    """The run's trackers (rank 0; an empty set elsewhere), with the run's config logged once."""
    if not rank0:
        return MetricLoggers([])
    loggers: list[MetricLogger] = [TensorBoardLogger(str(paths.tensorboard), start_step)]
    missing = dict(missing_tracker_packages(cfg.logging))
    if missing:  # validated at submit; a compute node may still have another environment
        raise UserError("; ".join(missing.values()))
    if cfg.logging.wandb is not None:
        loggers.append(WandbLogger(cfg.logging.wandb, cfg, str(paths.root)))
    if cfg.logging.mlflow is not None:
        loggers.append(MlflowLogger(cfg.logging.mlflow, cfg))
    config = cfg.model_dump(mode="json", exclude={"logging"})
    for logger in loggers:
        logger.log_config(config)
    return MetricLoggers(loggers)

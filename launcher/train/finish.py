"""The end of a run on one rank: final checkpoint, eval loss, export, result.json, then samples and BLEU.

What is computed first is kept first: a failure in generation or BLEU leaves the eval loss, the export
and result.json (with the failure as the run's reason).
"""

from __future__ import annotations

import os

from launcher.rundir.paths import RunState, to_json, write_text_atomic
from launcher.rundir.status import failure_reason, record_failure, update_status
from launcher.train.distributed import DistEnv, barrier
from launcher.train.memory import combine_peaks, peak_memory_all_ranks
from launcher.train.result import TrainOutcome, build_result, write_result
from launcher.train.session import TrainingRun
from launcher.train.startup import startup_s


class EvalFailed(RuntimeError):
    """Generation or BLEU failed after training; what was computed before is on disk."""


def node_count(env: DistEnv) -> int:
    """Nodes in the job: from the scheduler when it says, else world size / ranks per node."""
    for var in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if os.environ.get(var) and env.source == "submitit":
            return int(os.environ[var])
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local and int(local) > 0:
        return max(1, env.world_size // int(local))
    return 1


def _examples_seen(run: TrainingRun) -> int:
    """Training examples seen over all ranks: every micro-batch is full (drop_last). Packed rows hold
    several examples: there it is epochs done x examples per epoch (exact for whole epochs)."""
    t, data = run.cfg.training, run.data
    if not t.packing:
        return run.state.micro_steps * t.per_device_batch_size * run.env.world_size
    return round(run.state.micro_steps / max(1, data.order.num_batches) * len(data.train_features))


def _final_eval_and_export(run: TrainingRun) -> TrainOutcome:
    """Final checkpoint, peak memory, eval loss and the export in final/; result.json as RUNNING."""
    from launcher.train.export import export_final

    cfg, state = run.cfg, run.state
    run.save()
    # Training peak of the whole run (all attempts), before generation adds its KV cache.
    peak = combine_peaks(peak_memory_all_ranks(run.device), state.peak_memory)
    final_eval_loss = run.eval_loss()
    export_final(
        run.engine.module,
        cfg.method,
        run.tokenizer,
        run.paths.final,
        zero_stage=cfg.resources.zero_stage,
        is_rank0=run.rank0,
        chat=run.chat,
        initial_adapter=run.paths.lora_init,
    )
    outcome = TrainOutcome(
        steps=state.global_step,
        epochs=run.epoch_progress(),
        tokens=state.tokens,
        train_time_s=state.train_time_s,
        world_size=run.env.world_size,
        nodes=node_count(run.env),
        gradient_checkpointing=cfg.resources.gradient_checkpointing,
        truncated_frac=run.data.truncated_frac,
        peak=peak,
        eval_loss=final_eval_loss,
        scores={},
        template_used=run.template_used,
        query_cut_frac=run.data.query_cut_frac,
        eval_set_hash=run.data.eval_set_hash,
        train_examples=_examples_seen(run),
        startup_s=startup_s(),
    )
    if run.rank0:
        write_result(run.paths, build_result(cfg, run.paths, outcome, RunState.RUNNING.value))
    return outcome


def _samples_and_scores(run: TrainingRun, outcome: TrainOutcome) -> None:
    """Generate the eval samples (all ranks), write them and their BLEU / chrF into ``outcome`` (rank 0).
    A failure is recorded as the run's reason, result.json says FAILED, and EvalFailed is raised."""
    from launcher.train.evaluate import bleu_scores, generate_samples

    cfg, paths, env = run.cfg, run.paths, run.env
    try:
        samples = generate_samples(
            run.engine.module,
            run.tokenizer,
            run.data.eval_examples,
            cfg,
            env.rank,
            env.world_size,
            chat=run.chat,
        )
        if run.rank0:
            write_text_atomic(paths.samples_jsonl, "".join(to_json(s, indent=None) + "\n" for s in samples))
            if samples:
                outcome.scores.update(
                    bleu_scores(samples, cfg.eval.bleu_tokenize, chatglm_bleu4=cfg.eval.chatglm_bleu4)
                )
    except Exception as exc:
        what = " ".join(str(exc).split())  # one line: it becomes the run's reason
        failure = EvalFailed(
            f"eval generation/BLEU failed after training ({type(exc).__name__}: {what}); "
            "the eval loss, the export in final/ and result.json are kept"
        )
        if run.rank0:  # the run's reason: the attempt's earliest failure (another rank's, when it came first)
            first = record_failure(paths, env.rank, failure_reason(failure))
            reason = first.reason if first is not None else str(failure)
            write_result(paths, build_result(cfg, paths, outcome, RunState.FAILED.value, reason=reason))
            run.loggers.close(RunState.FAILED.value)
        raise failure from exc


def finish(run: TrainingRun) -> str:
    """Everything after the last step; returns "COMPLETED" (raises EvalFailed when generation fails)."""
    outcome = _final_eval_and_export(run)
    _samples_and_scores(run, outcome)
    if run.rank0:
        write_result(run.paths, build_result(run.cfg, run.paths, outcome, RunState.COMPLETED.value))
        run.loggers.log_final(outcome)
        run.loggers.close(RunState.COMPLETED.value)
        update_status(run.paths, RunState.COMPLETED, step=run.state.global_step, total_steps=run.total_steps)
    barrier()
    run.engine.destroy()  # drops ZeRO-3's hooks and pending collectives before the process group goes
    return RunState.COMPLETED.value

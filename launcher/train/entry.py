"""The rank-aware entrypoint every rank runs: ``launcher train RUN_DIR`` (= ``python -m launcher.train``).

Exit codes (``EXIT_CODES``, also in ``launcher train --help``): 0 COMPLETED, 1 FAILED (recorded in
status.json), 2 bad input (the run dir cannot be read; nothing started), 3 PREEMPTED (checkpoint
saved; the scheduler may requeue).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from launcher.builtins.ops_cache import use_environment_ops_dir
from launcher.errors import UserError
from launcher.rundir.attempts import record_attempt_end, record_attempt_start
from launcher.rundir.paths import RunPaths, RunState, read_json
from launcher.rundir.run_config import RunConfig
from launcher.rundir.startup import startup_reporting
from launcher.rundir.status import ATTEMPT_ID_ENV, clear_failure, failure_reason, read_status, record_failure
from launcher.train.signals import PreemptionFlag

PREEMPTED_EXIT_CODE = 3
FAILED_EXIT_CODE = 1
EXIT_CODES = (
    "exit 0 completed, 1 failed (recorded in status.json), 2 bad input (nothing started), "
    "3 preempted (checkpoint saved)"
)

log = logging.getLogger("launcher.train")


def _setup_logging(paths: RunPaths, rank: int) -> list[logging.Handler]:
    """Everything this rank logs (ours, DeepSpeed's, transformers') goes to logs/rank{N}.log, and to stderr
    (the scheduler's log) unless the caller already configured logging."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    file_handler = logging.FileHandler(paths.rank_log(rank), encoding="utf-8")
    handlers: list[logging.Handler] = [file_handler]
    root = logging.getLogger()
    # stderr is the scheduler's log, or (local backend) this very file: then one copy is enough.
    if not root.handlers and not _same_file(sys.stderr, paths.rank_log(rank)):
        stream = logging.StreamHandler(sys.stderr)
        stream.addFilter(_without_tracebacks)  # the terminal gets `error: <reason>`, the log the traceback
        handlers.append(stream)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    logging.getLogger("DeepSpeed").addHandler(file_handler)  # DeepSpeed's logger does not propagate
    return handlers


def _same_file(stream: Any, path: Path) -> bool:
    try:
        mine, theirs = os.fstat(stream.fileno()), os.stat(path)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False  # closed, replaced (pytest's capture) or not a file
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def _without_tracebacks(record: logging.LogRecord) -> bool:
    return record.exc_info is None and "Traceback (most recent call last)" not in record.getMessage()


def _teardown_logging(handlers: list[logging.Handler]) -> None:
    for handler in handlers:
        for name in ("", "DeepSpeed"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()


def _load_inputs(paths: RunPaths) -> tuple[RunConfig, dict[str, Any]]:
    for required in (paths.run_yaml, paths.ds_config):
        if not required.is_file():
            raise UserError(
                f"{required}: missing. Is {paths.root} a run directory written by `launcher submit`?"
            )
    try:
        cfg = RunConfig.from_yaml_file(paths.run_yaml)
    except Exception as exc:  # pydantic / yaml errors, in the file's terms
        raise UserError(f"{paths.run_yaml}: not a valid run config: {exc}") from exc
    ds_config = read_json(paths.ds_config)
    if not isinstance(ds_config, dict):
        raise UserError(f"{paths.ds_config}: expected a JSON object")
    return cfg, ds_config


def _record_failure(paths: RunPaths, rank: int, exc: BaseException) -> None:
    """Traceback into this rank's log; the reason into its failure record and status.json."""
    log.error(
        "rank %d failed:\n%s", rank, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    )
    record_failure(paths, rank, failure_reason(exc))


def train_run(run_dir: Path) -> str:
    """Train the run in ``run_dir`` on this rank. Returns "COMPLETED" or "PREEMPTED"; raises after
    writing FAILED to status.json otherwise."""
    paths = RunPaths(Path(run_dir).resolve())
    if read_status(paths).get("state") == RunState.COMPLETED.value and paths.result_json.is_file():
        return RunState.COMPLETED.value
    cfg, ds_config = _load_inputs(paths)
    # Take over SIGTERM/SIGUSR2 before the slow imports (a signal during start-up is not lost) and after
    # submitit installed its own handlers: ours must win.
    flag = PreemptionFlag()
    flag.install()

    # lazy: torch and deepspeed load after the preemption handler is installed
    from launcher.train import startup
    from launcher.train.distributed import detect_dist_env, init_distributed, shutdown_distributed
    from launcher.train.loop import run_training

    startup.begin_run()
    # Before anything in this rank can JIT-build a DeepSpeed op: one build directory per environment
    # (launcher/builtins/ops_cache.py), so no two venvs or containers rebuild each other's ops.
    use_environment_ops_dir()

    try:
        env = detect_dist_env()
        handlers = _setup_logging(paths, env.rank)
        clear_failure(paths, env.rank)  # a previous attempt's failure is history
    except BaseException:
        flag.uninstall()
        raise
    log.info("run %s (%s) rank %d/%d via %s", cfg.name, cfg.run_id, env.rank, env.world_size, env.source)
    attempt = os.environ.get(ATTEMPT_ID_ENV) or f"{os.getpid()}@{time.time():.0f}"
    if env.rank == 0:  # the run's real wall time (launcher.rundir.attempts); one GPU per rank
        with contextlib.suppress(OSError):  # bookkeeping: a full disk fails the run where it writes results
            record_attempt_start(paths, attempt, env.world_size, job_id=os.environ.get("SLURM_JOB_ID"))
    outcome = RunState.FAILED.value
    try:
        with startup_reporting(paths, writes_status=env.is_rank0):
            startup.prepare_ops(ds_config, on_cpu=not _cuda_available())
            startup.report_rendezvous_phase(env.world_size)
            init_distributed(env)
            outcome = run_training(cfg, ds_config, paths, env, flag)
        return outcome
    except BaseException as exc:
        _record_failure(paths, env.rank, exc)
        raise
    finally:
        if env.rank == 0:
            with contextlib.suppress(OSError):  # a full disk must not hide the run's own failure
                record_attempt_end(paths, attempt, outcome)
        flag.uninstall()
        shutdown_distributed()
        _teardown_logging(handlers)


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def exit_code_for(state: str) -> int:
    if state == RunState.COMPLETED.value:
        return 0
    if state == RunState.PREEMPTED.value:
        return PREEMPTED_EXIT_CODE
    return FAILED_EXIT_CODE


def main(argv: Sequence[str] | None = None) -> int:
    """``launcher train RUN_DIR`` / ``python -m launcher.train RUN_DIR``: the exit code (EXIT_CODES)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(f"usage: python -m launcher.train RUN_DIR ({EXIT_CODES})", file=sys.stderr)
        return 2
    paths = RunPaths(Path(args[0]).resolve())
    try:
        _load_inputs(paths)  # an unreadable run dir is bad input: nothing starts, status.json untouched
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        state = train_run(paths.root)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        print(
            f"error: training failed: {failure_reason(exc)} (traceback in {paths.logs}/rank*.log)",
            file=sys.stderr,
        )
        return FAILED_EXIT_CODE
    return exit_code_for(state)


def exit_rank_process(code: int) -> NoReturn:
    """End a rank process without the interpreter's teardown. Everything is on disk by now (results and
    checkpoints are written atomically, the process group is destroyed, log files are closed); but
    during finalization gloo's worker threads can still hold tensors from ZeRO-3's asynchronous
    collectives, and freeing them then aborts the process ("terminate called without an active
    exception", SIGABRT) - which the scheduler would report as a failed rank of a completed run."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing to save
            stream.flush()
    os._exit(code)

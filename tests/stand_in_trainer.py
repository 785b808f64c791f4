"""A tiny stand-in for `python -m launcher.train RUN_DIR`, used only by the backend tests.

It follows the trainer's contract (status.json through ``update_status``, metrics.jsonl, exit 0/3/1,
SIGTERM -> checkpoint -> PREEMPTED, resume from the newest checkpoint) without torch, so backend tests
take seconds. Knobs (environment): STAND_IN_STEP_S (seconds per step), STAND_IN_CRASH="RUN:RANK:STEP"
(that rank raises; the other ranks then block as if inside a collective), and every rank records its
environment in logs/env{RANK}.json so tests can check what the backend passed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import yaml

from launcher.rundir.paths import RENDEZVOUS_FILE_ENV, RunPaths, RunState
from launcher.rundir.status import update_status

STOP = {"signal": None}


def _on_term(signum: int, frame: object) -> None:
    STOP["signal"] = signal.Signals(signum).name


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _status(run_dir: Path, state: str, reason: str | None = None, **extra: object) -> None:
    """Through the trainer's own API: merged under the status lock, like every other writer."""
    update_status(RunPaths(run_dir), RunState(state), reason, **extra)


def main() -> int:
    run_dir = Path(sys.argv[-1])
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGUSR2, _on_term)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = yaml.safe_load((run_dir / "run.yaml").read_text())
    name = cfg["name"]
    total = int(cfg["training"].get("max_steps") or 5)
    step_s = float(os.environ.get("STAND_IN_STEP_S", "0.05"))
    (run_dir / "logs").mkdir(exist_ok=True)
    keys = (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "CUDA_VISIBLE_DEVICES",
        RENDEZVOUS_FILE_ENV,
    )
    env = {k: os.environ.get(k) for k in keys}
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    env["slurm_vars"] = sorted(k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_")))
    env["pid"] = os.getpid()
    env["start"] = time.time()
    env["state_at_start"] = json.loads((run_dir / "status.json").read_text())["state"]
    _write_json(run_dir / "logs" / f"env{rank}.json", env)
    print(f"stand-in rank {rank}/{world} of {name} on port {env['MASTER_PORT']}", flush=True)

    ckpt_dir = run_dir / "checkpoints"
    done = sorted(int(p.name.split("_")[1]) for p in ckpt_dir.glob("step_*")) if ckpt_dir.is_dir() else []
    step = done[-1] if done else 0
    crash = os.environ.get("STAND_IN_CRASH", "")
    crash_run, crash_rank, crash_step = [*crash.split(":"), "", "", ""][:3] if crash else ("", "", "")
    if rank == 0:
        _status(run_dir, "RUNNING", step=step, total_steps=total, resumed_from=step)
    while step < total:
        if STOP["signal"]:
            if rank == 0:
                (ckpt_dir / f"step_{step}").mkdir(parents=True, exist_ok=True)
                _status(
                    run_dir, "PREEMPTED", f"{STOP['signal']} received; checkpoint at step {step}", step=step
                )
            print(f"rank {rank}: preempted at step {step}", flush=True)
            return 3
        step += 1
        if crash_run == name and int(crash_step) == step:
            if int(crash_rank) == rank:
                raise RuntimeError(f"simulated crash of rank {rank} at step {step}")
            time.sleep(1000)  # the survivors hang in a collective that never completes
        time.sleep(step_s)
        if rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as handle:
                record = {"step": step, "loss": 2.0 / step, "tokens_per_s": 100.0, "elapsed_s": step * step_s}
                handle.write(json.dumps(record) + "\n")
            _status(run_dir, "RUNNING", step=step, total_steps=total)
    if rank == 0:
        _write_json(run_dir / "result.json", {"name": name, "state": "COMPLETED", "steps": total})
        _status(run_dir, "COMPLETED", step=total, total_steps=total)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

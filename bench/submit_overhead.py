"""Submission overhead on the test Slurm cluster: a 1,000-run sweep as job arrays vs one sbatch per run.

    .venv/bin/python bench/submit_overhead.py [--runs 1000] [--json out.json]

Both ways plan the same spec (`load_and_plan` + `write_run_dirs`) and submit through submitit; every job
is submitted held (`--hold`) and cancelled right after, so nothing runs and the machine is not
flooded. Printed: wall time of plan and of submit for each way, their ratios, and the number of
sbatch calls (arrays: one per resource shape + the collector job).
Needs the cluster (`bash tests/slurm/cluster.sh up`). Target: <= 3 sbatch calls, >= 50x faster.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SPEC_TEMPLATE = {
    "model": {"builtin": "tiny-glm"},
    "data": {"builtin": "dialogue"},
    "training": {"max_steps": 2, "max_source_length": 32, "max_target_length": 16, "precision": "fp32"},
    "methods": [{"method": "lora"}],
    "resources": {"nodes": 1, "gpus_per_node": 1},
    "cluster": {"partition": "low", "time_min": 10, "cpus_per_task": 1},
}


def write_spec(directory: Path, experiment: str, runs: int) -> Path:
    spec = dict(SPEC_TEMPLATE, experiment=experiment, output_dir=str(directory / "out"))
    # lr x seed grid: 1,000 = 100 learning rates x 10 seeds
    seeds = 10 if runs % 10 == 0 else 1
    lrs = [round(1e-5 * (i + 1), 8) for i in range(runs // seeds)]
    spec["sweep"] = {"grid": {"training.learning_rate": lrs}, "seeds": list(range(seeds))}
    path = directory / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def plan(spec_path: Path) -> tuple[object, list, object]:
    from launcher.plan.planner import load_and_plan, write_run_dirs

    loaded = load_and_plan(spec_path)
    exp = write_run_dirs(loaded)
    return loaded.spec, loaded.runs, exp


def cancel_by_name(name: str) -> None:
    subprocess.run(["scancel", f"--name={name}"], check=False, timeout=60)
    subprocess.run(["scancel", f"--name={name}-collect"], check=False, timeout=60)


def count_jobs(name: str) -> int:
    out = subprocess.run(
        ["squeue", "--noheader", "--array", "--states=PENDING", f"--name={name}", "--format=%i"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return len(out.split())


def bench_arrays(directory: Path, runs: int) -> dict[str, float]:
    from launcher.backends.registry import get_backend
    from launcher.backends.slurm import SlurmBackend, job_name

    name = "bench_arrays"
    t0 = time.perf_counter()
    spec, planned, exp = plan(write_spec(directory, name, runs))
    t1 = time.perf_counter()
    backend = get_backend("slurm", spec)  # type: ignore[arg-type]
    assert isinstance(backend, SlurmBackend)
    backend.hold = True  # submitted held: 1,000 runs queue without running
    submitted = backend.submit(exp, planned, dry_run=False)  # type: ignore[arg-type]
    t2 = time.perf_counter()
    queued = count_jobs(job_name(name))
    cancel_by_name(job_name(name))
    assert len(submitted) == runs, (len(submitted), runs)
    return {
        "runs": len(submitted),
        "plan_s": t1 - t0,
        "submit_s": t2 - t1,
        "sbatch_calls": backend.sbatch_calls,
        "tasks_in_queue": queued,
    }


def bench_one_per_run(directory: Path, runs: int) -> dict[str, float]:
    """The naive way: one executor.submit (one sbatch) per run, same parameters and callable."""
    import submitit

    from launcher.backends.slurm import Shape, job_name, slurm_log_folder
    from launcher.backends.slurm_task import SlurmTask

    name = "bench_single"
    t0 = time.perf_counter()
    _spec, planned, exp = plan(write_spec(directory, name, runs))
    t1 = time.perf_counter()
    calls = 0
    executor = submitit.SlurmExecutor(folder=slurm_log_folder(exp), max_num_timeout=3)  # type: ignore[arg-type]
    shape = Shape.of(planned[0])
    executor.update_parameters(job_name=job_name(name), **shape.executor_parameters(1, hold=True))
    task = SlurmTask(max_requeues=shape.max_requeues)
    for run in planned:
        executor.submit(task, str(exp.root.resolve() / "runs" / run.name))  # type: ignore[attr-defined]
        calls += 1
    t2 = time.perf_counter()
    queued = count_jobs(job_name(name))
    cancel_by_name(job_name(name))
    return {
        "runs": len(planned),
        "plan_s": t1 - t0,
        "submit_s": t2 - t1,
        "sbatch_calls": calls,
        "tasks_in_queue": queued,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    if subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode != 0:
        print("no Slurm cluster: run `bash tests/slurm/cluster.sh up` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="launcher-bench-") as tmp:
        arrays = bench_arrays(Path(tmp), args.runs)
        single = bench_one_per_run(Path(tmp), args.runs)
    result = {
        "arrays": arrays,
        "one_sbatch_per_run": single,
        "submit_speedup": single["submit_s"] / arrays["submit_s"],
        "plan_plus_submit_speedup": (single["plan_s"] + single["submit_s"])
        / (arrays["plan_s"] + arrays["submit_s"]),
    }
    print(f"runs: {args.runs}")
    for label, r in (("arrays", arrays), ("one sbatch per run", single)):
        print(
            f"  {label:<20} plan {r['plan_s']:7.2f} s   submit {r['submit_s']:7.2f} s   "
            f"sbatch calls {r['sbatch_calls']:5d}   tasks queued {r['tasks_in_queue']}"
        )
    print(f"  submit speedup (arrays vs one per run):        {result['submit_speedup']:.1f}x")
    print(f"  plan+submit speedup (arrays vs one per run):   {result['plan_plus_submit_speedup']:.1f}x")
    ok = arrays["sbatch_calls"] <= 3 and result["submit_speedup"] >= 50
    print(f"  target (<= 3 sbatch calls, >= 50x submit): {'met' if ok else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

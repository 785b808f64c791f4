"""Peak memory of real training steps against the planner's estimate, per method x ZeRO-2/3 x offload x
gradient checkpointing x 1/2 ranks.

    .venv/bin/python bench/memory_check.py [--only SUBSTRING ...] [--steps 3] [--json out.json]

Every case is a real run of the built-in tiny model through the trainer's own entrypoint
(``launcher.train.entry.train_run``, one process per rank, DeepSpeed on gloo), on fixed-length examples
(every example exactly max_source + max_target + 1 tokens, the length the planner assumes), fp32 and two
bf16 cases.

Measured per rank, from the check of the target-only loss to the end of the last optimizer step:
- on CPU, the peak of live tensor bytes from the profiler's memory events
  (``torch.profiler.profile(profile_memory=True)``): the CPU allocator reports every allocation and free
  with its running total of live bytes. The profiler starts before the model is loaded, so every live
  tensor is counted. Not RSS, which also holds the interpreter, the libraries and pages the C allocator
  keeps after a free;
- on CUDA, ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` over the same window.

Compared with ``launcher.plan.resources.run_estimate`` for the same run: on CPU its allocated estimate without
CUDA-only terms (no context, no allocator cache, CPU dropout kernels) plus the offloaded (host) states,
since there the "device" and the host are one memory; on CUDA the allocated and the reserved estimate.
One line per case (the largest rank), then a summary; exit 1 if a ratio leaves [0.85, 1.15].
``--explain`` prints, per rank, the live tensors at the peak grouped by the code that allocated them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RATIO_BOUNDS = (0.85, 1.15)
MIB = 2**20
MAX_SOURCE, MAX_TARGET = 256, 64
METHODS: dict[str, dict[str, Any]] = {
    "freeze": {"method": "freeze", "trainable_layers": 1},
    "lora": {"method": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05},
    "dora": {"method": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "use_dora": True},
    "rslora": {"method": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "use_rslora": True},
    "ptuning-v1": {"method": "ptuning", "version": "v1", "pre_seq_len": 16},
    "ptuning-v2": {"method": "ptuning", "version": "v2", "pre_seq_len": 16},
    "full": {"method": "full"},
}
# (zero stage, offload optimizer, offload parameters): the four DeepSpeed templates
ZERO = {
    "z2": (2, False, False),
    "z2-off": (2, True, False),
    "z3": (3, False, False),
    "z3-off": (3, True, True),
}
EXPLAIN_ENV = "MEMORY_CHECK_EXPLAIN"


@dataclass(frozen=True)
class Case:
    method: str
    zero: str
    checkpointing: bool
    ranks: int
    precision: str = "fp32"

    @property
    def name(self) -> str:
        gc = "-gc" if self.checkpointing else ""
        return f"{self.method}-{self.zero}{gc}-r{self.ranks}-{self.precision}"


def all_cases() -> list[Case]:
    cases = [
        Case(method, zero, gc, ranks)
        for ranks in (1, 2)
        for method in METHODS
        for zero in ZERO
        for gc in (False, True)
        if not (gc and method == "ptuning-v2")  # prefix tuning cannot recompute its cache (peft refuses)
        and not (method == "dora" and zero.startswith("z3"))  # DoRA needs whole weights (the plan refuses)
    ]
    # bf16: 2-byte weights, activations and buckets, fp32 master and Adam states
    return [*cases, Case("full", "z2", False, 2, "bf16"), Case("lora", "z3", True, 2, "bf16")]


# --- run directories and the planner's estimate ---------------------------------------------------


def run_config(case: Case, data_file: Path, steps: int, micro_batch: int) -> Any:
    from launcher.rundir.run_config import build_run_config, resolved_resources
    from launcher.spec.schema import ClusterSpec, DataSpec, EvalSpec, ModelSpec, TokenizerSpec, TrainingSpec

    zero, off_opt, off_param = ZERO[case.zero]
    return build_run_config(
        experiment="memory-check",
        name=case.name,
        run_id=case.name,
        method=METHODS[case.method],  # type: ignore[arg-type]
        model=ModelSpec(builtin="tiny-glm"),
        tokenizer=TokenizerSpec(),
        data=DataSpec(  # memory, not generalisation: eval on the training file is fine here
            train_file=str(data_file), eval_file=str(data_file), max_eval_examples=2, allow_eval_overlap=True
        ),
        template="chatglm",
        training=TrainingSpec(
            learning_rate=1e-3,
            max_steps=steps,
            per_device_batch_size=micro_batch,
            max_source_length=MAX_SOURCE,
            max_target_length=MAX_TARGET,
            precision=case.precision,  # type: ignore[arg-type]
            logging_steps=1,
            save_steps=1_000_000,
        ),
        eval=EvalSpec(max_new_tokens=1, num_samples=1, batch_size=1),
        resources=resolved_resources(
            nodes=1,
            gpus_per_node=case.ranks,
            zero_stage=zero,
            offload_optimizer=off_opt,
            offload_param=off_param,
            gradient_checkpointing=case.checkpointing,
            est_mem_gib=0.0,
            fits=True,
        ),
        cluster=ClusterSpec(),
    )


def write_run_dir(root: Path, cfg: Any) -> Path:
    from launcher.plan.archs import tiny_glm_arch
    from launcher.plan.dsconfig import render_ds_config
    from launcher.rundir.paths import RunPaths, RunState, write_json_atomic, write_text_atomic
    from launcher.rundir.status import update_status

    paths = RunPaths(root / cfg.name)
    paths.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths.run_yaml, cfg.to_yaml())
    write_json_atomic(paths.ds_config, render_ds_config(cfg, tiny_glm_arch().hidden_size))
    update_status(paths, RunState.PLANNED)
    return paths.root


def planner_estimate(cfg: Any, on_cpu: bool) -> Any:
    from launcher.plan.archs import tiny_glm_arch
    from launcher.plan.methods import ResourceChoice
    from launcher.plan.resources import run_estimate

    r = cfg.resources
    choice = ResourceChoice(
        r.nodes, r.gpus_per_node, r.zero_stage, r.offload_optimizer, r.offload_param, r.gradient_checkpointing
    )
    return run_estimate(tiny_glm_arch(), cfg.method, cfg.training, choice, on_cpu=on_cpu)


# --- one rank (subprocess) ------------------------------------------------------------------------


class Window:
    """Marks (wall-clock ns, the profiler's clock) of the measured window: from the check of the
    target-only loss to the end of each optimizer step; on CUDA the allocator's peaks at those marks."""

    def __init__(self) -> None:
        self.start_ns = 0
        self.step_ends_ns: list[int] = []
        self.cuda_peaks: list[tuple[int, int]] = []

    def install(self) -> None:
        import torch
        from deepspeed.runtime.engine import DeepSpeedEngine

        from launcher.train.target_loss import TargetOnlyLoss

        window, verify, step = self, TargetOnlyLoss.verify, DeepSpeedEngine.step

        def marked_verify(loss: Any, *args: Any, **kwargs: Any) -> Any:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            window.start_ns = time.time_ns()
            return verify(loss, *args, **kwargs)

        def marked_step(engine: Any, *args: Any, **kwargs: Any) -> Any:
            out = step(engine, *args, **kwargs)
            window.step_ends_ns.append(time.time_ns())
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                peaks = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
                window.cuda_peaks.append(peaks)
            return out

        TargetOnlyLoss.verify = marked_verify  # type: ignore[method-assign]
        DeepSpeedEngine.step = marked_step  # type: ignore[method-assign]


def allocation_events(prof: Any) -> list[Any]:
    """Every CPU allocation/free event of the profiler, in time order."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append(event)
        stack.extend(event.children)
    events.sort(key=lambda e: e.start_time_ns)
    return events


def peak_between(events: list[Any], start_ns: int, end_ns: int) -> tuple[int, int]:
    """(live bytes, time ns) at the largest running total the allocator reported in the window."""
    best = (-1, 0)
    for event in events:
        if start_ns <= event.start_time_ns <= end_ns and event.extra_fields.total_allocated > best[0]:
            best = (int(event.extra_fields.total_allocated), event.start_time_ns)
    return best


def explain_peak(events: list[Any], at_ns: int, top: int = 20) -> list[tuple[int, str]]:
    """The tensors live at ``at_ns`` grouped by the op and the innermost project/library frames that
    allocated them (needs the profiler's ``with_stack``)."""
    from collections import Counter

    from torch._C._profiler import _EventType

    live: dict[int, Any] = {}
    for event in events:
        if event.start_time_ns > at_ns:
            break
        fields = event.extra_fields
        if fields.alloc_size > 0:
            live[fields.ptr] = event
        else:
            live.pop(fields.ptr, None)

    def origin(event: Any) -> str:
        op, frames, parent = None, [], event.parent
        while parent is not None:
            if parent.tag == _EventType.TorchOp and op is None:
                op = parent.name
            if parent.tag == _EventType.PyCall:
                try:
                    name = parent.name
                except UnicodeDecodeError:  # a frame name the profiler cut mid-character
                    name = ""
                if any(lib in name for lib in ("launcher/", "deepspeed/", "transformers/", "peft/")):
                    frames.append(name.split("site-packages/")[-1])
            parent = parent.parent
        return f"{op} <- " + " <- ".join(frames[:3])

    totals: Counter[str] = Counter()
    for event in live.values():
        totals[origin(event)] += event.extra_fields.alloc_size
    return [(nbytes, where) for where, nbytes in totals.most_common(top)]


def worker(run_dir: Path, out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from launcher.train.entry import train_run

    window = Window()
    window.install()
    if torch.cuda.is_available():
        state = train_run(run_dir)
        allocated, reserved = window.cuda_peaks[-1]
        result = {"allocated": allocated, "reserved": reserved}
    else:
        from torch.profiler import ProfilerActivity, profile

        explain = bool(os.environ.get(EXPLAIN_ENV))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=explain) as prof:
            state = train_run(run_dir)
        events = allocation_events(prof)
        peak, at_ns = peak_between(events, window.start_ns, window.step_ends_ns[-1])
        result = {"allocated": peak}
        if explain:
            result["explain"] = explain_peak(events, at_ns)
    result["state"] = state
    out.write_text(json.dumps(result))


# --- orchestration --------------------------------------------------------------------------------


def run_case(case: Case, root: Path, cfg: Any) -> list[dict[str, Any]]:
    from launcher.backends.launch_env import free_port, torchrun_env

    run_dir = write_run_dir(root, cfg)
    port = free_port()
    procs = []
    for rank in range(case.ranks):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SUBMITIT_", "SLURM_"))}
        env |= torchrun_env(rank, case.ranks, port)
        env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        log = open(run_dir / f"memory-check-rank{rank}.log", "w")  # noqa: SIM115 - closed below
        cmd = [sys.executable, __file__, "--worker", str(run_dir), str(run_dir / f"peak{rank}.json")]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=900))
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            codes.append(None)
        log.close()
    if any(codes):
        tail = (run_dir / "memory-check-rank0.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{case.name}: ranks exited with {codes}\n{tail}")
    return [json.loads((run_dir / f"peak{r}.json").read_text()) for r in range(case.ranks)]


def check_case(case: Case, root: Path, data_file: Path, steps: int, micro_batch: int) -> dict[str, Any]:
    """Train the case, estimate it; the row with measured / estimated ratios (largest rank)."""
    import torch

    on_cuda = torch.cuda.is_available()
    cfg = run_config(case, data_file, steps, micro_batch)
    measured = run_case(case, root, cfg)
    est = planner_estimate(cfg, on_cpu=not on_cuda)
    row: dict[str, Any] = {"case": case.name, "ranks": measured, "estimate": est.to_json()}
    row["allocated"] = max(m["allocated"] for m in measured)
    if on_cuda:
        row["estimated"] = est.allocated_bytes
        row["reserved"] = max(m["reserved"] for m in measured)
        row["estimated_reserved"] = est.reserved_bytes
        row["ratios"] = [row["allocated"] / est.allocated_bytes, row["reserved"] / est.reserved_bytes]
    else:
        row["estimated"] = est.allocated_bytes + est.host_bytes  # one memory on CPU
        row["ratios"] = [row["allocated"] / row["estimated"]]
    return row


def format_row(row: dict[str, Any]) -> str:
    text = (
        f"{row['case']:<30} measured {row['allocated'] / MIB:8.2f} MiB  "
        f"estimated {row['estimated'] / MIB:8.2f} MiB  ratio {row['ratios'][0]:5.2f}"
    )
    if "reserved" in row:
        text += (
            f"   reserved {row['reserved'] / MIB:8.2f} MiB  estimated {row['estimated_reserved'] / MIB:8.2f}"
            f" MiB  ratio {row['ratios'][1]:5.2f}"
        )
    return text


def in_bounds(row: dict[str, Any]) -> bool:
    return all(RATIO_BOUNDS[0] <= r <= RATIO_BOUNDS[1] for r in row["ratios"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[], help="the cases whose name contains one of these")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per case")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--keep", type=Path, help="write the run directories (with rank logs) here")
    parser.add_argument("--explain", action="store_true", help="print what is live at each peak (CPU)")
    parser.add_argument("--list", action="store_true", help="list the case names and exit")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        from launcher.train.entry import exit_rank_process

        exit_rank_process(0)  # no interpreter teardown after ZeRO-3 engines (gloo threads can abort it)
    cases = [c for c in all_cases() if not args.only or any(s in c.name for s in args.only)]
    if args.list or not cases:
        print("\n".join(c.name for c in all_cases()))
        return 0 if args.list else 2
    if args.explain:
        os.environ[EXPLAIN_ENV] = "1"

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_throughput import fixed_length_data

    from launcher.builtins.tiny import ensure_tiny_model

    ensure_tiny_model()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="memory-check-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        data_file = root / "fixed.jsonl"
        fixed_length_data(data_file, 8 * args.micro_batch, MAX_SOURCE, MAX_TARGET)
        for case in cases:
            row = check_case(case, root, data_file, args.steps, args.micro_batch)
            rows.append(row)
            print(format_row(row) + ("" if in_bounds(row) else "   OUT OF BOUNDS"), flush=True)
            for rank, measured in enumerate(row["ranks"]):
                for nbytes, where in measured.get("explain", []):
                    print(f"    rank{rank} {nbytes / MIB:8.2f} MiB  {where}")
    ratios = [r for row in rows for r in row["ratios"]]
    bad = [row["case"] for row in rows if not in_bounds(row)]
    print(
        f"\n{len(rows)} cases in {time.perf_counter() - started:.0f} s: measured / estimated "
        f"min {min(ratios):.2f}, median {statistics.median(ratios):.2f}, max {max(ratios):.2f}; "
        f"{len(rows) - len(bad)} within {RATIO_BOUNDS[0]}-{RATIO_BOUNDS[1]}"
        + (f"; out of bounds: {', '.join(bad)}" if bad else "")
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

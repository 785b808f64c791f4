"""The training entrypoint on one rank: a real DeepSpeed engine on the built-in tiny model, the run dir it
leaves behind (metrics, checkpoints, samples, export, result, status), every method under ZeRO-2, and
the small pure parts (step arithmetic, ds_config filling, rank detection, memory, signals)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from train_helpers import REPO, make_run_dir, metrics, rank_output, run_ranks, start_ranks, status, wait_all

from launcher.rundir.paths import RunState, read_json
from launcher.rundir.status import update_status
from launcher.spec.schema import TrainingSpec
from launcher.train import checkpoint as ckpt
from launcher.train.distributed import DIST_TIMEOUT_ENV, detect_dist_env, dist_timeout_s
from launcher.train.entry import PREEMPTED_EXIT_CODE, exit_code_for, train_run
from launcher.train.memory import PeakMemory, combine_peaks, peak_memory, peak_rss_gib
from launcher.train.result import RESULT_KEYS
from launcher.train.schedule import cpu_optimizer_op, fill_ds_config, total_optimizer_steps
from launcher.train.signals import PreemptionFlag

# The result.json keys of the run-dir contract (docs/run_directory.md), spelled out so a rename breaks this.
CONTRACT_KEYS = [
    "run_id",
    "name",
    "method",
    "state",
    "steps",
    "epochs",
    "train_loss_final",
    "train_loss_min",
    "eval_loss",
    "bleu",
    "chrf",
    "bleu4_chatglm",
    "rouge1",
    "rouge2",
    "rougeL",
    "peak_mem_gib",
    "peak_mem_kind",
    "peak_mem_reserved_gib",
    "tokens_per_s",
    "train_tokens",
    "train_time_s",
    "startup_s",
    "world_size",
    "nodes",
    "gpus_per_node",
    "zero_stage",
    "offload_optimizer",
    "offload_param",
    "gradient_checkpointing",
    "truncated_frac",
    "query_cut_frac",
    "template_used",
    "eval_set_hash",
    "train_examples",
    "seed",
    "swept",
    "versions",
    "reason",
]

STEPS = 12
LOGGING_STEPS = 2


# --- one real run, shared by the assertions below ------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, dialogue_files: object):
    root = tmp_path_factory.mktemp("entry")
    paths = make_run_dir(
        root,
        "lora",
        max_steps=STEPS,
        logging_steps=LOGGING_STEPS,
        save_steps=4,
        save_total_limit=2,
        eval_steps=6,
    )
    update_status(paths, RunState.PENDING, job_id="4242_0", attempt=1)  # what a backend writes
    started = time.monotonic()
    codes = run_ranks(paths, 1, timeout_s=300)
    wall_s = time.monotonic() - started
    assert codes == [0], rank_output(paths)
    print(f"\n1-rank lora ZeRO-2 {STEPS} steps: {wall_s:.1f}s wall, result {read_json(paths.result_json)}")
    return paths


@pytest.mark.slow
def test_run_dir_contents(lora_run) -> None:
    paths = lora_run
    for required in (
        "run.yaml",
        "ds_config.json",
        "status.json",
        "metrics.jsonl",
        "eval.jsonl",
        "samples.jsonl",
    ):
        assert (paths.root / required).is_file(), required
    assert (paths.final / "adapter_config.json").is_file()
    assert paths.rank_log(0).is_file()
    assert "trainable params: " in paths.rank_log(0).read_text()
    # keep-last-2 of the checkpoints at steps 4, 8, 12; no temporary directory left over
    assert [step for step, _ in ckpt.complete_checkpoints(paths.checkpoints)] == [8, 12]
    assert not [p for p in paths.checkpoints.iterdir() if p.name.startswith(".")]
    assert (paths.checkpoints / "latest").read_text().strip() == "global_step12"
    state = read_json(paths.checkpoints / "global_step12" / "trainer_state.json")
    assert state["global_step"] == STEPS and state["micro_steps"] == STEPS * 2


@pytest.mark.slow
def test_status_completed(lora_run) -> None:
    st = status(lora_run)
    assert st["state"] == "COMPLETED" and st["reason"] is None
    assert st["step"] == STEPS and st["total_steps"] == STEPS
    assert st["job_id"] == "4242_0" and st["attempt"] == 1  # the backend's keys are kept


@pytest.mark.slow
def test_metrics_lines_and_values(lora_run) -> None:
    lines = metrics(lora_run)
    assert len(lines) == STEPS // LOGGING_STEPS
    assert [m["step"] for m in lines] == list(range(LOGGING_STEPS, STEPS + 1, LOGGING_STEPS))
    for m in lines:
        assert set(m) == {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}
        assert math.isfinite(m["loss"]) and m["tokens_per_s"] > 0 and m["grad_norm"] > 0
    tokens = [m["tokens"] for m in lines]
    assert tokens == sorted(tokens) and tokens[0] > 0
    # epochs: 12 steps x 2 micro-batches of 4 examples over 96 examples = 1 epoch
    assert lines[-1]["epoch"] == pytest.approx(1.0)
    # warm-up then linear decay to 0 at the last step
    assert lines[-1]["lr"] < max(m["lr"] for m in lines)
    # each line's lr is the rate its step ran at (DeepSpeed's scheduler on the run's filled config)
    from deepspeed.runtime.lr_schedules import WarmupDecayLR
    from test_lr_schedule_fill import rates_per_step

    ds = fill_ds_config(read_json(lora_run.ds_config), total_steps=STEPS, warmup_ratio=0.1, world_size=1)
    params = {k: v for k, v in ds["scheduler"]["params"].items() if k != "last_batch_iteration"}
    peak = ds["optimizer"]["params"]["lr"]
    expected = rates_per_step(lambda opt: WarmupDecayLR(opt, **params), STEPS, peak)
    assert [m["lr"] for m in lines] == pytest.approx([expected[m["step"] - 1] for m in lines], abs=1e-12)
    losses = [m["loss"] for m in lines]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses


@pytest.mark.slow
def test_eval_and_samples(lora_run) -> None:
    evals = [line for line in (lora_run.root / "eval.jsonl").read_text().splitlines() if line]
    assert len(evals) == 1 and '"step": 6' in evals[0]  # step 12 is the final eval, in result.json
    samples = [read_json_line(x) for x in lora_run.samples_jsonl.read_text(encoding="utf-8").splitlines()]
    assert len(samples) == 4
    assert all(set(s) == {"id", "prompt", "reference", "prediction"} for s in samples)


def read_json_line(line: str) -> dict:
    import json

    return dict(json.loads(line))


@pytest.mark.slow
def test_result_json(lora_run) -> None:
    result = read_json(lora_run.result_json)
    assert list(result) == list(RESULT_KEYS) and set(result) == set(CONTRACT_KEYS)
    lines = metrics(lora_run)
    assert result["state"] == "COMPLETED" and result["reason"] is None
    assert result["method"] == "lora" and result["steps"] == STEPS and result["epochs"] == pytest.approx(1.0)
    assert result["train_loss_final"] == lines[-1]["loss"]
    assert result["train_loss_min"] == min(m["loss"] for m in lines)
    assert 0 < result["eval_loss"] < 10
    assert result["bleu"] is not None and result["chrf"] is not None
    assert result["peak_mem_kind"] == "cpu_rss" and 0.05 < result["peak_mem_gib"] < 8
    assert result["tokens_per_s"] == pytest.approx(lines[-1]["tokens"] / result["train_time_s"], rel=1e-2)
    assert result["world_size"] == 1 and result["zero_stage"] == 2 and result["offload_optimizer"] is False
    assert 0 <= result["truncated_frac"] <= 1 and result["seed"] == 42
    assert result["versions"]["deepspeed"] and result["versions"]["torch"] and result["versions"]["launcher"]
    assert result["train_tokens"] == lines[-1]["tokens"]
    assert all(0 <= result[k] <= 100 for k in ("rouge1", "rouge2", "rougeL"))
    # Process start to the first optimizer step: imports, data, weights and engine, but not the 12 steps.
    assert 0 < result["startup_s"] < 300
    log = lora_run.rank_log(0).read_text()
    phases = [line.split("start-up: ", 1)[1] for line in log.splitlines() if "start-up: " in line]
    engine = ["loading the tokenizer and data", "loading weights", "starting the DeepSpeed engine"]
    assert phases[-3:] == engine
    assert "starting the process group" in phases


@pytest.mark.slow
def test_attempts_record_the_real_wall_time(lora_run) -> None:
    from launcher.rundir.attempts import wall_time

    records = [json.loads(line) for line in lora_run.attempts_jsonl.read_text().splitlines()]
    assert [(r["event"], r.get("state")) for r in records] == [("start", None), ("end", "COMPLETED")]
    assert records[0]["gpus"] == 1 and records[0]["attempt"] == records[1]["attempt"]
    measured = wall_time(lora_run, last_seen=time.time())
    assert measured is not None and measured.open_attempts == 0
    # the process's whole life (imports, model, eval), more than the optimizer steps alone
    assert measured.seconds > read_json(lora_run.result_json)["train_time_s"] > 0


@pytest.mark.slow
def test_second_run_on_completed_dir_does_nothing(lora_run) -> None:
    before = lora_run.metrics_jsonl.read_text()
    started = time.monotonic()
    assert train_run(lora_run.root) == "COMPLETED"
    assert time.monotonic() - started < 2
    assert lora_run.metrics_jsonl.read_text() == before
    # and through the CLI: exit code 0
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "train", str(lora_run.root)],
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()


# --- every method on one rank, ZeRO-2 ------------------------------------------------------------


ZERO2_METHODS = ("freeze", "ptuning_v1", "ptuning_v2")


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, dialogue_files: object):
    """Freeze, P-Tuning v1 and v2 on one rank each, trained at the same time (independent processes)."""
    root = tmp_path_factory.mktemp("methods")
    runs = {m: make_run_dir(root, m, max_steps=4, save_steps=4, learning_rate=1e-2) for m in ZERO2_METHODS}
    procs = {m: start_ranks(paths, 1) for m, paths in runs.items()}
    codes = {m: wait_all(p, timeout_s=400) for m, p in procs.items()}
    return runs, codes


@pytest.mark.slow
@pytest.mark.parametrize("method", ZERO2_METHODS)
def test_methods_zero2_one_rank(method: str, method_runs) -> None:
    runs, codes = method_runs
    paths = runs[method]
    assert codes[method] == [0], rank_output(paths)
    result = read_json(paths.result_json)
    assert result["state"] == "COMPLETED" and result["method"] == (
        "freeze" if method == "freeze" else "ptuning"
    )
    assert len(metrics(paths)) == 4 and math.isfinite(result["eval_loss"])
    assert result["zero_stage"] == 2 and result["steps"] == 4
    log_text = paths.rank_log(0).read_text()
    assert f"{result['method']}: trainable params: " in log_text
    assert any(paths.final.iterdir())


# --- failures -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nan_loss_fails_the_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A model with a NaN weight (a corrupt checkpoint) -> FAILED "loss is NaN at step 1", exit code 1."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights_file = next(broken.glob("*.safetensors"))
    weights = load_file(weights_file)
    name = next(k for k in weights if "layers.0" in k and k.endswith("weight") and weights[k].dim() == 2)
    weights[name][0, 0] = float("nan")
    save_file(weights, weights_file, metadata={"format": "pt"})

    paths = make_run_dir(tmp_path / "runs", "lora", max_steps=4, save_steps=100, model_path=broken)
    assert run_ranks(paths, 1, timeout_s=300) == [1], rank_output(paths)
    st = status(paths)
    assert st["state"] == "FAILED" and st["reason"] == "loss is NaN at step 1", st
    log_text = paths.rank_log(0).read_text()
    assert "Traceback" in log_text
    # The terminal (the rank's stderr) gets the reason as `error:`, the traceback stays in the log.
    terminal = (paths.logs / "test-stdout-rank0.txt").read_text()
    assert "Traceback" not in terminal and "error: training failed: loss is NaN at step 1" in terminal
    assert "loss: logits of target positions only" in log_text  # NaN is reported, not a layout mismatch
    assert not paths.result_json.exists() and not metrics(paths)


def test_missing_run_yaml_is_a_user_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "train", str(tmp_path)], cwd=REPO, capture_output=True, timeout=120
    )
    assert proc.returncode == 2
    assert "run.yaml: missing" in proc.stderr.decode()


def test_a_run_that_fails_on_bad_input_exits_1_as_help_says(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A data file missing at run time is the run's failure (FAILED in status.json, exit 1 as
    `launcher train --help` says), not exit 2: 2 means the run dir itself could not be read."""
    from launcher import cli
    from launcher.train.entry import EXIT_CODES, FAILED_EXIT_CODE, main

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert " ".join(EXIT_CODES.split()) in " ".join(capsys.readouterr().out.split())
    paths = make_run_dir(tmp_path, "lora", max_steps=2)
    config = yaml.safe_load(paths.run_yaml.read_text())
    config["data"].update(builtin=None, train_file=str(tmp_path / "gone.json"), eval_file=str(tmp_path))
    paths.run_yaml.write_text(yaml.safe_dump(config))
    assert main([str(paths.root)]) == FAILED_EXIT_CODE == 1
    err = capsys.readouterr().err
    assert status(paths)["state"] == "FAILED" and "gone.json" in status(paths)["reason"]
    assert "Traceback" not in err and "error: training failed: data.train_file:" in err


# --- pure parts ----------------------------------------------------------------------------------


def test_total_optimizer_steps() -> None:
    assert total_optimizer_steps(TrainingSpec(max_steps=7), batches_per_epoch=100) == 7
    # 2 epochs x 25 micro-batches / accumulation 4 = 12 (the trailing partial window is dropped)
    assert total_optimizer_steps(TrainingSpec(num_epochs=2, gradient_accumulation_steps=4), 25) == 12
    assert total_optimizer_steps(TrainingSpec(num_epochs=0.5, gradient_accumulation_steps=1), 9) == 5
    assert total_optimizer_steps(TrainingSpec(gradient_accumulation_steps=8), 3) == 1
    # ds_config's accumulation (derived from global_batch_size by the planner) wins
    assert total_optimizer_steps(TrainingSpec(num_epochs=1, gradient_accumulation_steps=1), 40, 4) == 10


def test_fill_ds_config() -> None:
    ds = {
        "train_batch_size": 16,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"total_num_steps": "auto", "warmup_num_steps": "auto", "warmup_max_lr": 1e-3},
        },
    }
    filled = fill_ds_config(ds, total_steps=100, warmup_ratio=0.1, world_size=1)
    assert filled["scheduler"]["params"]["total_num_steps"] == 100
    assert filled["scheduler"]["params"]["warmup_num_steps"] == 10
    assert filled["train_batch_size"] == 8  # planned for 2 ranks, running on 1
    assert ds["scheduler"]["params"]["total_num_steps"] == "auto"  # the input is not modified
    # on CPU torch's AdamW replaces DeepSpeed's FusedAdam (exact resume) and cpu_adam (no JIT build)
    adamw = {"type": "AdamW", "params": {"lr": 1e-3}}
    on_cpu = fill_ds_config(
        {**ds, "optimizer": adamw}, total_steps=10, warmup_ratio=0, world_size=2, on_cpu=True
    )
    assert on_cpu["optimizer"]["params"]["torch_adam"] is True
    assert cpu_optimizer_op(on_cpu) is None
    offloaded = {
        **ds,
        "optimizer": adamw,
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
    }
    filled = fill_ds_config(offloaded, total_steps=10, warmup_ratio=0, world_size=2, on_cpu=True)
    assert filled["optimizer"]["params"]["torch_adam"] is True
    assert cpu_optimizer_op(offloaded) is None
    # the config's own choice wins: DeepSpeed's optimizers, and the op they build
    asked = {**offloaded, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": False}}}
    filled = fill_ds_config(asked, total_steps=10, warmup_ratio=0, world_size=2, on_cpu=True)
    assert filled["optimizer"]["params"]["torch_adam"] is False
    assert cpu_optimizer_op(asked) == "cpu_adam"
    assert cpu_optimizer_op({**asked, "zero_optimization": {"stage": 2}}) == "fused_adam"
    on_gpu = fill_ds_config(offloaded, total_steps=10, warmup_ratio=0, world_size=2, on_cpu=False)
    assert "torch_adam" not in on_gpu["optimizer"]["params"]
    with pytest.raises(ValueError, match=r"optimizer\.params\.lr"):
        fill_ds_config(
            {**ds, "optimizer": {"params": {"lr": "auto"}}}, total_steps=1, warmup_ratio=0, world_size=2
        )


def test_detect_dist_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith(("SUBMITIT_", "SLURM_"))] + ["RANK", "WORLD_SIZE"]:
        monkeypatch.delenv(var, raising=False)
    single = detect_dist_env()
    assert (single.rank, single.world_size, single.source) == (0, 1, "single")
    assert single.master_port == 0  # the store binds a port the OS picks: nothing chosen beforehand

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "node7")
    monkeypatch.setenv("MASTER_PORT", "29511")
    env = detect_dist_env()
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port) == (
        3,
        1,
        4,
        "node7",
        29511,
    )
    assert env.source == "torchrun"

    # Inside a submitit Slurm job: submitit parses the Slurm variables (and the node list) for us.
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    slurm = {
        "SLURM_JOB_ID": "1234",
        "SLURM_PROCID": "2",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "4",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "node[1-2]",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    env = detect_dist_env()
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.source) == (
        2,
        0,
        4,
        "node1",
        "submitit",
    )


def test_dist_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DIST_TIMEOUT_ENV, raising=False)
    assert dist_timeout_s() == 600
    monkeypatch.setenv(DIST_TIMEOUT_ENV, "30")
    assert dist_timeout_s() == 30
    monkeypatch.setenv(DIST_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=DIST_TIMEOUT_ENV):
        dist_timeout_s()


def test_peak_memory_is_rss_in_gib() -> None:
    before = peak_rss_gib()
    block = bytearray(200 * 1024 * 1024)  # touch 200 MiB
    block[::4096] = b"x" * len(block[::4096])
    after = peak_memory()
    assert after.kind == "cpu_rss" and after.peak_mem_reserved_gib is None
    assert after.peak_mem_gib >= before and after.peak_mem_gib >= 0.19
    assert after.peak_mem_gib < 64  # KiB read as bytes (or as GiB) would be far off
    del block


def test_peak_of_a_resumed_run_covers_the_earlier_attempts() -> None:
    from dataclasses import asdict

    now = PeakMemory(peak_mem_gib=2.0, peak_mem_reserved_gib=2.5, kind="cuda_allocated")
    earlier = asdict(PeakMemory(peak_mem_gib=3.0, peak_mem_reserved_gib=None, kind="cuda_allocated"))
    assert combine_peaks(now, earlier) == PeakMemory(3.0, 2.5, "cuda_allocated")
    higher_now = PeakMemory(peak_mem_gib=4.0, peak_mem_reserved_gib=None, kind="cuda_allocated")
    assert combine_peaks(higher_now, earlier) == higher_now
    assert combine_peaks(now, None) == now  # a first attempt
    # An attempt measured as CPU RSS is not comparable with a CUDA peak: keep this attempt's.
    cpu_earlier = asdict(PeakMemory(peak_mem_gib=9.0, peak_mem_reserved_gib=None, kind="cpu_rss"))
    assert combine_peaks(now, cpu_earlier) == now


def test_preemption_flag_overrides_previous_handler() -> None:
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))
    try:
        flag = PreemptionFlag()
        assert flag.install()
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert flag.requested and flag.signal_name == "SIGUSR2" and calls == []
        flag.uninstall()
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert calls == [signal.SIGUSR2]  # the previous handler is back
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_exit_codes() -> None:
    assert exit_code_for("COMPLETED") == 0
    assert exit_code_for("PREEMPTED") == PREEMPTED_EXIT_CODE == 3


def test_checkpoint_listing_ignores_incomplete(tmp_path: Path) -> None:
    for name in ("global_step3", "global_step12", ".tmp-global_step15", ".deleting-global_step1", "latest"):
        (tmp_path / name).mkdir()
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [3, 12]
    assert ckpt.latest_complete(tmp_path) == tmp_path / "global_step12"
    assert sorted(ckpt.remove_incomplete(tmp_path)) == [".deleting-global_step1", ".tmp-global_step15"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step12", "global_step3", "latest"]

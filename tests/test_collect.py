"""The collector on hand-made run dirs: every state and every corruption, checking the table's values."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
from collect_fixtures import (
    CORRUPT,
    default_result,
    make_run,
    metrics_records,
    perturb,
    references,
    samples,
    write_jsonl,
    write_spec,
)

from launcher.cli import main
from launcher.collect import SUMMARY_KEYS, collect_experiment, sort_rows
from launcher.collect.table import COLUMNS, fmt_note, render_csv, render_markdown
from launcher.errors import UserError
from launcher.rundir.paths import RunState, write_json_atomic

CONTRACT_KEYS = {
    *("run_id", "name", "method", "state", "steps", "epochs", "train_loss_final", "train_loss_min"),
    *("eval_loss", "bleu", "chrf", "bleu4_chatglm", "peak_mem_gib", "peak_mem_kind", "peak_mem_reserved_gib"),
    *("tokens_per_s", "train_time_s", "startup_s", "world_size", "nodes", "gpus_per_node", "zero_stage"),
    *("offload_optimizer", "offload_param", "gradient_checkpointing", "truncated_frac", "seed", "swept"),
    *("versions", "reason", "bleu_delta", "bleu_delta_ci", "bleu_p_value"),
}


def cells(collection, name: str) -> dict[str, str]:
    """The rendered table cells of one run, by column header."""
    row = collection.row(name)
    return {c.header: c.cell(row) for c in COLUMNS}


def test_completed_run_shows_result_values(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    make_run(exp, "lora", result=default_result("lora", swept={"training.max_source_length": 512}))
    collection = collect_experiment(exp, write=False)
    row = collection.row("lora")
    assert row.get("state") == "COMPLETED"
    assert row.get("train_loss_final") == 1.25 and row.get("train_loss_min") == 1.1
    assert row.get("bleu") == 20.0 and row.get("peak_mem_gib") == 12.5
    assert row.warnings == []
    c = cells(collection, "lora")
    assert c["steps"] == "100" and c["loss"] == "1.250" and c["eval loss"] == "1.400"
    assert c["BLEU"] == "20.00" and c["chrF"] == "30.00"
    assert c["ΔBLEU"] == "baseline" and c["95% CI"] == "-"
    assert c["peak mem GiB"] == "12.50 (GPU)"
    assert c["nodes x GPUs"] == "1x2"
    assert c["ZeRO"] == "3 off:opt gc"
    assert c["tok/s"] == "1234" or c["tok/s"] == "1235"
    assert c["train"] == "1h02m" and c["wall"] == "-"  # no attempts.jsonl: real wall time unknown
    assert c["start-up"] == "1m35s"
    assert c["trunc"] == "12.5%"


def test_running_run_without_result_reads_metrics_and_run_yaml(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    metrics = metrics_records(50)
    make_run(
        exp,
        "lora-src1024",
        state=RunState.RUNNING,
        metrics=metrics,
        eval_points=[{"step": 20, "eval_loss": 2.5}, {"step": 40, "eval_loss": 2.25}],
        swept={"training.max_source_length": 1024},
        nodes=2,
        gpus_per_node=4,
        zero_stage=3,
        offload_optimizer=True,
    )
    row = collect_experiment(exp, write=False).row("lora-src1024")
    assert row.get("state") == "RUNNING"
    assert row.get("steps") == 50
    assert row.get("train_loss_final") == pytest.approx(metrics[-1]["loss"])
    assert row.get("train_loss_min") == pytest.approx(min(m["loss"] for m in metrics))
    assert row.get("train_time_s") == 100.0 and row.get("tokens_per_s") == 1050.0
    assert row.get("eval_loss") == 2.25
    assert row.get("swept") == {"training.max_source_length": 1024}
    assert (row.get("nodes"), row.get("gpus_per_node"), row.get("world_size")) == (2, 4, 8)
    assert row.get("zero_stage") == 3 and row.get("offload_optimizer") is True
    assert row.get("reason") is None


def test_plan_json_stands_in_for_run_yaml(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    paths = make_run(exp, "full-seed7", state=RunState.PENDING)
    paths.run_yaml.unlink()  # proves plan.json is what was read
    write_json_atomic(
        exp / "plan.json",
        {"runs": [{"name": "full-seed7", "run_id": "r7", "method": "full", "swept": {"training.seed": 7},
                   "nodes": 2, "gpus_per_node": 8, "world_size": 16, "zero_stage": 3,
                   "offload_optimizer": True, "offload_param": True, "gradient_checkpointing": True}]},
    )  # fmt: skip
    collection = collect_experiment(exp, write=False)
    row = collection.row("full-seed7")
    assert row.get("state") == "PENDING" and row.get("method") == "full" and row.get("seed") == 7
    assert cells(collection, "full-seed7")["ZeRO"] == "3 off:opt+param gc"
    assert cells(collection, "full-seed7")["nodes x GPUs"] == "2x8"


def test_rows_follow_the_plan_order_and_the_first_planned_run_is_the_baseline(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    for name in ("lora-src64", "lora-src128", "stray"):
        make_run(exp, name, result=default_result(name))
    write_json_atomic(exp / "plan.json", {"runs": [{"name": "lora-src64"}, {"name": "lora-src128"}]})
    collection = collect_experiment(exp, write=False)
    assert [r.name for r in collection.rows] == ["lora-src64", "lora-src128", "stray"]
    assert collection.baseline == "lora-src64"


def test_truncated_last_metrics_line_is_skipped_with_a_warning(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    metrics = metrics_records(30)
    make_run(exp, "torn", state=RunState.RUNNING, metrics=metrics, metrics_tail='{"step": 40, "loss": 0.1')
    row = collect_experiment(exp, write=False).row("torn")
    assert row.get("steps") == 30  # the torn step 40 is not counted
    assert row.get("train_loss_final") == pytest.approx(metrics[-1]["loss"])
    assert any("metrics.jsonl:4: not valid JSON" in w for w in row.warnings), row.warnings


def test_corrupt_result_json_falls_back_to_metrics(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    metrics = metrics_records(20)
    make_run(exp, "broken", result=CORRUPT, metrics=metrics)
    row = collect_experiment(exp, write=False).row("broken")
    assert row.get("state") == "COMPLETED"
    assert row.get("steps") == 20 and row.get("train_loss_final") == pytest.approx(metrics[-1]["loss"])
    assert row.get("bleu") is None
    assert any(w.startswith("result.json: not valid JSON") for w in row.warnings), row.warnings
    assert any("numbers from metrics.jsonl" in w for w in row.warnings)


def test_missing_result_json_of_a_completed_run_is_flagged(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    make_run(exp, "noresult", metrics=metrics_records(10))
    row = collect_experiment(exp, write=False).row("noresult")
    assert row.get("steps") == 10
    assert any("result.json missing" in w for w in row.warnings)


def test_nan_and_wrong_types_become_empty_cells_with_warnings(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    result = default_result(
        "nan", bleu=float("nan"), eval_loss=float("inf"), steps="many", offload_param="yes"
    )
    make_run(exp, "nan", result=result)
    collection = collect_experiment(exp, write=True)
    row = collection.row("nan")
    assert row.get("bleu") is None and row.get("eval_loss") is None and row.get("steps") is None
    assert row.get("offload_param") is None
    assert row.get("chrf") == 30.0  # the rest of the row is intact
    joined = " | ".join(row.warnings)
    assert "bleu is nan" in joined and "eval_loss is inf" in joined and "steps='many'" in joined
    data = json.loads((exp / "summary.json").read_text())  # strict JSON: no NaN
    assert data[0]["bleu"] is None and data[0]["chrf"] == 30.0


def test_nan_losses_in_metrics_are_skipped(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    metrics = metrics_records(30)
    metrics[1]["loss"] = float("nan")
    make_run(exp, "diverged", state=RunState.FAILED, reason="loss is NaN", metrics=metrics)
    row = collect_experiment(exp, write=False).row("diverged")
    assert row.get("train_loss_min") == pytest.approx(min(metrics[0]["loss"], metrics[2]["loss"]))
    assert row.get("reason") == "loss is NaN"
    assert any("1 non-finite loss" in w for w in row.warnings)


def test_failed_run_reason_from_status_then_logs(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    make_run(exp, "a-status", state=RunState.FAILED, reason="rank 1 exited with code 137")
    log = (
        'step 10 loss 2.0\nTraceback (most recent call last):\n  File "train.py", line 3, in <module>\n'
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\nstep 11 (shutting down)\n"
    )
    make_run(exp, "b-log", state=RunState.FAILED, logs={"rank0.log": "all good\n", "rank1.log": log})
    make_run(exp, "c-none", state=RunState.FAILED)
    make_run(exp, "d-cancelled", state=RunState.CANCELLED, reason="cancelled by user")
    make_run(exp, "e-pending", state=RunState.PENDING)
    collection = collect_experiment(exp, write=False)
    assert collection.row("a-status").get("reason") == "rank 1 exited with code 137"
    assert collection.row("b-log").get("reason") == (
        "rank1.log: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    assert "no reason recorded" in collection.row("c-none").get("reason")
    assert collection.row("d-cancelled").get("state") == "CANCELLED"
    assert collection.row("d-cancelled").get("reason") == "cancelled by user"
    assert collection.row("e-pending").get("state") == "PENDING"
    assert [r.name for r in collection.rows] == ["a-status", "b-log", "c-none", "d-cancelled", "e-pending"]
    md = render_markdown(collection)
    assert "rank1.log: torch.OutOfMemoryError" in md and "| PENDING |" in md


def test_unreadable_status_json_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    paths = make_run(exp, "x", result=default_result("x"))
    paths.status_json.write_text("{oops")  # a corrupt status.json on purpose
    row = collect_experiment(exp, write=False).row("x")
    assert row.get("state") == "COMPLETED"  # from result.json
    assert any(w.startswith("status.json: not valid JSON") for w in row.warnings)


def _hist_experiment(exp: Path, base_preds: list[str], sys_preds: list[str], refs: list[str]) -> None:
    make_run(exp, "lora-src512", result=default_result("lora-src512", bleu=None),
             samples=samples(refs, base_preds), swept={"training.max_source_length": 512})  # fmt: skip
    make_run(exp, "lora-src1024", result=default_result("lora-src1024", bleu=None),
             samples=samples(refs, sys_preds), swept={"training.max_source_length": 1024})  # fmt: skip


def test_empty_samples_file_gives_no_delta_and_a_warning(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    refs = references(30)
    make_run(exp, "a-base", result=default_result("a-base"), samples=samples(refs, perturb(refs, 0.3, 1)))
    paths = make_run(exp, "b-empty", result=default_result("b-empty"))
    paths.samples_jsonl.write_text("")
    collection = collect_experiment(exp, write=False)
    row = collection.row("b-empty")
    assert row.get("bleu_delta") is None and row.get("bleu_p_value") is None
    assert any("no usable example" in w for w in row.warnings), row.warnings
    assert row.get("bleu") == 20.0


def test_samples_with_other_examples_are_an_error_naming_the_run(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    refs = references(20)
    make_run(exp, "a-base", result=default_result("a-base"), samples=samples(refs, refs))
    other_ids = [f"ex{i:04d}" for i in range(1, 21)]  # shifted by one: one missing, one extra
    make_run(exp, "b-ids", result=default_result("b-ids"), samples=samples(refs, refs, ids=other_ids))
    changed = list(refs)
    changed[3] = "完全不同的参考"
    make_run(exp, "c-refs", result=default_result("c-refs"), samples=samples(changed, refs))
    collection = collect_experiment(exp, write=False)
    ids_row, refs_row = collection.row("b-ids"), collection.row("c-refs")
    assert ids_row.get("bleu_delta") is None and refs_row.get("bleu_delta") is None
    # The table says why the significance is absent, in the run's row.
    ids_reason, refs_reason = ids_row.get("no_delta_reason"), refs_row.get("no_delta_reason")
    assert ids_reason.startswith("not the baseline's eval examples")
    assert "1 baseline example(s) missing" in ids_reason
    assert "1 reference(s) differ" in refs_reason and "'ex0003'" in refs_reason
    assert cells(collection, "b-ids")["ΔBLEU"] == "n/a"
    assert "no ΔBLEU: not the baseline's eval examples" in fmt_note(refs_row)


def test_baseline_choice_flag_then_spec_then_first_run(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    for name in ("a", "b", "c"):
        make_run(exp, name, result=default_result(name))
    assert collect_experiment(exp, write=False).baseline == "a"
    write_spec(exp, baseline="b")
    collection = collect_experiment(exp, write=False)
    assert collection.baseline == "b" and collection.row("b").get("baseline") is True
    assert collect_experiment(exp, "c", write=False).baseline == "c"
    with pytest.raises(UserError, match=r"no run of that name.*did you mean"):
        collect_experiment(exp, "cc", write=False)
    write_spec(exp, baseline="zzz")
    collection = collect_experiment(exp, write=False)
    assert collection.baseline == "a" and any("'zzz' matches no run" in w for w in collection.warnings)


def test_seed_repeats_are_grouped_with_mean_and_std(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    bleus = {1: 20.0, 2: 22.0, 3: 27.0}
    for seed, bleu in bleus.items():
        name = f"lora-lr0.001-seed{seed}"
        swept = {"training.learning_rate": 0.001, "training.seed": seed}
        make_run(exp, name, result=default_result(name, bleu=bleu, seed=seed, swept=swept), seed=seed)
    make_run(exp, "lora-lr0.01-seed1", result=default_result("lora-lr0.01-seed1", seed=1,
             swept={"training.learning_rate": 0.01, "training.seed": 1}))  # fmt: skip
    make_run(exp, "single", result=default_result("single", bleu=5.0))  # no seed axis: not a repeat
    collection = collect_experiment(exp, write=True)
    assert len(collection.groups) == 1
    group = collection.groups[0]
    assert group.key == "lora-lr0.001"
    assert group.seeds == [1, 2, 3] and group.n["bleu"] == 3
    assert group.mean["bleu"] == pytest.approx(23.0)
    assert group.std["bleu"] == pytest.approx(
        math.sqrt(((20 - 23) ** 2 + (22 - 23) ** 2 + (27 - 23) ** 2) / 2)
    )
    assert collection.row("lora-lr0.001-seed2").get("group")["key"] == "lora-lr0.001"
    assert collection.row("single").get("group") is None
    md = (exp / "summary.md").read_text()
    assert "## Seed groups" in md and "23.00 ± 3.61" in md


def test_summary_files_hold_every_run_and_the_contract_keys(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    refs = references(40)
    _hist_experiment(exp, perturb(refs, 0.6, 1), perturb(refs, 0.1, 2), refs)
    make_run(exp, "z-pending", state=RunState.PENDING)
    collect_experiment(exp, "lora-src512")
    data = json.loads((exp / "summary.json").read_text())
    assert [d["name"] for d in data] == ["lora-src1024", "lora-src512", "z-pending"]
    for obj in data:
        assert set(obj) >= CONTRACT_KEYS, CONTRACT_KEYS - set(obj)
    by_name = {d["name"]: d for d in data}
    assert by_name["lora-src512"]["bleu_delta"] is None and by_name["z-pending"]["bleu_delta"] is None
    system = by_name["lora-src1024"]
    assert system["bleu_delta"] > 0 and system["bleu_delta_ci"][0] > 0 and system["bleu_p_value"] < 0.05
    rows = list(csv.DictReader(io.StringIO((exp / "summary.csv").read_text())))
    assert [r["name"] for r in rows] == ["lora-src1024", "lora-src512", "z-pending"]
    assert float(rows[0]["bleu_delta"]) == pytest.approx(system["bleu_delta"])
    assert float(rows[0]["bleu_delta_ci_low"]) == pytest.approx(system["bleu_delta_ci"][0])
    assert rows[2]["state"] == "PENDING" and rows[2]["bleu"] == ""
    md = (exp / "summary.md").read_text()
    assert "Baseline: **lora-src512**" in md and "| z-pending |" in md
    for png in ("loss.png", "memory.png"):
        assert (exp / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sort_by_key_descending_puts_missing_last(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    for name, bleu in (("a", 10.0), ("b", 30.0), ("c", None), ("d", 20.0)):
        make_run(exp, name, result=default_result(name, bleu=bleu))
    collection = collect_experiment(exp, write=False)
    assert [r.name for r in sort_rows(collection.rows, "-bleu")] == ["b", "d", "a", "c"]
    assert [r.name for r in sort_rows(collection.rows, "bleu")] == ["a", "d", "b", "c"]
    with pytest.raises(UserError, match="did you mean 'bleu'"):
        sort_rows(collection.rows, "blue")


def test_cli_collect_prints_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = tmp_path / "exp"
    make_run(exp, "a", result=default_result("a", bleu=11.0))
    make_run(exp, "b", state=RunState.FAILED, reason="boom")
    assert main(["collect", str(exp), "--format", "json", "--sort=-bleu"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data] == ["a", "b"] and data[1]["reason"] == "boom"
    assert set(SUMMARY_KEYS) <= set(data[0])
    assert main(["collect", str(exp), "--format", "csv", "--no-write"]) == 0
    assert capsys.readouterr().out.startswith("run_id,name,method,state")
    assert main(["collect", str(exp)]) == 0
    out = capsys.readouterr().out
    assert "FAILED" in out and "boom" in out and "11.00" in out
    assert main(["collect", str(tmp_path / "nope")]) == 2
    assert "no such experiment directory" in capsys.readouterr().err


def test_experiment_without_runs_dir_is_a_user_error(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "exp", "a").root
    with pytest.raises(UserError, match="looks like a run dir"):
        collect_experiment(run_dir)


def test_significance_cache_is_reused_and_invalidated(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    refs = references(30)
    _hist_experiment(exp, perturb(refs, 0.5, 1), perturb(refs, 0.2, 2), refs)
    first = collect_experiment(exp).row("lora-src512").get("bleu_delta")
    assert (exp / ".collect_cache.json").exists()
    assert collect_experiment(exp).row("lora-src512").get("bleu_delta") == first
    # New outputs for the system: the cached number must not be served.
    write_jsonl(exp / "runs" / "lora-src512" / "samples.jsonl", samples(refs, refs))
    again = collect_experiment(exp).row("lora-src512").get("bleu_delta")
    assert again != first and again > 0


def test_csv_and_markdown_render_the_same_rows(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    make_run(exp, "a|pipe", result=default_result("a|pipe"))
    collection = collect_experiment(exp, write=False)
    assert "a\\|pipe" in render_markdown(collection)
    assert list(csv.reader(io.StringIO(render_csv(collection))))[1][1] == "a|pipe"


@pytest.mark.slow
def test_collects_a_real_tiny_training_run(
    tmp_path: Path, tiny_model_dir: Path, dialogue_files: object
) -> None:
    """A real run (train entrypoint, DeepSpeed on CPU): its row is result.json; BLEU is consistent."""
    import shutil

    import sacrebleu
    from train_helpers import make_run_dir, rank_output, run_ranks

    from launcher.rundir.paths import iter_jsonl, read_json

    exp = tmp_path / "real"
    paths = make_run_dir(
        exp / "runs", "lora", name="a-lora", max_steps=4, logging_steps=1, save_steps=4, eval_steps=2
    )
    assert run_ranks(paths, 1, timeout_s=300) == [0], rank_output(paths)
    # A second run with the very same outputs (a copy): the pair must read as "no difference".
    shutil.copytree(
        paths.root, exp / "runs" / "b-copy", ignore=shutil.ignore_patterns("checkpoints", "final")
    )
    collection = collect_experiment(exp)
    row, result = collection.row("a-lora"), read_json(paths.result_json)
    assert row.get("state") == "COMPLETED" and row.warnings == [], row.warnings
    for key in (
        "steps",
        "train_loss_final",
        "train_loss_min",
        "eval_loss",
        "bleu",
        "peak_mem_gib",
        "seed",
        "method",
    ):
        assert row.get(key) == result[key], key
    assert row.get("peak_mem_kind") == "cpu_rss" and row.get("steps") == 4
    # wall: the rank's real time from attempts.jsonl (load, train, eval), not the optimizer steps alone
    assert row.get("wall_source") == "attempts" and row.get("wall_time_s") > row.get("train_time_s") > 0
    assert row.get("gpu_hours") == pytest.approx(row.get("wall_time_s") / 3600)
    recs = list(iter_jsonl(paths.samples_jsonl))
    expected = sacrebleu.corpus_bleu(
        [r["prediction"] for r in recs], [[r["reference"] for r in recs]], tokenize="zh"
    )
    assert row.get("bleu") == pytest.approx(expected.score, abs=0.01)
    copy = collection.row("b-copy")
    assert copy.get("n_samples") == len(recs) == 4
    assert copy.get("bleu_delta") == 0.0 and copy.get("bleu_p_value") == 1.0
    summary = json.loads((exp / "summary.json").read_text())
    assert [d["name"] for d in summary] == ["a-lora", "b-copy"]
    assert (exp / "loss.png").stat().st_size > 0 and (exp / "memory.png").stat().st_size > 0


def test_plots_are_redrawn_only_when_their_inputs_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import launcher.collect.plots as plots

    exp = tmp_path / "exp"
    make_run(exp, "a", result=default_result("a"), metrics=metrics_records(20))
    drawn: list[int] = []
    real = plots.write_plots
    monkeypatch.setattr(plots, "write_plots", lambda c: (drawn.append(1), real(c)))
    collect_experiment(exp)
    collect_experiment(exp)
    assert len(drawn) == 1  # unchanged: the PNGs stay
    write_jsonl(exp / "runs" / "a" / "metrics.jsonl", metrics_records(30))
    collect_experiment(exp)
    assert len(drawn) == 2  # the loss curve changed
    (exp / "memory.png").unlink()
    collect_experiment(exp)
    assert len(drawn) == 3 and (exp / "memory.png").exists()

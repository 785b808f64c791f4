"""What the comparison table can and cannot tell: Holm-adjusted significance over several runs, the
smallest detectable ΔBLEU and too-small eval sets, ROUGE, cost per run, and runs that differ in more
than their configurations (fixture run dirs, tests/collect_fixtures.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from collect_fixtures import default_result, make_run, perturb, references, samples, write_spec

from launcher.backends.slurm_queries import slurm_elapsed_by_run_dir
from launcher.collect import collect_experiment
from launcher.collect.significance import holm, min_detectable_delta
from launcher.collect.table import columns_for, legend, render_csv, render_markdown
from launcher.rundir.attempts import record_attempt_end, record_attempt_start

BASE = "base"


def _cells(collection, name: str) -> dict[str, str]:
    row = collection.row(name)
    return {c.header: c.cell(row) for c in columns_for(collection)}


def _bleu_experiment(exp: Path, refs: list[str], base: list[str], systems: dict[str, list[str]]) -> Path:
    for name, preds in {BASE: base, **systems}.items():
        make_run(exp, name, result=default_result(name, bleu=None), samples=samples(refs, preds))
    write_spec(exp, baseline=BASE)
    return exp


# --- 4. significance over several comparisons ------------------------------------------------------


def test_holm_by_hand() -> None:
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04)
    assert adjusted == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"only": 0.02}) == {"only": 0.02}
    assert holm({"x": 0.9, "y": 0.8}) == {"y": 1.0, "x": 1.0}


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory: pytest.TempPathFactory):
    """Three runs against one baseline; "close" has both raw p-values below 0.05, but not after Holm."""
    refs = references(120, seed=7)
    systems = {
        "clear": perturb(refs, 0.36, seed=2),
        "close": perturb(refs, 0.37, seed=2),
        "none": perturb(refs, 0.36, seed=3),
    }
    exp = _bleu_experiment(
        tmp_path_factory.mktemp("holm") / "exp", refs, perturb(refs, 0.40, seed=1), systems
    )
    return collect_experiment(exp)


def test_star_uses_holm_adjusted_p_values_with_several_runs(three_runs) -> None:
    collection = three_runs
    assert collection.n_comparisons == 3
    close = collection.row("close")
    raw_bs, raw_ar = close.get("bleu_p_value"), close.get("bleu_p_value_ar")
    assert raw_bs < 0.05 and raw_ar < 0.05  # significant alone...
    rows = [collection.row(n) for n in ("clear", "close", "none")]
    for key, adjusted_key in (
        ("bleu_p_value", "bleu_p_value_holm"),
        ("bleu_p_value_ar", "bleu_p_value_ar_holm"),
    ):
        expected = holm({r.name: r.get(key) for r in rows})
        assert {r.name: r.get(adjusted_key) for r in rows} == pytest.approx(expected)
    assert close.get("bleu_p_value_ar_holm") >= 0.05  # ...but not as one of three
    cells = _cells(collection, "close")
    assert not cells["ΔBLEU"].endswith("*") and not cells["p bs/ar"].endswith("*")
    assert cells["p bs/ar"] == f"{close.get('bleu_p_value_holm'):.3f}/{close.get('bleu_p_value_ar_holm'):.3f}"
    assert _cells(collection, "clear")["ΔBLEU"].endswith("*")
    assert "Holm-adjusted over the 3 runs" in legend(collection)
    assert "Holm-adjusted over the 3 runs" in render_markdown(collection)
    summary = {r["name"]: r for r in json.loads(collection.exp.summary_json.read_text())}
    assert summary["close"]["bleu_p_value"] == raw_bs  # the raw ones stay in the summaries
    assert summary["close"]["bleu_p_value_holm"] == close.get("bleu_p_value_holm")


def test_smallest_detectable_delta_comes_from_the_bootstraps_spread(three_runs) -> None:
    collection = three_runs
    for name in ("clear", "close", "none"):
        row = collection.row(name)
        low, high = row.get("bleu_delta_ci")
        se = row.get("bleu_delta_se")
        assert se == pytest.approx((high - low) / (2 * 1.96), rel=0.25)  # the CI's own spread
        assert row.get("bleu_mde") == pytest.approx(min_detectable_delta(se, 3))
        assert 2.8 * se < row.get("bleu_mde") < 3.5 * se  # z(1 - 0.05/6) + z(0.8) = 3.23
    md = render_markdown(collection)
    assert "Smallest ΔBLEU this eval set can detect" in md and "120 examples" in md
    assert "too small" not in md


def test_a_tiny_eval_set_is_called_too_small_to_tell(tmp_path: Path) -> None:
    refs = references(8, seed=3)
    exp = _bleu_experiment(
        tmp_path / "exp", refs, perturb(refs, 0.5, seed=4), {"lora": perturb(refs, 0.1, seed=5)}
    )
    collection = collect_experiment(exp, write=False)
    notes = render_markdown(collection)
    assert "only 8 examples, fewer than 100: too small to tell runs apart" in notes
    assert collection.n_comparisons == 1 and "Holm" not in legend(collection)


def test_a_zero_spread_bootstrap_gets_no_star(tmp_path: Path) -> None:
    # One example: every resample is that example, so every resampled ΔBLEU is the observed one.
    refs = references(1, seed=3)
    exp = _bleu_experiment(tmp_path / "exp", refs, perturb(refs, 0.6, seed=4), {"lora": list(refs)})
    collection = collect_experiment(exp, write=False)
    row = collection.row("lora")
    assert row.get("bleu_delta") > 0 and row.get("bleu_delta_se") < 1e-9
    assert row.get("bleu_p_value") < 0.05  # sacrebleu's verdict on a degenerate distribution
    assert not _cells(collection, "lora")["ΔBLEU"].endswith("*")
    assert "zero spread" in render_markdown(collection)
    # A zero-width 95% CI with some spread in the tails is as degenerate: no * either.
    row.values["bleu_delta_se"] = 0.5
    assert not _cells(collection, "lora")["ΔBLEU"].endswith("*")
    row.values["bleu_delta_ci"] = [row.get("bleu_delta") - 1, row.get("bleu_delta") + 1]
    assert _cells(collection, "lora")["ΔBLEU"].endswith("*")


def test_identical_outputs_still_give_p_one_after_adjustment(tmp_path: Path) -> None:
    refs = references(60, seed=8)
    same = perturb(refs, 0.4, seed=9)
    exp = _bleu_experiment(tmp_path / "exp", refs, same, {"a": list(same), "b": perturb(refs, 0.1, seed=10)})
    row = collect_experiment(exp, write=False).row("a")
    assert row.get("bleu_p_value") == 1.0 and row.get("bleu_p_value_holm") == 1.0
    assert row.get("bleu_p_value_ar_holm") == 1.0


# --- 5. ROUGE in the summaries and the table -------------------------------------------------------


def test_rouge_reaches_the_summaries_and_the_table(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    make_run(exp, "lora", result=default_result("lora", rouge1=45.25, rouge2=20.5, rougeL=40.125))
    make_run(exp, "old", result=default_result("old"))  # written before ROUGE existed
    collection = collect_experiment(exp)
    assert _cells(collection, "lora")["ROUGE-1/2/L"] == "45.2/20.5/40.1"
    assert _cells(collection, "old")["ROUGE-1/2/L"] == "-"
    header = render_csv(collection).splitlines()[0]
    assert {"rouge1", "rouge2", "rougeL"} <= set(header.split(","))
    summary = json.loads(collection.exp.summary_json.read_text())
    assert summary[0]["rougeL"] == 40.125


# --- 6. cost per run ---------------------------------------------------------------------------------


def _attempts(paths, attempts: list[tuple[str, float, float | None, int]]) -> None:
    for attempt, start, end, gpus in attempts:
        record_attempt_start(paths, attempt, gpus, at=start)
        if end is not None:
            record_attempt_end(paths, attempt, "PREEMPTED", at=end)


def test_wall_time_and_gpu_hours_sum_every_attempt_without_the_queue(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    t0 = time.time() - 100_000
    # 2 GPUs: a preempted attempt of 1 h; 3 h waiting in the queue; a resumed attempt of 30 min.
    full = make_run(exp, "full", result=default_result("full", train_time_s=20.0, world_size=2))
    _attempts(full, [("1:0", t0, t0 + 3600, 2), ("1:1", t0 + 3 * 3600, t0 + 3 * 3600 + 1800, 2)])
    # Killed hard in its first attempt (no end record): counted until the next attempt started.
    lora = make_run(exp, "lora", result=default_result("lora", world_size=1))
    _attempts(lora, [("2:0", t0, None, 1), ("2:1", t0 + 600, t0 + 900, 1)])
    (exp / "spec.yaml").write_text("cluster: {gpu_hour_price: 2.5}\n", encoding="utf-8")
    collection = collect_experiment(exp)
    row = collection.row("full")
    assert row.get("wall_time_s") == pytest.approx(5400)
    assert row.get("gpu_hours") == pytest.approx(3.0) and row.get("cost") == pytest.approx(7.5)
    cells = _cells(collection, "full")
    assert cells["wall"] == "1h30m" and cells["train"] == "20s"
    assert cells["GPU h"] == "3.00" and cells["cost"] == "7.50"
    assert collection.row("lora").get("wall_time_s") == pytest.approx(900)
    assert any("no end record" in w for w in collection.row("lora").warnings)
    summary = {r["name"]: r for r in json.loads(collection.exp.summary_json.read_text())}
    assert summary["full"]["gpu_hours"] == pytest.approx(3.0) and summary["full"]["wall_source"] == "attempts"


def test_gpu_hour_price_is_a_positive_number_in_the_spec() -> None:
    from pydantic import ValidationError

    from launcher.spec.schema import ClusterSpec

    assert ClusterSpec(gpu_hour_price=2.5).gpu_hour_price == 2.5 and ClusterSpec().gpu_hour_price is None
    with pytest.raises(ValidationError, match="gpu_hour_price"):
        ClusterSpec(gpu_hour_price=0)


def test_no_price_no_cost_column(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    make_run(exp, "lora", result=default_result("lora"))
    collection = collect_experiment(exp, write=False)
    assert "cost" not in [c.header for c in columns_for(collection)]
    assert collection.row("lora").get("cost") is None


def test_slurms_elapsed_time_wins_where_sacct_has_it(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    paths = make_run(exp, "full", result=default_result("full", world_size=4))
    # A first submission (raw job 70, since replaced in the manifest by --retry-failed), then 77_3 (raw 80).
    record_attempt_start(paths, "70:0", 4, at=1000.0, job_id="70")
    record_attempt_end(paths, "70:0", "FAILED", at=1100.0)
    record_attempt_start(paths, "80:0", 4, at=2000.0, job_id="80")
    make_run(exp, "local", result=default_result("local"))
    manifest = {
        "version": 1,
        "runs": {
            "id-full": {"name": "full", "backend": "slurm", "job_id": "77_3"},
            "id-local": {"name": "local", "backend": "local", "job_id": None},
        },
    }
    (exp / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    calls: list[list[str]] = []

    def sacct(cmd: list[str]) -> str:  # the subprocess boundary
        calls.append(cmd)
        return (
            "70|70|2026-01-01T10:00:00|300\n"  # the first job
            "77_3|80|2026-01-01T11:00:00|1200\n"  # 77_3, preempted and requeued
            "77_3|80|2026-01-01T11:30:00|600\n"
            "77_3|80|2026-01-01T11:30:00|600\n"  # the same allocation again (named twice): once
            "77_4|81|2026-01-01T11:00:00|5\n"  # another run's
        )

    elapsed = slurm_elapsed_by_run_dir([exp], runner=sacct)
    assert "--duplicates" in calls[0] and calls[0][-1] == "70,77_3,80"
    row = collect_experiment(exp, write=False, elapsed_s=elapsed).row("full")
    assert row.get("wall_time_s") == 2100 and row.get("gpu_hours") == pytest.approx(4 * 2100 / 3600)
    assert row.get("wall_source") == "sacct"
    assert collect_experiment(exp, write=False, elapsed_s=elapsed).row("local").get("wall_source") is None
    assert slurm_elapsed_by_run_dir([exp], runner=lambda cmd: None) == {}  # no accounting


# --- 7. runs that differ in more than what was compared -----------------------------------------------


def _data_result(name: str, **values: Any) -> dict[str, Any]:
    base = {
        "template_used": "chatglm",
        "eval_set_hash": "e" * 16,
        "train_examples": 3000,
        "query_cut_frac": 0.0,
    }
    return default_result(name, **{**base, **values})


def test_notes_name_unswept_differences_in_what_runs_saw(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    make_run(exp, "freeze", result=_data_result("freeze"))
    make_run(
        exp,
        "lora",
        result=_data_result(
            "lora", template_used="plain", eval_set_hash="f" * 16, train_examples=2400, query_cut_frac=0.2
        ),
    )
    make_run(exp, "older", result=default_result("older", truncated_frac=0.125))  # keys missing: skipped
    md = render_markdown(collect_experiment(exp, write=False))
    assert "Runs differ in templates: chatglm (freeze); plain (lora); no config difference explains it" in md
    assert "Runs differ in eval sets:" in md
    assert "Runs differ in training examples seen: 2,400 (lora); 3,000 (freeze)" in md
    assert "shares of examples whose current query is cut: 0.0% (freeze); 20.0% (lora)" in md
    assert "shares of truncated examples" not in md  # all 12.5%


def test_a_swept_length_explains_its_truncation_difference(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    make_run(exp, "src512", result=_data_result("src512", truncated_frac=0.3), max_source_length=512)
    make_run(exp, "src1024", result=_data_result("src1024", truncated_frac=0.1), max_source_length=1024)
    md = render_markdown(collect_experiment(exp, write=False))
    assert "shares of truncated examples: 10.0% (src1024); 30.0% (src512); follows from what differs" in md
    assert "training.max_source_length" in md
    assert "templates" not in md and "eval sets" not in md


def test_identical_runs_get_no_difference_notes(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    for name in ("a", "b"):
        make_run(exp, name, result=_data_result(name))
    assert "Runs differ" not in render_markdown(collect_experiment(exp, write=False))

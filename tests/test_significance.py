"""Significance of BLEU differences: agreement with the sacrebleu CLI, and two crafted cases.

The crafted cases are a ``history_length``-style experiment (two LoRA runs, max_source_length 512 vs
1024) collected end to end: identical outputs must read as "no evidence" (p near 1), clearly
different ones as significant (p < 0.05, CI away from 0).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from collect_fixtures import default_result, make_run, perturb, references, samples

from launcher.collect import collect_experiment
from launcher.collect.significance import (
    SamplesMismatch,
    align,
    compare_to_baseline,
    load_samples,
)
from launcher.collect.table import COLUMNS

N_EXAMPLES = 200


def _sacrebleu_cli(
    tmp_path: Path, refs: list[str], base: list[str], system: list[str], *flags: str
) -> list[dict]:
    files = {}
    for label, lines in (("ref", refs), ("base", base), ("sys", system)):
        files[label] = tmp_path / f"{label}.txt"
        files[label].write_text("\n".join(lines) + "\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "sacrebleu", str(files["ref"]), "-i", str(files["base"]), str(files["sys"])]
    cmd += ["-m", "bleu", "-tok", "zh", "-f", "json", *flags]
    env = {"SACREBLEU_SEED": "12345", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, timeout=120)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def close_pair() -> tuple[list[str], list[str], list[str]]:
    """Two systems of similar quality: a p-value in the middle, where any discrepancy would show."""
    refs = references(N_EXAMPLES, seed=11)
    return refs, perturb(refs, 0.40, seed=12), perturb(refs, 0.38, seed=13)


def test_bleu_and_p_values_agree_with_the_sacrebleu_cli(
    tmp_path: Path, close_pair: tuple[list[str], list[str], list[str]]
) -> None:
    refs, base, system = close_pair
    ours = compare_to_baseline(base, {"sys": system}, refs, tokenize="zh")["sys"]
    bs = _sacrebleu_cli(tmp_path, refs, base, system, "--paired-bs")
    assert ours.baseline_bleu == pytest.approx(bs[0]["BLEU"]["score"], abs=1e-9)
    assert ours.system_bleu == pytest.approx(bs[1]["BLEU"]["score"], abs=1e-9)
    assert ours.p_bootstrap == pytest.approx(bs[1]["BLEU"]["p_value"], abs=1e-12)
    assert ours.system_ci == pytest.approx(bs[1]["BLEU"]["ci"], abs=1e-9)
    assert 0.05 < ours.p_bootstrap < 0.95, "the fixture should give a p-value in the middle"
    ar = _sacrebleu_cli(tmp_path, refs, base, system, "--paired-ar", "--paired-ar-n", "2000")
    assert ours.p_approx_randomization == pytest.approx(ar[1]["BLEU"]["p_value"], abs=1e-12)
    # The CI of the difference brackets the observed difference.
    assert ours.delta_ci[0] <= ours.delta <= ours.delta_ci[1]
    assert ours.delta == pytest.approx(ours.system_bleu - ours.baseline_bleu)


def test_results_are_deterministic_and_do_not_depend_on_the_environment_seed(
    monkeypatch: pytest.MonkeyPatch, close_pair: tuple[list[str], list[str], list[str]]
) -> None:
    refs, base, system = close_pair
    first = compare_to_baseline(base, {"sys": system}, refs)["sys"]
    monkeypatch.setenv("SACREBLEU_SEED", "none")  # would make sacrebleu draw from OS entropy
    second = compare_to_baseline(base, {"sys": system}, refs)["sys"]
    assert first == second


def _history_experiment(exp: Path, base_preds: list[str], sys_preds: list[str], refs: list[str]) -> None:
    for name, length, preds in (("lora-src512", 512, base_preds), ("lora-src1024", 1024, sys_preds)):
        swept = {"training.max_source_length": length}
        make_run(exp, name, result=default_result(name, bleu=None, swept=swept), samples=samples(refs, preds),
                 swept=swept, max_source_length=length)  # fmt: skip


def _cells(collection, name: str) -> dict[str, str]:
    row = collection.row(name)
    return {c.header: c.cell(row) for c in COLUMNS}


def test_identical_outputs_are_not_significant(tmp_path: Path) -> None:
    refs = references(N_EXAMPLES, seed=21)
    outputs = perturb(refs, 0.4, seed=22)
    exp = tmp_path / "history_length"
    _history_experiment(exp, outputs, list(outputs), refs)
    collection = collect_experiment(exp, "lora-src512", write=False)
    row = collection.row("lora-src1024")
    assert row.get("bleu_delta") == 0.0
    assert row.get("bleu_delta_ci") == [0.0, 0.0]
    # sacrebleu alone says 1/1001 here (it counts strictly larger differences; none is): p = 1 instead.
    assert row.get("bleu_p_value") == 1.0 and row.get("bleu_p_value_ar") == 1.0
    assert row.get("n_samples") == N_EXAMPLES
    cells = _cells(collection, "lora-src1024")
    assert cells["ΔBLEU"] == "+0.00" and cells["95% CI"] == "[+0.00, +0.00]"
    assert cells["p bs/ar"] == "1.000/1.000"  # no star


def test_clearly_different_outputs_are_significant(tmp_path: Path) -> None:
    refs = references(N_EXAMPLES, seed=31)
    exp = tmp_path / "history_length"
    _history_experiment(exp, perturb(refs, 0.6, seed=32), perturb(refs, 0.2, seed=33), refs)
    collection = collect_experiment(exp, "lora-src512", write=False)
    row = collection.row("lora-src1024")
    assert row.get("bleu_delta") > 10
    low, high = row.get("bleu_delta_ci")
    assert 0 < low < row.get("bleu_delta") < high
    assert row.get("bleu_p_value") < 0.05 and row.get("bleu_p_value_ar") < 0.05
    assert _cells(collection, "lora-src1024")["p bs/ar"].endswith("*")
    # The BLEU column, recomputed from samples.jsonl (result.json had none), is sacrebleu's corpus BLEU.
    import sacrebleu

    expected = sacrebleu.corpus_bleu(perturb(refs, 0.2, seed=33), [refs], tokenize="zh").score
    assert row.get("bleu") == pytest.approx(expected)
    assert collection.row("lora-src512").get("bleu_p_value") is None  # the baseline itself


def test_system_order_in_samples_does_not_matter(tmp_path: Path) -> None:
    refs = references(40, seed=41)
    preds = perturb(refs, 0.3, seed=42)
    base_rows = samples(refs, perturb(refs, 0.5, seed=43))
    sys_rows = samples(refs, preds)
    for path, rows in ((tmp_path / "a.jsonl", base_rows), (tmp_path / "b.jsonl", list(reversed(sys_rows)))):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    base, system = load_samples(tmp_path / "a.jsonl"), load_samples(tmp_path / "b.jsonl")
    assert align(base, system, "b") == preds


def test_duplicate_ids_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    row = {"id": "x", "prompt": "p", "reference": "r", "prediction": "q"}
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(SamplesMismatch, match="appears twice"):
        load_samples(path)


def test_many_systems_share_one_baseline_pass() -> None:
    refs = references(60, seed=51)
    base = perturb(refs, 0.5, seed=52)
    systems = {f"s{i}": perturb(refs, 0.1 * i, seed=60 + i) for i in range(1, 4)}
    results = compare_to_baseline(base, systems, refs)
    alone = compare_to_baseline(base, {"s2": systems["s2"]}, refs)["s2"]
    assert results["s2"].p_bootstrap == alone.p_bootstrap and results["s2"].delta == alone.delta
    assert results["s1"].delta > results["s2"].delta > results["s3"].delta


def test_several_references_per_example_are_scored_against_all_of_them(tmp_path: Path) -> None:
    """An eval set with several references per example: the paired test's BLEU is sacrebleu's
    multi-reference corpus BLEU (as the rank's result.json BLEU is), read from samples.jsonl."""
    from sacrebleu.metrics import BLEU

    first = references(40, seed=21)
    second = perturb(first, 0.5, seed=22)
    base, system = perturb(second, 0.3, seed=23), perturb(second, 0.1, seed=24)
    for name, preds in (("base", base), ("sys", system)):
        rows = [
            {"id": str(i), "prompt": "", "reference": a, "references": [a, b], "prediction": p}
            for i, (a, b, p) in enumerate(zip(first, second, preds, strict=True))
        ]
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    base_samples, sys_samples = load_samples(tmp_path / "base.jsonl"), load_samples(tmp_path / "sys.jsonl")
    aligned = align(base_samples, sys_samples, "sys")
    ours = compare_to_baseline(base_samples.predictions, {"sys": aligned}, base_samples.reference_sets)["sys"]
    both = BLEU(tokenize="zh").corpus_score(system, [first, second]).score
    only_first = BLEU(tokenize="zh").corpus_score(system, [first]).score
    assert ours.system_bleu == pytest.approx(both, abs=1e-9)
    assert abs(both - only_first) > 5  # the second reference matters here
    changed = [*sys_samples.reference_sets[:-1], (first[-1], "另一个参考")]
    with pytest.raises(SamplesMismatch, match="reference"):
        align(
            base_samples, sys_samples.__class__(**{**sys_samples.__dict__, "reference_sets": changed}), "sys"
        )

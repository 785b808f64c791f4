"""What was computed is kept: when BLEU (or generation) fails after training, the eval loss, the export
and result.json are still written, and the failure is the run's reason."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from train_helpers import make_run_dir, rank_output, run_ranks, status

from launcher.rundir.paths import read_json

pytestmark = pytest.mark.slow


def test_a_bleu_failure_keeps_eval_loss_export_and_result(tmp_path: Path, tiny_model_dir: Path) -> None:
    # sacrebleu's Korean tokenizer needs mecab, which is not installed: BLEU fails after generation
    paths = make_run_dir(
        tmp_path, "lora", max_steps=2, save_steps=100, eval_settings={"bleu_tokenize": "ko-mecab"}
    )
    assert run_ranks(paths, 1, timeout_s=300) == [1], rank_output(paths)
    st = status(paths)
    assert st["state"] == "FAILED"
    assert st["reason"].startswith(
        "eval generation/BLEU failed after training (RuntimeError: Korean tokenization"
    )
    result = read_json(paths.result_json)
    assert result["state"] == "FAILED" and result["reason"] == st["reason"]
    assert math.isfinite(result["eval_loss"]) and result["steps"] == 2 and result["bleu"] is None
    assert (paths.final / "adapter_model.safetensors").is_file()
    assert len(paths.samples_jsonl.read_text(encoding="utf-8").splitlines()) == 4  # generation had finished

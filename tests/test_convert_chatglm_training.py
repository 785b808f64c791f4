"""Training on a converted ChatGLM3 checkpoint through the real entrypoint (`python -m launcher.train
RUN_DIR`, one process per rank): Freeze, P-Tuning v1 and v2 and LoRA on one rank (ZeRO-2), full
fine-tuning under ZeRO-3 with offload on 2 gloo ranks. The runs render through the converted tokenizer's
own chat template (template: auto), LoRA through the named chatglm3 layout. Each export is reloaded the
way users load it and must reproduce the run's own eval loss; its chat template must give the prompt ids
training saw."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from chatglm_fixtures import Case, chatglm_cases
from train_helpers import make_run_dir, rank_output, start_ranks, wait_all

from launcher.rundir.paths import RunPaths, read_json

torch.set_num_threads(1)
ONE_RANK = ("freeze", "lora", "ptuning_v1", "ptuning_v2")
NAMED_TEMPLATE = {"lora": "chatglm3"}
"""The runs trained in a named template (the others: auto, the tokenizer's chat template)."""
STEPS = 3


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return chatglm_cases(tmp_path_factory.getbasetemp() / "chatglm")["chatglm3"]


@pytest.fixture(scope="module")
def runs(
    converted: Case, tmp_path_factory: pytest.TempPathFactory, dialogue_files: object
) -> dict[str, tuple[RunPaths, list[int]]]:
    """Every method trained at the same time (independent processes), a few steps each."""
    root = tmp_path_factory.mktemp("chatglm-train")
    common: dict[str, Any] = {
        "model_path": converted.dst,
        "max_steps": STEPS,
        "save_steps": STEPS,
        "learning_rate": 1e-2,
        "micro_batch": 2,
        "accumulation": 1,
        "train_examples": 16,
        "eval_examples": 6,
    }
    paths = {m: make_run_dir(root, m, template=NAMED_TEMPLATE.get(m, "auto"), **common) for m in ONE_RANK}
    paths["full"] = make_run_dir(
        root, "full", template="auto", world_size=2, zero_stage=3, offload=True, **common
    )
    procs = {m: start_ranks(p, 2 if m == "full" else 1) for m, p in paths.items()}
    return {m: (paths[m], wait_all(procs[m], timeout_s=400)) for m in paths}


def _eval_loss_of_export(method: str | None, final: Path, base: Path, paths: RunPaths) -> float:
    """The eval loss of the export reloaded as users reload it, on the run's own eval examples
    (``method`` None: of the untrained converted model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.data.templates import conversation
    from launcher.rundir.run_config import RunConfig
    from launcher.train.data import encode_for_training, encode_prompt, load_examples, resolve_data_files
    from launcher.train.evaluate import eval_loss

    cfg = RunConfig.from_yaml_file(paths.run_yaml)
    tokenizer = AutoTokenizer.from_pretrained(final)  # the export carries the converted tokenizer
    if cfg.template == "auto":  # the export carries the converted tokenizer's own chat template
        assert tokenizer.chat_template == AutoTokenizer.from_pretrained(base).chat_template
    if method is None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    elif method in ("lora", "ptuning_v1", "ptuning_v2"):
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), final
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    t = cfg.training
    examples = load_examples(resolve_data_files(cfg.data)[1])[: cfg.data.max_eval_examples]
    for ex in examples if method is not None else ():  # the export's chat template: training's prompt
        prompt = conversation(ex.system, ex.history, ex.query)
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
        assert ids == encode_prompt(ex, tokenizer, cfg.template, 10**6)
    features = [
        encode_for_training(ex, tokenizer, cfg.template, t.max_source_length, t.max_target_length)
        for ex in examples
    ]
    return eval_loss(model, features, tokenizer.pad_token_id, t.per_device_batch_size)


@pytest.mark.slow
@pytest.mark.parametrize("method", [*ONE_RANK, "full"])
def test_every_method_trains_a_converted_chatglm3_and_its_export_reloads(
    method: str, runs: dict[str, tuple[RunPaths, list[int]]], converted: Case
) -> None:
    paths, codes = runs[method]
    assert codes == ([0, 0] if method == "full" else [0]), rank_output(paths)
    result = read_json(paths.result_json)
    assert result["state"] == "COMPLETED" and result["steps"] == STEPS
    assert result["zero_stage"] == (3 if method == "full" else 2)
    assert math.isfinite(result["eval_loss"])
    reloaded = _eval_loss_of_export(method, paths.final, converted.dst, paths)
    untrained = _eval_loss_of_export(None, converted.dst, converted.dst, paths)
    print(
        f"\n{method}: eval loss {result['eval_loss']:.6f}, reloaded {reloaded:.6f}, untrained {untrained:.6f}"
    )
    assert reloaded == pytest.approx(result["eval_loss"], rel=1e-4)
    assert abs(reloaded - untrained) > 1e-3  # the export holds the trained model

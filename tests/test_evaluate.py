"""Evaluation: BLEU equals the sacrebleu CLI, ChatGLM's BLEU-4 by hand, greedy generation deterministic,
eval loss token-weighted, and 2 ranks (plain and real DeepSpeed ZeRO-3) give exactly the 1-rank results."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from methods_helpers import EVAL_METHODS, EXPORT_METHODS, features, load, run_config, spawn_ranks

from launcher.train.bleu_chatglm import bleu4_chatglm, sentence_bleu4_chatglm
from launcher.train.data import collate, encode_prompt
from launcher.train.evaluate import (
    _embeds_with_virtual_tokens,
    bleu_scores,
    eval_loss,
    generate_samples,
    left_pad,
    shard_batches,
)
from launcher.train.rouge_chatglm import ROUGE_KEYS, rouge_chatglm, sentence_rouge_chatglm

torch.set_num_threads(1)

HYPS = ["今天天气不错，我们去公园散步吧。", "我叫小明，住在北京。", "猫在沙发上睡觉", "", "32加3等于35。"]
REFS = [
    "今天天气很好，我们去公园散步。",
    "我叫小红，我住在上海。",
    "一只猫在沙发上睡觉。",
    "你住在海口。",
    "32加3等于35。",
]


def sacrebleu_cli(tmp_path: Path, *args: str) -> float:
    ref, hyp = tmp_path / "ref.txt", tmp_path / "hyp.txt"
    ref.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    hyp.write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-b", "-w", "4", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip())


def test_bleu_and_chrf_equal_the_sacrebleu_cli(tmp_path: Path) -> None:
    samples = [{"prediction": h, "reference": r} for h, r in zip(HYPS, REFS, strict=True)]
    scores = bleu_scores(samples, "zh")
    assert 0 < scores["bleu"] < 100
    assert round(scores["bleu"], 4) == sacrebleu_cli(tmp_path, "-tok", "zh")
    assert round(scores["chrf"], 4) == sacrebleu_cli(tmp_path, "-m", "chrf")
    assert round(bleu_scores(samples, "char")["bleu"], 4) == sacrebleu_cli(tmp_path, "-tok", "char")


def test_bleu4_chatglm_by_hand() -> None:
    # hyp 今天天气不错 vs ref 今天天气很好: char n-gram precisions 4/6, 3/5, 2/4, 1/3; equal lengths (bp 1)
    expected = (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25 * 100
    assert sentence_bleu4_chatglm("今天天气不错", "今天天气很好") == round(expected, 4)
    # 今天下雨 vs 今天天气很好: 2/4, 1/3, then no 3-/4-gram match -> method 3 gives 1/(2*2), 1/(4*1);
    # shorter than the reference: bp = exp(1 - 6/4)
    expected2 = math.exp(1 - 6 / 4) * (2 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25 * 100
    assert sentence_bleu4_chatglm("今天下雨", "今天天气很好") == round(expected2, 4)
    assert sentence_bleu4_chatglm("", "今天天气很好") == 0.0
    assert sentence_bleu4_chatglm("一样的句子。", "一样的句子。") == 100.0
    assert bleu4_chatglm(["今天天气不错", "今天下雨"], ["今天天气很好"] * 2) == pytest.approx(
        (round(expected, 4) + round(expected2, 4)) / 2
    )


def test_bleu_scores_without_samples() -> None:
    empty = {
        "bleu": None,
        "chrf": None,
        "bleu4_chatglm": None,
        "rouge1": None,
        "rouge2": None,
        "rougeL": None,
    }
    assert bleu_scores([], "zh") == empty
    without = bleu_scores([{"prediction": "好", "reference": "好"}], "zh", chatglm_bleu4=False)
    assert [without[k] for k in ("bleu4_chatglm", *ROUGE_KEYS)] == [None] * 4


def chatglm_rouge_reference(preds: list[str], labels: list[str]) -> dict[str, float]:
    """ChatGLM2-6B ptuning/main.py compute_metrics, its ROUGE part, as published (jieba words,
    rouge_chinese, F x100 rounded to 4 decimals, mean over examples; an empty side scores 0)."""
    import jieba
    import numpy as np
    from rouge_chinese import Rouge

    score_dict: dict[str, list[float]] = {"rouge-1": [], "rouge-2": [], "rouge-l": []}
    for pred, label in zip(preds, labels, strict=True):
        hypothesis = list(jieba.cut(pred))
        reference = list(jieba.cut(label))
        if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
            result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        for k, v in result.items():
            score_dict[k].append(round(v["f"] * 100, 4))
    return {k: float(np.mean(v)) for k, v in score_dict.items()}


ROUGE_REFS = [
    "今天天气很好，我们去公园散步。",
    "我叫小明，住在上海。",
    "The cat sat on the mat.",
    "北京是中国的首都",
]
ROUGE_HYPS = ["今天天气不错，我们去公园散步吧。", "我叫小明，住在北京。", "A cat was sitting on a mat.", ""]


def test_rouge_equals_chatglms_evaluation_on_chinese_and_english() -> None:
    ours = rouge_chatglm(ROUGE_HYPS, ROUGE_REFS)
    reference = chatglm_rouge_reference(ROUGE_HYPS, ROUGE_REFS)
    assert [ours[k] for k in ROUGE_KEYS] == pytest.approx(
        [reference[k] for k in ("rouge-1", "rouge-2", "rouge-l")]
    )
    for hyp, ref in zip(ROUGE_HYPS, ROUGE_REFS, strict=True):  # and example by example
        one = chatglm_rouge_reference([hyp], [ref])
        assert list(sentence_rouge_chatglm(hyp, ref).values()) == [
            one["rouge-1"],
            one["rouge-2"],
            one["rouge-l"],
        ]
    assert 0 < ours["rouge2"] < ours["rouge1"] < 100  # partial overlap: neither trivial value
    assert sentence_rouge_chatglm("今天天气很好", "今天天气很好") == dict.fromkeys(ROUGE_KEYS, 100.0)
    scores = bleu_scores(
        [{"prediction": h, "reference": r} for h, r in zip(ROUGE_HYPS, ROUGE_REFS, strict=True)], "zh"
    )
    assert [scores[k] for k in ROUGE_KEYS] == [ours[k] for k in ROUGE_KEYS]
    # several references: each example scores its best one (the reference itself among them: 100)
    multi = rouge_chatglm(ROUGE_HYPS[:2], [[ROUGE_REFS[0], ROUGE_HYPS[0]], [ROUGE_REFS[1]]])
    alone = rouge_chatglm(ROUGE_HYPS[1:2], ROUGE_REFS[1:2])
    assert [multi[k] for k in ROUGE_KEYS] == pytest.approx([(100 + alone[k]) / 2 for k in ROUGE_KEYS])


def test_sharding_and_left_padding() -> None:
    lengths = [3, 9, 5, 9, 1, 4, 7]
    batches = [shard_batches(lengths, 2, r, 2)[0] for r in range(2)]
    assert batches == [[[1, 3], [5, 0]], [[6, 2], [4]]]  # longest first; batch b -> rank b % 2
    assert shard_batches(lengths, 2, 0, 1) == ([[1, 3], [6, 2], [5, 0], [4]], 4)
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.fixture(scope="module")
def base(
    tiny_model_dir: Path, dialogue_files: tuple[Path, Path]
) -> tuple[Any, Any, Any, list[Any], list[Any]]:
    model, tokenizer, cfg = load(str(tiny_model_dir), {"method": "full"})
    examples, encoded = features(str(dialogue_files[1]), tokenizer, cfg, 9)
    return model, tokenizer, cfg, examples, encoded


def test_generation_greedy_deterministic_and_independent_of_batching(base: Any, tiny_model_dir: Path) -> None:
    model, tokenizer, cfg, examples, _ = base
    model.train()
    first = generate_samples(model, tokenizer, examples, cfg, 0, 1)
    assert model.training, "training mode must be restored"
    assert [s["id"] for s in first] == [ex.id for ex in examples[:7]]  # num_samples=7, example order
    assert all(set(s) == {"id", "prompt", "reference", "prediction"} for s in first)
    assert [s["reference"] for s in first] == [ex.response for ex in examples[:7]]
    assert all(s["prompt"].endswith(ex.query + "\n答：") for s, ex in zip(first, examples, strict=False))
    assert all(0 < len(s["prediction"]) <= cfg.eval.max_new_tokens for s in first)  # one char per token
    assert generate_samples(model, tokenizer, examples, cfg, 0, 1) == first
    # left padding is right: batches of 1 (no padding) give the same predictions as padded batches of 4
    single = run_config(tiny_model_dir, {"method": "full"}, batch_size=1)
    assert generate_samples(model, tokenizer, examples, single, 0, 1) == first


def test_ptuning_v1_generation_independent_of_batching(
    tiny_model_dir: Path, dialogue_files: tuple[Path, Path]
) -> None:
    """P-Tuning v1 prepends virtual tokens; peft's own generate puts them before the left padding and
    drops the position ids, so a padded row's prediction depended on its batch. Now padded batches,
    batches of 1 and a cache-free greedy loop through peft's forward (as in training) all agree."""
    method = {"method": "ptuning", "name": "ptuning_v1", "version": "v1", "pre_seq_len": 4}
    model, tokenizer, cfg = load(str(tiny_model_dir), method)
    examples, _ = features(str(dialogue_files[1]), tokenizer, cfg, 9)
    padded = [s["prediction"] for s in generate_samples(model, tokenizer, examples, cfg, 0, 1)]
    single_cfg = run_config(tiny_model_dir, method, batch_size=1)
    assert [s["prediction"] for s in generate_samples(model, tokenizer, examples, single_cfg, 0, 1)] == padded
    prompts = [encode_prompt(ex, tokenizer, cfg.template, cfg.training.max_source_length) for ex in examples]
    ids, mask = left_pad(prompts[:4], tokenizer.pad_token_id)
    assert (mask == 0).any()
    with torch.no_grad():
        alone = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts[:4]])
        embeds, full_mask = _embeds_with_virtual_tokens(model, ids, mask)
        ours = model.get_base_model()(inputs_embeds=embeds, attention_mask=full_mask).logits[:, -1]
        assert torch.allclose(ours, alone, atol=1e-4)
        # peft's layout (virtual tokens, padding, prompt) moves a padded row's prompt away from them
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits[:, -1], alone, atol=1e-3)
        for prompt, prediction in zip(prompts[:3], padded, strict=False):
            assert greedy_through_forward(model, tokenizer, prompt, cfg.eval.max_new_tokens) == prediction


def greedy_through_forward(
    model: Any, tokenizer: Any, prompt: list[int], max_new_tokens: int, stops: tuple[int, ...] = ()
) -> str:
    """The reference decode: one example, no padding, no KV cache, every step through the model's
    (peft's) forward - the path training uses. It stops at eos or any of ``stops``."""
    seq, new = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id or token in stops:
                break
            seq.append(token)
            new.append(token)
    return str(tokenizer.decode(new, skip_special_tokens=True).strip())


PTUNING_V1, PTUNING_V2 = (
    EXPORT_METHODS[2],
    {"method": "ptuning", "name": "ptuning_v2", "version": "v2", "pre_seq_len": 4},
)
GENERATION_CASES = [
    *(("tiny", method) for method in EXPORT_METHODS[:3]),
    # grouped-query models prompted through their chat templates: Llama 3 (4 heads over 1 KV head),
    # Phi-3 (4 over 2, fused qkv), GLM-4 (head_dim 24 != hidden / heads)
    *((family, method) for family in ("llama3", "phi3", "glm4") for method in (PTUNING_V2, PTUNING_V1)),
]


@pytest.mark.parametrize(
    ("model", "method"),
    GENERATION_CASES,
    ids=[f"{m}-{x.get('name') or x['method']}" for m, x in GENERATION_CASES],
)
def test_generation_equals_greedy_through_the_training_forward(
    model: str,
    method: dict[str, Any],
    tiny_model_dir: Path,
    family_dirs: dict[str, Path],
    dialogue_files: tuple[Path, Path],
) -> None:
    """peft's generate drops P-Tuning v2's prefix under transformers 5.2x (its past_key_values lose to
    generate's own cache): the tuned model then answered like the base. Padded batches must give what
    the model's forward gives, one token at a time, and a prefix must change the answers."""
    from launcher.data.templates import chat_format
    from launcher.train.evaluate import _eos_ids

    model_dir = tiny_model_dir if model == "tiny" else family_dirs[model]
    peft_model, tokenizer, cfg = load(
        str(model_dir), method, template="chatglm" if model == "tiny" else "auto"
    )
    peft_model.eval()
    if method["method"] == "ptuning":  # a freshly initialised prompt barely moves a model
        torch.manual_seed(3)
        for param in peft_model.prompt_encoder.parameters():
            param.data.normal_(0.0, 1.0)
    examples, _ = features(str(dialogue_files[1]), tokenizer, cfg, 5)
    predictions = [s["prediction"] for s in generate_samples(peft_model, tokenizer, examples, cfg, 0, 1)]
    prompts = [encode_prompt(ex, tokenizer, cfg.template, cfg.training.max_source_length) for ex in examples]
    stops = tuple(
        _eos_ids(tokenizer, peft_model.get_base_model(), chat_format(cfg.template, tokenizer).stop_ids)
    )
    reference = [
        greedy_through_forward(peft_model, tokenizer, p, cfg.eval.max_new_tokens, stops) for p in prompts
    ]
    assert predictions == reference and any(reference)
    # (on the tiny model, v1's 4 virtual tokens leave these long prompts' answers alone)
    if method.get("version") == "v2" or (model != "tiny" and method["method"] == "ptuning"):
        with peft_model.disable_adapter():
            base = [
                greedy_through_forward(peft_model, tokenizer, p, cfg.eval.max_new_tokens, stops)
                for p in prompts
            ]
        assert base != reference, "the virtual tokens changed no answer: the test would not see them dropped"


def test_eval_loss_is_token_weighted(base: Any) -> None:
    model, tokenizer, _, _, encoded = base
    pad = tokenizer.pad_token_id
    total = tokens = 0.0
    with torch.no_grad():
        for feature in encoded:  # one example at a time: no padding at all
            batch = collate([feature], pad)
            count = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * count
            tokens += count
    model.train()
    value = eval_loss(model, encoded, pad, 4)
    assert model.training
    assert value == pytest.approx(total / tokens, rel=1e-5)
    assert 0.1 < value < 10


def one_rank_reference(model_dir: Path, eval_file: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for method in EVAL_METHODS:
        model, tokenizer, cfg = load(str(model_dir), method)
        examples, encoded = features(str(eval_file), tokenizer, cfg, 9)
        results[f"{cfg.name}/loss"] = eval_loss(model, encoded, tokenizer.pad_token_id, 2)
        results[f"{cfg.name}/samples"] = generate_samples(model, tokenizer, examples, cfg, 0, 1)
    return results


@pytest.mark.slow
def test_two_ranks_plain_and_zero3_equal_one_rank(
    tiny_model_dir: Path, dialogue_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """2 gloo ranks, first as plain processes, then under real DeepSpeed ZeRO-3 (every tensor
    partitioned, uneven batches per rank, synced generation), for the base model and P-Tuning v2 and v1."""
    spawn_ranks(["evaluate", str(tiny_model_dir), str(dialogue_files[1]), str(tmp_path)], timeout_s=400)
    got = json.loads((tmp_path / "evaluate.json").read_text(encoding="utf-8"))
    want = one_rank_reference(tiny_model_dir, dialogue_files[1])
    for method in EVAL_METHODS:
        name = method.get("name") or method["method"]
        assert len(want[f"{name}/samples"]) == 7
        for mode in ("plain", "zero3"):
            assert got[f"{name}/{mode}/samples"] == want[f"{name}/samples"], (name, mode)
            assert got[f"{name}/{mode}/loss"] == pytest.approx(want[f"{name}/loss"], rel=1e-6), (name, mode)

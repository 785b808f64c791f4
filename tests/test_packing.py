"""Packing: a packed batch gives every example the loss and gradients it has alone, for every method."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import TypeAdapter

from launcher.spec.schema import MethodSpec
from launcher.train.data import IGNORE_INDEX, Encoded
from launcher.train.packing import PackedOrder, collate_packed, pack_rows, prefix_packed_mask, virtual_tokens

sys.path.insert(0, str(Path(__file__).parent))
TOLERANCE = 1e-5
GLM = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
}
METHODS = {
    "full": {"method": "full"},
    "freeze": {"method": "freeze", "trainable_layers": 1},
    "lora": {"method": "lora", "r": 4, "lora_dropout": 0.0},  # dropout would draw other masks
    "ptuning-v1": {"method": "ptuning", "version": "v1", "pre_seq_len": 4},
    "ptuning-v2": {"method": "ptuning", "version": "v2", "pre_seq_len": 4},
}


def _examples(count: int = 7) -> list[Encoded]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for i in range(count):
        source, target = 5 + 3 * i % 11, 3 + i % 4
        ids = torch.randint(4, GLM["vocab_size"], (source + target,), generator=gen).tolist()
        out.append(Encoded(ids, [IGNORE_INDEX] * source + ids[source:], False, source))
    return out


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every position that predicts a target (0 elsewhere), [batch, seq - 1]."""
    flat = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
        labels[:, 1:].reshape(-1),
        reduction="none",
        ignore_index=IGNORE_INDEX,
    )
    return flat.view(labels.shape[0], -1)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _model(method: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    from transformers import GlmConfig, GlmForCausalLM

    from launcher.train.adapters import apply_method
    from launcher.train.packing import prepare_model

    torch.manual_seed(0)
    spec = TypeAdapter(MethodSpec).validate_python(method)
    base = GlmForCausalLM(GlmConfig(**GLM, attn_implementation="sdpa"))
    base.config.use_cache = False  # as the trainer loads it: with a cache transformers sees no packing
    model, _ = apply_method(base, spec)
    prepare_model(model, spec)
    model.train()
    return model, spec


@pytest.mark.parametrize("name", list(METHODS))
def test_packed_losses_and_gradients_equal_unpacked(name: str) -> None:
    model, spec = _model(METHODS[name])
    examples = _examples()
    slots = virtual_tokens(spec)

    # Alone: one example per forward, as an unpacked batch lays it out (peft puts P-Tuning's prompt first).
    alone, total = [], torch.zeros((), dtype=torch.float64)
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, slots:]
        loss = _token_losses(logits, torch.tensor([ex.labels])).sum()
        alone.append(loss.item())
        total = total + loss
    total.backward()
    grads_alone = _grads(model)

    # Packed: rows of up to 40 tokens, one forward for all of them.
    rows = pack_rows([len(e.input_ids) + slots for e in examples], 40)
    assert len(rows) < len(examples)  # something was really packed
    batch, real = collate_packed([[examples[i] for i in row] for row in rows], pad_token_id=0, slots=slots)
    assert real == sum(len(e.input_ids) for e in examples)
    labels = batch.pop("labels")
    per_token = _token_losses(model(**batch).logits, labels)
    per_token.sum().backward()
    grads_packed = _grads(model)

    # Per example: its tokens in the packed rows, found from the layout.
    packed: dict[int, float] = {}
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            end = start + slots + len(examples[i].input_ids)
            packed[i] = per_token[r, start : end - 1].sum().item()
            start = end
    for i, value in enumerate(alone):
        assert packed[i] == pytest.approx(value, abs=TOLERANCE), (name, i)
    assert grads_alone.keys() == grads_packed.keys() and grads_alone
    for key, grad in grads_alone.items():
        assert torch.allclose(grads_packed[key], grad, atol=TOLERANCE, rtol=0), (name, key)


@pytest.mark.parametrize("name", ["lora", "ptuning-v1", "ptuning-v2"])
def test_the_training_loss_on_a_packed_batch_is_the_mean_over_its_targets(name: str) -> None:
    """The trainer's target-only loss (LM head on target rows only) takes packed batches as they are."""
    from launcher.train.target_loss import TargetOnlyLoss

    model, spec = _model(METHODS[name])
    loss_fn = TargetOnlyLoss(model)
    examples = _examples()
    slots = virtual_tokens(spec)
    rows = pack_rows([len(e.input_ids) + slots for e in examples], 40)
    batch, _ = collate_packed([[examples[i] for i in row] for row in rows], pad_token_id=0, slots=slots)
    with torch.no_grad():
        ours = loss_fn.loss(model, dict(batch))
        labels = batch.pop("labels")
        reference = _token_losses(model(**batch).logits, labels)
    targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert targets == sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in examples)
    assert ours.item() == pytest.approx(reference.sum().item() / targets, abs=TOLERANCE)


def test_rows_hold_whole_examples_up_to_the_capacity_and_every_rank_the_same_batches() -> None:
    lengths = [9, 3, 7, 2, 5, 5, 1, 8, 4, 6]
    rows = pack_rows(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 5  # 50 tokens in rows of 10: best-fit leaves no room unused here
    with pytest.raises(ValueError, match="more than a packed row holds"):
        pack_rows([11], 10)
    tokens = [sum(lengths[i] for i in row) for row in rows]
    ranks = [PackedOrder(rows, tokens, batch_size=1, rank=r, world_size=2, seed=1) for r in range(2)]
    assert ranks[0].num_batches == ranks[1].num_batches == 2
    seen = [row for order in ranks for batch in order.batches(0) for row in batch]
    assert len({tuple(r) for r in seen}) == 4  # disjoint slices of the same shuffled rows
    assert ranks[0].batches(0) != ranks[0].batches(1) or ranks[1].batches(0) != ranks[1].batches(1)


def test_prefix_mask_opens_the_prefix_and_each_example_to_itself() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])  # examples of 3 and 2 tokens, then a pad segment
    mask = prefix_packed_mask(positions, prefix=2, dtype=None)[0, 0]
    assert mask[:, :2].all()  # the prefix, for everyone
    own = mask[:, 2:]
    assert own[4].tolist() == [False, False, False, True, True, False]
    assert own[2].tolist() == [True, True, True, False, False, False]
    additive = prefix_packed_mask(positions, prefix=2, dtype=torch.float32)[0, 0]
    assert (additive == 0).equal(mask)


def _varied_lengths(path: Path, count: int = 64) -> dict[str, Any]:
    """Examples of 24 to 126 tokens, none truncated: a row as long as the longest holds several short ones."""
    from launcher.builtins.demo_data import pretraining_corpus

    text = "".join(pretraining_corpus(40))
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            prompt_chars, response_chars = 4 + (i * 37) % 90, 3 + (i * 11) % 20
            start = (i * 131) % (len(text) - prompt_chars - response_chars)
            prompt = text[start : start + prompt_chars]
            response = text[start + prompt_chars : start + prompt_chars + response_chars]
            handle.write(json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False) + "\n")
    # these tests are about packing, not generalisation: eval on the training file is intended
    return {"train_file": str(path), "eval_file": str(path), "allow_eval_overlap": True}


def _expected_tokens(paths: Any, world_size: int, steps: int) -> list[int]:
    """Real tokens after each optimizer step, from the packed order every rank builds (accumulation 1)."""
    from launcher.data.templates import chat_format
    from launcher.rundir.run_config import RunConfig
    from launcher.train.distributed import DistEnv
    from launcher.train.setup import build_data, load_tokenizer

    cfg = RunConfig.from_yaml_file(paths.run_yaml)
    tokenizer = load_tokenizer(cfg)
    chat = chat_format(cfg.template, tokenizer)
    per_step = [0] * steps
    for rank in range(world_size):
        data = build_data(cfg, tokenizer, DistEnv(rank, rank, world_size, "localhost", 0, "single"), chat)
        assert data.order.num_batches >= steps
        assert len(data.order.rows) < len(data.train_features)  # rows really hold several examples
        for step, rows in enumerate(data.order.batches(0)[:steps]):
            batch, real = data.make_batch(rows)
            assert real == int((batch["input_ids"] != data.pad_token_id).sum())  # pads are not counted
            per_step[step] += real
    return [sum(per_step[: s + 1]) for s in range(steps)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "zero_stage", "world_size"), [("ptuning_v1", 3, 1), ("ptuning_v2", 2, 1), ("lora", 3, 2)]
)
def test_packed_training_through_the_entrypoint(
    tmp_path: Path, tiny_model_dir: Path, method: str, zero_stage: int, world_size: int
) -> None:
    """``training.packing: true`` through ``python -m launcher.train``: the per-example prompt layouts run
    inside a real DeepSpeed engine (ZeRO-3 gathers the prompt encoder's weights inside the packed
    forward), two ranks train disjoint slices of the same packed rows, and the loop counts the real
    tokens of exactly those rows, not their padding."""
    from train_helpers import make_run_dir, metrics, rank_output, run_ranks, status

    steps = 3
    paths = make_run_dir(
        tmp_path,
        method,
        world_size=world_size,
        zero_stage=zero_stage,
        max_steps=steps,
        accumulation=1,
        save_steps=100,
        data=_varied_lengths(tmp_path / "varied.jsonl"),
        max_source_length=128,
        max_target_length=32,
        packing=True,
    )
    assert run_ranks(paths, world_size, timeout_s=240) == [0] * world_size, rank_output(paths)
    assert status(paths)["state"] == "COMPLETED"
    rows = metrics(paths)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert [r["tokens"] for r in rows] == _expected_tokens(paths, world_size, steps)
    log = paths.rank_log(0).read_text()
    assert "packing:" in log, log[-2000:]

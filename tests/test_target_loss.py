"""The target-only loss: the same loss and gradients as the model's own for every method, logits for
target rows only, the head left alone outside the loss, and a fall-back for heads it cannot read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from methods_helpers import EXPORT_METHODS, features, load
from torch import nn

from launcher.train.data import collate
from launcher.train.target_loss import TargetOnlyLoss

torch.set_num_threads(1)
METHODS = [m for m in EXPORT_METHODS if m.get("name") != "full_offload"]


def _batch(model_dir: Path, eval_file: Path, method: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    model, tokenizer, cfg = load(str(model_dir), method)
    _, encoded = features(str(eval_file), tokenizer, cfg, 6)
    batch = collate(encoded, tokenizer.pad_token_id)  # lengths differ: right padding in most rows
    assert (batch["attention_mask"] == 0).any()
    model.eval()  # no dropout (LoRA's): both losses must see the same network
    return model, batch


def _loss_and_grads(model: Any, loss: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


@pytest.mark.parametrize("method", METHODS, ids=[m.get("name") or m["method"] for m in METHODS])
def test_same_loss_and_gradients_as_the_models_own(
    method: dict[str, Any], tiny_model_dir: Path, dialogue_files: tuple[Path, Path]
) -> None:
    model, batch = _batch(tiny_model_dir, dialogue_files[1], method)
    loss_fn = TargetOnlyLoss(model)
    head_rows: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: head_rows.append(out.shape[-2]))

    reference, reference_grads = _loss_and_grads(model, model(**batch).loss)
    assert loss_fn.verify(model, batch)
    head_rows.clear()
    ours, our_grads = _loss_and_grads(model, loss_fn.loss(model, batch))

    targets = int((batch["labels"][:, 1:] != -100).sum())
    assert head_rows == [targets]  # logits for the target rows only
    assert targets < batch["input_ids"].numel() / 3  # ... which are a small part of the batch
    assert ours == pytest.approx(reference, rel=1e-5)
    assert len(our_grads) == len(reference_grads) > 0
    for mine, theirs in zip(our_grads, reference_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_head_runs_as_usual_outside_the_loss(tiny_model_dir: Path, dialogue_files: tuple[Path, Path]) -> None:
    model, batch = _batch(tiny_model_dir, dialogue_files[1], {"method": "full"})
    loss_fn = TargetOnlyLoss(model)
    loss_fn.loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[:2] == batch["input_ids"].shape  # generation still sees every position


class _ToyLM(nn.Module):
    """A causal LM whose head sees [seq, batch, hidden] (as ChatGLM-6B's remote code does), or the
    hidden states flattened to [batch * seq, hidden] (a layout the target-only loss cannot read)."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layout = layout
        self.embed = nn.Embedding(50, 16)
        self.lm_head = nn.Linear(16, 50)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None, labels: Any = None) -> Any:
        hidden = self.embed(input_ids)
        if self.layout == "seq_first":
            logits = self.lm_head(hidden.transpose(0, 1)).transpose(0, 1)
        else:
            logits = self.lm_head(hidden.reshape(-1, 16)).reshape(*input_ids.shape, 50)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
        return type("Out", (), {"loss": loss, "logits": logits})()


def _toy_batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[1, 5:] = -100  # rows differ, so a transposed row order would show
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def test_a_seq_first_head_gets_the_target_rows_too() -> None:
    model, batch = _ToyLM("seq_first"), _toy_batch()
    loss_fn = TargetOnlyLoss(model)
    head_inputs: list[tuple[int, ...]] = []
    model.lm_head.register_forward_hook(lambda _m, args, _out: head_inputs.append(tuple(args[0].shape)))
    assert loss_fn.verify(model, batch)
    head_inputs.clear()
    ours = loss_fn.loss(model, batch)
    assert head_inputs == [(int((batch["labels"][:, 1:] != -100).sum()), 1, 16)]
    assert float(ours) == pytest.approx(float(model(**batch).loss), rel=1e-6)


def test_falls_back_to_the_models_loss_for_a_head_it_cannot_read(caplog: Any) -> None:
    model, batch = _ToyLM("flattened"), _toy_batch()
    loss_fn = TargetOnlyLoss(model)
    assert loss_fn.enabled
    assert not loss_fn.verify(model, batch)
    assert "neither [batch, seq, hidden] nor [seq, batch, hidden]" in caplog.text
    assert float(loss_fn.loss(model, batch)) == pytest.approx(float(model(**batch).loss))


def test_one_rank_that_disagrees_turns_it_off_everywhere(
    tiny_model_dir: Path, dialogue_files: tuple[Path, Path]
) -> None:
    model, batch = _batch(tiny_model_dir, dialogue_files[1], {"method": "full"})
    verdicts: list[bool] = []

    def another_rank_failed(ok: bool) -> bool:
        verdicts.append(ok)
        return False

    loss_fn = TargetOnlyLoss(model)
    assert not loss_fn.verify(model, batch, agree=another_rank_failed)
    assert verdicts == [True]  # this rank matched, yet follows the others
    head_rows: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: head_rows.append(out.shape[-2]))
    assert float(loss_fn.loss(model, batch)) == pytest.approx(float(model(**batch).loss))
    assert head_rows[0] == batch["input_ids"].shape[1]  # every position went through the head


def test_a_model_without_an_output_head_keeps_its_own_loss() -> None:
    model = _ToyLM("seq_first")
    model.get_output_embeddings = lambda: None  # type: ignore[method-assign]
    assert not TargetOnlyLoss(model).enabled

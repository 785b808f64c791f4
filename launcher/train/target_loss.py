"""The training loss computed from the target positions only.

Prompt tokens are masked from the loss, yet a causal LM's forward computes logits for every position
- batch x seq x vocab floats, plus as many for their gradient and for the fp32 copy the loss makes -
and throws most of them away: in dialogue fine-tuning the prompt (history + query) is most of the
sequence. For ChatGLM-6B (vocab 130,528) at micro-batch 4 x 768 tokens those logits are 0.4 G
floats, 1.6 GB per fp32 copy. Here the LM head gets only the hidden states of positions whose next
token is a target (a forward pre-hook on the output embeddings), so logits exist for those rows
alone, and the cross-entropy is taken over them: the same sum (and mean) over target tokens as Hugging
Face's ``ForCausalLMLoss``, at a fraction of the head's compute and memory. The training loop takes the
sum and divides it by the target tokens of the whole global batch (launcher/train/step.py).

The head's input may be batch-first (transformers) or seq-first (ChatGLM-6B's remote code); both are
handled. A model may also post-process logits in ways that assume their full shape, so ``verify``
compares this loss with the model's own on a real batch before training, and the run falls back to
the model's loss when they differ.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from launcher.train.data import IGNORE_INDEX

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]

AGREEMENT_RTOL = 5e-3
"""How close the two losses must be for the target-only path to be used. Loose enough for bf16 logits
computed over fewer rows (another matmul kernel), tight enough to catch a head that saw the wrong rows."""


def target_count(batch: Batch) -> int:
    """Target tokens of a batch: labelled positions after the first (the shifted labels a causal LM
    predicts). On the host for a CPU batch; a device batch costs a sync."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class TargetOnlyLoss:
    """Computes a causal LM's loss from target-position logits only; falls back to the model's loss.

    Install it on the model before wrapping (DeepSpeed, peft already applied); call ``verify`` once on a
    real batch (a collective under ZeRO-3: every rank must call it), then ``loss`` per batch.
    """

    def __init__(self, model: nn.Module) -> None:
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        self.enabled = isinstance(head, nn.Module)
        self._targets: torch.Tensor | None = None  # [batch, seq-1] bool: next token is a target
        self._layout: str | None = None  # how the head saw the hidden states in the call under way
        if isinstance(head, nn.Module):
            head.register_forward_pre_hook(self._keep_target_rows)

    def _keep_target_rows(self, _head: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        targets = self._targets
        if targets is None or not args or not isinstance(args[0], torch.Tensor):
            return None  # generation, or a call of ours not under way: the head runs as usual
        hidden = args[0]
        batch, positions = targets.shape
        if hidden.dim() != 3:
            return None
        # [batch, seq, hidden] as in transformers, or [seq, batch, hidden] as in ChatGLM-6B's code. Soft
        # prompts (P-Tuning v1) put virtual tokens in front of the sequence: the offset skips them.
        if hidden.shape[0] == batch and hidden.shape[1] > positions:
            self._layout, seq_len = "batch_first", hidden.shape[1]
            seq_stride, batch_stride = 1, seq_len
        elif hidden.shape[1] == batch and hidden.shape[0] > positions:
            self._layout, seq_len = "seq_first", hidden.shape[0]
            seq_stride, batch_stride = batch, 1
        else:
            return None
        device = hidden.device
        offset = seq_len - (positions + 1)
        rows = (
            torch.arange(batch, device=device).unsqueeze(1) * batch_stride
            + (offset + torch.arange(positions, device=device)) * seq_stride
        )[targets.to(device)]  # in the order of labels[:, 1:][targets]
        kept = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        # still 3-d, one sequence of the target rows, so the model's own post-processing (a transpose
        # back to batch-first, soft-capping) runs unchanged
        return (kept.unsqueeze(0) if self._layout == "batch_first" else kept.unsqueeze(1), *args[1:])

    def _target_only(self, forward: Callable[..., Any], batch: Batch) -> torch.Tensor | None:
        labels = batch["labels"]
        self._targets = labels[:, 1:] != IGNORE_INDEX
        self._layout = None
        try:
            logits = forward(**{k: v for k, v in batch.items() if k != "labels"}).logits
        finally:
            targets, self._targets = self._targets, None
        wanted = labels[:, 1:][targets]
        if self._layout is None or logits.numel() != wanted.numel() * logits.shape[-1]:
            return None
        logits = logits.reshape(-1, logits.shape[-1])
        # The sum over no targets is a zero that still carries a graph, where a mean would be NaN.
        return nn.functional.cross_entropy(logits.float(), wanted.to(logits.device), reduction="sum")

    def loss_sum(self, forward: Callable[..., Any], batch: Batch) -> torch.Tensor:
        """Summed cross-entropy over the batch's target tokens (fp32); ``forward`` is the engine or the
        model. A sum, not a mean, so that the caller can divide by the target tokens of the whole global
        batch: a mean per micro-batch would weigh a short micro-batch's tokens more."""
        if not self.enabled:
            # the model's own loss is the mean over its shifted targets: back to their sum
            return forward(**batch).loss.float() * (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        value = self._target_only(forward, batch)
        if value is None:
            raise RuntimeError("the LM head's input changed layout after the target-only loss was verified")
        return value

    def loss(self, forward: Callable[..., Any], batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over the batch's target tokens; ``forward`` is the engine or the model."""
        if not self.enabled:
            return forward(**batch).loss
        return self.loss_sum(forward, batch) / max(1, target_count(batch))

    def verify(
        self,
        forward: Callable[..., Any],
        batch: Batch,
        agree: Callable[[bool], bool] = lambda ok: ok,
    ) -> bool:
        """Compare with the model's own loss on ``batch`` (no grad); keep the target-only path if equal.

        ``agree`` combines the verdicts of all ranks (every rank must take the same path).
        """
        if self.enabled:
            with torch.no_grad():
                reference = forward(**batch).loss
                ours = self._target_only(forward, batch)
                if ours is not None:
                    ours = ours / max(1, target_count(batch))
            # equal_nan: a broken model (NaN weights) is the loop's to report, not a reason to switch
            ok = ours is not None and torch.allclose(
                ours.float(), reference.float(), rtol=AGREEMENT_RTOL, atol=AGREEMENT_RTOL, equal_nan=True
            )
            if not ok:
                log.warning(
                    "target-only loss: %s; using the model's own loss (logits for every position)",
                    "the LM head's input is neither [batch, seq, hidden] nor [seq, batch, hidden]"
                    if ours is None
                    else f"{float(ours):.6f} differs from the model's {float(reference):.6f}",
                )
            self.enabled = agree(ok)
        return self.enabled

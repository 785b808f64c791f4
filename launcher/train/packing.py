"""Packing (``training.packing: true``): batches of whole examples packed into rows, almost free of padding.

Examples are packed into rows of at most the longest example's length (best-fit decreasing, once per
run, so every epoch has the same number of batches and a resumed run skips exactly the batches it
trained); a micro-batch holds ``per_device_batch_size`` rows of similar length. Rows no longer than one
example keep the memory plan's sequence length and attention's cost per token: SDPA has no
variable-length kernel, so a packed row is attended under a dense block-diagonal mask, whose cost grows
with the row's length (one row of 8 x 292 tokens trained 3x slower per token than rows of 292 on the
built-in model). Inside a row every example keeps its own positions (``position_ids`` restart at 0) and
attends to itself only:

- Freeze, LoRA, full: the batch carries ``position_ids`` and no ``attention_mask``; transformers reads
  the restarts as packed sequences (``masking_utils.find_packed_sequence_indices``) and builds a
  block-diagonal causal mask for SDPA and eager attention, and flash-attention's varlen kernels use the
  same position ids.
- P-Tuning v2 (a trained key/value prefix in every layer): every example must see the prefix and its
  own tokens. transformers does not detect packing when a cache (the prefix) is present, so the model's
  forward gets a 4-D mask here: the prefix columns open to every token, the rest block-diagonal causal.
  The positions restart at the prefix length, as peft offsets them in an unpacked batch.
- P-Tuning v1 (trained virtual tokens before the input): peft prepends them once per row; here each
  example gets its own ``pre_seq_len`` slots in front of it, filled with the prompt encoder's output,
  with the example's positions counting from the first slot, exactly as peft lays out one example.

The first token of every example is never a target (nothing before it in the example predicts it), so
the shifted loss never crosses from one example into the next. The pad segment that evens out the rows
of a micro-batch is a sequence of its own with no targets.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from launcher.errors import UserError
from launcher.spec.schema import MethodSpec, PtuningMethod
from launcher.train.data import IGNORE_INDEX, Encoded

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]
PROMPT_SLOTS_KEY = "prompt_slots"
"""Batch key (P-Tuning v1 only) marking the virtual-token slots; consumed by the packed forward."""


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Example indices grouped into rows of at most ``capacity`` tokens (best-fit decreasing: each example,
    longest first, goes to the fullest row it still fits in). Deterministic for the same lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"example {i} has {need} tokens, more than a packed row holds ({capacity})")
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (space - need, row))
        else:
            rows.append([i])
            bisect.insort(free, (capacity - need, len(rows) - 1))
    return rows


@dataclass
class PackedOrder:
    """Which packed rows each rank sees in which batch; the interface of ``data.BatchOrder`` (a batch is a
    list of rows, a row a list of example indices). Rows are packed once; per epoch they are shuffled,
    sorted by length inside mega-batches of ``MEGA_BATCHES`` global batches (so the rows of a batch are
    about as long and the pad segment stays short) and the batches shuffled again; a global batch is
    ``batch_size x world_size`` rows and rank r takes its r-th slice."""

    rows: list[list[int]]
    row_tokens: list[int]
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 42
    MEGA_BATCHES = 50

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def num_batches(self) -> int:
        return len(self.rows) // self.global_batch

    def batches(self, epoch: int) -> list[list[list[int]]]:
        rng = random.Random(f"packed-order-{self.seed}-{epoch}")
        order = list(range(len(self.rows)))
        rng.shuffle(order)
        order = order[: self.num_batches * self.global_batch]
        mega = self.global_batch * self.MEGA_BATCHES
        order = [
            r
            for start in range(0, len(order), mega)
            for r in sorted(order[start : start + mega], key=lambda r: -self.row_tokens[r])
        ]
        global_batches = [order[s : s + self.global_batch] for s in range(0, len(order), self.global_batch)]
        rng.shuffle(global_batches)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [[self.rows[r] for r in batch[lo:hi]] for batch in global_batches]


def virtual_tokens(method: MethodSpec) -> int:
    """Slots P-Tuning v1 puts before every example (0 for the other methods)."""
    return method.pre_seq_len if isinstance(method, PtuningMethod) and method.version == "v1" else 0


def collate_packed(rows: Sequence[Sequence[Encoded]], pad_token_id: int, slots: int = 0) -> tuple[Batch, int]:
    """(batch, real tokens): ``input_ids``, ``position_ids``, ``labels`` and, with ``slots`` (P-Tuning
    v1), ``prompt_slots``. Rows are evened out with a trailing pad segment of their own."""
    ids_rows, pos_rows, label_rows, slot_rows = [], [], [], []
    real = 0
    for row in rows:
        ids: list[int] = []
        pos: list[int] = []
        labels: list[int] = []
        slot: list[bool] = []
        for ex in row:
            n = len(ex.input_ids)
            real += n
            ids += [pad_token_id] * slots + list(ex.input_ids)
            pos += list(range(slots + n))
            # the example's first token is predicted by nothing in it: never a target across examples
            labels += [IGNORE_INDEX] * (slots + 1) + list(ex.labels[1:])
            slot += [True] * slots + [False] * n
        ids_rows.append(ids)
        pos_rows.append(pos)
        label_rows.append(labels)
        slot_rows.append(slot)
    width = max(len(ids) for ids in ids_rows)
    for ids, pos, labels, slot in zip(ids_rows, pos_rows, label_rows, slot_rows, strict=True):
        pad = width - len(ids)
        ids += [pad_token_id] * pad
        pos += list(range(pad))  # a sequence of its own: the restart separates it
        labels += [IGNORE_INDEX] * pad
        slot += [False] * pad
    batch = {
        "input_ids": torch.tensor(ids_rows, dtype=torch.long),
        "position_ids": torch.tensor(pos_rows, dtype=torch.long),
        "labels": torch.tensor(label_rows, dtype=torch.long),
    }
    if slots:
        batch[PROMPT_SLOTS_KEY] = torch.tensor(slot_rows, dtype=torch.bool)
    return batch, real


def batching(
    features: Sequence[Encoded],
    method: MethodSpec,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    pad_token_id: int,
) -> tuple[PackedOrder, Callable[[list[list[int]]], tuple[Batch, int]]]:
    """The packed order over ``features`` and the function that turns one of its batches into tensors.

    A row holds as many tokens as the longest example (plus P-Tuning v1's slots for each example), so a
    packed micro-batch is never longer than an unpacked one and the memory plan still holds."""
    slots = virtual_tokens(method)
    lengths = [len(f.input_ids) + slots for f in features]
    rows = pack_rows(lengths, max(lengths))
    row_tokens = [sum(lengths[i] for i in row) for row in rows]
    order = PackedOrder(rows, row_tokens, batch_size, rank, world_size, seed)
    if order.num_batches == 0:
        raise UserError(
            f"training.packing: {len(features)} examples pack into {len(order.rows)} rows, fewer than one "
            f"global batch of {order.global_batch} rows (per_device_batch_size x ranks); use more "
            "examples, a smaller per_device_batch_size, or packing: false"
        )

    filled = sum(lengths) / (len(rows) * max(lengths))
    log.info(
        "packing: %d examples in %d rows of up to %d tokens (%.1f%% filled), %d batches per epoch",
        len(features),
        len(order.rows),
        max(lengths),
        100 * filled,
        order.num_batches,
    )

    def make_batch(rows: list[list[int]]) -> tuple[Batch, int]:
        return collate_packed([[features[i] for i in row] for row in rows], pad_token_id, slots)

    return order, make_batch


# --- the model side: P-Tuning's per-example prompt ---------------------------------------------------


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Which example each position belongs to: a new one starts wherever the position does not go up by 1."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def prefix_packed_mask(position_ids: torch.Tensor, prefix: int, dtype: torch.dtype | None) -> torch.Tensor:
    """[batch, 1, seq, prefix + seq]: every position sees the prefix, then causally its own example only.
    Boolean (True = attend) for SDPA; additive (0 / most negative) in ``dtype`` for eager attention."""
    seg = segment_ids(position_ids)
    seq = position_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    own = (seg[:, :, None] == seg[:, None, :]) & causal
    allowed = torch.cat((own.new_ones(own.shape[0], seq, prefix), own), dim=-1)[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def prepare_model(model: nn.Module, method: MethodSpec) -> None:
    """Make a peft prompt-learning model lay packed batches out per example (before DeepSpeed wraps it).

    Batches without packing markers (evaluation, generation, the loss check) take peft's own forward."""
    if not isinstance(method, PtuningMethod):
        return  # transformers handles packed position ids itself
    original = model.forward
    peft_model: Any = model
    if method.version == "v1":

        def forward_v1(*args: Any, **kwargs: Any) -> Any:
            slots = kwargs.pop(PROMPT_SLOTS_KEY, None)
            if slots is None:
                return original(*args, **kwargs)
            embeds = peft_model.word_embeddings(kwargs.pop("input_ids"))
            prompt = peft_model.get_prompt(batch_size=1)[0].to(embeds.dtype)  # [pre_seq_len, hidden]
            fill = prompt.repeat(int(slots.sum()) // prompt.shape[0], 1)
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), fill)
            return peft_model.base_model(inputs_embeds=embeds, **kwargs)

        model.forward = forward_v1  # type: ignore[method-assign]
        return

    base = peft_model.base_model
    implementation = getattr(base.config, "_attn_implementation", "sdpa")
    if implementation not in ("sdpa", "eager"):
        raise UserError(
            f"training.packing with P-Tuning v2 builds its own attention mask, which {implementation} "
            "attention does not take; load the model with sdpa or eager attention, or set packing: false"
        )
    pending: dict[str, torch.Tensor] = {}

    def inject_mask(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if "mask" in pending and kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = pending["mask"]
            return args, kwargs
        return None

    base.register_forward_pre_hook(inject_mask, with_kwargs=True)

    def forward_v2(*args: Any, **kwargs: Any) -> Any:
        position_ids = kwargs.get("position_ids")
        if position_ids is None or kwargs.get("attention_mask") is not None:
            return original(*args, **kwargs)
        dtype = None if implementation == "sdpa" else next(base.parameters()).dtype
        pending["mask"] = prefix_packed_mask(position_ids, method.pre_seq_len, dtype)
        try:
            return original(*args, **kwargs)
        finally:
            pending.clear()

    model.forward = forward_v2  # type: ignore[method-assign]

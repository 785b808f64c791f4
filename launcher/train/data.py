"""Training data: load records (launcher.data.formats), render them with the run's ChatFormat
(launcher.data.templates), tokenize with the history-truncation rule and the label mask, pad per batch, and
order batches deterministically across ranks.

Truncation rule (the README states the same): when the rendered source is longer than
``max_source_length``, whole history turns are dropped, OLDEST first; the current query is cut only when
it alone does not fit. Then, by default (``data.query_truncation: keep_start``), its START is kept and
its end cut, as ChatGLM's own scripts keep the start of the prompt: an alpaca-style record keeps its
instruction. ``keep_end`` keeps the end instead. The query is cut as text and rendered again, so the
template's generation prompt (``答：``, ``<|im_start|>assistant``) always stays. Either case marks the
example ``truncated``; a cut query also marks it ``query_cut``. A system message is never dropped.

Labels: only the assistant's tokens are learned, i.e. the answer and its end-of-turn token. With a chat
template they are found by rendering the prompt (``add_generation_prompt``) and the conversation with
the answer, and taking what the answer adds, up to the first special token (``<|im_end|>``,
``<|eot_id|>``...); a template that writes no end-of-turn token gets eos. ``train_on: all`` also labels
every earlier assistant turn, located the same way; if the template renders an earlier turn differently
once later turns follow (e.g. it drops past reasoning), each assistant turn becomes its own sequence.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.data.formats import CONVERSATION_FORMATS, FORMATS, Example, ExampleReader
from launcher.data.templates import ChatFormat, chat_format, conversation, has_tools
from launcher.errors import UserError

if TYPE_CHECKING:
    import torch

    from launcher.rundir.run_config import RunConfig
    from launcher.spec.schema import DataSpec, ModelSpec

__all__ = ["FORMATS", "IGNORE_INDEX", "Example"]
IGNORE_INDEX = -100
TRAIN_ON: tuple[str, ...] = ("all", "last")
PROBLEMS_SHOWN = 10


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    """``IGNORE_INDEX`` except on the assistant's tokens (the response and its end-of-turn token)."""
    truncated: bool
    """True when history turns were dropped or the query was cut to fit ``max_source_length``."""
    source_len: int = 0
    query_cut: bool = False
    """True when the current query itself was cut (it alone did not fit)."""

    def __len__(self) -> int:
        return len(self.input_ids)


# --- loading ------------------------------------------------------------------------------------


def problems_message(path: Path, problems: Sequence[str], total: int | None = None) -> str:
    """Every problem of a file on its own line (the first ``PROBLEMS_SHOWN``, then how many more)."""
    total = len(problems) if total is None else total
    shown = list(problems[:PROBLEMS_SHOWN])
    more = f"\n  ... and {total - len(shown)} more" if total > len(shown) else ""
    noun = "record" if total == 1 else "records"
    return f"{path}: {total} {noun} with problems:\n  " + "\n  ".join(shown) + more


def load_data(
    path: Path, fmt: str = "auto", columns: dict[str, str] | None = None
) -> tuple[list[Example], str]:
    """(examples, the file's format) of a data file (see launcher.data.formats; ``columns`` is
    data.columns). Every malformed record is reported at once as a UserError with file:line and the key."""
    reader = ExampleReader(Path(path), fmt, columns)
    examples: list[Example] = []
    problems: list[str] = []
    for _, item in reader:
        if isinstance(item, str):
            problems.append(item)
        else:
            examples.append(item)
    if problems:
        raise UserError(problems_message(Path(path), problems))
    if not examples:
        raise UserError(f"{path}: no records (empty data file)")
    return examples, reader.format


def load_examples(path: Path, fmt: str = "auto") -> list[Example]:
    return load_data(path, fmt)[0]


def train_on_for(train_on: str | None, fmt: str) -> str:
    """Which assistant turns are learned: the setting, else ``all`` for conversations (messages,
    sharegpt; as LLaMA-Factory, TRL and OpenAI do) and ``last`` for chatglm/alpaca, whose history is
    context (ChatGLM's own fine-tuning code learns only the response)."""
    if train_on is not None:
        return train_on
    return "all" if fmt in CONVERSATION_FORMATS else "last"


def resolve_data_files(data: DataSpec) -> tuple[Path, Path | None]:
    """(train, eval) files: the built-in set (generated once into the cache) or the spec's files; eval
    is None with ``data.eval_split`` (held out of the training file)."""
    if data.builtin is not None:
        from launcher.builtins.demo_data import ensure_builtin_data

        train, evaluation = ensure_builtin_data(data.builtin)
        return train, None if data.eval_split is not None else evaluation
    if data.train_file is None or (data.eval_file is None and data.eval_split is None):
        raise UserError("data: set builtin (dialogue, spo), or train_file with eval_file or eval_split")
    from launcher.data.records import data_file_problem

    if data.eval_file is None:
        train_only = Path(data.train_file)
        problem = data_file_problem(train_only)
        if problem is not None:
            raise UserError(f"data.train_file: {problem} (paths are relative to the spec file)")
        return train_only, None
    files = (Path(data.train_file), Path(data.eval_file))
    for key, path in zip(("data.train_file", "data.eval_file"), files, strict=True):
        problem = data_file_problem(path)
        if problem is not None:
            raise UserError(f"{key}: {problem} (paths are relative to the spec file)")
    return files


def with_resolved_template(cfg: RunConfig, tokenizer: Any) -> tuple[RunConfig, str]:
    """(the run's config with ``template: auto`` replaced by what it means for this model and tokenizer,
    ``template_used`` as result.json and the plan record it). Without a chat template, ``auto`` is
    ChatGLM's layout only for a ChatGLM/GLM model, else ``plain`` (launcher.data.templates)."""
    from launcher.data.templates import model_type_of, resolve_template, template_used

    model_type = model_type_of(resolve_model_dir(cfg.model))
    resolved = resolve_template(cfg.template, tokenizer, model_type)
    used = template_used(cfg.template, resolved)
    return (cfg if resolved == cfg.template else cfg.model_copy(update={"template": resolved})), used


def resolve_model_dir(model: ModelSpec) -> Path:
    """The model directory: the built-in tiny model (built once, cached) or the spec's local HF dir."""
    if model.builtin is not None:
        from launcher.builtins.tiny import ensure_tiny_model

        return ensure_tiny_model()
    if model.path is None:
        raise UserError("model: set either builtin: tiny-glm or path: <local Hugging Face model dir>")
    path = Path(model.path)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json (not a Hugging Face model dir)"
        raise UserError(f"model.path: {path} {what}")
    return path


# --- encoding -----------------------------------------------------------------------------------


def _format(template: str | ChatFormat, tokenizer: Any) -> ChatFormat:
    return template if isinstance(template, ChatFormat) else chat_format(template, tokenizer)


@dataclass
class _Source:
    ids: list[int]
    history: list[tuple[str, str]]
    """The turns kept (the newest ones)."""
    query: str
    """The query as rendered (cut when it alone did not fit)."""
    truncated: bool
    rendered: bool = True
    """False when even the cut query did not fit and the ids are the rendering's tail."""
    query_cut: bool = False


QUERY_TRUNCATION: tuple[str, ...] = ("keep_start", "keep_end")


def _cut_query(query: str, keep: int, query_truncation: str) -> str:
    """The query with ``keep`` of its characters: its start (``keep_start``) or its end."""
    return query[:keep] if query_truncation == "keep_start" else query[len(query) - keep :]


def _encode_source(
    ex: Example, fmt: ChatFormat, budget: float, query_truncation: str = "keep_start"
) -> _Source:
    history = list(ex.history)

    def render(turns: list[tuple[str, str]], query: str) -> list[int]:
        return fmt.ids(conversation(ex.system, turns, query), add_generation_prompt=True)

    ids = render(history, ex.query)
    if len(ids) <= budget:
        return _Source(ids, history, ex.query, False)
    if len(render([], ex.query)) <= budget:
        # Dropping more turns never makes the source longer: binary search for the fewest to drop.
        lo, hi = 1, len(history)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(render(history[mid:], ex.query)) <= budget:
                hi = mid
            else:
                lo = mid + 1
        return _Source(render(history[lo:], ex.query), history[lo:], ex.query, True)
    # Even the query alone is too long: keep the most characters that fit (binary search), from its
    # start or its end (query_truncation).
    if query_truncation not in QUERY_TRUNCATION:
        raise UserError(
            f"unknown data.query_truncation {query_truncation!r}: use one of {', '.join(QUERY_TRUNCATION)}"
        )
    lo, hi = 0, len(ex.query) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(render([], _cut_query(ex.query, mid, query_truncation))) <= budget:
            lo = mid
        else:
            hi = mid - 1
    query = _cut_query(ex.query, lo, query_truncation)
    ids = render([], query)
    if len(ids) <= budget:
        return _Source(ids, [], query, True, query_cut=True)
    # the template itself does not fit: keep the end, where the answer starts
    return _Source(ids[len(ids) - int(budget) :], [], query, True, rendered=False, query_cut=True)


def _answer(ex: Example, fmt: ChatFormat, source: _Source) -> tuple[list[int], int]:
    """(answer ids, end-of-turn id) following the source's prompt."""
    if not fmt.uses_chat_template:
        return fmt.continuation_ids(ex.response), fmt.eos_id
    prompt = conversation(ex.system, source.history, source.query)
    full = [*prompt, {"role": "assistant", "content": ex.response}]
    prompt_ids = source.ids if source.rendered else fmt.ids(prompt, add_generation_prompt=True)
    full_ids = fmt.ids(full, add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        tail = full_ids[len(prompt_ids) :]
    else:  # the answer's first token merged with the prompt's last: tokenize what the answer adds alone
        prompt_text = fmt.render(prompt, add_generation_prompt=True)
        full_text = fmt.render(full, add_generation_prompt=False)
        if not full_text.startswith(prompt_text):
            raise UserError(
                f"example {ex.id}: the chat template renders the conversation with its answer differently "
                "from the prompt it renders for generation, so the answer cannot be located; use a named "
                "template (template: chatglm, ...)"
            )
        tail = fmt.continuation_ids(full_text[len(prompt_text) :])
    answer, eot, _ = fmt.split_answer(tail)
    return answer, eot


def encode_prompt(
    ex: Example,
    tokenizer: Any,
    template: str | ChatFormat,
    max_source_length: int,
    query_truncation: str = "keep_start",
) -> list[int]:
    """Source token ids for generation (same rendering and truncation as training)."""
    fmt = _format(template, tokenizer)
    if ex.messages is not None:  # a tool conversation: everything before its last assistant turn
        ids = fmt.ids(ex.messages[:-1], add_generation_prompt=True, tools=ex.tools)
        return ids[-max_source_length:]
    return _encode_source(ex, fmt, max_source_length, query_truncation).ids


def _encode_tool_conversation(ex: Example, fmt: ChatFormat, limit: int, train_on: str) -> list[Encoded]:
    """A tool-calling conversation: its assistant turns (calls and answers; ``last``: those after the last
    user turn) learned, the tool results never. Too long for ``limit`` tokens: the oldest whole rounds
    (from one user turn to the next) are dropped, then the beginning is cut."""
    assert ex.messages is not None
    if fmt.tools_problem is not None and has_tools(ex.messages, ex.tools):
        raise UserError(f"example {ex.id}: {fmt.tools_problem}")
    head = list(ex.messages[:1]) if ex.messages[0]["role"] == "system" else []
    body = list(ex.messages[len(head) :])
    starts = [i for i, m in enumerate(body) if m["role"] == "user"]
    dropped = 0
    for dropped, start in enumerate(starts):  # noqa: B007 - how many rounds were dropped is used below
        kept = head + body[start:]
        last_user = max(i for i, m in enumerate(kept) if m["role"] == "user")
        learn = [
            i for i, m in enumerate(kept) if m["role"] == "assistant" and (train_on == "all" or i > last_user)
        ]
        sequences = fmt.assistant_sequences(kept, ex.tools, learn)
        if max(len(ids) for ids, _ in sequences) <= limit:
            break
    out = []
    for ids, spans in sequences:
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            labels[start:end] = ids[start:end]
        cut = max(0, len(ids) - limit)  # keep the end, where the learned turns are
        out.append(Encoded(ids[cut:], labels[cut:], dropped > 0 or cut > 0, max(0, spans[0][0] - cut)))
    return out


def _encode_last(
    ex: Example,
    fmt: ChatFormat,
    max_source_length: int,
    max_target_length: int,
    max_length: int | None,
    query_truncation: str = "keep_start",
) -> tuple[Encoded, _Source]:
    """The response learned after the (truncated) source; the source's budget is ``max_source_length``,
    less what ``max_length`` leaves after the target."""
    budget = max_source_length
    if max_length is None:
        source = _encode_source(ex, fmt, budget, query_truncation)
        answer, eot = _answer(ex, fmt, source)
    else:  # the target's length sets the source's budget: measure it on the whole conversation first
        whole = _encode_source(ex, fmt, math.inf)
        answer, eot = _answer(ex, fmt, whole)
        target_len = min(len(answer), max_target_length, max_length - 2) + 1  # >= 1 source token
        budget = max(1, min(budget, max_length - target_len))
        source = whole if len(whole.ids) <= budget else _encode_source(ex, fmt, budget, query_truncation)
        if source is not whole and fmt.uses_chat_template:  # the kept turns may render the answer anew
            answer, eot = _answer(ex, fmt, source)
        answer = answer[: max(0, max_length - len(source.ids) - 1)]
    target = [*answer[:max_target_length], eot]
    labels = [IGNORE_INDEX] * len(source.ids) + target
    encoded = Encoded(source.ids + target, labels, source.truncated, len(source.ids), source.query_cut)
    return encoded, source


def encode_for_training(
    ex: Example,
    tokenizer: Any,
    template: str | ChatFormat,
    max_source_length: int,
    max_target_length: int,
    *,
    max_length: int | None = None,
    query_truncation: str = "keep_start",
) -> Encoded:
    """Source (truncated by the history rule) + response (cut to ``max_target_length``) + its
    end-of-turn token; only the response and that token are labelled.

    ``max_length`` caps source + target: the source budget shrinks first, so more history is dropped
    rather than the response being cut.
    """
    fmt = _format(template, tokenizer)
    return _encode_last(ex, fmt, max_source_length, max_target_length, max_length, query_truncation)[0]


def _history_spans(ex: Example, fmt: ChatFormat, source: _Source) -> list[tuple[int, int]] | None:
    """[start, end) of every kept earlier assistant turn (its answer and end-of-turn token) inside the
    source ids; None when the template renders some earlier turn differently inside the whole
    conversation than as the last turn (the spans would not be what the model sees at generation)."""
    ids = source.ids
    spans = []
    for j, (question, reply) in enumerate(source.history):
        prompt = fmt.ids(conversation(ex.system, source.history[:j], question), add_generation_prompt=True)
        full = fmt.ids(
            conversation(ex.system, source.history[:j], question, reply), add_generation_prompt=False
        )
        start = len(prompt)
        if ids[:start] != prompt or full[:start] != prompt:
            return None
        answer, _, eot_written = fmt.split_answer(full[start:])
        if eot_written:
            end = start + len(answer) + 1
            if ids[start:end] != full[start:end]:
                return None
        else:  # no end-of-turn token of its own: the next turn's first special token ends it (GLM-4)
            end = len(full)
            if ids[:end] != full:
                return None
            if end < len(ids) and ids[end] in fmt.special_ids:
                end += 1
        spans.append((start, end))
    return spans


def encode_example(
    ex: Example,
    tokenizer: Any,
    template: str | ChatFormat,
    max_source_length: int,
    max_target_length: int,
    *,
    max_length: int | None = None,
    train_on: str = "last",
    query_truncation: str = "keep_start",
) -> list[Encoded]:
    """The training sequences of one example: ``last`` learns the response only (one sequence);
    ``all`` also learns every earlier assistant turn that survives truncation."""
    if train_on not in TRAIN_ON:
        raise UserError(f"unknown data.train_on {train_on!r}: use one of {', '.join(TRAIN_ON)}")
    fmt = _format(template, tokenizer)
    if ex.messages is not None:
        limit = max_length or max_source_length + max_target_length
        return _encode_tool_conversation(ex, fmt, limit, train_on)
    enc, source = _encode_last(ex, fmt, max_source_length, max_target_length, max_length, query_truncation)
    if train_on == "last" or not source.history:
        return [enc]
    spans = _history_spans(ex, fmt, source)
    if spans is None:  # each assistant turn in its own sequence, in the context it has at generation
        turns = source.history
        earlier = [
            _encode_last(
                Example(ex.id, turns[:j], q, a, system=ex.system),
                fmt,
                max_source_length,
                max_target_length,
                max_length,
                query_truncation,
            )[0]
            for j, (q, a) in enumerate(turns)
        ]
        return [*earlier, enc]
    for start, end in spans:
        enc.labels[start:end] = enc.input_ids[start:end]
    return [enc]


@dataclass
class DataSets:
    """A run's training and eval examples, as the spec's data section defines them."""

    train: list[Example]
    eval: list[Example]
    train_format: str
    eval_format: str
    overlapping: int
    """Eval examples whose prompt and response are also in the training set."""
    same_file: bool
    """The eval file is the training file (same path or content)."""


def load_datasets(data: DataSpec) -> DataSets:
    """Train and eval examples: the eval file's, or ``eval_split`` held out of the training file (by its
    content hash, the same for every run); then the first ``max_train_examples`` /
    ``max_eval_examples``. The same file for both is a UserError unless ``allow_eval_overlap``."""
    from launcher.data import eval_set

    train_path, eval_path = resolve_data_files(data)
    train, train_format = load_data(train_path, data.format, data.columns)
    if eval_path is None:
        assert data.eval_split is not None
        train, held_out = eval_set.split_eval(train, data.eval_split, eval_set.content_hash(train_path))
        eval_format, same = train_format, False
    else:
        held_out, eval_format = load_data(eval_path, data.format, data.columns)
        same = eval_set.same_file(train_path, eval_path)
        if same and not data.allow_eval_overlap:
            raise UserError(
                f"data.eval_file: {eval_path} is the training file {train_path}; {eval_set.SAME_FILE_FIX}"
            )
    train, held_out = train[: data.max_train_examples], held_out[: data.max_eval_examples]
    overlapping = eval_set.overlap_count(train, held_out)
    return DataSets(train, held_out, train_format, eval_format, overlapping, same)


def encode_examples(
    examples: Sequence[Example], fmt: str, cfg: RunConfig, tokenizer: Any, *, chat: ChatFormat | None = None
) -> list[Encoded]:
    """The training sequences of a run's examples (``fmt``: their file's format, for ``train_on``).
    ``chat``: the run's chat format when the caller has built it (once per run), else built here."""
    train_on = train_on_for(cfg.data.train_on, fmt)
    chat = chat or chat_format(cfg.template, tokenizer)
    t = cfg.training
    return [
        enc
        for ex in examples
        for enc in encode_example(
            ex,
            tokenizer,
            chat,
            t.max_source_length,
            t.max_target_length,
            max_length=t.max_length,
            train_on=train_on,
            query_truncation=cfg.data.query_truncation,
        )
    ]


def truncated_fraction(encoded: Sequence[Encoded]) -> float:
    """Share of examples whose source was cut (history dropped or query shortened)."""
    return sum(e.truncated for e in encoded) / len(encoded) if encoded else 0.0


def query_cut_fraction(encoded: Sequence[Encoded]) -> float:
    """Share of examples whose current query itself was cut (it alone exceeded the source budget)."""
    return sum(e.query_cut for e in encoded) / len(encoded) if encoded else 0.0


def collate(features: Sequence[Encoded | dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence IN THIS BATCH (never to max length): input_ids,
    attention_mask, labels (padding is ``IGNORE_INDEX`` in labels)."""
    import torch

    rows = [
        (f.input_ids, f.labels) if isinstance(f, Encoded) else (f["input_ids"], f["labels"]) for f in features
    ]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(labs)] = torch.tensor(labs, dtype=torch.long)
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# --- batch order --------------------------------------------------------------------------------


@dataclass
class BatchOrder:
    """Which examples each rank sees in which batch: deterministic per (seed, epoch), the same number
    of batches on every rank, so a resumed run can skip exactly the batches already consumed.

    Each step takes one global batch of ``batch_size * world_size`` examples; rank r gets its r-th
    slice. Without ``drop_last`` the last global batch is filled by wrapping around to the start of
    the epoch's permutation (as torch's DistributedSampler pads). With ``group_by_length``, indices are
    sorted by length (longest first) inside mega-batches of ``MEGA_BATCHES`` global batches, so a batch
    holds similar lengths and dynamic padding wastes little; the batch order is then shuffled.
    """

    lengths: Sequence[int]
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 42
    group_by_length: bool = False
    drop_last: bool = False
    shuffle: bool = True
    MEGA_BATCHES: int = field(default=50, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"invalid batch_size/rank/world_size: {self.batch_size}/{self.rank}/{self.world_size}"
            )
        if not self.lengths:
            raise UserError("no training examples to batch")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def num_batches(self) -> int:
        """Batches per rank per epoch (the same on every rank)."""
        n = len(self.lengths)
        count = n // self.global_batch if self.drop_last else math.ceil(n / self.global_batch)
        if count == 0:
            raise UserError(
                f"{n} examples are fewer than one global batch ({self.global_batch}) with drop_last"
            )
        return count

    def batches(self, epoch: int) -> list[list[int]]:
        n, total = len(self.lengths), self.num_batches * self.global_batch
        order = list(range(n))
        rng = random.Random(f"batch-order-{self.seed}-{epoch}")
        if self.shuffle:
            rng.shuffle(order)
        while len(order) < total:  # wrap around so every rank gets full batches
            order += order[: total - len(order)]
        order = order[:total]
        if self.group_by_length:
            mega = self.global_batch * self.MEGA_BATCHES
            order = [
                i
                for start in range(0, total, mega)
                for i in sorted(order[start : start + mega], key=lambda k: -self.lengths[k])
            ]
        global_batches = [order[s : s + self.global_batch] for s in range(0, total, self.global_batch)]
        if self.group_by_length and self.shuffle:
            rng.shuffle(global_batches)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [gb[lo:hi] for gb in global_batches]

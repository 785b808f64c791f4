"""The original ChatGLM tokenizers as a ``tokenizer.json`` that ``AutoTokenizer`` loads without remote code.

The original keeps a sentencepiece model (ChatGLM2/3) or a tiktoken-style BPE file (GLM-4) and numbers
its special tokens itself, right after the base vocabulary; ``tokenizer(text)`` prepends ``[gMASK]`` and
the start-of-piece token. The conversion keeps every base piece at its id (sentencepiece through
transformers' own converter, which follows the model's normalizer settings and treats every chunk
between special tokens as the original treats a separately encoded string), adds the special tokens
at the original ids, the prefix as the post-processor, the stop tokens and a chat template.

A special token whose name is also an ordinary piece of the base vocabulary (a sentencepiece piece
``sop``, say) cannot keep that name: the tokenizer would give it the piece's id. It is then written in
angle brackets (``<sop>``), and the conversion says so; its id is the original's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.convert.families import Family
from launcher.errors import UserError

TOKENIZER_MODEL = "tokenizer.model"
_SINGLE_WORD = ("sop", "eop")
"""Plain-word names: matched only as a whole word, so text like "sophisticated" keeps its pieces."""


@dataclass
class ConvertedTokenizer:
    tokenizer: Any
    """A ``PreTrainedTokenizerFast``, ready for ``save_pretrained``."""
    ids: dict[str, int]
    """The tokens the family names (special tokens, eos, pad), by original name -> id."""
    size: int
    """Base vocabulary plus the special tokens: the rows of the embedding the tokenizer can reach."""
    notes: list[str] = field(default_factory=list)


def is_sentencepiece(path: Path) -> bool:
    """A sentencepiece model is a protobuf; the tiktoken format is text lines ``<base64> <rank>``."""
    with open(path, "rb") as handle:
        head = handle.read(256)
    try:
        first = head.decode("ascii").split("\n", 1)[0].split()
    except UnicodeDecodeError:
        return True
    return not (len(first) == 2 and first[1].isdigit())


def read_sentencepiece(path: Path) -> Any:
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError, or a file that is not one at all
        raise UserError(f"{path}: not a sentencepiece model ({exc})") from None
    if not proto.pieces:
        raise UserError(f"{path}: not a sentencepiece model (no pieces)")
    return proto


def special_names(family: Family, ordinary: set[str], path: Path) -> dict[str, str]:
    """Original name -> the name it gets here (angle brackets when an ordinary piece already has it)."""
    names = {}
    for name in family.special_tokens:
        new = name if name not in ordinary else f"<{name}>"
        if new in ordinary:
            raise UserError(f"{path}: special token {name!r} and {new!r} are both ordinary pieces")
        names[name] = new
    return names


def finish(
    core: Any,
    family: Family,
    *,
    base_vocab_size: int,
    names: dict[str, str],
    plain_ids: dict[str, int],
    model_max_length: int,
    path: Path,
) -> ConvertedTokenizer:
    """Add the special tokens at the original ids, the prefix and the chat template to a converted core.

    ``plain_ids``: tokens of the base vocabulary the family uses (sentencepiece's ``</s>``, ``<unk>``).
    """
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    core.add_special_tokens(
        [AddedToken(n, special=True, normalized=False, single_word=n in _SINGLE_WORD) for n in names.values()]
    )
    ids = dict(plain_ids)
    for i, (original, name) in enumerate(names.items()):
        got = core.token_to_id(name)
        if got != base_vocab_size + i:  # the whole point: the model's embedding rows are numbered this way
            raise UserError(f"{path}: special token {original} got id {got}, not {base_vocab_size + i}")
        ids[original] = got
    gmask, sop = (names.get(t, t) for t in family.prefix)
    eos = names.get(family.eos, family.eos)
    core.post_processor = processors.TemplateProcessing(
        single=f"{gmask} {sop} $A",
        pair=f"{gmask} {sop} $A $B {eos}",  # the original's build_inputs_with_special_tokens
        special_tokens=[(gmask, ids[family.prefix[0]]), (sop, ids[family.prefix[1]]), (eos, ids[family.eos])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=eos,
        pad_token=names.get(family.pad, family.pad),
        unk_token=family.unk,
        padding_side="left",  # the original pads on the left (generation continues at the right end)
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        chat_template=family.template(gmask + sop),
    )
    return ConvertedTokenizer(tokenizer, ids, base_vocab_size + len(names))


def convert_sentencepiece(path: Path, family: Family, model_max_length: int) -> ConvertedTokenizer:
    """ChatGLM2/3: the sentencepiece model in ``tokenizer.model``."""
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = read_sentencepiece(path)
    trainer = proto.trainer_spec
    if trainer.model_type not in (1, 2):  # UNIGRAM, BPE
        raise UserError(f"{path}: sentencepiece model type {trainer.model_type} is not BPE or unigram")
    if not trainer.split_by_whitespace or trainer.treat_whitespace_as_suffix:
        # The chat template joins a role's line break and the content with one space, which equals
        # encoding them apart only when no piece spans a word boundary.
        raise UserError(
            f"{path}: pieces may span words (split_by_whitespace off); its chat format cannot be reproduced"
        )
    pieces = [p.piece for p in proto.pieces]
    if trainer.model_type == 2:
        vocab: Any = {piece: i for i, piece in enumerate(pieces)}
    else:
        vocab = [(p.piece, p.score) for p in proto.pieces]
    core = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if core is None:
        raise UserError(f"{path}: transformers could not convert this sentencepiece model")
    eos_id, unk_id = trainer.eos_id, trainer.unk_id
    if not 0 <= eos_id < len(pieces) or not 0 <= unk_id < len(pieces):
        raise UserError(f"{path}: the model defines no end-of-sequence or unknown piece")
    plain = {pieces[eos_id]: eos_id, pieces[unk_id]: unk_id}
    if family.eos not in plain or family.pad not in plain:
        raise UserError(
            f"{path}: expected {family.eos!r} and {family.pad!r} as the model's end-of-sequence and unknown "
            f"pieces, found {pieces[eos_id]!r} and {pieces[unk_id]!r}"
        )
    names = special_names(family, set(pieces), path)
    converted = finish(
        core,
        family,
        base_vocab_size=len(pieces),
        names=names,
        plain_ids=plain,
        model_max_length=model_max_length,
        path=path,
    )
    converted.notes += [
        f"special token {original} (id {converted.ids[original]}) is named {name}: {original!r} is an "
        "ordinary piece of the sentencepiece model"
        for original, name in names.items()
        if original != name
    ]
    return converted

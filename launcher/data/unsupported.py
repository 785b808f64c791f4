"""Records that supervised fine-tuning cannot train as their authors meant, refused before anything is
queued instead of trained wrongly:

- KTO labels (LLaMA-Factory's ``kto_tag``, TRL's unpaired preference: ``label: false``): a ``false``
  answer would be learned as a good one;
- preference pairs (``chosen`` / ``rejected``, DPO/ORPO/RM data): the rejected answer would be dropped
  or learned;
- images, videos and audio (LLaMA-Factory's ``images``/``videos``/``audios``, OpenAI's non-text parts):
  the models here read text only, so the ``<image>`` placeholders would be learned as text.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

MEDIA_KEYS: dict[str, str] = {
    "images": "image",
    "image": "image",
    "videos": "video",
    "video": "video",
    "audios": "audio",
    "audio": "audio",
}
PREFERENCE_KEYS: tuple[str, ...] = ("chosen", "rejected")
KTO_KEYS: tuple[str, ...] = ("label", "kto_tag")


def unsupported_key(record: Mapping[str, Any], used: Collection[str] = ()) -> tuple[str, str] | None:
    """(key, why it cannot be trained) for the first key of ``record`` that asks for something other
    than supervised text fine-tuning; ``used`` are keys ``data.columns`` maps to a field (those are
    data, whatever their name)."""
    for key in KTO_KEYS:
        if key not in used and isinstance(record.get(key), bool):
            return key, (
                f"{str(record[key]).lower()}: a KTO label (desirable or undesirable answer); supervised "
                "fine-tuning would learn every answer as a good one, including those labelled false: drop "
                "the records labelled false and this key, or train them with a KTO trainer"
            )
    for key in PREFERENCE_KEYS if "chosen" not in used else ():
        if key in record:
            return key, (
                "a preference pair (chosen/rejected: DPO, ORPO or reward-model data); supervised "
                "fine-tuning cannot learn from a rejected answer: to learn the chosen answers only, map "
                "them (data.columns: {response: chosen}, format chatglm) or drop the key"
            )
    for key, kind in MEDIA_KEYS.items():
        if key not in used and record.get(key):
            return key, (
                f"{kind} inputs cannot be trained here (the models read text only; the <{kind}> "
                f"placeholders would be learned as text): drop these records or the {key!r} key"
            )
    return None

"""``samples.jsonl``'s references: the one reading of them for the rank's scoring and the collector's
paired tests (an eval record may carry several references)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def sample_references(sample: Mapping[str, Any]) -> list[str]:
    """Every reference of a sample: ``references`` (an eval record with several), else ``reference``."""
    refs = sample.get("references")
    return [str(r) for r in refs] if isinstance(refs, list) and refs else [str(sample["reference"])]


def reference_streams(per_sample: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's multi-reference layout: stream k holds every sample's k-th reference (None where a
    sample has fewer, which sacrebleu skips)."""
    width = max(len(refs) for refs in per_sample)
    return [[refs[k] if k < len(refs) else None for refs in per_sample] for k in range(width)]

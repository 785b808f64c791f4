"""Runs repeated with several seeds: mean and standard deviation per configuration."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from launcher.collect.rows import RunRow

# The numbers worth averaging over seeds.
GROUP_METRICS: tuple[str, ...] = (
    "train_loss_final",
    "eval_loss",
    "bleu",
    "chrf",
    "bleu_delta",
    "peak_mem_gib",
    "tokens_per_s",
    "train_time_s",
)


@dataclass
class SeedGroup:
    key: str
    """Method + swept values without the seed."""
    runs: list[str]
    seeds: list[Any]
    mean: dict[str, float | None] = field(default_factory=dict)
    std: dict[str, float | None] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)
    """How many runs had a value for each metric (unfinished runs have none)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "runs": self.runs,
            "seeds": self.seeds,
            "mean": self.mean,
            "std": self.std,
            "n": self.n,
        }


def seed_groups(rows: list[RunRow]) -> list[SeedGroup]:
    """Configurations run more than once (same method and swept values, other seed), in first-row order."""
    by_key: dict[str, list[RunRow]] = {}
    for row in rows:
        if row.group_key:
            by_key.setdefault(row.group_key, []).append(row)
    groups: list[SeedGroup] = []
    for key, members in by_key.items():
        seeds = [r.get("seed") for r in members]
        # Seed repeats have distinct, known seeds; same key and same seed means two method entries
        # that the swept values do not tell apart (e.g. two LoRA ranks), not repeats.
        if len(members) < 2 or None in seeds or len(set(seeds)) != len(seeds):
            continue
        group = SeedGroup(key=key, runs=[r.name for r in members], seeds=seeds)
        for metric in GROUP_METRICS:
            values = [float(v) for r in members if isinstance(v := r.get(metric), int | float)]
            group.n[metric] = len(values)
            group.mean[metric] = statistics.fmean(values) if values else None
            # Sample standard deviation (n-1): the seeds are a sample of possible seeds.
            group.std[metric] = statistics.stdev(values) if len(values) >= 2 else None
        groups.append(group)
    return groups

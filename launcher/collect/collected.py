"""What collecting an experiment produces: its rows, baseline, seed groups, reviews and warnings. The
table, the summary files and the plots read this; launcher.collect.collection builds it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from launcher.collect.groups import SeedGroup
from launcher.collect.review import ReviewCounts
from launcher.collect.rows import RunRow
from launcher.rundir.paths import ExperimentPaths

DEFAULT_TOKENIZE = "zh"


@dataclass
class Collection:
    """Everything the table, the files and the plots show for one experiment."""

    exp: ExperimentPaths
    rows: list[RunRow]
    baseline: str | None
    groups: list[SeedGroup] = field(default_factory=list)
    reviews: list[ReviewCounts] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """Experiment-level problems; each row has its own ``warnings`` too."""
    gpu_mem_gib: float | None = None
    tokenize: str = DEFAULT_TOKENIZE
    differing_keys: list[str] = field(default_factory=list)
    """Config keys (dotted, from run.yaml) whose values differ between the runs."""
    gpu_hour_price: float | None = None
    """cluster.gpu_hour_price of the (first) spec: the cost column's price per GPU hour."""
    n_comparisons: int = 0
    """Runs compared with the baseline: above 1, the p-values that decide * are Holm-adjusted."""

    def row(self, name: str) -> RunRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def to_json(self) -> list[dict[str, Any]]:
        """summary.json: one object per run dir."""
        return [row.to_json() for row in self.rows]

    def all_warnings(self) -> list[str]:
        return self.warnings + [f"{row.name}: {w}" for row in self.rows for w in row.warnings]

"""The notes under the comparison table: what the significance test can tell on this eval set, and
where runs differ in more than their configurations were meant to (what they trained on and saw).

Each note is one sentence a reader can act on. Keys written by older trainers may be missing: an
aspect is compared only among the runs that record it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from launcher.collect.rows import RunRow

if TYPE_CHECKING:
    from launcher.collect.collected import Collection

MIN_EVAL_EXAMPLES = 100
"""Below this the paired bootstrap's resamples of corpus BLEU are too few distinct sets to trust (an
8-example set gave a zero-width CI and p = 0.001); Koehn (2004) validated it on 300 and more."""
_NAMES_SHOWN = 4
_COUNT_TOLERANCE = 0.01  # relative: counts of tokens and examples seen
_FRACTION_TOLERANCE = 0.005  # absolute: truncation shares (half a percentage point)
_NO_SPREAD = 1e-6  # BLEU points: float noise of equal resampled differences


def degenerate_bootstrap(row: RunRow) -> bool:
    """Every resample (or all but the tails beyond the 95% CI) gave the same nonzero ΔBLEU, as in
    ``+1.22* [+1.22, +1.22]`` on 8 examples: the test has nothing to judge by."""
    se, delta, ci = row.get("bleu_delta_se"), row.get("bleu_delta"), row.get("bleu_delta_ci")
    if delta is None or abs(delta) < _NO_SPREAD:
        return False
    flat_ci = isinstance(ci, list | tuple) and len(ci) == 2 and None not in ci and ci[1] - ci[0] < _NO_SPREAD
    return (se is not None and se < _NO_SPREAD) or flat_ci


def significance_notes(collection: Collection) -> list[str]:
    compared = [r for r in collection.rows if r.get("bleu_mde") is not None]
    if not compared:
        return []
    notes: list[str] = []
    n = max(int(r.get("n_samples") or 0) for r in compared)
    mdes = sorted(float(r.get("bleu_mde")) for r in compared)
    level = "α = 0.05" + (f" / {len(compared)} (Holm over {len(compared)} runs)" if len(compared) > 1 else "")
    span = f"{mdes[0]:.2f}" if mdes[-1] - mdes[0] < 0.005 else f"{mdes[0]:.2f}-{mdes[-1]:.2f}"
    notes.append(
        f"Smallest ΔBLEU this eval set can detect: about {span} BLEU ({n} examples; 80% power at {level}: "
        "(z(1 - α/2) + z(0.8)) x the standard error of the paired bootstrap's ΔBLEU). Smaller true "
        "differences usually get no *."
    )
    if n < MIN_EVAL_EXAMPLES:
        notes.append(
            f"The eval set has only {n} examples, fewer than {MIN_EVAL_EXAMPLES}: too small to tell runs "
            "apart unless they differ by far more than the smallest detectable ΔBLEU; the bootstrap's "
            "p-values and CI are rough at this size. Generate on more examples: eval.num_samples and a "
            "larger eval file."
        )
    flat = [r.name for r in compared if degenerate_bootstrap(r)]
    if flat:
        notes.append(
            f"{_names(flat)}: the bootstrap resamples give one ΔBLEU (zero spread or a zero-width CI), "
            "so the test cannot judge it: no * however small p is."
        )
    return notes


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def _examples_seen(row: RunRow) -> float | None:
    examples, epochs = row.get("train_examples"), row.get("epochs")
    if isinstance(examples, int | float) and isinstance(epochs, int | float):
        return float(examples) * float(epochs)
    return None


def _tokens_seen(row: RunRow) -> float | None:
    tokens = row.get("train_tokens")
    if isinstance(tokens, int | float):
        return float(tokens)
    rate, seconds = row.get("tokens_per_s"), row.get("train_time_s")
    if isinstance(rate, int | float) and isinstance(seconds, int | float):
        return float(rate) * float(seconds)
    return None


def _value(key: str) -> Callable[[RunRow], Any]:
    return lambda row: row.get(key)


_AMOUNT = (
    "training.num_epochs",
    "training.max_steps",
    "training.per_device_batch_size",
    "training.gradient_accumulation_steps",
    "training.global_batch_size",
    "resources.world_size",
    "data.",
)
_LENGTHS = ("training.max_source_length", "training.max_target_length", "training.max_length")

# (what, how to read it from a row, how to show a value, kind of comparison, config keys that explain it)
_ASPECTS: tuple[tuple[str, Callable[[RunRow], Any], Callable[[Any], str], str, tuple[str, ...]], ...] = (
    ("templates", _value("template_used"), str, "exact", ("template", "model.")),
    ("eval sets", _value("eval_set_hash"), lambda v: str(v)[:10], "exact", ("data.",)),
    ("training examples seen", _examples_seen, lambda v: f"{v:,.0f}", "count", _AMOUNT),
    ("training tokens seen", _tokens_seen, lambda v: f"{v:,.0f}", "count", (*_AMOUNT, *_LENGTHS, "template")),
    (
        "shares of truncated examples",
        _value("truncated_frac"),
        lambda v: f"{100 * v:.1f}%",
        "fraction",
        (*_LENGTHS, "data.", "template", "model."),
    ),
    (
        "shares of examples whose current query is cut",
        _value("query_cut_frac"),
        lambda v: f"{100 * v:.1f}%",
        "fraction",
        (*_LENGTHS, "data.", "template", "model."),
    ),
)


def _differs(values: list[Any], kind: str) -> bool:
    if kind == "exact":
        return len({repr(v) for v in values}) > 1
    low, high = min(values), max(values)
    if kind == "fraction":
        return bool(high - low > _FRACTION_TOLERANCE)
    return bool(high > low * (1 + _COUNT_TOLERANCE))


def _differing_keys(collection: Collection) -> list[str]:
    """The config keys that differ between the runs, and the GPU count (a column, not a hyperparameter)."""
    worlds = {r.get("world_size") for r in collection.rows if r.get("world_size") is not None}
    return collection.differing_keys + (["resources.world_size"] if len(worlds) > 1 else [])


def difference_notes(collection: Collection) -> list[str]:
    """Runs that differ in what they trained or were evaluated on; says whether a config key that
    differs between them explains it, or whether it is a confound nobody chose."""
    finished = [r for r in collection.rows if r.get("state") == "COMPLETED"]
    notes: list[str] = []
    for what, read, show, kind, causes in _ASPECTS:
        present = [(row, read(row)) for row in finished]
        present = [(row, v) for row, v in present if v is not None]
        if len(present) < 2 or not _differs([v for _, v in present], kind):
            continue
        by_shown: dict[str, list[str]] = {}
        for row, v in sorted(present, key=lambda item: repr(item[1]) if kind == "exact" else item[1]):
            by_shown.setdefault(show(v), []).append(row.name)
        groups = "; ".join(f"{shown} ({_names(names)})" for shown, names in by_shown.items())
        explained = [k for k in _differing_keys(collection) if k.startswith(causes)]
        why = (
            f"follows from what differs in the configs ({', '.join(explained[:3])})"
            if explained
            else "no config difference explains it: it confounds the comparison"
        )
        notes.append(f"Runs differ in {what}: {groups}; {why}.")
    return notes


def table_notes(collection: Collection) -> list[str]:
    return significance_notes(collection) + difference_notes(collection)

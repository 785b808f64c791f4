"""Is a BLEU difference real? sacrebleu's paired bootstrap and approximate randomization tests.

The tests themselves are sacrebleu's (``sacrebleu.significance.PairedTest``, the code behind
``sacrebleu REF -i BASE SYS --paired-bs``), so our p-values equal the CLI's on the same files. Two
things are added around it:

* the samples are checked first: both runs must cover the same example ids with the same
  references (a mismatch raises ``SamplesMismatch`` instead of producing a meaningless number);
* the 95% confidence interval of the *difference* (sacrebleu reports one per system): computed on
  exactly the resamples the bootstrap test draws (same generator, same seed), with the standard
  deviation of those resampled differences (``delta_se``);
* Holm's step-down adjustment when several runs are compared with one baseline (``holm``), and the
  smallest difference the eval set can detect (``min_detectable_delta``).

Tokenization of every system happens once (``_MemoBLEU``), which keeps 1,000 examples under 2 s.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
from sacrebleu.metrics import BLEU
from sacrebleu.significance import PairedTest, Result

from launcher.rundir.paths import iter_jsonl
from launcher.rundir.samples import reference_streams, sample_references

# sacrebleu's own default seed (SACREBLEU_SEED): the CLI and this module draw the same resamples.
DEFAULT_SEED = 12345
N_BOOTSTRAP = 1000  # sacrebleu's default for --paired-bs
# sacrebleu's --paired-ar default is 10,000 trials; 2,000 resolve p to 0.0005 (enough to decide at
# 0.05, standard error 0.005 there) and keep a 1,000-example comparison under 2 s.
N_APPROX_RANDOMIZATION = 2000


class SamplesMismatch(ValueError):
    """Two runs' samples.jsonl cannot be compared example by example."""


@dataclass(frozen=True)
class Samples:
    """The eval outputs of one run, keyed by example id (file order kept)."""

    ids: list[str]
    references: list[str]
    """The first reference of each example (what a reviewer is shown)."""
    predictions: list[str]
    skipped: list[str]
    reference_sets: list[tuple[str, ...]]
    """Every reference of each example: BLEU and its tests score against all of them."""

    def __len__(self) -> int:
        return len(self.ids)


def load_samples(path: Path) -> Samples:
    """Read samples.jsonl; torn lines and records without id/reference/prediction are skipped."""
    skipped: list[str] = []
    ids: list[str] = []
    refs: list[str] = []
    preds: list[str] = []
    ref_sets: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for number, record in enumerate(iter_jsonl(path, skipped), start=1):
        ex_id, ref, pred = record.get("id"), record.get("reference"), record.get("prediction")
        if ex_id is None or not isinstance(ref, str) or not isinstance(pred, str):
            skipped.append(f"record {number}: needs id, reference and prediction (strings)")
            continue
        key = str(ex_id)
        if key in seen:
            raise SamplesMismatch(f"{path}: example id {key!r} appears twice")
        seen.add(key)
        ids.append(key)
        refs.append(ref)
        preds.append(pred)
        ref_sets.append(tuple(sample_references(record)))
    return Samples(ids, refs, preds, skipped, ref_sets)


def align(baseline: Samples, system: Samples, system_name: str) -> list[str]:
    """The system's predictions in the baseline's example order; raises on any mismatch."""
    base_ids, sys_ids = set(baseline.ids), set(system.ids)
    if base_ids != sys_ids:
        missing, extra = sorted(base_ids - sys_ids), sorted(sys_ids - base_ids)
        parts = []
        if missing:
            parts.append(f"{len(missing)} baseline example(s) missing (e.g. {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} example(s) not in the baseline (e.g. {extra[0]!r})")
        raise SamplesMismatch(
            f"{system_name}: samples cover other examples than the baseline's: " + ", ".join(parts)
        )
    by_id = dict(zip(system.ids, zip(system.reference_sets, system.predictions, strict=True), strict=True))
    predictions: list[str] = []
    differing: list[str] = []
    for ex_id, ref in zip(baseline.ids, baseline.reference_sets, strict=True):
        sys_ref, pred = by_id[ex_id]
        if sys_ref != ref:
            differing.append(ex_id)
        predictions.append(pred)
    if differing:
        raise SamplesMismatch(
            f"{system_name}: {len(differing)} reference(s) differ from the baseline's for the same id "
            f"(e.g. {differing[0]!r}): the runs were evaluated on different data"
        )
    return predictions


@dataclass(frozen=True)
class PairedComparison:
    system: str
    n_examples: int
    baseline_bleu: float
    system_bleu: float
    delta: float
    """system - baseline, BLEU points."""
    delta_ci: tuple[float, float]
    """95% percentile interval of the difference over the paired bootstrap resamples."""
    delta_se: float
    """Standard deviation of the difference over the same resamples (its standard error)."""
    p_bootstrap: float
    p_approx_randomization: float
    system_ci: float
    """sacrebleu's half-width 95% CI of the system's own score."""
    signature: str


class _MemoBLEU(BLEU):
    """sacrebleu's BLEU, remembering each system's sufficient statistics.

    PairedTest extracts them again for every test; tokenizing is most of the cost.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._memo: dict[tuple[str, ...], Any] = {}

    def _extract_corpus_statistics(self, hypotheses: Sequence[str], references: Any) -> Any:
        if references is not None:  # only the cached references are memoised
            return super()._extract_corpus_statistics(hypotheses, references)
        key = tuple(hypotheses)
        if key not in self._memo:
            self._memo[key] = super()._extract_corpus_statistics(hypotheses, references)
        return self._memo[key]


@contextlib.contextmanager
def _sacrebleu_seed(seed: int) -> Iterator[None]:
    """PairedTest reads its seed from SACREBLEU_SEED; pin it so a user's setting cannot unfix it."""
    old = os.environ.get("SACREBLEU_SEED")
    os.environ["SACREBLEU_SEED"] = str(seed)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SACREBLEU_SEED", None)
        else:
            os.environ["SACREBLEU_SEED"] = old


def _delta_interval(
    metric: BLEU, base_stats: Any, sys_stats: Any, n_examples: int, n_bootstrap: int, seed: int
) -> tuple[float, float, float]:
    # The very index draw of sacrebleu's _paired_bs_test (default_rng(seed).choice, same shape).
    rng = np.random.default_rng(seed)
    idxs = rng.choice(n_examples, size=(n_bootstrap, n_examples), replace=True)
    base_np = np.array(base_stats, dtype="float32")
    sys_np = np.array(sys_stats, dtype="float32")
    deltas = np.array(
        [
            metric._compute_score_from_stats(s.sum(0)).score
            - metric._compute_score_from_stats(b.sum(0)).score
            for s, b in zip(sys_np[idxs], base_np[idxs], strict=True)
        ]
    )
    low, high = np.percentile(deltas, [2.5, 97.5])
    return float(low), float(high), float(deltas.std())


def _as_result(value: object) -> Result:
    if not isinstance(value, Result):
        raise TypeError(f"sacrebleu returned {value!r} where a Result was expected")
    return value


def compare_to_baseline(
    baseline: Sequence[str],
    systems: Mapping[str, Sequence[str]],
    references: Sequence[str | Sequence[str]],
    *,
    tokenize: str = "zh",
    n_bootstrap: int = N_BOOTSTRAP,
    n_approx_randomization: int = N_APPROX_RANDOMIZATION,
    seed: int = DEFAULT_SEED,
) -> dict[str, PairedComparison]:
    """Paired tests of every system against the baseline on the same references (sentence-aligned; an
    example's references are a string or a sequence of several, all scored as sacrebleu does).

    Deterministic: fixed seed (must be non-zero: sacrebleu treats 0 as "unseeded").
    """
    if seed == 0:
        raise ValueError("seed 0 means 'unseeded' to sacrebleu; use another value")
    if not systems:
        return {}
    n = len(references)
    if len(baseline) != n or any(len(h) != n for h in systems.values()):
        raise SamplesMismatch("every system needs one prediction per reference")
    if n == 0:
        raise SamplesMismatch("no examples to compare")
    per_example = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    metric = _MemoBLEU(tokenize=tokenize, references=reference_streams(per_example))
    named: list[tuple[str, Sequence[str]]] = [("__baseline__", list(baseline))]
    named += [(name, list(h)) for name, h in systems.items()]
    with _sacrebleu_seed(seed):
        bs_test = PairedTest(named, {"BLEU": metric}, references=None, test_type="bs", n_samples=n_bootstrap)
        signatures, bs_scores = bs_test()
        ar_test = PairedTest(
            named, {"BLEU": metric}, references=None, test_type="ar", n_samples=n_approx_randomization
        )
        _, ar_scores = ar_test()
    metric_name = next(k for k in bs_scores if k != "System")
    base_result = _as_result(bs_scores[metric_name][0])
    base_stats = metric._extract_corpus_statistics(list(baseline), None)
    out: dict[str, PairedComparison] = {}
    for index, (name, hyps) in enumerate(named[1:], start=1):
        bs, ar = _as_result(bs_scores[metric_name][index]), _as_result(ar_scores[metric_name][index])
        sys_stats = metric._extract_corpus_statistics(hyps, None)
        p_bs, p_ar = float(bs.p_value or 0.0), float(ar.p_value or 0.0)
        if bs.score == base_result.score:
            # sacrebleu counts resampled differences strictly greater than the observed one; when
            # the observed difference is 0 (e.g. identical outputs) none is, and it reports the
            # smallest p (1/(n+1)) - "significant" for a system compared with itself. No
            # difference is no evidence: p = 1.
            p_bs = p_ar = 1.0
        low, high, spread = _delta_interval(metric, base_stats, sys_stats, n, n_bootstrap, seed)
        out[name] = PairedComparison(
            system=name,
            n_examples=n,
            baseline_bleu=float(base_result.score),
            system_bleu=float(bs.score),
            delta=float(bs.score - base_result.score),
            delta_ci=(low, high),
            delta_se=spread,
            p_bootstrap=p_bs,
            p_approx_randomization=p_ar,
            system_ci=float(bs.ci or 0.0),
            signature=str(signatures[metric_name]),
        )
    return out


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment: the family-wise error stays at the level for any number of runs.

    Sorted ascending, the i-th smallest of m p-values becomes max over j <= i of min(1, (m - j + 1) p_j).
    An adjusted p below 0.05 is then a claim that holds for all comparisons together. (Ten lines; the
    libraries that have it, statsmodels, would bring scipy, pandas and patsy.)
    """
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    m = len(ordered)
    adjusted: dict[str, float] = {}
    running = 0.0
    for index, (name, p) in enumerate(ordered):
        running = max(running, min(1.0, (m - index) * p))
        adjusted[name] = running
    return adjusted


def min_detectable_delta(
    delta_se: float, n_comparisons: int = 1, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The smallest |ΔBLEU| a two-sided test at ``alpha`` finds with probability ``power``, given the
    paired bootstrap's standard error: (z(1 - alpha / 2m) + z(power)) x SE. With m runs compared, Holm's
    strictest step tests at alpha / m, so that is the level used (about 2.8 x SE for one run)."""
    z = NormalDist().inv_cdf
    return (z(1 - alpha / (2 * max(1, n_comparisons))) + z(power)) * delta_se

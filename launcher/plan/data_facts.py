"""What each run's model will see, known before anything is queued: the template actually used, the
eval set (its source, size and hash), its overlap with the training set, and, when the data and the
tokenizer are on this machine, the share of training examples truncated and the share whose current
query is cut (the same encoding the rank runs, launcher.train.data).

Results are remembered by the inputs' sizes and mtimes (``cache_dir()/preflight``), as the pre-flight's
are: planning the same experiment again costs a few ``stat`` calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.rundir.run_config import RunConfig
from launcher.spec.yaml_source import Problems

FACTS_VERSION = 1
"""Bump when what is computed changes: remembered facts of the old version no longer count."""


@dataclass
class DataFacts:
    template_used: str
    truncated_frac: float | None = None
    query_cut_frac: float | None = None
    train_examples: int | None = None
    """Training examples in the training set (after the eval split and max_train_examples)."""
    eval_examples: int | None = None
    eval_set: str | None = None
    """Where the eval set comes from: ``eval_file`` or ``eval_split`` with its size."""
    eval_set_hash: str | None = None
    eval_overlap: int | None = None
    """Eval examples whose prompt and response are in the training set."""


def _model_dir(run: RunConfig) -> Path | None:
    if run.model.path is not None:
        return Path(run.model.path)
    from launcher.builtins.cache import cache_dir
    from launcher.builtins.tiny import build_hash

    built = cache_dir() / f"tiny-glm-{build_hash()}"  # never built here: that takes a minute
    return built if (built / "config.json").is_file() else None


def _model_type(run: RunConfig, model_dir: Path | None) -> str | None:
    from launcher.data.templates import model_type_of

    return "glm" if run.model.builtin is not None else model_type_of(model_dir)


def _fingerprint(path: Path | None) -> list[Any]:
    if path is None or not path.exists():
        return []
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _memo_path(key: Any) -> Path:
    from launcher.builtins.cache import cache_dir

    digest = hashlib.sha256(json.dumps([FACTS_VERSION, key], default=str).encode()).hexdigest()
    return cache_dir() / "preflight" / f"facts-{digest[:24]}.json"


def _remembered(key: Any) -> DataFacts | None:
    try:
        return DataFacts(**json.loads(_memo_path(key).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _remember(key: Any, facts: DataFacts) -> None:
    from launcher.rundir.paths import write_json_atomic

    with contextlib.suppress(OSError):  # a read-only cache only costs the next plan the work again
        write_json_atomic(_memo_path(key), asdict(facts))


class _Tokenizers:
    """Each tokenizer directory loaded once per plan (None: not on this machine or not loadable: the
    pre-flight reports why)."""

    def __init__(self) -> None:
        self.loaded: dict[str, Any] = {}

    def get(self, directory: Path | None, trust: bool) -> Any:
        if directory is None or not directory.is_dir():
            return None
        key = str(directory)
        if key not in self.loaded:
            from transformers import AutoTokenizer

            try:
                self.loaded[key] = AutoTokenizer.from_pretrained(key, trust_remote_code=trust)
            except Exception:
                self.loaded[key] = None
        return self.loaded[key]


def _data_on_this_machine(run: RunConfig) -> bool:
    if run.data.builtin is not None:
        return True
    files = [run.data.train_file, run.data.eval_file if run.data.eval_split is None else None]
    return all(Path(f).exists() for f in files if f is not None)


def _eval_set_label(run: RunConfig, count: int) -> str:
    split = run.data.eval_split
    if split is None:
        return f"eval_file ({count})"
    return f"eval_split {split:g} of train ({count})" if isinstance(split, float) else f"eval_split ({count})"


def facts_for_run(run: RunConfig, tokenizer: Any, model_dir: Path | None) -> DataFacts:
    """Every fact of one run (``tokenizer`` None: only the template's name and the eval set)."""
    from launcher.data.eval_set import eval_set_hash
    from launcher.data.templates import resolve_template, template_used
    from launcher.train.data import encode_examples, load_datasets, query_cut_fraction, truncated_fraction

    if tokenizer is None:
        resolved = run.template if run.template != "auto" else None
        used = template_used(run.template, resolved) if resolved else "auto (resolved by the rank)"
        facts = DataFacts(used)
    else:
        resolved = resolve_template(run.template, tokenizer, _model_type(run, model_dir))
        facts = DataFacts(template_used(run.template, resolved))
    sets = load_datasets(run.data)
    facts.train_examples, facts.eval_examples = len(sets.train), len(sets.eval)
    facts.eval_set = _eval_set_label(run, len(sets.eval))
    facts.eval_set_hash = eval_set_hash(sets.eval)
    facts.eval_overlap = sets.overlapping
    if tokenizer is not None and resolved is not None:
        features = encode_examples(
            sets.train, sets.train_format, run.model_copy(update={"template": resolved}), tokenizer
        )
        facts.truncated_frac = truncated_fraction(features)
        facts.query_cut_frac = query_cut_fraction(features)
    return facts


def _memo_key(run: RunConfig, model_dir: Path | None, tokenizer_dir: Path | None) -> Any:
    t = run.training
    data = run.data.model_dump(mode="json")
    files = [run.data.train_file, run.data.eval_file]
    return [
        data,
        [_fingerprint(Path(f)) for f in files if f is not None],
        _fingerprint(tokenizer_dir),
        str(model_dir),
        run.model.builtin,
        run.template,
        [t.max_source_length, t.max_target_length, t.max_length],
    ]


def _key_of(message: str, problems: Problems) -> Sequence[str | int]:
    for key in ("eval_split", "eval_file", "train_file"):
        if message.startswith(f"data.{key}"):
            return problems.first_present(("data", key), ("data",))
    return problems.first_present(("data",))


def run_data_facts(runs: Sequence[RunConfig], problems: Problems) -> dict[str, DataFacts]:
    """Facts per run name for the runs whose data is on this machine; an eval set overlapping the
    training set is a warning with counts, a problem with the data (an eval_split that leaves no
    training example, the training file as eval file) an error."""
    tokenizers = _Tokenizers()
    out: dict[str, DataFacts] = {}
    by_key: dict[str, DataFacts | None] = {}
    for run in runs:
        if not _data_on_this_machine(run):
            continue
        model_dir = _model_dir(run)
        tokenizer_dir = Path(run.tokenizer.path) if run.tokenizer.path else model_dir
        key = _memo_key(run, model_dir, tokenizer_dir)
        text = json.dumps(key, default=str, sort_keys=True)
        if text not in by_key:
            facts = _remembered(key)
            if facts is None:
                try:
                    tokenizer = tokenizers.get(tokenizer_dir, run.model.trust_remote_code)
                    facts = facts_for_run(run, tokenizer, model_dir)
                except UserError as exc:
                    problems.error(_key_of(str(exc), problems), str(exc), prefer_value=True)
                    facts = None
                else:
                    _remember(key, facts)
            if facts is not None and facts.eval_overlap:
                share = facts.eval_overlap / max(1, facts.eval_examples or 0)
                problems.warn(
                    problems.first_present(("data", "eval_file"), ("data",)),
                    f"{facts.eval_overlap} of {facts.eval_examples} eval examples ({share:.0%}) are also in "
                    "the training set (same prompt and response): their eval loss and BLEU measure memory",
                )
            by_key[text] = facts
        if by_key[text] is not None:
            out[run.name] = by_key[text]  # type: ignore[assignment]
    return out

"""Run dirs -> a Collection (rows, baseline comparison, seed groups, human review) -> summary files."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from launcher.collect import plots
from launcher.collect.collected import DEFAULT_TOKENIZE, Collection
from launcher.collect.cost import apply_cost
from launcher.collect.groups import seed_groups
from launcher.collect.hyperparams import differing_hyperparameters
from launcher.collect.review import load_reviews
from launcher.collect.rows import SUMMARY_KEYS, RunRow, group_key, read_row, read_run_yaml
from launcher.collect.table import write_summaries
from launcher.errors import UserError
from launcher.rundir.paths import (
    ExperimentPaths,
    RunPaths,
    RunState,
    file_fingerprint,
    read_json,
    write_json_atomic,
)

DEFAULT_GPU_MEM_GIB = 80.0  # ClusterSpec's default
_CACHE_NAME = ".collect_cache.json"
_BLEU_MISMATCH = 0.01  # BLEU points; result.json and samples.jsonl must agree closer than this


def sort_rows(rows: list[RunRow], key: str) -> list[RunRow]:
    """Sort by a summary.json key (``-key`` for descending); runs without a value go last."""
    descending = key.startswith("-")
    name = key.lstrip("-+")
    if name not in SUMMARY_KEYS:
        close = difflib.get_close_matches(name, SUMMARY_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"--sort {key}: unknown key{hint}; valid keys: {', '.join(SUMMARY_KEYS)}")
    present = [r for r in rows if r.get(name) is not None]
    missing = [r for r in rows if r.get(name) is None]

    def sort_value(row: RunRow) -> Any:
        value = row.get(name)
        if isinstance(value, int | float | str):
            return (0, value) if not isinstance(value, str) else (1, value)
        return (2, json.dumps(value, sort_keys=True, default=str))

    return sorted(present, key=sort_value, reverse=descending) + missing


def _run_dirs(exp: ExperimentPaths) -> list[RunPaths]:
    # os.scandir gives the entry type without a stat per directory (10,000 runs in the budget).
    try:
        entries = [e for e in os.scandir(exp.runs_dir) if e.is_dir() and not e.name.startswith(".")]
    except FileNotFoundError:
        return []
    return [RunPaths(Path(e.path)) for e in sorted(entries, key=lambda e: e.name)]


def _read_spec(exp: ExperimentPaths, warnings: list[str]) -> dict[str, Any]:
    """spec.yaml as a plain mapping (only baseline, eval and cluster are used)."""
    try:
        data = yaml.safe_load(exp.spec_yaml.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as exc:
        warnings.append(f"spec.yaml unreadable ({type(exc).__name__}): baseline and GPU size from defaults")
        return {}
    return data if isinstance(data, dict) else {}


def _read_plan(exp: ExperimentPaths, warnings: list[str]) -> dict[str, dict[str, Any]]:
    """plan.json's run objects by name (launcher.plan.planner writes it next to the run dirs)."""
    try:
        data = read_json(exp.plan_json)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        warnings.append(f"plan.json unreadable ({type(exc).__name__}): unfinished runs read from run.yaml")
        return {}
    runs = data.get("runs") if isinstance(data, dict) else data
    if not isinstance(runs, list):
        return {}
    return {str(r["name"]): r for r in runs if isinstance(r, dict) and "name" in r}


def _nested(mapping: dict[str, Any], *keys: str) -> Any:
    value: Any = mapping
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _pick_baseline(
    rows: list[RunRow], requested: str | None, spec_baseline: Any, warnings: list[str]
) -> str | None:
    names = [r.name for r in rows]
    if not names:
        return None
    if requested is not None:
        if requested in names:
            return requested
        across = [n for n in names if n.endswith(f"/{requested}")]  # RUN for EXP/RUN across experiments
        if len(across) == 1:
            return across[0]
        close = difflib.get_close_matches(requested, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; runs: {', '.join(names[:20])}"
        raise UserError(f"--baseline {requested}: no run of that name{hint}")
    if isinstance(spec_baseline, str) and spec_baseline:
        if spec_baseline in names:
            return spec_baseline
        # The spec may name a method (run-name base) whose runs carry swept values in their names.
        prefixed = [n for n in names if n.startswith(spec_baseline)]
        if prefixed:
            return prefixed[0]
        warnings.append(
            f"spec.yaml baseline {spec_baseline!r} matches no run; using the first run {names[0]!r}"
        )
    return names[0]


def _tokenize_of(paths: RunPaths, fallback: str) -> str:
    config = read_run_yaml(paths, [])
    value = _nested(config or {}, "eval", "bleu_tokenize")
    return value if isinstance(value, str) else fallback


def _apply_significance(
    collection: Collection, rows_by_name: dict[str, RunRow], cache: dict[str, Any], use_cache: bool
) -> dict[str, Any]:
    """Fill bleu_delta / CI / p-values of every run with samples against the baseline run."""
    # lazy: sacrebleu and numpy load only when samples are compared
    from launcher.collect import significance as sig
    from launcher.collect.significance import SamplesMismatch, align, compare_to_baseline, load_samples

    base_name = collection.baseline
    new_cache: dict[str, Any] = {}
    if base_name is None:
        return new_cache
    base_row = rows_by_name[base_name]
    base_paths = base_row.run_paths()
    base_fp = file_fingerprint(base_paths.samples_jsonl)
    samples_name = base_paths.samples_jsonl.name
    candidates = [
        r
        for r in collection.rows
        if r.name != base_name and os.path.exists(os.path.join(str(r.run_paths().root), samples_name))
    ]
    if base_fp is None or base_fp[0] == 0:
        if candidates:
            collection.warnings.append(
                f"baseline {base_name!r} has no samples.jsonl (or it is empty): no BLEU deltas; "
                "pick a finished run with --baseline NAME"
            )
        return new_cache
    try:
        base = load_samples(base_paths.samples_jsonl)
    except SamplesMismatch as exc:
        collection.warnings.append(f"baseline {base_name!r}: {exc}; no BLEU deltas")
        return new_cache
    base_row.warnings.extend(f"samples.jsonl: {s}" for s in base.skipped)
    if len(base) == 0:
        base_row.warnings.append("samples.jsonl has no usable example: no BLEU deltas against it")
        return new_cache
    tokenize = _tokenize_of(base_paths, collection.tokenize)
    collection.tokenize = tokenize
    base_row.values["n_samples"] = len(base)

    systems: dict[str, list[str]] = {}
    fingerprints: dict[str, Any] = {}
    notes: dict[str, list[str]] = {}
    # A cached comparison is reused only for the same files (size, mtime), tokenizer and test settings.
    test_params = [sig.N_BOOTSTRAP, sig.N_APPROX_RANDOMIZATION, sig.DEFAULT_SEED, "delta_se"]
    for row in candidates:
        paths = row.run_paths()
        fp = {
            "base": base_fp,
            "sys": file_fingerprint(paths.samples_jsonl),
            "tok": tokenize,
            "params": test_params,
        }
        cached = cache.get(row.name)
        if use_cache and isinstance(cached, dict) and cached.get("fp") == fp:
            new_cache[row.name] = cached
            row.warnings.extend(str(n) for n in cached.get("notes") or [])
            continue
        first_note = len(row.warnings)
        try:
            samples = load_samples(paths.samples_jsonl)
            row.warnings.extend(f"samples.jsonl: {s}" for s in samples.skipped)
            if len(samples) == 0:
                row.warnings.append("samples.jsonl has no usable example: no BLEU delta")
                continue
            systems[row.name] = align(base, samples, row.name)
        except SamplesMismatch as exc:
            # Significance needs the same eval examples: say why the cell is empty, in the table.
            row.values["no_delta_reason"] = f"not the baseline's eval examples: {exc}".replace(
                f"{row.name}: ", ""
            )
            continue
        run_tok = _tokenize_of(paths, tokenize)
        if run_tok != tokenize:
            row.warnings.append(
                f"eval.bleu_tokenize is {run_tok!r}, the baseline's {tokenize!r}: compared with {tokenize!r}"
            )
        fingerprints[row.name] = fp
        notes[row.name] = row.warnings[first_note:]
    if systems:
        results = compare_to_baseline(base.predictions, systems, base.reference_sets, tokenize=tokenize)
        for name, res in results.items():
            new_cache[name] = _cache_entry(res, fingerprints[name], notes[name])
    _write_deltas(new_cache, rows_by_name, base_row, tokenize)
    _adjust_for_many_comparisons(collection, rows_by_name, new_cache)
    return new_cache


def _cache_entry(res: Any, fingerprint: Any, notes: list[str]) -> dict[str, Any]:
    """One run's comparison with the baseline as .collect_cache.json keeps it."""
    return {
        "fp": fingerprint,
        "baseline_bleu": res.baseline_bleu,
        "system_bleu": res.system_bleu,
        "delta": res.delta,
        "delta_ci": list(res.delta_ci),
        "delta_se": res.delta_se,
        "p_bootstrap": res.p_bootstrap,
        "p_ar": res.p_approx_randomization,
        "n": res.n_examples,
        "notes": notes,
    }


def _write_deltas(
    comparisons: dict[str, Any], rows_by_name: dict[str, RunRow], base_row: RunRow, tokenize: str
) -> None:
    """The compared runs' ΔBLEU, CI and p-values into their rows, each BLEU checked against result.json."""
    for name, entry in comparisons.items():
        row = rows_by_name[name]
        row.values["bleu_delta"] = entry["delta"]
        row.values["bleu_delta_ci"] = entry["delta_ci"]
        row.values["bleu_p_value"] = entry["p_bootstrap"]
        row.values["bleu_p_value_ar"] = entry["p_ar"]
        row.values["n_samples"] = entry["n"]
        _check_bleu(row, entry["system_bleu"], tokenize)
        _check_bleu(base_row, entry["baseline_bleu"], tokenize)


def _adjust_for_many_comparisons(
    collection: Collection, rows_by_name: dict[str, RunRow], entries: dict[str, Any]
) -> None:
    """Holm-adjusted p-values over every run compared with the baseline (equal to the raw ones for a
    single run), which the * uses; and the smallest ΔBLEU each comparison can detect at that level."""
    from launcher.collect.significance import holm, min_detectable_delta

    collection.n_comparisons = len(entries)
    if not entries:
        return
    for raw_key, key in (("p_bootstrap", "bleu_p_value_holm"), ("p_ar", "bleu_p_value_ar_holm")):
        for name, adjusted in holm({n: float(e[raw_key]) for n, e in entries.items()}).items():
            rows_by_name[name].values[key] = adjusted
    for name, entry in entries.items():
        row = rows_by_name[name]
        row.values["bleu_delta_se"] = entry["delta_se"]
        row.values["bleu_mde"] = min_detectable_delta(entry["delta_se"], len(entries))


def _check_bleu(row: RunRow, samples_bleu: float, tokenize: str) -> None:
    """BLEU shown = result.json's; recomputed from samples when missing, flagged when they disagree."""
    reported = row.get("bleu")
    if reported is None:
        row.values["bleu"] = samples_bleu
        note = "bleu recomputed from samples.jsonl (result.json has none)"
    elif abs(reported - samples_bleu) > _BLEU_MISMATCH:
        note = (
            f"result.json bleu {reported:.2f} differs from sacrebleu on samples.jsonl "
            f"({samples_bleu:.2f}, tokenize={tokenize}); the delta uses samples.jsonl"
        )
    else:
        return
    if note not in row.warnings:
        row.warnings.append(note)


def _attach_reviews(collection: Collection, rows_by_name: dict[str, RunRow]) -> None:
    for review in collection.reviews:
        for me, other, win, loss in (
            (review.run_a, review.run_b, review.wins_a, review.wins_b),
            (review.run_b, review.run_a, review.wins_b, review.wins_a),
        ):
            row = rows_by_name.get(me)
            if row is None:
                collection.warnings.append(f"{review.path.name}: run {me!r} is not in this experiment")
                continue
            entries = row.values.get("review") or []
            entries.append(
                {"vs": other, "win": win, "tie": review.ties, "loss": loss, "unrated": review.unrated}
            )
            row.values["review"] = entries


def _open_experiment(root: Path) -> ExperimentPaths:
    exp = ExperimentPaths(Path(root))
    if not exp.root.is_dir():
        raise UserError(f"{exp.root}: no such experiment directory (the <output_dir>/<experiment> of a spec)")
    if not exp.runs_dir.is_dir():
        hint = (
            " (that looks like a run dir; pass its experiment dir)"
            if (exp.root / "run.yaml").exists()
            else ""
        )
        raise UserError(f"{exp.root}: no runs/ directory{hint}; run `launcher submit SPEC` first")
    return exp


def _experiment_rows(exp: ExperimentPaths, warnings: list[str]) -> tuple[list[RunRow], dict[str, Any]]:
    """Every run dir of one experiment as a row, in the plan's order; and its spec.yaml."""
    spec = _read_spec(exp, warnings)
    plan = _read_plan(exp, warnings)
    # The plan's order is the spec's (methods, then sweep values): the order users think in, and the
    # "first run" that is the default baseline. Run dirs the plan does not know follow by name.
    position = {name: index for index, name in enumerate(plan)}
    run_dirs = sorted(_run_dirs(exp), key=lambda p: (position.get(p.root.name, len(position)), p.root.name))
    rows = [read_row(paths, plan.get(paths.root.name)) for paths in run_dirs]
    if not rows:
        warnings.append(f"{exp.runs_dir} has no run directories")
    for row in rows:
        row.values["experiment"] = exp.root.name
    return rows, spec


def comparison_dir(roots: list[Path]) -> Path:
    """Where ``collect EXP_A EXP_B`` writes the joint summaries and plots: beside the first experiment."""
    names = "+".join(Path(r).resolve().name for r in roots)
    if len(names) > 100:
        names = (
            f"{Path(roots[0]).resolve().name}+{len(roots) - 1}-more-"
            + hashlib.sha1(names.encode()).hexdigest()[:8]
        )
    return Path(roots[0]).resolve().parent / f"compare_{names}"


def collect_experiment(
    exp_root: Path,
    baseline: str | None = None,
    *,
    write: bool = True,
    elapsed_s: dict[str, float] | None = None,
) -> Collection:
    """One experiment; see ``collect_experiments``."""
    return collect_experiments([exp_root], baseline, write=write, elapsed_s=elapsed_s)


def collect_experiments(
    exp_roots: list[Path],
    baseline: str | None = None,
    *,
    write: bool = True,
    out_dir: Path | None = None,
    elapsed_s: dict[str, float] | None = None,
) -> Collection:
    """Read every run dir of the experiments; with ``write``, also write summary.{md,csv,json} and the
    plots: into the experiment dir, or for several experiments into ``out_dir`` (default
    ``comparison_dir``), where each run is named ``EXP/run``. ``elapsed_s``: Slurm's elapsed seconds
    per run directory (launcher.collect.cost), where the caller could ask sacct.

    Never fails on a damaged run dir (its row says what is known, warnings say what was skipped);
    raises UserError for a missing experiment or an unknown ``baseline``.
    """
    exps = [_open_experiment(Path(root)) for root in exp_roots]
    names = [e.root.name for e in exps]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"experiment name(s) given twice: {', '.join(twice)}; runs are told apart as EXP/run")
    several = len(exps) > 1
    warnings: list[str] = []
    rows: list[RunRow] = []
    specs: list[dict[str, Any]] = []
    for exp in exps:
        exp_warnings: list[str] = []
        exp_rows, spec = _experiment_rows(exp, exp_warnings)
        specs.append(spec)
        warnings += [f"{exp.root.name}: {w}" for w in exp_warnings] if several else exp_warnings
        if several:
            for row in exp_rows:
                row.name = row.values["name"] = f"{exp.root.name}/{row.name}"
                row.group_key = group_key(row.name, row.get("method"), row.get("swept"))
        rows += exp_rows
    exp = ExperimentPaths(Path(out_dir or comparison_dir(exp_roots))) if several else exps[0]
    spec = specs[0]
    spec_baseline = spec.get("baseline")
    if several and isinstance(spec_baseline, str):
        spec_baseline = f"{names[0]}/{spec_baseline}"
    rows_by_name = {r.name: r for r in rows}
    gpu_mem = _nested(spec, "cluster", "gpu_mem_gib")
    tokenize = _nested(spec, "eval", "bleu_tokenize")
    collection = Collection(
        exp=exp,
        rows=rows,
        baseline=_pick_baseline(rows, baseline, spec_baseline, warnings),
        warnings=warnings,
        gpu_mem_gib=float(gpu_mem) if isinstance(gpu_mem, int | float) else None,
        tokenize=tokenize if isinstance(tokenize, str) else DEFAULT_TOKENIZE,
    )
    if collection.gpu_mem_gib is None and rows:
        config = read_run_yaml(rows_by_name[collection.baseline or rows[0].name].run_paths(), [])
        value = _nested(config or {}, "cluster", "gpu_mem_gib")
        collection.gpu_mem_gib = float(value) if isinstance(value, int | float) else DEFAULT_GPU_MEM_GIB
    for row in rows:
        row.values["baseline"] = row.name == collection.baseline
    price = _nested(spec, "cluster", "gpu_hour_price")
    collection.gpu_hour_price = float(price) if isinstance(price, int | float) and price > 0 else None
    apply_cost(rows, gpu_hour_price=collection.gpu_hour_price, elapsed_s=elapsed_s)
    collection.differing_keys = differing_hyperparameters(rows, warnings)

    # .collect_cache.json: significance results and the plots' input hash of the last collect. Only
    # reused for identical inputs; deleting it is always safe.
    cache_path = exp.root / _CACHE_NAME
    cache_file: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = read_json(cache_path)
        cache_file = loaded if isinstance(loaded, dict) else {}
    cache = (cache_file.get("runs") or {}) if cache_file.get("baseline") == collection.baseline else {}
    new_cache = _apply_significance(collection, rows_by_name, cache, use_cache=True)

    collection.groups = seed_groups(rows)
    for group in collection.groups:
        for name in group.runs:
            rows_by_name[name].values["group"] = group.to_json()
    for source in exps:
        for review in load_reviews(source.root, collection.warnings):
            if several:  # the review files name runs of their own experiment
                prefix = f"{source.root.name}/"
                review = replace(review, run_a=prefix + review.run_a, run_b=prefix + review.run_b)
            collection.reviews.append(review)
    _attach_reviews(collection, rows_by_name)
    for row in rows:
        if row.get("state") == RunState.COMPLETED.value and row.get("bleu") is None:
            row.warnings.append("no BLEU (result.json has none and no samples.jsonl)")
        for key in ("train_loss_final", "eval_loss"):
            value = row.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                row.values[key] = None

    if write:
        exp.root.mkdir(parents=True, exist_ok=True)
        write_summaries(collection)
        signature = plots.plot_signature(collection)
        pngs_there = exp.loss_png.exists() and exp.memory_png.exists()
        if signature != cache_file.get("plots") or not pngs_there:
            plots.write_plots(collection)
        write_json_atomic(
            cache_path, {"baseline": collection.baseline, "runs": new_cache, "plots": signature}
        )
    return collection

"""Pre-flight: everything a plan's runs need that this machine can check, before anything is queued.

For every distinct input of the runs (a sweep shares them):
- the model: ``config.json`` loads in transformers, and the weight files (safetensors headers, ``.bin``
  memory-mapped with ``weights_only``, or the shards their index lists) hold every parameter the config
  makes, each with the shape the config gives it; a Git LFS pointer file is named as one;
- the tokenizer: it loads, has an eos token, has no ids beyond the model's embeddings, and has a chat
  template when ``template: tokenizer`` asks for it;
- the data: every train and eval record is read, parsed in its format and rendered with the run's
  template (a chat template must render the prompt as the start of the conversation with its answer).

Every problem goes into the plan's ``Problems`` (``spec:line:col: key: file:line: ...``), all at once.
Inputs that passed are remembered by their files' sizes and mtimes (``cache_dir()/preflight``): planning
again costs a few ``stat`` calls.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.builtins import cache as builtin_cache
from launcher.convert.checkpoint_files import scan, weight_files
from launcher.data.formats import ExampleReader
from launcher.data.records import data_file_problem
from launcher.data.templates import (
    ChatFormat,
    conversation,
    get_template,
    has_tools,
    named_tools_refusal,
    resolve_template,
)
from launcher.data.tokenizers import MIN_TOKENIZER_TOKENS, empty_tokenizer_problem, tokenizer_load_problem
from launcher.errors import UserError
from launcher.plan.archs import ArchInfo
from launcher.rundir.paths import write_json_atomic
from launcher.rundir.run_config import RunConfig
from launcher.spec.yaml_source import KeyPath, Problems

PREFLIGHT_VERSION = 1
"""Bump when a check changes: remembered results of the old checks no longer count."""
PROBLEMS_PER_FILE = 20
LFS_POINTER = b"version https://git-lfs"


@dataclass
class PreflightReport:
    """What was checked (for the user and the benchmark)."""

    records: int = 0
    """Data records read and rendered (0 for inputs remembered from an earlier check)."""
    cached: int = 0
    """Inputs whose earlier check still holds (same files, sizes and mtimes)."""
    seconds: float = 0.0
    checked: list[str] = field(default_factory=list)


# --- remembered results ------------------------------------------------------------------------------


def _files_of(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    return [path] if path.exists() else []


def _fingerprint(*paths: Path | None) -> list[Any]:
    """Each file's path, size and mtime (a directory: its files): what a remembered result depends on."""
    out: list[Any] = []
    for path in paths:
        if path is None:
            continue
        for file in _files_of(path):
            stat = file.stat()
            out.append([str(file), stat.st_size, stat.st_mtime_ns])
    return out


def _memo_path(kind: str, key: Any) -> Path:
    digest = hashlib.sha256(json.dumps([PREFLIGHT_VERSION, kind, key], default=str).encode()).hexdigest()
    return builtin_cache.cache_dir() / "preflight" / f"{kind}-{digest[:24]}.json"


def _remembered(kind: str, key: Any) -> bool:
    return _memo_path(kind, key).is_file()


def _remember(kind: str, key: Any, info: dict[str, Any]) -> None:
    path = _memo_path(kind, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, info)
    except OSError:  # a read-only cache only costs the next plan the check again
        pass


# --- the model ------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _expected_parameters(
    config: Any, trust_remote_code: bool
) -> tuple[list[list[str]], dict[str, tuple[int, ...]], str]:
    """(groups of names sharing one tensor (tied weights), shape by name, base-model prefix) of the
    model the config makes, on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    groups: dict[int, list[str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
        shapes[name] = tuple(param.shape)
    return list(groups.values()), shapes, str(getattr(model, "base_model_prefix", "") or "")


def _renamed_on_load(config: Any) -> bool:
    """transformers renames or fuses this model type's checkpoint keys while loading (names on disk may
    differ from the model's): only shapes of names that match can be compared then."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # pragma: no cover - older transformers: no renaming table
        return False
    return bool(get_checkpoint_conversion_mapping(getattr(config, "model_type", "")))


def check_model(model_dir: Path, trust_remote_code: bool = False) -> list[str]:
    """Problems of a local model directory: its config and its weight files against that config."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as exc:
        return [f"{model_dir}/config.json does not load in transformers ({_first_line(exc)})"]
    try:
        files = weight_files(model_dir)
    except UserError as exc:
        return [str(exc)]
    pointers = []
    for file in files:
        with open(file, "rb") as handle:
            if handle.read(len(LFS_POINTER)) == LFS_POINTER:
                pointers.append(file)
    if pointers:
        return [
            f"{file} is a Git LFS pointer, not the weights: run `git lfs pull` in {model_dir}"
            for file in pointers
        ]
    try:
        found = scan(model_dir)  # headers only
    except UserError as exc:
        return [str(exc)]
    try:
        groups, shapes, prefix = _expected_parameters(config, trust_remote_code)
    except Exception as exc:
        return [f"{model_dir}/config.json does not make a causal LM in transformers ({_first_line(exc)})"]
    # Checkpoint names as the model names them: with or without the base model's prefix ("model.").
    on_disk: dict[str, Any] = {}
    for name, info in found.items():
        if name not in shapes and f"{prefix}.{name}" in shapes:
            name = f"{prefix}.{name}"
        elif (
            name not in shapes
            and prefix
            and name.startswith(f"{prefix}.")
            and name[len(prefix) + 1 :] in shapes
        ):
            name = name[len(prefix) + 1 :]
        on_disk[name] = info
    problems = [
        f"{info.file}: {name} has shape {list(info.shape)} but {model_dir.name}/config.json makes it "
        f"{list(shapes[name])}: the weights and config.json are from different models"
        for name, info in sorted(on_disk.items())
        if name in shapes and tuple(info.shape) != shapes[name]
    ]
    missing = [group[0] for group in groups if not any(name in on_disk for name in group)]
    if missing and not _renamed_on_load(config):
        shown = ", ".join(missing[:5]) + (f" ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        problems.append(
            f"{model_dir}: {len(missing)} of the model's {len(groups)} weights are in no weight file "
            f"({shown}); transformers would initialise them randomly: is this the checkpoint for this "
            "config.json?"
        )
    return problems


# --- data -----------------------------------------------------------------------------------------


class TemplateCannotRender(Exception):
    """The run's template cannot render what the data holds (tools): one problem of the template, not
    of each record."""


def _tool_check(fmt: Any) -> Callable[[Any], str | None]:
    """A check of one tool-calling Example: the template renders tools, and every assistant turn (calls
    included) can be located for the label mask."""

    def render(ex: Any) -> str | None:
        if fmt.tools_problem is not None and has_tools(ex.messages, ex.tools):
            raise TemplateCannotRender(fmt.tools_problem)
        learn = [i for i, m in enumerate(ex.messages) if m["role"] == "assistant"]
        try:
            fmt.assistant_sequences(ex.messages, ex.tools, learn)
        except Exception as exc:  # jinja's TemplateError, raise_exception(), or a turn not located
            return f"the chat template refused this conversation ({_first_line(exc)})"
        return None

    return render


def _renderer(template: str, tokenizer: Any) -> Callable[[Any], str | None]:
    """A check of one Example: None when it renders, else the problem. With a chat template the prompt
    must render as the start of the conversation with its answer (that is how the answer is found).
    A template that cannot render the data's tools raises TemplateCannotRender."""
    if tokenizer is None:  # the built-in model: its tokenizer has no chat template (auto = chatglm)
        named = get_template("chatglm" if template in ("auto", "tokenizer") else template)

        def render_named(ex: Any) -> str | None:
            if ex.messages is not None:
                raise TemplateCannotRender(named_tools_refusal(named.name))
            named.render(ex.history, ex.query, ex.system)
            return None

        return render_named
    fmt = ChatFormat(template, tokenizer)
    render_tools = _tool_check(fmt)

    def render(ex: Any) -> str | None:
        if ex.messages is not None:
            return render_tools(ex)
        prompt = conversation(ex.system, ex.history, ex.query)
        try:
            head = fmt.render(prompt, add_generation_prompt=True)
            if not fmt.uses_chat_template:
                return None
            whole = fmt.render(
                [*prompt, {"role": "assistant", "content": ex.response}], add_generation_prompt=False
            )
        except Exception as exc:  # jinja's TemplateError, or raise_exception() in the template
            return f"the chat template refused this conversation ({_first_line(exc)})"
        if not whole.startswith(head):
            return (
                "the chat template renders the conversation with its answer differently from the prompt it "
                "renders for generation, so the answer cannot be located; use a named template"
            )
        return None

    return render


def check_data(
    path: Path, fmt: str, render: Callable[[Any], str | None], columns: dict[str, str] | None = None
) -> tuple[int, list[str], int]:
    """(records, the first problems, how many records have problems) of one data file: every record
    read, parsed (through ``data.columns``) and rendered."""
    records = 0
    shown: list[str] = []
    total = 0
    for where, item in ExampleReader(path, fmt, columns):
        records += 1
        problem = item if isinstance(item, str) else render(item)
        if problem is not None:
            total += 1
            if len(shown) < PROBLEMS_PER_FILE:
                shown.append(problem if isinstance(item, str) else f"{where}: {problem}")
    if records == 0:
        shown.append(f"{path}: no records (empty data file)")
        total = 1
    return records, shown, total


# --- the runs -------------------------------------------------------------------------------------


def _key(problems: Problems, *paths: KeyPath) -> KeyPath:
    return tuple(problems.first_present(*paths))


def _load_tokenizer(directory: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)


def check_tokenizer(tokenizer: Any, template: str, arch: ArchInfo | None) -> list[tuple[str, str]]:
    """(spec key, problem) for a loaded tokenizer: eos, ids within the model's embeddings, template."""
    out = []
    if len(tokenizer) < MIN_TOKENIZER_TOKENS:  # transformers builds an empty one from a bare config
        out.append(
            (
                "tokenizer",
                empty_tokenizer_problem(len(tokenizer)),
            )
        )
        return out
    if tokenizer.eos_token_id is None:
        out.append(
            ("tokenizer", "the tokenizer has no eos token: set eos_token in its tokenizer_config.json")
        )
    if arch is not None and arch.vocab_size and len(tokenizer) > arch.vocab_size:
        out.append(
            (
                "tokenizer",
                f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings have "
                f"{arch.vocab_size} rows: ids past them would crash training; use the model's own tokenizer",
            )
        )
    try:
        resolve_template(template, tokenizer)
    except UserError as exc:
        out.append(("template", str(exc)))
    return out


def run_preflight(
    runs: Sequence[RunConfig], archs: dict[str, ArchInfo], problems: Problems
) -> PreflightReport:
    """Check every model, tokenizer and data file the runs use (each once); report into ``problems``."""
    started = time.perf_counter()
    report = PreflightReport()
    done: set[Any] = set()
    tokenizers: dict[Any, Any] = {}
    for run in runs:
        model_dir = Path(run.model.path) if run.model.path else None
        trust = run.model.trust_remote_code
        model_key = _key(problems, ("model", "path"), ("model",))
        if (
            model_dir is not None
            and (model_dir / "config.json").is_file()
            and ("model", model_dir) not in done
        ):
            done.add(("model", model_dir))
            memo = [str(model_dir), trust, _fingerprint(model_dir)]
            if _remembered("model", memo):
                report.cached += 1
            else:
                found = check_model(model_dir, trust)
                for problem in found:
                    problems.error(model_key, problem, prefer_value=True)
                if not found:
                    _remember("model", memo, {"model": str(model_dir)})
                report.checked.append(str(model_dir))
        tokenizer_dir = Path(run.tokenizer.path) if run.tokenizer.path else model_dir
        tokenizer_key = (
            _key(problems, ("tokenizer", "path"), ("tokenizer",)) if run.tokenizer.path else model_key
        )
        if tokenizer_dir is not None and not tokenizer_dir.is_dir():
            continue  # not on this machine: the path checks said so (a warning at plan, an error at submit)
        tokenizer = _tokenizer_for(
            run, tokenizer_dir, trust, archs.get(run.name), problems, tokenizer_key, done, tokenizers
        )
        if tokenizer is False:
            continue
        _check_run_data(run, tokenizer, tokenizer_dir, problems, done, report)
    report.seconds = time.perf_counter() - started
    return report


def _tokenizer_for(
    run: RunConfig,
    directory: Path | None,
    trust: bool,
    arch: ArchInfo | None,
    problems: Problems,
    key: KeyPath,
    done: set[Any],
    loaded: dict[Any, Any],
) -> Any:
    """The run's tokenizer (None for the built-in model's; False when it cannot be loaded), loaded once
    per pre-flight."""
    if directory is None:
        return None
    cache_key = (str(directory), trust)
    if cache_key not in loaded:
        try:
            loaded[cache_key] = _load_tokenizer(directory, trust)
        except Exception as exc:
            loaded[cache_key] = False
            problems.error(key, tokenizer_load_problem(directory, exc, run.tokenizer.path), prefer_value=True)
    tokenizer = loaded[cache_key]
    checked = ("tokenizer", cache_key, run.template, arch.vocab_size if arch else None)
    if tokenizer is not False and checked not in done:
        done.add(checked)
        for where, problem in check_tokenizer(tokenizer, run.template, arch):
            problems.error(
                key if where == "tokenizer" else _key(problems, ("template",)), problem, prefer_value=True
            )
    return tokenizer


def _check_run_data(
    run: RunConfig,
    tokenizer: Any,
    tokenizer_dir: Path | None,
    problems: Problems,
    done: set[Any],
    report: PreflightReport,
) -> None:
    render: Callable[[Any], str | None] | None = None
    for spec_key, value in (("train_file", run.data.train_file), ("eval_file", run.data.eval_file)):
        if value is None or data_file_problem(Path(value)) is not None:
            continue  # built-in data, or a path problem the path checks report
        path = Path(value)
        memo: list[Any] = [str(path), _fingerprint(path), run.data.format, run.template]
        memo += [_fingerprint(tokenizer_dir)] + ([run.data.columns] if run.data.columns else [])
        if spec_key == "train_file":
            _check_global_batch(run, memo, problems)
        if ("data", json.dumps(memo, default=str)) in done:
            continue
        done.add(("data", json.dumps(memo, default=str)))
        if _remembered("data", memo):
            report.cached += 1
            continue
        if render is None:
            try:
                render = _renderer(run.template, tokenizer)
            except UserError:  # the template itself is the problem, reported with the tokenizer
                return
        try:
            records, shown, total = check_data(path, run.data.format, render, run.data.columns)
        except UserError as exc:  # the file as a whole cannot be read
            problems.error(_key(problems, ("data", spec_key), ("data",)), str(exc), prefer_value=True)
            continue
        except TemplateCannotRender as exc:
            problems.error(("template",), str(exc), prefer_value=True)  # once, whichever file showed it
            continue
        report.records += records
        report.checked.append(str(path))
        key = _key(problems, ("data", spec_key), ("data",))
        for problem in shown:
            problems.error(key, problem, prefer_value=True)
        if total > len(shown):
            more = f"{path}: ... and {total - len(shown)} more records with problems"
            problems.error(key, more, prefer_value=True)
        if total == 0:
            _remember("data", memo, {"records": records})
            if spec_key == "train_file":
                _check_global_batch(run, memo, problems)


def _check_global_batch(run: RunConfig, memo: Any, problems: Problems) -> None:
    """Every step takes one full global batch (the last partial one is dropped): a train file with fewer
    examples than one would pass here and fail in the job. Known once the file's check passed."""
    path = _memo_path("data", memo)
    try:
        records = int(json.loads(path.read_text(encoding="utf-8"))["records"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # not checked yet, or it has problems of its own
    t = run.training
    examples = min(records, run.data.max_train_examples or records)
    world = run.resources.world_size
    if examples < t.per_device_batch_size * world:
        used = f"the first {examples} of {records}" if examples < records else f"{records}"
        problems.error(
            _key(problems, ("data", "train_file"), ("data",)),
            f"{used} training example(s) are fewer than one global batch of "
            f"{t.per_device_batch_size * world} (training.per_device_batch_size {t.per_device_batch_size} x "
            f"{world} GPU(s)), and every step needs a full one: add records or lower "
            "training.per_device_batch_size",
            prefer_value=True,
        )

"""Validation of a job spec, in the spec's own terms: ``file:line:col: key.path: message``.

Three layers, all problems collected and raised together as one SpecError:
1. YAML syntax (launcher.spec.yaml_source), ``yaml.safe_load`` semantics only;
2. the schema (pydantic): its errors are translated to key paths with positions, valid choices and the
   closest valid key ("did you mean lora_alpha?");
3. semantic checks: model/data choices, sweep and override keys, zip lengths, freeze settings, paths that
   do not exist (errors at submit, warnings at plan).
What only planning can find (batch arithmetic, runs that cannot fit, duplicate run names) is checked
by launcher.plan.planner, into the same problem list: ``launcher.plan.planner.load_and_plan`` runs both, once.
What the checks need to know from the layers above the spec (the bundled architectures, the template
names, which data files can be read, where the experiment directory goes) is handed in as
``InputKnowledge`` by the planner, so the spec imports nothing above itself.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from launcher.errors import UserError
from launcher.spec.keys import SECTIONS, base_config, method_has_field, set_dotted, valid_dotted_keys
from launcher.spec.schema import METHOD_NAMES, FreezeMethod, JobSpec, ResourcesSpec
from launcher.spec.speed_options import check_speed_options
from launcher.spec.trackers import missing_tracker_packages
from launcher.spec.yaml_source import KeyPath, Problems
from launcher.spec.zero_offload import offload_conflicts

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# File systems allow 255 bytes per name; the launcher adds up to 23 (`replaced/<run>-<utc time>`, the
# `.<name>.<random>.tmp` of an atomic write), and job names are cut at 100 anyway.
MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class InputKnowledge:
    """What the semantic checks need from the layers above the spec, handed in by the planner
    (launcher.plan.input_knowledge)."""

    arch_names: Callable[[], list[str]]
    """The bundled architecture descriptions ``model.arch`` may name."""
    check_template: Callable[[str], None]
    """Raises UserError for a ``template`` value that names no template."""
    data_file_problem: Callable[[Path], str | None]
    """Why a path is not a data file that can be read, or None."""
    experiment_dir: Callable[[str, str], Path]
    """Where ``output_dir`` and ``experiment`` put the experiment (launcher.rundir.paths)."""
    columns_problems: Callable[[str, dict[str, str]], list[tuple[str, str]]]
    """(field, problem) for each ``data.columns`` entry the format does not have (launcher.data.columns)."""


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return repr(value)


# --- walking pydantic types along an error location ---------------------------------------------


def _members(tp: Any) -> list[Any]:
    """Flatten Annotated / Optional / Union into concrete member types."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _members(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    return [tp]


def _step(tp: Any, part: str | int) -> Any:
    for member in _members(tp):
        if isinstance(member, type) and issubclass(member, BaseModel):
            if isinstance(part, str) and part in member.model_fields:
                return member.model_fields[part].annotation
            if part == member.__name__ or part == _tag_of(member):
                return member
        origin = typing.get_origin(member)
        if origin is list and isinstance(part, int):
            return typing.get_args(member)[0]
        if origin is dict and isinstance(part, str):
            return typing.get_args(member)[1]
    return None


def _tag_of(cls: type[BaseModel]) -> str | None:
    field = cls.model_fields.get("method")
    if field is None:
        return None
    args = typing.get_args(field.annotation)
    return str(args[0]) if args else None


def model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    tp: Any = JobSpec
    for part in loc:
        tp = _step(tp, part)
        if tp is None:
            return None
    for member in _members(tp):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def key_homes(key: str, model: type[BaseModel] = JobSpec, prefix: tuple[str, ...] = ()) -> list[str]:
    """Every dotted path of the spec's sections (not list entries such as methods) that ends in
    ``key``: a key written in the wrong section gets its section ("did you mean training.learning_rate?")."""
    homes = []
    for name, field in model.model_fields.items():
        if name == key:
            homes.append(".".join((*prefix, name)) if prefix else f"{name} (top level)")
        for member in _members(field.annotation):
            if isinstance(member, type) and issubclass(member, BaseModel) and len(prefix) < 3:
                homes += key_homes(key, member, (*prefix, name))
    return homes


# --- translating pydantic errors -------------------------------------------------------------------


def _is_branch_tag(part: Any) -> bool:
    """A union-branch label pydantic inserts in locations (not a key of the data)."""
    return isinstance(part, str) and part not in METHOD_NAMES


def _walk(
    loc: tuple[Any, ...], data: Any, kind: str = ""
) -> tuple[list[str | int], Any, list[tuple[int, str]]]:
    """(data path, the key missing at the end or None, [(depth, union-branch tag)])."""
    cur = data
    path: list[str | int] = []
    tags: list[tuple[int, str]] = []
    for i, part in enumerate(loc):
        in_dict = isinstance(cur, dict) and part in cur
        in_list = isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur)
        if in_dict or in_list:
            # A non-string mapping key (``1: x``) is named as written in the file.
            path.append(str(part) if in_dict and not isinstance(part, str) else part)
            cur = cur[part]
        elif i == len(loc) - 1 and (kind == "missing" or not _is_branch_tag(part)):
            return path, part, tags
        elif _is_branch_tag(part):
            tags.append((len(path), str(part)))
    return path, None, tags


def _get(data: Any, path: list[str | int]) -> Any:
    for part in path:
        data = data[part] if not isinstance(data, dict) or part in data else data.get(int(part))
    return data


def _branch_label(tag: str) -> str:
    if tag.startswith("literal["):
        return tag[len("literal[") : -1]
    if tag.startswith("list["):
        return f"a list of {tag[len('list[') : -1]}"
    if tag.startswith("dict["):
        return "a mapping"
    return "a mapping"


def _expected_choices(expected: str) -> list[str]:
    quoted = re.findall(r"'([^']*)'", expected)
    if quoted:  # with bare choices too (Literal[True, "pissa"]: "True, 'pissa'"), as YAML spells them
        bare = [c.strip() for c in re.split(r",| or ", re.sub(r"'[^']*'", "", expected)) if c.strip()]
        return [{"True": "true", "False": "false"}.get(c, c) for c in bare] + quoted
    return [c.strip() for c in re.split(r",| or ", expected) if c.strip()]


def _message(err: dict[str, Any], loc: tuple[Any, ...]) -> str:
    kind = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}
    msg = str(err.get("msg", ""))
    if kind == "literal_error":
        choices = _expected_choices(str(ctx.get("expected", "")))
        hint = did_you_mean(str(value), choices)
        return f"{_show(value)} is not valid; choose one of: {', '.join(choices)}{hint}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping, got {_show(value)}"
    if kind == "list_type":
        return f"must be a list, got {_show(value)}"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length', 1)} item(s)"
    if msg.startswith("Input should be "):
        return f"must be {msg[len('Input should be ') :]}, got {_show(value)}"
    return f"{msg} (got {_show(value)})"


def translate_errors(exc: ValidationError, data: Any, problems: Problems) -> None:
    """Add each pydantic error as a positioned problem; union branches are merged into one message."""
    unions: dict[tuple[str | int, ...], list[tuple[str, dict[str, Any]]]] = {}
    for details in exc.errors():
        err: dict[str, Any] = dict(details)
        loc = tuple(err["loc"])
        path, missing, tags = _walk(loc, data, err["type"])
        if tags:
            depth, tag = tags[0]
            unions.setdefault(tuple(path[:depth]), []).append((tag, err))
            continue
        _report(err, loc, path, missing, problems)
    for upath, branch_errors in unions.items():
        value = _get(data, list(upath))
        if isinstance(value, dict):
            keep = [e for t, e in branch_errors if not t.startswith(("literal[", "list["))]
        elif isinstance(value, list):
            keep = [e for t, e in branch_errors if t.startswith("list[")]
        else:
            keep = []
        if keep:
            for kept in keep:
                loc = tuple(kept["loc"])
                path, missing, _ = _walk(loc, data, kept["type"])
                _report(kept, loc, path, missing, problems)
            continue
        labels = list(dict.fromkeys(_branch_label(t) for t, _ in branch_errors))
        problems.error(list(upath), f"must be {' or '.join(labels)}, got {_show(value)}", prefer_value=True)


def _report(
    err: dict[str, Any], loc: tuple[Any, ...], path: list[str | int], missing: Any, problems: Problems
) -> None:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "missing":
        problems.error([*path, missing], f"missing required key '{missing}'")
        return
    if kind == "extra_forbidden":
        parent = model_at(loc[:-1])
        fields = list(parent.model_fields) if parent else []
        key = path[-1] if path else missing
        here = ".".join(str(p) for p in path[:-1] if isinstance(p, str))
        homes = [home for home in key_homes(str(key)) if home.rpartition(".")[0] != here]
        hint = f"; did you mean {' or '.join(homes[:2])}?" if homes else did_you_mean(str(key), fields)
        valid = f" (valid keys: {', '.join(fields)})" if fields else ""
        problems.error(path or [missing], f"unknown key '{key}'{hint}{valid}")
        return
    if kind == "union_tag_invalid":
        tag = ctx.get("tag")
        choices = _expected_choices(str(ctx.get("expected_tags", "")))
        problems.error(
            [*path, "method"],
            f"unknown method '{tag}'; choose one of: {', '.join(choices)}{did_you_mean(str(tag), choices)}",
            prefer_value=True,
        )
        return
    if kind == "union_tag_not_found":
        problems.error(
            [*path, "method"], f"missing required key 'method' (one of: {', '.join(METHOD_NAMES)})"
        )
        return
    problems.error(path, _message(err, loc), prefer_value=True)


# --- semantic checks --------------------------------------------------------------------------------


def name_too_long(name: str) -> str | None:
    """Why ``name`` cannot be a directory name here (None when it can)."""
    if len(name.encode("utf-8")) > MAX_NAME_CHARS:
        return (
            f"{name[:40]}... is {len(name)} characters; names become directory names, at most "
            f"{MAX_NAME_CHARS} here"
        )
    return None


def _check_names(spec: JobSpec, problems: Problems) -> None:
    if not SAFE_NAME.match(spec.experiment):
        problems.error(
            ("experiment",),
            f"{spec.experiment!r} is used as a directory name: letters, digits, '.', '_' and '-' only",
            prefer_value=True,
        )
    elif too_long := name_too_long(spec.experiment):
        problems.error(("experiment",), too_long, prefer_value=True)
    seen: dict[str, int] = {}
    for i, method in enumerate(spec.methods):
        base = method.name or method.method
        where = ("methods", i, "name") if method.name else ("methods", i, "method")
        if method.name is not None and not SAFE_NAME.match(method.name):
            problems.error(
                where, f"{method.name!r}: letters, digits, '.', '_' and '-' only", prefer_value=True
            )
        elif method.name is not None and (too_long := name_too_long(method.name)):
            problems.error(where, too_long, prefer_value=True)
        if base in seen:
            problems.error(
                where,
                f"duplicate run name {base!r} (methods[{seen[base]}] has it too); "
                f"give each a distinct `name:`, e.g. {base}-2",
                prefer_value=True,
            )
        else:
            seen[base] = i


def _check_model_data(spec: JobSpec, problems: Problems, knowledge: InputKnowledge) -> None:
    m = spec.model
    if m.path is None and m.builtin is None:
        problems.error(
            ("model",), "set exactly one of path (a local HF model directory) or builtin (tiny-glm)"
        )
    elif m.path is not None and m.builtin is not None:
        problems.error(("model", "builtin"), "set exactly one of path or builtin, not both")
    if m.arch is not None and m.arch not in knowledge.arch_names():
        names = knowledge.arch_names()
        problems.error(
            ("model", "arch"),
            f"unknown architecture {m.arch!r}; bundled: {', '.join(names)}{did_you_mean(m.arch, names)}",
            prefer_value=True,
        )
    _check_data_files(spec, problems)
    try:
        knowledge.check_template(spec.template)
    except UserError as exc:
        problems.error(("template",), str(exc), prefer_value=True)


def _check_data_columns(spec: JobSpec, problems: Problems, knowledge: InputKnowledge) -> None:
    """``data.columns`` names fields of ``data.format`` (any format's under auto)."""
    for field_name, problem in knowledge.columns_problems(spec.data.format, spec.data.columns or {}):
        problems.error(("data", "columns", field_name), problem)


def _check_methods(spec: JobSpec, problems: Problems) -> None:
    for i, method in enumerate(spec.methods):
        if isinstance(method, FreezeMethod):
            if method.trainable_layers is None and not method.trainable_patterns:
                problems.error(
                    ("methods", i),
                    "freeze needs trainable_layers (train the last N layers) or trainable_patterns (regexes)",
                )
            if method.trainable_layers is not None and method.trainable_patterns:
                problems.error(
                    ("methods", i, "trainable_patterns"),
                    "set trainable_layers or trainable_patterns, not both",
                )
            for j, pattern in enumerate(method.trainable_patterns or []):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    problems.error(
                        ("methods", i, "trainable_patterns", j),
                        f"not a valid regex: {exc}",
                        prefer_value=True,
                    )
        _check_resource_block(method.resources, ("methods", i, "resources"), problems)
    _check_resource_block(spec.resources, ("resources",), problems)


def _check_resource_block(res: Any, where: KeyPath, problems: Problems) -> None:
    if not isinstance(res, ResourcesSpec):
        return
    conflicts = offload_conflicts(
        res.zero_stage, offload_optimizer=res.offload_optimizer, offload_param=res.offload_param
    )
    for key, message in sorted(conflicts, reverse=True):  # offload_param first, as always reported
        problems.error((*where, key), message)


def _check_dotted_value(
    spec: JobSpec, key: str, value: Any, where: KeyPath, problems: Problems, knowledge: InputKnowledge
) -> None:
    """Validate one swept/overridden value by applying it and re-validating its section."""
    section = key.split(".", 1)[0]
    try:
        if section == "method":
            field = key.split(".", 1)[1]
            for method in spec.methods:
                if method_has_field(method, key):
                    data = method.model_dump(mode="json")
                    data[field] = value
                    type(method).model_validate(data)
        elif section == "template":
            if not isinstance(value, str):
                problems.error(where, f"must be a string, got {_show(value)}", prefer_value=True)
                return
            knowledge.check_template(value)
        elif section == "resources":
            ResourcesSpec.model_validate({key.split(".", 1)[1]: value})
        else:
            config = base_config(spec)
            set_dotted(config, key, value)
            SECTIONS[section].model_validate(config[section])
    except ValidationError as exc:
        first: dict[str, Any] = dict(exc.errors()[0])
        problems.error(where, f"{key}: {_message(first, tuple(first['loc']))}", prefer_value=True)
    except UserError as exc:
        problems.error(where, str(exc), prefer_value=True)


ALIASES = {
    "lr": "learning_rate",
    "bs": "per_device_batch_size",
    "batch_size": "per_device_batch_size",
    "epochs": "num_epochs",
    "steps": "max_steps",
    "src": "max_source_length",
    "tgt": "max_target_length",
    "ga": "gradient_accumulation_steps",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "rank": "r",
    "zero": "zero_stage",
}


def suggest_dotted(key: str, valid: list[str]) -> str:
    """The closest valid dotted key: a known abbreviation, the whole key, or the last part in its section."""
    root, _, leaf = key.rpartition(".")
    alias = ALIASES.get(leaf)
    if alias is not None and f"{root}.{alias}" in valid:
        return f"; did you mean {root}.{alias}?"
    hint = did_you_mean(key, valid)
    if hint:
        return hint
    same_root = {k.rpartition(".")[2]: k for k in valid if k.rpartition(".")[0] == root}
    close = difflib.get_close_matches(leaf, list(same_root), n=1, cutoff=0.5)
    return f"; did you mean {same_root[close[0]]}?" if close else ""


def _check_key(spec: JobSpec, key: str, where: KeyPath, problems: Problems, valid: list[str]) -> bool:
    if key not in valid:
        roots = sorted({k.split(".", 1)[0] for k in valid})
        problems.error(
            where,
            f"unknown key '{key}'{suggest_dotted(key, valid)} (keys are dotted paths under "
            f"{', '.join(roots)}, e.g. training.learning_rate or method.r)",
        )
        return False
    if key.startswith("method.") and not any(method_has_field(m, key) for m in spec.methods):
        problems.error(where, f"no method of this spec has the parameter {key.split('.', 1)[1]!r}")
        return False
    return True


def _check_sweep(spec: JobSpec, problems: Problems, knowledge: InputKnowledge) -> None:
    valid = valid_dotted_keys()
    sweep = spec.sweep
    for kind in ("grid", "zip"):
        axes: dict[str, list[Any]] = getattr(sweep, kind)
        for key, values in axes.items():
            where: KeyPath = ("sweep", kind, key)
            if not _check_key(spec, key, where, problems, valid):
                continue
            if not values:
                problems.error(where, "an axis needs at least one value", prefer_value=True)
            if key == "training.seed" and sweep.seeds:
                problems.error(where, "training.seed is swept and sweep.seeds is set; keep one")
            for j, value in enumerate(values):
                _check_dotted_value(spec, key, value, (*where, j), problems, knowledge)
    both = set(sweep.grid) & set(sweep.zip)
    for key in both:
        problems.error(("sweep", "zip", key), "is also a grid axis; sweep each key in one place")
    lengths = {k: len(v) for k, v in sweep.zip.items()}
    if len(set(lengths.values())) > 1:
        first = next(iter(lengths))
        for key, n in lengths.items():
            if n != lengths[first]:
                problems.error(
                    ("sweep", "zip", key),
                    f"zip axes vary together and need equal lengths: {key} has {n} values, {first} has "
                    f"{lengths[first]}",
                )
    swept = set(sweep.grid) | set(sweep.zip) | ({"training.seed"} if sweep.seeds else set())
    for i, method in enumerate(spec.methods):
        for key, value in method.overrides.items():
            where = ("methods", i, "overrides", key)
            if not _check_key(spec, key, where, problems, valid):
                continue
            if key.startswith("method."):
                problems.error(where, f"set {key.split('.', 1)[1]} directly on the method, not in overrides")
                continue
            if key in swept:
                problems.error(
                    where, f"{key} is also swept; an override would make the sweep's runs identical"
                )
            _check_dotted_value(spec, key, value, where, problems, knowledge)


def _check_data_files(spec: JobSpec, problems: Problems) -> None:
    """builtin, or train_file with eval_file or eval_split; eval_file and eval_split exclude each other."""
    d = spec.data
    files = (d.train_file, d.eval_file)
    if d.eval_split is not None and d.eval_file is not None:
        problems.error(
            ("data", "eval_split"),
            "set either eval_file or eval_split (held out of train_file), not both",
            prefer_value=True,
        )
    if d.builtin is not None and any(files):
        problems.error(("data", "builtin"), "set either builtin or train_file + eval_file, not both")
    elif d.builtin is None:
        if not any(files):
            problems.error(
                ("data",), "set builtin (dialogue, spo), or train_file with eval_file or eval_split"
            )
        elif d.train_file is None:
            problems.error(("data", "train_file"), "missing: eval_file is set, train_file is needed too")
        elif d.eval_file is None and d.eval_split is None:
            problems.error(
                ("data", "eval_file"),
                "missing: train_file is set; give an eval_file, or hold part of train_file out with "
                "eval_split: 0.1 (a fraction) or eval_split: 200 (a count)",
            )


def resolve_path(value: str | None, base_dir: Path) -> str | None:
    """A spec path made absolute against the spec file's directory (``~`` expanded)."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def _check_paths(
    spec: JobSpec, base_dir: Path, problems: Problems, check_paths: bool, knowledge: InputKnowledge
) -> None:
    report = problems.error if check_paths else problems.warn
    checks: list[tuple[KeyPath, str | None, str]] = [
        (("data", "train_file"), spec.data.train_file, "data"),
        (("data", "eval_file"), spec.data.eval_file, "data"),
        (("model", "path"), spec.model.path, "model"),
        (("tokenizer", "path"), spec.tokenizer.path, "dir"),
        (("hostfile",), spec.hostfile, "file"),
    ]
    for where, value, kind in checks:
        resolved = resolve_path(value, base_dir)
        if resolved is None:
            continue
        path = Path(resolved)
        if kind == "data":
            problem = knowledge.data_file_problem(path)
            if not path.exists():
                report(where, f"{resolved} does not exist on this machine", prefer_value=True)
            elif problem is not None:  # a directory, an unknown file type: wrong on any machine
                problems.error(where, problem, prefer_value=True)
        elif kind == "file" and not path.is_file():
            report(where, f"{resolved} does not exist on this machine", prefer_value=True)
        elif kind == "dir" and not path.is_dir():
            report(where, f"directory {resolved} does not exist on this machine", prefer_value=True)
        elif kind == "model" and not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "has no config.json"
            report(
                where,
                f"{resolved} {what} on this machine (a Hugging Face model directory)",
                prefer_value=True,
            )


def _check_eval_is_not_train(spec: JobSpec, base_dir: Path, problems: Problems) -> None:
    """The same path for training and eval is an error unless allowed (the pre-flight also compares
    contents and counts overlapping examples when the files are on this machine)."""
    d = spec.data
    train, evaluation = resolve_path(d.train_file, base_dir), resolve_path(d.eval_file, base_dir)
    if train is None or evaluation is None or d.allow_eval_overlap:
        return
    if Path(train).resolve() == Path(evaluation).resolve():
        problems.error(
            ("data", "eval_file"),
            f"the eval file is the training file ({evaluation}): every eval example was trained on, so eval "
            "loss and BLEU would measure memory; hold part of it out with data.eval_split: 0.1 (a fraction "
            "or a count) instead of data.eval_file, or set data.allow_eval_overlap: true if this is intended",
            prefer_value=True,
        )


def _check_logging(spec: JobSpec, problems: Problems) -> None:
    """A configured tracker must be importable here, not found missing on a compute node hours later."""
    for tracker, hint in missing_tracker_packages(spec.logging):
        problems.error(("logging", tracker), hint)


def _check_quantization(spec: JobSpec, problems: Problems) -> None:
    """QLoRA needs bitsandbytes here (it runs 4-bit and 8-bit on CPU as well as CUDA), not a failure in
    the job: the same rule as the trackers above."""
    import importlib.util

    if spec.model.quantization is not None and importlib.util.find_spec("bitsandbytes") is None:
        problems.error(
            ("model", "quantization"),
            f"{spec.model.quantization} loading needs bitsandbytes, which is not installed here: "
            "pip install 'launcher[qlora]' (or drop model.quantization)",
        )


def _check_output_dir(spec: JobSpec, problems: Problems, knowledge: InputKnowledge) -> None:
    """The experiment directory must be creatable and writable here: found at validate, not as a
    traceback at `plan --write` or submit. Relative output_dir: relative to the current directory."""
    if len(spec.experiment) > MAX_NAME_CHARS:
        return  # reported by _check_names; statting such a path fails (ENAMETOOLONG)
    target = knowledge.experiment_dir(spec.output_dir, spec.experiment)
    existing = target
    where = problems.first_present(("output_dir",), ("experiment",))
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
    except OSError as exc:  # a name longer than the file system allows (found once the parent exists)
        problems.error(where, f"{target} cannot be created here ({exc.strerror}); use a shorter name")
        return
    if not existing.is_dir():
        problems.error(where, f"{existing} is a file, so {target} cannot be created; change output_dir")
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = "a read-only file system" if _read_only(existing) else "no write permission"
        problems.error(
            where,
            f"cannot write in {existing} ({why}), where {target} would be created; "
            "choose an output_dir you can write",
        )


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_spec(
    spec: JobSpec, spec_path: Path, problems: Problems, *, check_paths: bool, knowledge: InputKnowledge
) -> None:
    """Semantic checks of a schema-valid spec (the plan's own checks come after, in launcher.plan.planner)."""
    _check_names(spec, problems)
    _check_output_dir(spec, problems, knowledge)
    _check_model_data(spec, problems, knowledge)
    _check_data_columns(spec, problems, knowledge)
    _check_methods(spec, problems)
    _check_sweep(spec, problems, knowledge)
    _check_paths(spec, spec_path.resolve().parent, problems, check_paths, knowledge)
    _check_eval_is_not_train(spec, spec_path.resolve().parent, problems)
    _check_logging(spec, problems)
    _check_quantization(spec, problems)
    check_speed_options(spec, problems)


def validate_spec(
    data: Any, spec_path: Path, problems: Problems, *, check_paths: bool, knowledge: InputKnowledge
) -> JobSpec:
    """The loaded YAML as a JobSpec: schema errors raise at once (nothing else can be checked without
    a schema-valid spec); semantic problems are added to ``problems`` for the caller to raise."""
    if not isinstance(data, dict):
        problems.error(
            (), f"a job spec is a YAML mapping (experiment:, model:, data:, methods: ...), got {_show(data)}"
        )
        problems.raise_if_errors()
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        translate_errors(exc, data, problems)
        problems.raise_if_errors()
        raise  # unreachable: a ValidationError always has errors
    check_spec(spec, spec_path, problems, check_paths=check_paths, knowledge=knowledge)
    return spec

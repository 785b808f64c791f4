"""The plan: a spec loaded, validated and expanded once, and the run directories that materialise it.

``load_and_plan`` is what every command starts from: YAML with positions, the schema and the semantic
checks (launcher.spec.check), then one ``RunConfig`` per run (sweep expanded, paths made absolute,
resources chosen, run id hashed), with every problem of all three stages raised together. The
``Plan`` it returns keeps each run's architecture, so nothing resolves it again.
``write_run_dirs`` writes the experiment directory (spec.yaml, plan.json) and each run's run.yaml,
ds_config.json and status.json, after checking that nothing it would overwrite belongs to a different
run.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from launcher.convert.detect import model_problem
from launcher.errors import UserError
from launcher.plan.archs import (
    ArchInfo,
    arch_from_model_dir,
    bundled_arch,
    bundled_arch_names,
    guess_bundled_name,
    short_module_names,
    tiny_glm_arch,
)
from launcher.plan.data_facts import DataFacts, run_data_facts
from launcher.plan.dsconfig import batch_sizes, render_ds_config
from launcher.plan.input_knowledge import INPUT_KNOWLEDGE
from launcher.plan.lora_variants import check_lora_variant
from launcher.plan.memory_model import LayoutError, param_layout, quantize_layout
from launcher.plan.methods import describe
from launcher.plan.preflight import PreflightReport, run_preflight
from launcher.plan.resources import ResourceProblem, resolve_resources
from launcher.plan.sweep import RunPlan, expand
from launcher.plan.user_dsconfig import FileResourceConflict, merge_file_resources, read_user_ds_config
from launcher.rundir.identity import run_id_of
from launcher.rundir.method_label import method_label
from launcher.rundir.paths import (
    ExperimentPaths,
    RunState,
    experiment_dir,
    utc_now,
    write_json_atomic,
    write_text_atomic,
)
from launcher.rundir.run_config import ResolvedResources, RunConfig, build_run_config
from launcher.rundir.status import update_status
from launcher.spec.check import name_too_long, resolve_path, validate_spec
from launcher.spec.overrides import apply_overrides
from launcher.spec.schema import (
    DataSpec,
    EvalSpec,
    JobSpec,
    LoggingSpec,
    LoraMethod,
    ModelSpec,
    TokenizerSpec,
    TrainingSpec,
)
from launcher.spec.yaml_source import Problems, load_yaml_file

_WRITE_THREADS = 16  # overlapping fsyncs; more threads stop paying off on one disk


@dataclass
class Plan:
    """A validated spec and its runs, each with the architecture its memory was planned with."""

    spec: JobSpec
    spec_path: Path
    runs: list[RunConfig]
    archs: dict[str, ArchInfo] = field(default_factory=dict)
    """Run name -> the model architecture the planner resolved for it (sizes, layer names)."""
    warnings: list[str] = field(default_factory=list)
    """Problems that are not errors here (e.g. data files not on this machine, errors at submit)."""
    preflight: PreflightReport | None = None
    """What the pre-flight read (None when it did not run)."""
    overrides: tuple[str, ...] = ()
    """The command line's KEY=VALUE overrides applied to the file."""
    effective: dict[str, Any] | None = None
    """The spec data with the overrides applied (what <experiment>/spec.yaml records); None: the file."""
    data_facts: dict[str, DataFacts] = field(default_factory=dict)
    """Run name -> template used, truncation and eval-set facts (runs whose data is on this machine)."""

    @property
    def exp(self) -> ExperimentPaths:
        return experiment_paths(self.spec)

    def rows(self) -> list[dict[str, Any]]:
        """Every run as ``launcher plan --json`` prints it."""
        return [
            {**plan_row(run, self.archs[run.name]), **facts_row(run, self.data_facts.get(run.name))}
            for run in self.runs
        ]


def load_and_plan(
    spec_path: Path,
    *,
    check_paths: bool = False,
    preflight: bool | None = None,
    overrides: Sequence[str] = (),
) -> Plan:
    """Load, validate and plan a spec file once; every problem is raised together as a SpecError
    (file:line:col: key: message).

    ``check_paths``: model/data/hostfile paths that are not on this machine are errors (submit)
    instead of warnings (validate, plan). ``preflight`` (default: ``check_paths``) reads what is on
    this machine: the model's config and weight headers, the tokenizer, every data record rendered
    (launcher.plan.preflight). Later stages that read the inputs themselves belong here
    too, reporting into the same ``problems``.

    ``overrides``: ``KEY=VALUE`` from the command line (launcher.spec.overrides), applied to the loaded data
    before anything is checked; their problems point at them (``<override 2>: ...``).
    """
    spec_path = Path(spec_path)
    data, source = load_yaml_file(spec_path)
    problems = Problems(source, str(spec_path))
    if overrides and isinstance(data, dict):
        data = apply_overrides(data, source, overrides, problems)
    spec = validate_spec(data, spec_path, problems, check_paths=check_paths, knowledge=INPUT_KNOWLEDGE)
    runs: list[RunConfig] = []
    archs: dict[str, ArchInfo] = {}
    report = None
    facts: dict[str, DataFacts] = {}
    if not problems.errors:  # planning a spec with known problems would only repeat them
        runs, archs = plan_runs(spec, spec_path, problems)
    if (check_paths if preflight is None else preflight) and not problems.errors:
        # the inputs themselves: weights against the config, the tokenizer, every data record rendered
        report = run_preflight(runs, archs, problems)
        if not problems.errors:  # what the model will see: template, truncation, the eval set
            facts = run_data_facts(runs, problems)
    problems.raise_if_errors()
    return Plan(
        spec=spec,
        spec_path=spec_path,
        runs=runs,
        archs=archs,
        warnings=list(problems.warnings),
        preflight=report,
        overrides=tuple(overrides),
        effective=data if overrides else None,
        data_facts=facts,
    )


def experiment_paths(spec: JobSpec) -> ExperimentPaths:
    """``<output_dir>/<experiment>``; a relative output_dir is relative to the current directory."""
    return ExperimentPaths(experiment_dir(spec.output_dir, spec.experiment))


def resolve_logging(logging: LoggingSpec, base_dir: Path) -> LoggingSpec:
    """A local MLflow store given as a relative path (``mlruns``, ``file:mlruns``) made absolute: ranks
    start in other working directories."""
    mlflow = logging.mlflow
    uri = mlflow.tracking_uri if mlflow else None
    if mlflow is None or uri is None or ("://" in uri and not uri.startswith("file:")):
        return logging
    path = uri.removeprefix("file:")
    if path.startswith("//"):  # file:///abs/path
        return logging
    absolute = resolve_path(path, base_dir)
    return logging.model_copy(
        update={"mlflow": mlflow.model_copy(update={"tracking_uri": f"file:{absolute}"})}
    )


def resolve_arch(model: ModelSpec, base_dir: Path) -> tuple[ArchInfo | None, str | None, str | None]:
    """(architecture, error, warning) for planning: local config.json, then the bundled descriptions."""
    if model.builtin == "tiny-glm":
        return tiny_glm_arch(), None, None
    names = bundled_arch_names()
    # A model that cannot run here (ChatGLM's remote code) is an error now, not a plan that fails in the job.
    unrunnable = model_problem(resolve_path(model.path, base_dir), model.arch, model.trust_remote_code)
    if unrunnable is not None:
        return None, unrunnable, None
    if model.path is not None:
        model_dir = Path(resolve_path(model.path, base_dir) or "")
        if (model_dir / "config.json").is_file():
            try:
                return arch_from_model_dir(str(model_dir), model.trust_remote_code), None, None
            except Exception as exc:  # a config transformers cannot build: fall back to the description
                warning = f"could not instantiate {model_dir}/config.json on the meta device ({exc})"
                if model.arch in names:
                    return (
                        bundled_arch(model.arch),
                        None,
                        warning + f"; planning with the bundled {model.arch}",
                    )
                return None, warning + f"; set model.arch to one of {', '.join(names)}", None
    if model.arch is not None:
        if model.arch not in names:
            return None, f"unknown architecture {model.arch!r}; bundled: {', '.join(names)}", None
        return bundled_arch(model.arch), None, None
    guess = guess_bundled_name(model.path or "")
    if guess is not None:
        return bundled_arch(guess), None, None
    return (
        None,
        (
            f"{model.path} is not on this machine and no architecture is named, so memory cannot be planned; "
            f"set model.arch to one of {', '.join(names)}"
        ),
        None,
    )


def _absolute_paths(config: dict[str, Any], base_dir: Path) -> None:
    config["model"]["path"] = resolve_path(config["model"].get("path"), base_dir)
    config["tokenizer"]["path"] = resolve_path(config["tokenizer"].get("path"), base_dir)
    for key in ("train_file", "eval_file"):
        config["data"][key] = resolve_path(config["data"].get(key), base_dir)


def _duplicate_name(problems: Problems, plan: RunPlan, first: RunPlan) -> None:
    """Two runs got one name: from two methods (they need distinct `name:`s), or from one method's
    sweep values that are written the same way in a name (launcher.plan.sweep.format_value)."""
    where_method: tuple[str | int, ...] = ("methods", plan.method_index)
    if first.method_index != plan.method_index:
        problems.error(
            problems.first_present((*where_method, "name"), where_method),
            f"duplicate run name {plan.name!r} (also produced by methods[{first.method_index}]); "
            "give the methods distinct `name:` values",
        )
        return
    differ = {k: (first.swept.get(k), v) for k, v in plan.swept.items() if first.swept.get(k) != v}
    shown = "; ".join(f"{k}: {a!r} and {b!r}" for k, (a, b) in differ.items())
    key = next(iter(differ), "")
    problems.error(
        problems.first_present(("sweep", "grid", key), ("sweep", "zip", key), where_method),
        f"duplicate run name {plan.name!r}: the sweep values {shown} are written the same way in a "
        "run name; use values that differ there (e.g. 1e-4 and 2e-4)",
    )


def _resource_key_path(problems: Problems, plan: RunPlan, key: str) -> tuple[str | int, ...]:
    """Where the value a resource problem is about was written: the method, the top level, or training."""
    parts = tuple(key.split("."))
    i = plan.method_index
    candidates: list[tuple[str | int, ...]] = [
        ("methods", i, *parts),
        ("methods", i, "overrides", key),
        parts,
    ]
    if key == "resources":
        candidates = [("methods", i, "resources"), ("resources",), ("methods", i, "method")]
    found = problems.first_present(*candidates)
    return tuple(found) if problems.has(found) else ("methods", i)


class _RunProblems:
    """Per-run problems, merged so a sweep of 12 runs with the same mistake gives one line naming them."""

    def __init__(self) -> None:
        self.by_cause: dict[tuple[tuple[str | int, ...], str], list[str]] = {}

    def add(self, path: Any, run: str, message: str) -> None:
        self.by_cause.setdefault((tuple(path), message), []).append(run)

    def flush(self, problems: Problems) -> None:
        for (path, message), names in self.by_cause.items():
            label = f"run {names[0]}" if len(names) == 1 else f"runs {', '.join(names)}"
            problems.error(path, f"{label}: {message}")


@dataclass(frozen=True)
class _Sections:
    """One expanded run's config sections, validated."""

    model: ModelSpec
    training: TrainingSpec
    tokenizer: TokenizerSpec
    data: DataSpec
    eval: EvalSpec

    @classmethod
    def of(cls, config: dict[str, Any]) -> _Sections:
        return cls(
            model=ModelSpec.model_validate(config["model"]),
            training=TrainingSpec.model_validate(config["training"]),
            tokenizer=TokenizerSpec.model_validate(config["tokenizer"]),
            data=DataSpec.model_validate(config["data"]),
            eval=EvalSpec.model_validate(config["eval"]),
        )


ArchCache = dict[str, tuple[ArchInfo | None, str | None, str | None]]


def _arch_of(model: ModelSpec, base_dir: Path, cache: ArchCache, problems: Problems) -> ArchInfo | None:
    """The run's architecture, resolved once per distinct model; None (with the error) if unknown."""
    key = repr(model.model_dump())
    if key not in cache:
        cache[key] = resolve_arch(model, base_dir)
    arch, arch_error, arch_warning = cache[key]
    if arch_warning:
        problems.warn(("model",), arch_warning)
    if arch is None:
        problems.error(
            problems.first_present(("model", "arch"), ("model", "path"), ("model",)), arch_error or ""
        )
    return arch


def _resources_of(
    spec: JobSpec,
    plan: RunPlan,
    sections: _Sections,
    arch: ArchInfo,
    problems: Problems,
    per_run: _RunProblems,
    base_dir: Path,
) -> ResolvedResources | None:
    """What the resource policy chooses for the run; None (with the problem) if it cannot."""
    where_method: tuple[str | int, ...] = ("methods", plan.method_index)
    try:
        layout = quantize_layout(param_layout(arch, plan.method), arch, sections.model.quantization)
    except LayoutError as exc:
        per_run.add(problems.first_present((*where_method, exc.key), where_method), plan.name, str(exc))
        return None
    explicit = dict(plan.resources)
    user_ds = explicit.pop("deepspeed", None)
    try:
        user_ds_path = None
        if user_ds is not None:  # a user's DeepSpeed JSON: its ZeRO stage and offload become the run's
            user_ds_path = Path(resolve_path(user_ds, base_dir) or user_ds)
            explicit = merge_file_resources(explicit, read_user_ds_config(user_ds_path), user_ds_path)
        resources = resolve_resources(
            method=plan.method,
            explicit=explicit,
            auto=plan.auto,
            training=sections.training,
            cluster=spec.cluster,
            arch=arch,
            layout=layout,
        )
        check_lora_variant(plan.method, resources, sections.model, arch)  # LoRA variants, QLoRA
        if user_ds_path is not None:
            resources.deepspeed = str(user_ds_path)
        return resources
    except (ResourceProblem, FileResourceConflict) as exc:
        per_run.add(_resource_key_path(problems, plan, exc.key), plan.name, str(exc))
        return None
    except UserError as exc:  # the user's DeepSpeed JSON cannot be read
        per_run.add(_resource_key_path(problems, plan, "resources.deepspeed"), plan.name, str(exc))
        return None


def _name_is_free(plan: RunPlan, seen: dict[str, RunPlan], problems: Problems) -> bool:
    """The run name fits the file system and no other run has it (reported otherwise)."""
    where_method: tuple[str | int, ...] = ("methods", plan.method_index)
    if too_long := name_too_long(plan.name):
        where_name = problems.first_present((*where_method, "name"), where_method)
        problems.error(where_name, f"run {too_long}; shorten the method's name or sweep fewer keys")
        return False
    if plan.name in seen:
        _duplicate_name(problems, plan, seen[plan.name])
        return False
    seen[plan.name] = plan
    return True


def _batch_problem(
    spec: JobSpec, plan: RunPlan, run: RunConfig, problems: Problems
) -> tuple[tuple[str | int, ...], str] | None:
    """(where, message) when the run's batch arithmetic does not work out, else None."""
    try:
        _, _, accum = batch_sizes(run)
    except UserError as exc:
        where = problems.first_present(("training", "global_batch_size"), ("training",))
        return tuple(where), str(exc).split(": ", 1)[-1]
    t = run.training
    accumulation_set = (
        "gradient_accumulation_steps" in spec.training.model_fields_set
        or "training.gradient_accumulation_steps" in {**plan.swept, **plan.method.overrides}
    )
    if t.global_batch_size is not None and accumulation_set and accum != t.gradient_accumulation_steps:
        return (
            ("training", "gradient_accumulation_steps"),
            f"global_batch_size {t.global_batch_size} = per_device_batch_size "
            f"{t.per_device_batch_size} x world size {run.resources.world_size} x {accum} accumulation "
            f"steps, not {t.gradient_accumulation_steps}; drop one of the two",
        )
    return None


def plan_runs(
    spec: JobSpec, spec_path: Path, problems: Problems
) -> tuple[list[RunConfig], dict[str, ArchInfo]]:
    """Every run of the spec as a RunConfig, with its architecture by run name; problems are collected,
    runs with problems are skipped."""
    per_run = _RunProblems()
    base_dir = spec_path.resolve().parent
    hostfile = resolve_path(spec.hostfile, base_dir)
    logging = resolve_logging(spec.logging, base_dir)
    runs: list[RunConfig] = []
    archs: dict[str, ArchInfo] = {}
    arch_cache: ArchCache = {}
    seen: dict[str, RunPlan] = {}
    for plan in expand(spec):
        _absolute_paths(plan.config, base_dir)
        try:
            sections = _Sections.of(plan.config)
        except ValidationError as exc:  # reported with positions by the spec checks; keep the first line
            per_run.add(("sweep",), plan.name, str(exc.errors()[0]["msg"]))
            continue
        arch = _arch_of(sections.model, base_dir, arch_cache, problems)
        if arch is None:
            continue
        resources = _resources_of(spec, plan, sections, arch, problems, per_run, base_dir)
        if resources is None or not _name_is_free(plan, seen, problems):
            continue
        run = build_run_config(
            experiment=spec.experiment,
            name=plan.name,
            method=plan.method,
            swept=plan.swept,
            model=sections.model,
            tokenizer=sections.tokenizer,
            data=sections.data,
            template=plan.config["template"],
            training=sections.training,
            eval=sections.eval,
            resources=resources,
            cluster=spec.cluster,
            local=spec.local,
            backend=spec.backend,
            hostfile=hostfile,
            logging=logging,
        )
        if (problem := _batch_problem(spec, plan, run, problems)) is not None:
            per_run.add(problem[0], plan.name, problem[1])
            continue
        if resources.deepspeed is not None:  # its "auto" values and conflicts, found now, not at write
            try:
                render_ds_config(run, arch.hidden_size)
            except UserError as exc:
                per_run.add(_resource_key_path(problems, plan, "resources.deepspeed"), plan.name, str(exc))
                continue
        run.run_id = run_id_of(run)
        runs.append(run)
        archs[run.name] = arch
    per_run.flush(problems)
    if spec.baseline is not None and runs and spec.baseline not in {r.name for r in runs}:
        problems.error(
            ("baseline",),
            f"no run is named {spec.baseline!r}; runs: {', '.join(r.name for r in runs)}",
            prefer_value=True,
        )
    return runs, archs


def lora_targets(run: RunConfig, arch: ArchInfo) -> list[str] | None:
    """The layer modules LoRA will wrap, resolved on the model (``q_proj``...), for the plan to show."""
    if not isinstance(run.method, LoraMethod):
        return None
    return short_module_names(lin.name for lin in arch.lora_linears(run.method.target_modules))


def facts_row(run: RunConfig, facts: DataFacts | None) -> dict[str, Any]:
    """The plan's data columns of one run: known facts, else what the spec alone says."""
    if facts is not None:
        return asdict(facts)
    from launcher.data.templates import AUTO, template_used

    known = "auto (resolved by the rank)"
    if run.template != AUTO:
        known = template_used(run.template, run.template)
    return asdict(DataFacts(template_used=known))


def plan_row(run: RunConfig, arch: ArchInfo) -> dict[str, Any]:
    """One run as ``launcher plan --json`` prints it and plan.json stores it (``arch``: the run's
    architecture as the plan resolved it)."""
    r = run.resources
    train_batch, micro, accum = batch_sizes(run)
    return {
        "name": run.name,
        "run_id": run.run_id,
        "method": method_label(run.method.model_dump(mode="json")),  # the table's: lora r8 dora
        "method_label": describe(run.method),
        "lora_targets": lora_targets(run, arch),
        "swept": run.swept,
        "nodes": r.nodes,
        "gpus_per_node": r.gpus_per_node,
        "world_size": r.world_size,
        "zero_stage": r.zero_stage,
        "offload_optimizer": r.offload_optimizer,
        "offload_param": r.offload_param,
        "gradient_checkpointing": r.gradient_checkpointing,
        "train_batch_size": train_batch,
        "micro_batch_size": micro,
        "gradient_accumulation_steps": accum,
        "est_mem_gib": r.est_mem_gib,
        "est_reserved_gib": r.est_reserved_gib,
        "fits": r.fits,
    }


def _existing_run_id(path: Path, planned_id: str) -> str:
    """The identity of the run a run.yaml holds: its run_id, recomputed when it differs from the plan's
    (a run dir written by an older launcher stamped ids that hashed placement too)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return "<unreadable>"
    stored = str(data.get("run_id")) if isinstance(data, dict) else "<unreadable>"
    if stored == planned_id or not isinstance(data, dict):
        return stored
    try:
        return run_id_of(RunConfig.model_validate(data))
    except ValidationError:
        return stored


def effective_spec_text(plan: Plan) -> str:
    """What ``<experiment>/spec.yaml`` records: the spec file as written, or with overrides the
    effective spec (the file's data with them applied) under a comment that lists them."""

    def dump(data: Any) -> str:
        return str(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))

    if plan.effective is not None:
        lines = [f"# {plan.spec_path} with {len(plan.overrides)} command-line override(s):"]
        lines += [f"#   {text!r}" if not text.isprintable() else f"#   {text}" for text in plan.overrides]
        return "\n".join(lines) + "\n" + dump(plan.effective)
    try:
        return plan.spec_path.read_text(encoding="utf-8")
    except OSError:
        return dump(plan.spec.model_dump(mode="json"))


def write_run_dirs(
    plan: Plan, runs: Sequence[RunConfig] | None = None, *, force: bool = False
) -> ExperimentPaths:
    """Materialise the experiment: spec.yaml, plan.json and per run (all of the plan's, or ``runs``)
    run.yaml, ds_config.json, status.json.

    A run directory that already holds a run with a different id (the spec changed under the same name)
    is refused unless ``force``, which replaces it. A directory with the same run id is kept as it is
    (its status and results stay), so re-planning or re-submitting an experiment is safe.
    """
    spec, spec_path = plan.spec, plan.spec_path
    runs = plan.runs if runs is None else list(runs)
    exp = experiment_paths(spec)
    conflicts: list[str] = []
    replace: set[str] = set()
    for run in runs:
        existing = exp.run(run.name).run_yaml
        if existing.exists():
            old_id = _existing_run_id(existing, run.run_id)
            if old_id != run.run_id:
                conflicts.append(
                    f"{exp.run(run.name).root}: holds run_id {old_id}, the plan has {run.run_id}"
                )
                replace.add(run.name)
    if conflicts and not force:
        raise UserError(
            "these run directories belong to a different configuration of the same run name:\n  "
            + "\n  ".join(conflicts)
            + "\nuse --force to replace them (their results are deleted), or change `experiment:`"
        )
    # Render everything before writing anything: a failure must leave nothing half-written.
    rendered = [(run, render_ds_config(run, plan.archs[run.name].hidden_size)) for run in runs]
    spec_text = effective_spec_text(plan)
    exp.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(exp.spec_yaml, spec_text)
    write_json_atomic(
        exp.plan_json,
        {
            "experiment": spec.experiment,
            "spec": str(spec_path.resolve()),
            "created_at": utc_now(),
            "runs": [plan_row(run, plan.archs[run.name]) for run in runs],
        },
    )

    def write_run(run: RunConfig, ds_config: dict[str, Any]) -> None:
        paths = exp.run(run.name)
        if run.name in replace and paths.root.exists():
            shutil.rmtree(paths.root)
        fresh = not paths.status_json.exists()
        paths.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(paths.run_yaml, run.to_yaml())
        write_json_atomic(paths.ds_config, ds_config)
        if fresh:
            update_status(paths, RunState.PLANNED)

    # Each file is fsynced; fsync waits on the disk with the GIL released, so threads overlap the waits
    # (a 1,000-run sweep otherwise spends most of its plan time in 3,000 sequential fsyncs).
    with ThreadPoolExecutor(max_workers=_WRITE_THREADS) as pool:
        for future in [pool.submit(write_run, run, ds_config) for run, ds_config in rendered]:
            future.result()
    return exp

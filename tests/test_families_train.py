"""Every method on every family, through the real entrypoint: Freeze, P-Tuning v1/v2, LoRA (all-linear,
the default, and the family's attention projections) on one rank, and full fine-tuning on 2 ranks under
ZeRO-3 with optimizer + parameter offload and gradient checkpointing. The data comes in every format and
file kind, rendered through each family's chat template (GPT-2 has none: the named chatglm template).

One process trains all single-rank runs one after another, and one pair of processes all 2-rank runs
(tests/family_worker.py), so the imports are paid twice, not 42 times. A few steps each."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from families import FAMILIES
from test_formats import write
from train_helpers import REPO, make_run_dir, metrics, rank_env, rank_output

from launcher.backends.launch_env import free_port
from launcher.rundir.paths import RunPaths, read_json

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("family_worker.py")
SINGLE_RANK: dict[str, dict[str, Any]] = {
    "freeze": {"method": "freeze", "trainable_layers": 1},
    "ptuning_v1": {"method": "ptuning", "version": "v1", "pre_seq_len": 4},
    "ptuning_v2": {"method": "ptuning", "version": "v2", "pre_seq_len": 4},
    "lora": {"method": "lora", "r": 4},  # target_modules defaults to all-linear
}
# How each family's data comes: (format, file kind), or the bundled ChatGLM-format data
DATA: dict[str, tuple[str, str] | None] = {
    "qwen2": ("messages", "jsonl"),
    "llama3": ("sharegpt", "parquet"),
    "llama2": None,
    "glm4": ("messages", "datasets"),
    "glm4-0414": ("alpaca", "json"),
    "phi3": ("sharegpt", "jsonl"),
    "gpt2": None,
}
COMMON: dict[str, Any] = {
    "max_steps": 3,
    "save_steps": 100,
    "train_examples": 24,
    "eval_examples": 4,
    "micro_batch": 4,
    "accumulation": 1,
    "learning_rate": 1e-2,
    "template": "auto",
}


def convert(record: dict[str, Any], fmt: str) -> dict[str, Any]:
    """A bundled ChatGLM-format record (prompt/response/history) in another format."""
    turns = [*record["history"], [record["prompt"], record["response"]]]
    if fmt == "alpaca":
        return {
            "instruction": record["prompt"],
            "input": "",
            "output": record["response"],
            "history": record["history"],
        }
    if fmt == "sharegpt":
        return {
            "conversations": [
                {"from": f, "value": t} for q, a in turns for f, t in (("human", q), ("gpt", a))
            ]
        }
    return {
        "messages": [{"role": r, "content": t} for q, a in turns for r, t in (("user", q), ("assistant", a))]
    }


def data_spec(family: str, dialogue_files: tuple[Path, Path], root: Path) -> dict[str, Any] | None:
    kind = DATA[family]
    if kind is None:
        return None
    fmt, file_kind = kind
    files = {}
    for split, source in zip(("train", "eval"), dialogue_files, strict=True):
        records = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()[:40]]
        directory = root / "data" / family / split
        directory.mkdir(parents=True)
        files[f"{split}_file"] = str(write(file_kind, [convert(r, fmt) for r in records], directory))
    return {**files, "format": "auto"}


def run_worker(runs: list[RunPaths], world_size: int, out: Path) -> None:
    port = free_port()
    env = [rank_env(rank, world_size, port) for rank in range(world_size)]
    if world_size == 1:
        env = [{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}]
        env[0].update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out), *(str(r.root) for r in runs)],
            cwd=REPO,
            env=env[rank],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.wait(timeout=600)


@pytest.fixture(scope="module")
def family_runs(
    tmp_path_factory: pytest.TempPathFactory, family_dirs: dict[str, Path], dialogue_files: tuple[Path, Path]
) -> dict[tuple[str, str], RunPaths]:
    root = tmp_path_factory.mktemp("families")
    single: dict[tuple[str, str], RunPaths] = {}
    full: dict[tuple[str, str], RunPaths] = {}
    for family, model_dir in family_dirs.items():
        data = data_spec(family, dialogue_files, root)
        base = {"model_path": model_dir, "data": data, **COMMON}
        methods = {
            **SINGLE_RANK,
            "lora_attn": {"method": "lora", "r": 4, "target_modules": list(FAMILIES[family].lora_attention)},
        }
        for name, spec in methods.items():
            single[family, name] = make_run_dir(root / family, name=name, method_spec=spec, **base)
        full[family, "full"] = make_run_dir(
            root / family,
            name="full",
            method_spec={"method": "full"},
            world_size=2,
            zero_stage=3,
            offload=True,
            gradient_checkpointing=True,
            **base,
        )
    run_worker(list(single.values()), 1, root / "single.json")
    run_worker(list(full.values()), 2, root / "full.json")
    runs = {**single, **full}
    print("\neval loss after 3 steps (family x method):\n" + _table(runs))
    return runs


def _table(runs: dict[tuple[str, str], RunPaths]) -> str:
    methods = [*SINGLE_RANK, "lora_attn", "full"]
    lines = ["| family | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for family in FAMILIES:
        cells = []
        for method in methods:
            result = (
                read_json(runs[family, method].result_json)
                if runs[family, method].result_json.exists()
                else {}
            )
            cells.append(f"{result['eval_loss']:.2f}" if result.get("state") == "COMPLETED" else "FAILED")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_completes_on_the_family(
    family: str, family_runs: dict[tuple[str, str], RunPaths]
) -> None:
    from transformers import AutoTokenizer

    from launcher.data.templates import model_type_of, resolve_template
    from launcher.rundir.run_config import RunConfig
    from launcher.train.data import Example, encode_prompt, load_examples, resolve_data_files

    for (fam, method), paths in family_runs.items():
        if fam != family:
            continue
        assert paths.result_json.is_file(), f"{family}/{method}:\n{rank_output(paths)}"
        result = read_json(paths.result_json)
        assert result["state"] == "COMPLETED", f"{family}/{method}: {result['reason']}\n{rank_output(paths)}"
        assert result["steps"] == 3 and len(metrics(paths)) == 3 and math.isfinite(result["eval_loss"])
        assert result["world_size"] == (2 if method == "full" else 1)
        # the export carries the tokenizer and the chat template the run trained with: its prompt is
        # token for token what training and eval gave the model
        cfg = RunConfig.from_yaml_file(paths.run_yaml)
        query = load_examples(resolve_data_files(cfg.data)[1], cfg.data.format)[0].query
        original = AutoTokenizer.from_pretrained(cfg.model.path)
        template = resolve_template(cfg.template, original, model_type_of(Path(cfg.model.path)))
        trained = encode_prompt(Example("e", [], query, ""), original, template, 4096)
        exported = AutoTokenizer.from_pretrained(paths.final)
        messages = [{"role": "user", "content": query}]
        assert (
            exported.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == trained
        )
        assert (paths.final / "generation_config.json").is_file()

"""Side by side with LLaMA-Factory and axolotl: our entrypoint vs ``llamafactory-cli train`` and
``axolotl train`` on the same model, data, token sequences and hyperparameters.

    .venv/bin/python bench/peer_bench.py --quick        # LoRA and full, 1 repeat, 592 examples
    .venv/bin/python bench/peer_bench.py                # 3 interleaved repeats, 2992 examples

LLaMA-Factory (pinned: ``LLAMAFACTORY_VERSION``) goes into its own venv, created by the bench under
``--work`` (with the CPU build of torch): its pins on transformers, peft and datasets differ from ours.
It imports torchaudio at start-up, and no torchaudio on PyPI loads with torch 2.13: the bench puts an
empty ``torchaudio`` module in that venv (text training never uses it). axolotl (``AXOLOTL_VERSION``,
the newest for Python 3.11) gets its own venv the same way (``--no-axolotl`` leaves it out); on CPU its
Triton LoRA kernels are switched off, and it learns the same layout through its custom ``format``.
It shuffles the file while preparing it, so its sequences are compared with ours as a set.

Model: a tiny Qwen2 (hidden 128, 2 layers, 4 heads / 2 KV heads) built from a config with random
weights, with a byte-level BPE tokenizer trained on the training file (Qwen2's own pre-tokenizer, so
both venvs' transformers load it as the same ``Qwen2Tokenizer``). Data: the bundled dialogues as an
alpaca file (instruction = the dialogue so far, output = the answer; lengths vary ~3x).

Same token sequences: LLaMA-Factory's ``vicuna`` template with its default system text switched off
(``default_system: ""``) renders ``USER: {query} ASSISTANT:`` + answer + eos, and our side gets that
custom template. Before training, the bench tokenizes every train and eval example through both
sides' own code (LLaMA-Factory's ``get_dataset`` in its venv, our ``encode_examples``) and stops if
any input id or label differs. Both learn the answer and eos only (the prompt is masked).

Same settings: one epoch, micro-batch, accumulation, learning rate, linear decay to 0 without warm-up,
AdamW, clipping 1.0, no weight decay, batches grouped by length, fp32 on CPU, no checkpoints, one
process; each repeat uses seed ``seed + repeat`` on both sides (their spread is the noise). Both
normalise the loss per target token over the accumulated batch, both log every step, and the bench
computes the train loss from those per-step logs the same way for both (mean of the last
``LOSS_WINDOW`` steps). Eval loss: per target token over the whole eval file on both sides (ours
does that; LLaMA-Factory's Trainer averages per-batch means, so it gets the whole eval file as one
batch).

Recorded per run: real (non-pad) tokens/s (ours: result.json; LLaMA-Factory: the Trainer's
``num_input_tokens_seen`` counted as ``non_padding`` over its ``train_runtime``), peak RSS of the process
tree, train loss, eval loss, wall time from process start to exit, and the part of it outside the
training loop (start-up, data, eval, saving). The last line: ``ours vs LLaMA-Factory: tokens/s X.XXx,
wall Y.YYx (lora)``. Not part of the test suite (tests/test_peer_bench.py runs its pieces that need no
LLaMA-Factory).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

LLAMAFACTORY_VERSION = "0.9.5"
AXOLOTL_VERSION = "0.19.0"
"""The newest axolotl for Python 3.11 (0.20 and later need 3.12)."""
TORCH_CPU = "torch==2.13.0"
QWEN2_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}
METHODS = ("lora", "full")
MODEL_DIR_NAME = "qwen2-tiny-bpe1024"
"""Named after its tokenizer: a model directory of an earlier bench version is never reused."""
VOCAB_SIZE = 1024
EOS, PAD = "<|endoftext|>", "<|pad|>"
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
"""transformers' Qwen2Tokenizer pre-tokenizer: it rebuilds the pipeline around a tokenizer.json's vocab
for any ``model_type: qwen2`` model (transformers 5.24 does so even for another ``tokenizer_class``), so
the bench's tokenizer uses the same one and loads alike in both venvs."""
LF_TEMPLATE = "vicuna"
"""``USER: {{content}} ASSISTANT:``, then the answer and eos (LLaMA-Factory's template.py); its default
system text is switched off with ``default_system: ""``."""
OUR_TEMPLATE = "USER: {query} ASSISTANT:"
AXOLOTL_FORMAT = "USER: {instruction} ASSISTANT:"
"""axolotl's custom instruction format for the same layout (it adds eos after the output)."""
LOSS_WINDOW = 10
"""Train loss = mean of the last this many optimizer steps' losses, from each side's per-step log."""


@dataclass(frozen=True)
class Settings:
    examples: int
    eval_examples: int
    repeats: int
    micro_batch: int = 8
    accumulation: int = 2
    cutoff_len: int = 320
    lora_lr: float = 2e-3
    full_lr: float = 5e-4
    lora_rank: int = 8
    lora_dropout: float = 0.0
    seed: int = 42

    def learning_rate(self, method: str) -> float:
        return self.lora_lr if method == "lora" else self.full_lr


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="592 examples, 1 repeat (under 15 min)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3, quick 1)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/peer-bench"), help="venv, model, data, runs")
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    parser.add_argument("--no-axolotl", action="store_true", help="LLaMA-Factory only")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    wanted = 600 if args.quick else 3000
    step = Settings.micro_batch * Settings.accumulation
    # whole optimizer steps only: the Trainer runs a last step on a partial window, our entrypoint drops it
    examples = wanted - wanted % step
    return args, Settings(examples=examples, eval_examples=100, repeats=repeats)


def _bundled_records(which: str) -> list[dict[str, Any]]:
    from launcher.builtins.demo_data import ensure_builtin_data

    train_src, eval_src = ensure_builtin_data("dialogue")
    src = train_src if which == "train" else eval_src
    return [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_tokenizer(dest: Path) -> None:
    """A byte-level BPE (``VOCAB_SIZE``) trained on the bundled training dialogues and the template's
    text, with Qwen2's normaliser, pre-tokenizer and decoder, saved for ``Qwen2Tokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [_alpaca(r)["instruction"] + _alpaca(r)["output"] for r in _bundled_records("train")]
    tokenizer.train_from_iterator([*texts, OUR_TEMPLATE], trainer)
    tokenizer.save(str(dest / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "bos_token": None,
        "model_max_length": QWEN2_CONFIG["max_position_embeddings"],
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")


def build_qwen2(dest: Path) -> Path:
    """The tiny Qwen2 both sides train, with its own tokenizer (built once)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if (dest / "config.json").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build_tokenizer(tmp)
    (tmp / "config.json").write_text(json.dumps({"model_type": "qwen2"}), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp))
    config = Qwen2Config(
        **QWEN2_CONFIG,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp)  # writes the real config.json over the stub
    os.replace(tmp, dest)
    return dest


def _alpaca(record: dict[str, Any]) -> dict[str, str]:
    """One bundled dialogue as alpaca: the earlier turns and the question as instruction."""
    history = record.get("history") or []
    context = "".join(f"{q}{a}" for q, a in history)
    return {"instruction": context + record["prompt"], "input": "", "output": record["response"]}


def write_data(work: Path, settings: Settings) -> tuple[Path, Path]:
    """(train.json, eval.json) in alpaca format, plus LLaMA-Factory's dataset_info.json next to them."""
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for name, limit in (("train", settings.examples), ("eval", settings.eval_examples)):
        records = _bundled_records(name)[:limit]
        path = data_dir / f"{name}.json"
        path.write_text(json.dumps([_alpaca(r) for r in records], ensure_ascii=False), encoding="utf-8")
        out.append(path)
    info = {name: {"file_name": f"{name}.json"} for name in ("train", "eval")}
    (data_dir / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return out[0], out[1]


def llamafactory_config(
    settings: Settings, method: str, model_dir: Path, data_dir: Path, out: Path, seed: int | None = None
) -> dict:
    config: dict[str, Any] = {
        "model_name_or_path": str(model_dir),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": method,
        "dataset": "train",
        "eval_dataset": "eval",
        "dataset_dir": str(data_dir),
        "template": LF_TEMPLATE,
        "default_system": "",
        "cutoff_len": settings.cutoff_len,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "per_device_train_batch_size": settings.micro_batch,
        # the whole eval file in one batch: the Trainer's eval loss is then per target token, as ours
        "per_device_eval_batch_size": settings.eval_examples,
        "gradient_accumulation_steps": settings.accumulation,
        "learning_rate": settings.learning_rate(method),
        "num_train_epochs": 1.0,
        "lr_scheduler_type": "linear",
        "warmup_ratio": 0.0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "train_sampling_strategy": "group_by_length",
        "eval_strategy": "no",
        "do_eval": True,
        "seed": settings.seed if seed is None else seed,
        "include_num_input_tokens_seen": "non_padding",  # True would count the padding too
        "report_to": "none",
        "use_cpu": True,
        "dataloader_num_workers": 0,
    }
    if method == "lora":
        config.update(
            {
                "lora_rank": settings.lora_rank,
                "lora_alpha": 2 * settings.lora_rank,
                "lora_dropout": settings.lora_dropout,
                "lora_target": "all",
            }
        )
    return config


def our_spec(
    settings: Settings,
    method: str,
    model_dir: Path,
    train: Path,
    eval_: Path,
    out: Path,
    seed: int | None = None,
) -> dict:
    lora = {
        "r": settings.lora_rank,
        "lora_alpha": 2 * settings.lora_rank,
        "lora_dropout": settings.lora_dropout,  # ours defaults to 0.05, the peers to 0
        "target_modules": "all-linear",
    }
    return {
        "experiment": f"peer-{method}",
        "output_dir": str(out),
        "backend": "local",
        "model": {"path": str(model_dir)},
        "data": {"format": "alpaca", "train_file": str(train), "eval_file": str(eval_)},
        "template": OUR_TEMPLATE,
        "training": {
            "precision": "fp32",
            "learning_rate": settings.learning_rate(method),
            "lr_scheduler": "linear",
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "num_epochs": 1,
            "per_device_batch_size": settings.micro_batch,
            "gradient_accumulation_steps": settings.accumulation,
            "max_length": settings.cutoff_len,
            "max_source_length": settings.cutoff_len,
            "max_target_length": settings.cutoff_len,
            "group_by_length": True,
            "logging_steps": 1,
            "save_steps": 1_000_000,
            "seed": settings.seed if seed is None else seed,
        },
        "eval": {"num_samples": 8, "max_new_tokens": 16},  # generation cannot be off: the least of it
        "methods": [{"method": method, "name": method, **(lora if method == "lora" else {})}],
        "resources": {"nodes": 1, "gpus_per_node": 1, "zero_stage": 0, "gradient_checkpointing": False},
    }


Sequences = dict[str, list[tuple[list[int], list[int]]]]
"""split ("train", "eval") -> [(input_ids, labels)], in file order."""


def our_sequences(spec_path: Path) -> Sequences:
    """What our entrypoint trains and evaluates on: its tokenizer loading and ``encode_examples``."""
    from launcher.plan.planner import load_and_plan
    from launcher.train.data import encode_examples, load_datasets
    from launcher.train.setup import load_tokenizer

    cfg = load_and_plan(spec_path).runs[0]
    tokenizer = load_tokenizer(cfg)
    sets = load_datasets(cfg.data)
    return {
        split: [(list(e.input_ids), list(e.labels)) for e in encode_examples(examples, fmt, cfg, tokenizer)]
        for split, examples, fmt in (
            ("train", sets.train, sets.train_format),
            ("eval", sets.eval, sets.eval_format),
        )
    }


LF_SEQUENCES_SCRIPT = """
import json, sys, yaml
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer

model_args, data_args, training_args, _, _ = get_train_args(yaml.safe_load(open(sys.argv[1])))
module = load_tokenizer(model_args)
template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
data = get_dataset(template, model_args, data_args, training_args, stage="sft", **module)
out = {split: [[row["input_ids"], row["labels"]] for row in data[key]]
       for split, key in (("train", "train_dataset"), ("eval", "eval_dataset"))}
json.dump(out, open(sys.argv[2], "w"))
"""


def llamafactory_sequences(cli: Path, config: dict, out: Path) -> Sequences:
    """What LLaMA-Factory trains and evaluates on: its own ``get_dataset`` (template, tokenizer, masks),
    run in its venv on the training config."""
    out.mkdir(parents=True, exist_ok=True)
    config_path, dump = out / "sequences.yaml", out / "sequences.json"
    config_path.write_text(yaml.safe_dump(config))
    python = cli.parent / "python"
    done = subprocess.run(
        [str(python), "-c", LF_SEQUENCES_SCRIPT, str(config_path), str(dump)],
        env=_env(),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"LLaMA-Factory could not tokenize the data:\n{done.stderr[-3000:]}")
    raw = json.loads(dump.read_text())
    return {split: [(ids, labels) for ids, labels in rows] for split, rows in raw.items()}


def sequence_mismatch(
    ours: Sequences, theirs: Sequences, decode: Any = None, peer: str = "LLaMA-Factory", ordered: bool = True
) -> str | None:
    """None when both sides tokenize every example to the same input ids and labels; else what differs
    first, in words (``decode``: ids -> text, to show the two renderings). ``ordered=False``: compare as
    sorted lists (a peer that shuffles the file while preparing it)."""
    for split in ("train", "eval"):
        a, b = ours.get(split, []), theirs.get(split, [])
        if len(a) != len(b):
            return f"{split}: ours has {len(a)} sequences, {peer} {len(b)}"
        if not ordered:
            a, b = sorted(a), sorted(b)
        for index, ((ids_a, labels_a), (ids_b, labels_b)) in enumerate(zip(a, b, strict=True)):
            what = "input ids" if ids_a != ids_b else "labels" if labels_a != labels_b else None
            if what is None:
                continue
            shown = ""
            if decode is not None:
                shown = (
                    f"\n  ours:{' ' * max(1, len(peer) - 3)}{decode(ids_a)!r}\n  {peer}: {decode(ids_b)!r}"
                )
            where = f"{split} example {index}" if ordered else f"{split} sequence {index} (sorted)"
            return (
                f"{where}: the {what} differ (ours {len(ids_a)} tokens, "
                f"{sum(x != -100 for x in labels_a)} learned; {peer} {len(ids_b)} tokens, "
                f"{sum(x != -100 for x in labels_b)} learned){shown}"
            )
    return None


def check_same_sequences(
    cli: Path,
    settings: Settings,
    model_dir: Path,
    data: tuple[Path, Path],
    work: Path,
    axolotl_cli: Path | None = None,
) -> int:
    """Stop the bench unless every side trains and evaluates on identical token sequences; the real
    tokens of the training sequences when they do."""
    from transformers import AutoTokenizer

    out = work / "runs" / "sequences"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec_path = out / "ours.yaml"
    spec_path.write_text(yaml.safe_dump(our_spec(settings, "lora", model_dir, *data, out / "runs")))
    theirs_config = llamafactory_config(settings, "lora", model_dir, data[0].parent, out / "output")
    ours, theirs = our_sequences(spec_path), llamafactory_sequences(cli, theirs_config, out)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    problems = [sequence_mismatch(ours, theirs, tokenizer.decode)]
    if axolotl_cli is not None:
        axo_config = axolotl_config(settings, "lora", model_dir, data[0].parent, out / "axolotl")
        axo = axolotl_sequences(axolotl_cli, axo_config, out / "axolotl")
        problems.append(sequence_mismatch(ours, axo, tokenizer.decode, "axolotl", ordered=False))
    for problem in problems:
        if problem:
            raise SystemExit(f"the sides would train on different token sequences: {problem}")
    longest = max(len(ids) for split in ours.values() for ids, _ in split)
    if longest >= settings.cutoff_len:
        raise SystemExit(
            f"a sequence has {longest} tokens: raise cutoff_len above it (each side cuts its own way)"
        )
    sides = "ours, LLaMA-Factory" + (" and axolotl" if axolotl_cli else "")
    print(
        f"token sequences: identical for {sides} ({len(ours['train'])} train, {len(ours['eval'])} eval, "
        f"longest {longest} tokens)",
        flush=True,
    )
    return sum(len(ids) for ids, _ in ours["train"])


def window_mean(losses: list[float], window: int = LOSS_WINDOW) -> float | None:
    """Mean of the last ``window`` per-step losses (None without any)."""
    tail = losses[-window:]
    return sum(tail) / len(tail) if tail else None


def install_peer(work: Path, package: str, version: str, command: str) -> tuple[Path, bool]:
    """A peer's own venv under ``work`` with the CPU torch and ``package==version``: (the path of its
    ``command``, whether it was installed just now)."""
    venv = work / f"{package}-{version}"
    cli = venv / "bin" / command
    if cli.is_file():
        return cli, False
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_CPU, f"{package}=={version}"], check=True)
    return cli, True


def ensure_llamafactory(work: Path) -> Path:
    """LLaMA-Factory's own venv (created once): the path of its ``llamafactory-cli``."""
    cli, installed = install_peer(work, "llamafactory", LLAMAFACTORY_VERSION, "llamafactory-cli")
    if not installed:
        return cli
    venv = cli.parent.parent
    # pip pairs the CPU torch with PyPI's torchvision/torchaudio, built against another torch: importing
    # transformers then fails (operator torchvision::nms does not exist), and PyPI's newest torchaudio
    # (2.11.1) does not load with torch 2.13. Text training needs neither, but llamafactory imports
    # torchaudio at start-up (data/mm_plugin.py, for audio inputs): an empty module stands in for it.
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio"], check=True)
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    stand_in = Path(site) / "torchaudio" / "__init__.py"
    stand_in.parent.mkdir(exist_ok=True)
    stand_in.write_text('"""Stand-in (bench/peer_bench.py): no torchaudio loads with torch 2.13."""\n')
    return cli


def run_measured(
    cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None
) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS GiB of the process tree, sampled every 0.2 s)."""
    import psutil

    started = time.perf_counter()
    peak = 0
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.2)
    return proc.returncode, time.perf_counter() - started, peak / 2**30


def _env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "PYTHONPATH"))}
    return keep | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


def run_ours(
    settings: Settings, method: str, model_dir: Path, data: tuple[Path, Path], out: Path, seed: int
) -> dict:
    from launcher.plan.planner import load_and_plan, write_run_dirs
    from launcher.rundir.paths import iter_jsonl, read_json

    spec_path = out / f"{method}.yaml"
    out.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(yaml.safe_dump(our_spec(settings, method, model_dir, *data, out / "runs", seed)))
    exp = write_run_dirs(load_and_plan(spec_path), force=True)
    run_dir = exp.run(method).root
    env = _env() | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code, wall, rss = run_measured(
        [sys.executable, "-m", "launcher.train", str(run_dir)], out / "ours.log", env
    )
    result = read_json(run_dir / "result.json") if code == 0 else {}
    steps = list(iter_jsonl(run_dir / "metrics.jsonl")) if code == 0 else []
    train_s = result.get("train_time_s")
    return {
        "state": result.get("state", f"exit {code}"),
        "tokens_per_s": result.get("tokens_per_s"),
        "train_loss": window_mean([float(m["loss"]) for m in steps if m.get("loss") is not None]),
        "eval_loss": result.get("eval_loss"),
        "peak_rss_gib": rss,
        "wall_s": wall,
        "train_s": train_s,
        "outside_train_s": wall - train_s if train_s else None,
        "startup_s": result.get("startup_s"),
        # after the last step: final checkpoint, export, eval loss, generation of eval.num_samples answers
        "after_train_s": wall - result["startup_s"] - train_s
        if train_s and result.get("startup_s")
        else None,
        "steps": len(steps),
        "lrs": [float(m["lr"]) for m in steps if m.get("lr") is not None],
    }


def run_llamafactory(
    cli: Path, settings: Settings, method: str, model_dir: Path, out: Path, seed: int
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    config = llamafactory_config(settings, method, model_dir, model_dir.parent / "data", out / "output", seed)
    config_path = out / f"{method}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    code, wall, rss = run_measured([str(cli), "train", str(config_path)], out / "llamafactory.log", _env())
    results: dict[str, Any] = {}
    for name in ("train_results.json", "eval_results.json", "trainer_state.json"):
        path = out / "output" / name
        if path.is_file():
            results.update(json.loads(path.read_text()))
    logged = [h for h in results.get("log_history", []) if "loss" in h]
    tokens = results.get("num_input_tokens_seen")
    runtime = results.get("train_runtime")
    return {
        "state": "COMPLETED" if code == 0 else f"exit {code}",
        "tokens_per_s": tokens / runtime if tokens and runtime else None,
        "train_loss": window_mean([float(h["loss"]) for h in logged]),
        "eval_loss": results.get("eval_loss"),
        "peak_rss_gib": rss,
        "wall_s": wall,
        "train_s": runtime,
        "outside_train_s": wall - runtime if runtime else None,
        "eval_s": results.get("eval_runtime"),
        "startup_s": None,
        "steps": len(logged),
        "lrs": [float(h["learning_rate"]) for h in logged if "learning_rate" in h],
    }


def axolotl_config(
    settings: Settings, method: str, model_dir: Path, data_dir: Path, out: Path, seed: int | None = None
) -> dict:
    def dataset(name: str) -> dict[str, Any]:
        fields = {"field_instruction": "instruction", "field_output": "output"}
        layout = {"format": AXOLOTL_FORMAT, "no_input_format": AXOLOTL_FORMAT}
        return {
            "path": str(data_dir / f"{name}.json"),
            "ds_type": "json",
            "split": "train",
            "type": fields | layout,
        }

    config: dict[str, Any] = {
        "base_model": str(model_dir),
        "datasets": [dataset("train")],
        "test_datasets": [dataset("eval")],
        "val_set_size": 0,
        "skip_prepare_dataset": True,  # saving the prepared set hangs in datasets' process pool here
        "dataset_num_proc": 1,
        "output_dir": str(out),
        "dataset_prepared_path": str(out / "prepared"),  # else last_run_prepared/ in the working directory
        "sequence_len": settings.cutoff_len,
        "micro_batch_size": settings.micro_batch,
        "eval_batch_size": settings.eval_examples,  # one batch: the eval loss per token, as ours
        "gradient_accumulation_steps": settings.accumulation,
        "num_epochs": 1,
        "learning_rate": settings.learning_rate(method),
        "lr_scheduler": "linear",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optimizer": "adamw_torch",
        "group_by_length": True,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "logging_steps": 1,
        "save_strategy": "no",
        # evals_per_epoch: 1 with one epoch gives no eval at all; an epoch strategy also evals at the start
        "eval_strategy": "epoch",
        "seed": settings.seed if seed is None else seed,
    }
    if method == "lora":
        config |= {
            "adapter": "lora",
            "lora_r": settings.lora_rank,
            "lora_alpha": 2 * settings.lora_rank,
            "lora_dropout": settings.lora_dropout,
            "lora_target_linear": True,
            # axolotl turns its Triton LoRA kernels on by itself; they allocate on "cuda"
            **{f"lora_{part}_kernel": False for part in ("mlp", "qkv", "o", "embedding")},
        }
    return config


AXOLOTL_SEQUENCES_SCRIPT = """
import json, sys
from axolotl.cli.config import load_cfg
from axolotl.common.datasets import load_datasets

meta = load_datasets(cfg=load_cfg(sys.argv[1]))
out = {split: [[list(row["input_ids"]), list(row["labels"])] for row in data]
       for split, data in (("train", meta.train_dataset), ("eval", meta.eval_dataset))}
json.dump(out, open(sys.argv[2], "w"))
"""


def _axolotl_env(cli: Path) -> dict[str, str]:
    # its launcher looks for `accelerate` on PATH; no telemetry (no network here: it retries and waits)
    path = f"{cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return _env() | {"PATH": path, "AXOLOTL_DO_NOT_TRACK": "1"}


def axolotl_sequences(cli: Path, config: dict, out: Path) -> Sequences:
    """What axolotl trains and evaluates on: its own dataset loading, in its venv."""
    out.mkdir(parents=True, exist_ok=True)
    config_path, dump = out / "sequences.yaml", out / "sequences.json"
    config_path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [str(cli.parent / "python"), "-c", AXOLOTL_SEQUENCES_SCRIPT, str(config_path), str(dump)],
        env=_axolotl_env(cli),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out,
    )
    if done.returncode != 0:
        raise SystemExit(f"axolotl could not tokenize the data:\n{done.stderr[-3000:]}")
    raw = json.loads(dump.read_text())
    return {split: [(ids, labels) for ids, labels in rows] for split, rows in raw.items()}


def ensure_axolotl(work: Path) -> Path:
    """axolotl's own venv (created once): the path of its ``axolotl`` command."""
    return install_peer(work, "axolotl", AXOLOTL_VERSION, "axolotl")[0]


def _logged_dicts(text: str, first_key: str) -> list[dict[str, float]]:
    """The Trainer's log dicts that axolotl prints (values as strings), e.g. ``{'loss': '6.02', ...}``."""
    import ast

    found = []
    for match in re.finditer(r"\{'" + first_key + r"'[^{}]*\}", text):
        raw = ast.literal_eval(match.group(0))
        found.append({k: float(v) for k, v in raw.items() if _is_number(v)})
    return found


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def run_axolotl(
    cli: Path, settings: Settings, method: str, model_dir: Path, out: Path, seed: int, train_tokens: int
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    config = axolotl_config(settings, method, model_dir, model_dir.parent / "data", out / "output", seed)
    config_path = out / f"{method}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log = out / "axolotl.log"
    code, wall, rss = run_measured([str(cli), "train", str(config_path)], log, _axolotl_env(cli), cwd=out)
    text = log.read_text(errors="replace")
    steps = _logged_dicts(text, "loss")
    summary = (_logged_dicts(text, "train_runtime") or [{}])[-1]
    evals = _logged_dicts(text, "eval_loss")
    # the Trainer's train_runtime includes the evals it ran inside train() (at the start and the end)
    runtime = summary.get("train_runtime")
    if runtime:
        runtime -= sum(e.get("eval_runtime", 0.0) for e in evals)
    return {
        "state": "COMPLETED" if code == 0 and runtime else f"exit {code}",
        # the same sequences as ours (checked): their real tokens over the Trainer's training time
        "tokens_per_s": train_tokens / runtime if runtime else None,
        "train_loss": window_mean([h["loss"] for h in steps]),
        "eval_loss": evals[-1].get("eval_loss") if evals else None,
        "peak_rss_gib": rss,
        "wall_s": wall,
        "train_s": runtime,
        "outside_train_s": wall - runtime if runtime else None,
        "eval_s": evals[-1].get("eval_runtime") if evals else None,
        "startup_s": None,
        "steps": len(steps),
        "lrs": [h["learning_rate"] for h in steps if "learning_rate" in h],
    }


def lr_gap(ours: dict, theirs: dict) -> float | None:
    """Largest difference between the two sides' per-step learning rates, relative to the peak rate
    (None when the step counts differ). Both sides log the rate each step ran at."""
    a, b = ours.get("lrs") or [], theirs.get("lrs") or []
    if not a or len(a) != len(b):
        return None
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) / max(b)


def ratio(ours: list[dict], theirs: list[dict], key: str, higher_is_better: bool) -> float | None:
    a = [r[key] for r in ours if r.get(key)]
    b = [r[key] for r in theirs if r.get(key)]
    if not a or not b:
        return None
    return (
        statistics.median(a) / statistics.median(b)
        if higher_is_better
        else statistics.median(b) / statistics.median(a)
    )


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


PEER_NAMES = {"llamafactory": "LLaMA-Factory", "axolotl": "axolotl"}


def summarise(rows: list[dict], methods: list[str]) -> str:
    """Prints the per-method ratios against each peer; returns the LoRA line against LLaMA-Factory (the
    bench's last line)."""
    last = ""
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
    spread = lambda v: f"{statistics.mean(v):.4f} [{min(v):.4f}-{max(v):.4f}]" if v else "n/a"  # noqa: E731
    for method in methods:
        ours = [r for r in rows if r["method"] == method and r["runner"] == "ours"]
        for runner, name in PEER_NAMES.items():
            theirs = [r for r in rows if r["method"] == method and r["runner"] == runner]
            if not theirs:
                continue
            tps = ratio(ours, theirs, "tokens_per_s", True)
            wall = ratio(ours, theirs, "wall_s", False)
            rss = ratio(ours, theirs, "peak_rss_gib", False)
            line = f"ours vs {name}: tokens/s {fmt(tps)}, wall {fmt(wall)} ({method})"
            print(f"{line}; peak RSS {fmt(rss)} (smaller is better, as ratio theirs/ours)")
            for key in ("train_loss", "eval_loss"):
                a = [r[key] for r in ours if r.get(key) is not None]
                b = [r[key] for r in theirs if r.get(key) is not None]
                print(f"  {method} {key}: ours {spread(a)}, {name} {spread(b)} (mean [min-max] over repeats)")
            gaps = [g for g in (lr_gap(a, b) for a, b in zip(ours, theirs, strict=False)) if g is not None]
            print(
                f"  {method} learning rate per step vs {name}: largest gap {max(gaps):.2%} of the peak"
                if gaps
                else f"  {method} learning rate per step vs {name}: not comparable (step counts differ)"
            )
            if method == "lora" and runner == "llamafactory":
                last = line
    return last


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    print(f"load at start: {_uptime()}", flush=True)
    started = time.perf_counter()
    cli = ensure_llamafactory(work)
    axolotl_cli = None if args.no_axolotl else ensure_axolotl(work)
    model_dir = build_qwen2(work / MODEL_DIR_NAME)
    data = write_data(work, settings)
    train_tokens = check_same_sequences(cli, settings, model_dir, data, work, axolotl_cli)
    runners = ["ours", "llamafactory"] + ([] if axolotl_cli is None else ["axolotl"])
    rows: list[dict[str, Any]] = []
    for repeat in range(settings.repeats):  # interleaved: ours, theirs, ours, theirs...
        seed = settings.seed + repeat
        for method in args.methods:
            for runner in runners:
                out = work / "runs" / f"{method}-{runner}-{repeat}"
                shutil.rmtree(out, ignore_errors=True)
                if runner == "ours":
                    row = run_ours(settings, method, model_dir, data, out, seed)
                elif runner == "llamafactory":
                    row = run_llamafactory(cli, settings, method, model_dir, out, seed)
                else:
                    assert axolotl_cli is not None
                    row = run_axolotl(axolotl_cli, settings, method, model_dir, out, seed, train_tokens)
                row |= {"method": method, "runner": runner, "repeat": repeat, "seed": seed}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "lrs"}), flush=True)
    print(f"load at end: {_uptime()}; bench took {time.perf_counter() - started:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    last = summarise(rows, args.methods)
    if last:
        print(last)
    return 0 if all(r["state"] == "COMPLETED" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

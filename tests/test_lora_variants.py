"""LoRA variants (DoRA, rsLoRA, PiSSA/OLoRA, LoRA+) and QLoRA: spec, plan refusals, labels, LoRA+'s
learning rates, and the shipped jobs/lora_variants.yaml trained through `launcher submit --backend
local`, every export reloaded with peft on the original base to the run's own eval loss."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from launcher.errors import UserError
from launcher.plan.planner import load_and_plan
from launcher.rundir.identity import run_id_of
from launcher.rundir.method_label import method_label
from launcher.rundir.paths import ExperimentPaths, RunPaths, read_json
from launcher.spec.schema import LoraMethod

REPO = Path(__file__).resolve().parent.parent
JOB = REPO / "jobs" / "lora_variants.yaml"
torch.set_num_threads(1)


def _spec(tmp_path: Path, method: dict[str, Any], **top: Any) -> Path:
    spec = {
        "experiment": "variants",
        "output_dir": str(tmp_path / "runs"),
        "model": {"builtin": "tiny-glm", **top.pop("model", {})},
        "data": {"builtin": "dialogue"},
        "methods": [method],
        **top,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_plain_lora_keeps_its_run_yaml_and_run_id() -> None:
    """Runs planned before the variants existed keep their ids: defaults are not written."""
    dumped = LoraMethod(method="lora").model_dump(mode="json")
    assert dumped == {
        "name": None,
        "overrides": {},
        "resources": None,
        "method": "lora",
        "r": 8,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "target_modules": "all-linear",
        "merge": False,
    }
    dora = LoraMethod(method="lora", use_dora=True).model_dump(mode="json")
    assert dora["use_dora"] is True


def test_variants_are_told_apart_in_plan_and_table(tmp_path: Path) -> None:
    plan = load_and_plan(JOB, overrides=[f"output_dir={tmp_path}"])
    labels = {r.name: method_label(r.method.model_dump(mode="json")) for r in plan.runs}
    assert labels == {
        "lora": "lora",
        "dora": "lora r8 dora",
        "rslora": "lora r8 rslora",
        "pissa": "lora r8 pissa",
        "olora": "lora r8 olora",
        "loraplus": "lora r8 lora+4",
    }
    assert len({run_id_of(r) for r in plan.runs}) == len(plan.runs)
    from launcher.plan.methods import describe

    assert describe(plan.runs[1].method) == "lora r8/a32 dora"


@pytest.mark.parametrize(
    ("method", "top", "expected"),
    [
        (
            {"method": "lora", "init_lora_weights": "pissa", "resources": {"zero_stage": 3}},
            {},
            "init_lora_weights: pissa needs each whole weight on every rank",
        ),
        (
            {"method": "lora", "use_dora": True, "resources": {"zero_stage": 3}},
            {},
            "use_dora needs each whole base weight in every forward",
        ),
        (
            {"method": "lora", "init_lora_weights": "olora"},
            {"model": {"quantization": "4bit"}},
            "init_lora_weights: olora writes a residual into the base weights",
        ),
        ({"method": "full"}, {"model": {"quantization": "4bit"}}, "trains only LoRA adapters (QLoRA)"),
        (
            {"method": "lora", "resources": {"zero_stage": 3}},
            {"model": {"quantization": "8bit"}},
            "cannot be partitioned by ZeRO-3",
        ),
        (
            {"method": "lora", "init_lora_weights": "svd"},
            {},
            "init_lora_weights: 'svd' is not valid; choose one of: true, gaussian, pissa, olora",
        ),
        ({"method": "lora", "loraplus_lr_ratio": 0}, {}, "loraplus_lr_ratio"),
    ],
    ids=[
        "pissa-zero3",
        "dora-zero3",
        "olora-quantized",
        "quantized-full",
        "quantized-zero3",
        "unknown-init",
        "ratio-0",
    ],
)
def test_combinations_that_cannot_run_are_refused_at_plan(
    tmp_path: Path, method: dict[str, Any], top: dict[str, Any], expected: str
) -> None:
    spec = _spec(tmp_path, method, **top)
    with pytest.raises(UserError, match=re.escape(expected)) as info:
        load_and_plan(spec)
    assert "spec.yaml:" in str(info.value)  # file:line of the offending key
    assert not (tmp_path / "runs").exists()


def test_olora_on_conv1d_layers_is_refused_at_plan(tmp_path: Path, family_dirs: dict[str, Path]) -> None:
    """peft's OLoRA initialisation ignores fan_in_fan_out: on GPT-2's Conv1D layers it trains a wrongly
    shaped adapter ("mat1 and mat2 shapes cannot be multiplied"). PiSSA handles them and is planned."""
    gpt2 = {"model": {"builtin": None, "path": str(family_dirs["gpt2"])}}
    spec = _spec(tmp_path, {"method": "lora", "init_lora_weights": "olora"}, **gpt2)
    with pytest.raises(UserError, match=re.escape("init_lora_weights: olora cannot initialise")) as info:
        load_and_plan(spec)
    assert "attn.c_attn" in str(info.value) and "spec.yaml:" in str(info.value)
    assert not (tmp_path / "runs").exists()
    plan = load_and_plan(_spec(tmp_path, {"method": "lora", "init_lora_weights": "pissa"}, **gpt2))
    assert len(plan.runs) == 1
    qwen2 = {"model": {"builtin": None, "path": str(family_dirs["qwen2"])}}
    olora = {"method": "lora", "init_lora_weights": "olora"}
    assert len(load_and_plan(_spec(tmp_path, olora, **qwen2)).runs) == 1  # Linear layers: planned


def test_loraplus_trains_b_at_ratio_times_the_rate(tiny_model_dir: Path) -> None:
    from deepspeed.runtime.lr_schedules import WarmupDecayLR, WarmupLR
    from transformers import AutoModelForCausalLM

    from launcher.train.adapters import apply_method, optimizer_param_groups
    from launcher.train.schedule import scale_group_lrs

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    method = LoraMethod(method="lora", r=2, loraplus_lr_ratio=16)
    model, _ = apply_method(model, method)
    groups, multipliers = optimizer_param_groups(model, method, 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".lora_B." in names[id(p)] for p in groups[1]["params"])
    assert all(".lora_B." not in names[id(p)] for p in groups[0]["params"])
    for kind, extra in ((WarmupDecayLR, {"total_num_steps": 10}), (WarmupLR, {})):
        params = {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 2, **extra}
        ds = scale_group_lrs({"scheduler": {"params": dict(params)}}, multipliers)
        optimizer = torch.optim.AdamW(groups)
        scheduler = kind(optimizer, **ds["scheduler"]["params"])
        for _ in range(3):
            optimizer.step()
            scheduler.step()
        lr_a, lr_b = (g["lr"] for g in optimizer.param_groups)
        assert lr_a > 0 and lr_b == pytest.approx(16 * lr_a), kind.__name__
    plain, one = optimizer_param_groups(model, LoraMethod(method="lora"), 1e-3)
    assert one == [1.0] and len(plain) == 1


def _eval_loss_of(model: Any, paths: RunPaths) -> float:
    """``model``'s loss on the run's own eval examples, as the trainer computes it."""
    from transformers import AutoTokenizer

    from launcher.rundir.run_config import RunConfig
    from launcher.train.data import encode_for_training, load_examples, resolve_data_files
    from launcher.train.evaluate import eval_loss

    cfg = RunConfig.from_yaml_file(paths.run_yaml)
    tokenizer = AutoTokenizer.from_pretrained(paths.final)
    t = cfg.training
    examples = load_examples(resolve_data_files(cfg.data)[1])[: cfg.data.max_eval_examples]
    features = [
        encode_for_training(ex, tokenizer, cfg.template, t.max_source_length, t.max_target_length)
        for ex in examples
    ]
    pad_id = tokenizer.pad_token_id  # the trainer pads with eos where the tokenizer has no pad
    pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
    return float(eval_loss(model, features, pad_id, t.per_device_batch_size))


def _eval_loss_of_export(paths: RunPaths, model_dir: Path) -> tuple[float, float | None]:
    """The export reloaded as users do (peft on the original base); and for DoRA also merged
    (merge_and_unload)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(paths.final))
    loss = _eval_loss_of(model, paths)
    adapter = json.loads((paths.final / "adapter_config.json").read_text())
    merged = _eval_loss_of(model.merge_and_unload(), paths) if adapter["use_dora"] else None
    return loss, merged


@pytest.mark.slow
def test_lora_variants_job_trains_and_every_export_reloads(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The held-out check: plain LoRA, DoRA, rsLoRA, PiSSA, OLoRA and LoRA+ side by side in one experiment
    (jobs/lora_variants.yaml, a few steps each) through `launcher submit --backend local`."""
    overrides = [
        "training.max_steps=4",
        "training.logging_steps=2",
        "data.max_train_examples=64",
        "data.max_eval_examples=16",
        "eval.num_samples=4",
        "eval.max_new_tokens=8",
    ]
    only = ["--only", "lora", "dora", "rslora", "pissa", "loraplus"]  # olora exports as pissa does
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "submit", str(JOB), *overrides, "--backend", "local", *only],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = ExperimentPaths(tmp_path / "runs" / "lora_variants")
    summary = {row["name"]: row for row in json.loads(exp.summary_json.read_text())}
    assert {name: row["method"] for name, row in summary.items()} == {
        "lora": "lora",
        "dora": "lora r8 dora",
        "rslora": "lora r8 rslora",
        "pissa": "lora r8 pissa",
        "olora": "lora r8 olora",
        "loraplus": "lora r8 lora+4",
    }
    assert "lora r8 dora" in exp.summary_md.read_text()
    assert summary["olora"]["state"] == "PLANNED"
    losses = {}
    for name in ("lora", "dora", "rslora", "pissa", "loraplus"):
        paths = exp.run(name)
        result = read_json(paths.result_json)
        assert result["state"] == "COMPLETED", (name, result.get("reason"))
        reloaded, merged = _eval_loss_of_export(paths, tiny_model_dir)
        assert reloaded == pytest.approx(result["eval_loss"], rel=1e-4), name
        if merged is not None:
            assert merged == pytest.approx(result["eval_loss"], rel=1e-4), name
        adapter = json.loads((paths.final / "adapter_config.json").read_text())
        losses[name] = result["eval_loss"]
        if name in ("pissa", "olora"):  # converted: a plain LoRA of rank 2r on the original base
            assert adapter["r"] == 16 and adapter["init_lora_weights"] is True
            assert (paths.lora_init / "adapter_model.safetensors").is_file()
        else:
            assert adapter["r"] == 8 and not paths.lora_init.exists()
        assert adapter["use_dora"] is (name == "dora")
        assert adapter["use_rslora"] is (name == "rslora")
    assert len(set(losses.values())) == len(losses), losses  # each variant trained differently


def test_memory_model_counts_doras_magnitudes_and_kept_outputs(tiny_model_dir: Path) -> None:
    """DoRA's trainable parameters in the plan are the ones peft creates, and its activations and
    transient norm make the estimate larger than plain LoRA's."""
    from transformers import AutoModelForCausalLM

    from launcher.plan.archs import tiny_glm_arch
    from launcher.plan.memory_model import estimate, param_layout
    from launcher.train.adapters import apply_method

    arch = tiny_glm_arch()
    plain, dora = LoraMethod(method="lora", r=4), LoraMethod(method="lora", r=4, use_dora=True)
    for method in (plain, dora):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        _, counts = apply_method(model, method)
        assert param_layout(arch, method).trainable_params == counts.trainable
    settings: dict[str, Any] = {
        "world_size": 1,
        "zero_stage": 2,
        "offload_optimizer": False,
        "offload_param": False,
        "gradient_checkpointing": False,
        "precision": "fp32",
        "micro_batch": 8,
        "seq_len": 321,
        "on_cpu": True,
    }
    lora_est, dora_est = estimate(arch, plain, **settings), estimate(arch, dora, **settings)
    out_features = sum(lin.out_features for lin in arch.lora_linears("all-linear"))
    kept = 2 * out_features * 8 * 321 * 4 * arch.num_layers  # base and LoRA outputs, fp32
    assert dora_est.activations - lora_est.activations == kept


def test_quantization_without_bitsandbytes_is_refused_at_validate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "bitsandbytes" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    spec = _spec(tmp_path, {"method": "lora"}, model={"quantization": "4bit"})
    with pytest.raises(UserError, match=re.escape("pip install 'launcher[qlora]'")) as info:
        load_and_plan(spec)
    assert "model.quantization" in str(info.value)


@pytest.mark.slow
def test_qlora_4bit_trains_on_cpu_and_its_export_reloads(tiny_model_dir: Path, tmp_path: Path) -> None:
    """bitsandbytes runs NF4 on CPU: a real QLoRA run through the entrypoint (ZeRO-2, 3 steps), whose
    adapter reloads on a 4-bit base to the run's own eval loss."""
    from peft import PeftModel
    from train_helpers import make_run_dir
    from transformers import AutoModelForCausalLM

    from launcher.rundir.run_config import RunConfig
    from launcher.train.quantization import keep_training_layout, quantized_loading

    paths = make_run_dir(
        tmp_path, name="qlora", method_spec={"method": "lora", "r": 4}, max_steps=3, train_examples=32
    )
    config = yaml.safe_load(paths.run_yaml.read_text())
    config["model"]["quantization"] = "4bit"
    paths.run_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.train", str(paths.root)], capture_output=True, text=True
    )
    result = read_json(paths.result_json)
    assert result["state"] == "COMPLETED", proc.stderr[-3000:]
    cfg = RunConfig.from_yaml_file(paths.run_yaml)
    base = AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), dtype=torch.float32, **quantized_loading(cfg.model, torch.float32)
    )
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert keep_training_layout(base) > 0  # the kernels training used (CPU inference repacks: ~1e-3 off)
    model = PeftModel.from_pretrained(base, str(paths.final))
    assert _eval_loss_of(model, paths) == pytest.approx(result["eval_loss"], rel=1e-3)


VARIANTS: dict[str, dict[str, Any]] = {
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
    "loraplus": {"loraplus_lr_ratio": 4},
}
PACKED = ("dora", "rslora")  # training.packing: true


@pytest.mark.slow
def test_variants_train_on_other_families_with_packing_and_zero3(
    family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Each variant through the real entrypoint (tests/family_worker.py: one process trains them all) on
    Qwen2, Llama 3, GPT-2 (Conv1D; OLoRA refused there) and Phi-3 (fused layers), DoRA and rsLoRA with
    packing; rsLoRA (the one variant ZeRO-3 takes) once more under ZeRO-3 on 2 ranks, packed. Each
    completes with a finite loss (each variant's its own: they all start at the base model's output) and
    its export reloads with peft on the original base to the run's own eval loss."""
    from test_families_train import run_worker
    from train_helpers import make_run_dir, rank_output

    common: dict[str, Any] = {
        "max_steps": 3,  # the first step is warm-up at lr 0, the last decays to 0
        "save_steps": 100,
        "train_examples": 16,
        "eval_examples": 4,
        "micro_batch": 4,
        "accumulation": 1,
        "learning_rate": 1e-2,
        "eval_settings": {"num_samples": 2, "max_new_tokens": 4},
    }
    # the variants that read or rewrite the base weights on every family; rsLoRA and LoRA+ (a scale and
    # an optimizer group) on Qwen2, Llama 3 and GPT-2
    families = {"qwen2": VARIANTS, "llama3": VARIANTS, "gpt2": VARIANTS, "phi3": ("dora", "pissa", "olora")}
    single = {
        (family, name): make_run_dir(
            tmp_path / family,
            name=name,
            method_spec={"method": "lora", "r": 4, **variant},
            model_path=family_dirs[family],
            packing=name in PACKED,
            **common,
        )
        for family, names in families.items()
        for name, variant in VARIANTS.items()
        if name in names and (family, name) != ("gpt2", "olora")  # refused at plan (test above)
    }
    zero3 = make_run_dir(
        tmp_path / "qwen2",
        name="rslora-zero3",
        method_spec={"method": "lora", "r": 4, "use_rslora": True},
        model_path=family_dirs["qwen2"],
        world_size=2,
        zero_stage=3,
        packing=True,
        **common,
    )
    run_worker(list(single.values()), 1, tmp_path / "single.json")
    run_worker([zero3], 2, tmp_path / "zero3.json")
    runs = {**single, ("qwen2", "rslora-zero3"): zero3}
    losses: dict[str, dict[str, float]] = {}
    for (family, name), paths in runs.items():
        assert paths.result_json.is_file(), f"{family}/{name}:\n{rank_output(paths)}"
        result = read_json(paths.result_json)
        why = f"{family}/{name}: {result.get('reason')}\n{rank_output(paths)}"
        assert result["state"] == "COMPLETED", why
        assert result["steps"] == 3 and math.isfinite(result["eval_loss"]), (family, name)
        losses.setdefault(family, {})[name] = result["eval_loss"]
        reloaded, merged = _eval_loss_of_export(paths, family_dirs[family])
        assert reloaded == pytest.approx(result["eval_loss"], rel=1e-4), (family, name)
        if merged is not None:
            assert merged == pytest.approx(result["eval_loss"], rel=1e-4), (family, name)
    for family, by_variant in losses.items():  # each trained, and differently (they all start at the base)
        assert len(set(by_variant.values())) == len(by_variant), (family, by_variant)

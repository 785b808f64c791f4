"""The memory model against real DeepSpeed engines (2 CPU ranks, gloo) and against published numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from launcher.backends.launch_env import free_port, torchrun_env
from launcher.plan.archs import arch_from_model, bundled_arch
from launcher.plan.memory_model import estimate, model_state_bytes, param_layout
from launcher.spec.schema import MethodSpec

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import ds_memory_worker as worker
import published_memory

WORKER = Path(__file__).parent / "ds_memory_worker.py"
METHOD = TypeAdapter(MethodSpec)
CASES = [
    {"method": m, "zero_stage": z, "offload_optimizer": o, "precision": "fp32"}
    for m in ("freeze", "lora", "ptuning", "full")
    for z in (2, 3)
    for o in (False, True)
] + [  # bf16, the precision real runs use: 2-byte weights and gradients, fp32 master + Adam states
    {"method": "full", "zero_stage": 2, "offload_optimizer": False, "precision": "bf16"},
    {"method": "lora", "zero_stage": 3, "offload_optimizer": False, "precision": "bf16"},
    {"method": "freeze", "zero_stage": 2, "offload_optimizer": True, "precision": "bf16"},
    {"method": "ptuning", "zero_stage": 3, "offload_optimizer": True, "precision": "bf16"},
]


def _spawn(cases: list[dict[str, Any]], out: Path, world_size: int = 2) -> list[list[dict[str, Any]]]:
    (out / "cases.json").write_text(json.dumps(cases))
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            **torchrun_env(rank, world_size, port),
            "OMP_NUM_THREADS": "1",
        }
        log = open(out / f"log{rank}.txt", "w")  # noqa: SIM115 - the child owns it; closed by exit
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(out / "cases.json"), str(out)],
                env=env,
                stdout=log,
                stderr=log,
            )
        )
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=420))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(None)
    if any(codes):
        logs = "\n".join((out / f"log{r}.txt").read_text()[-3000:] for r in range(world_size))
        raise AssertionError(f"ranks exited with {codes}:\n{logs}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


@pytest.mark.slow
def test_model_states_match_real_deepspeed_engines_per_rank(tmp_path: Path) -> None:
    import torch
    from transformers import GlmForCausalLM

    with torch.device("meta"):
        arch = arch_from_model(GlmForCausalLM(worker.glm_config()), "tiny-glm-test")
    per_rank = _spawn(CASES, tmp_path)
    lines = []
    for rank, results in enumerate(per_rank):
        assert len(results) == len(CASES)
        for measured in results:
            layout = param_layout(arch, METHOD.validate_python(worker.METHODS[measured["method"]]))
            # Trainable / total counts from the architecture alone equal what peft + DeepSpeed built.
            assert layout.trainable_params == measured["trainable"], measured
            assert layout.total_params == measured["total"], measured
            pred = model_state_bytes(
                layout,
                world_size=2,
                zero_stage=measured["zero_stage"],
                offload_optimizer=measured["offload_optimizer"],
                offload_param=False,
                precision=measured["precision"],
                rank=rank,
            )
            params = pred["params_device"] + pred["params_host"]
            grads = pred["grads_device"] + pred["grads_host"]
            optim = pred["optim_device"] + pred["optim_host"]
            m = measured
            label = (
                f"rank{rank} {m['method']} z{m['zero_stage']} off={m['offload_optimizer']} {m['precision']}"
            )
            lines.append(
                f"{label}: params {m['params_bytes']}/{params} grads {m['grads_bytes']}/{grads} "
                f"optim {m['optim_bytes']}/{optim}"
            )
            assert measured["params_bytes"] == pytest.approx(params, rel=0.10), label
            assert measured["optim_bytes"] == pytest.approx(optim, rel=0.10), label
            assert measured["grads_bytes"] == pytest.approx(grads, rel=0.10), label
            total = measured["params_bytes"] + measured["grads_bytes"] + measured["optim_bytes"]
            assert total == pytest.approx(params + grads + optim, rel=0.10), label
    print("\n".join(lines))


# Rows the mechanisms modelled here do not explain (docs/memory_model.md says what is left).
UNEXPLAINED = {("ptuning", 4, True, 1560), ("full", 4, True, 1560)}


def test_chatglm6b_at_the_published_settings(capsys: pytest.CaptureFixture[str]) -> None:
    """Every row of the published ChatGLM-6B table at its own settings: the nvidia-smi estimate (reserved
    pool + CUDA context) within 0.8-1.1 of the published figure, never above it by more than 10 %."""
    rows = published_memory.table()
    with capsys.disabled():
        for item in rows:
            r = item["row"]
            print(
                f"\n{r.method:8s} {r.gpus} GPU ckpt={r.checkpointing!s:5} {r.seq_len:5d}: allocated "
                f"{item['allocated_gib']:5.1f} GiB, nvidia-smi {item['smi_gib']:5.1f} GiB, published "
                f"{r.published_gib:g}G, ratio {item['ratio']:.2f}"
            )
    for item in rows:
        r = item["row"]
        assert item["ratio"] <= 1.1, item
        if (r.method, r.gpus, r.checkpointing, r.seq_len) not in UNEXPLAINED:
            assert item["ratio"] >= 0.8, item
    by_key = {(i["row"].method, i["row"].gpus, i["row"].checkpointing): i for i in rows}
    # The mechanisms the rows turn on: eager attention keeps seq x seq scores without checkpointing
    # (LoRA 45G vs 20G), and the model is moved whole to each GPU before ZeRO-3 partitions it.
    assert (
        by_key[("lora", 1, False)]["estimate"].activations
        > 10 * by_key[("lora", 1, True)]["estimate"].activations
    )
    assert (
        by_key[("full", 4, True)]["estimate"].load_temp
        == by_key[("full", 4, True)]["estimate"].total_params * 2
    )


def test_bundled_descriptions_match_transformers_meta_models() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cases = [
        (
            "llama-2-7b",
            LlamaForCausalLM,
            LlamaConfig(
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                vocab_size=32000,
            ),
        ),
        (
            "qwen2-7b",
            Qwen2ForCausalLM,
            Qwen2Config(
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                vocab_size=152064,
                tie_word_embeddings=False,
            ),
        ),
    ]
    for name, cls, cfg in cases:
        with torch.device("meta"):
            model = cls(cfg)
        exact = arch_from_model(model, name)
        assert bundled_arch(name).total_params == exact.total_params
        assert sorted(bundled_arch(name).layer_params) == sorted(exact.layer_params)
    assert bundled_arch("llama-2-7b").total_params == 6_738_415_616
    assert bundled_arch("chatglm2-6b").total_params == 6_243_584_000


def test_memory_grows_with_sequence_and_shrinks_with_checkpointing_and_offload() -> None:
    arch = bundled_arch("chatglm-6b")
    full = METHOD.validate_python({"method": "full"})

    def gib(**kw: Any) -> float:
        args: dict[str, Any] = {
            "world_size": 4,
            "zero_stage": 3,
            "offload_optimizer": False,
            "offload_param": False,
            "gradient_checkpointing": False,
            "precision": "bf16",
            "micro_batch": 1,
            "seq_len": 1024,
        }
        args.update(kw)
        return estimate(arch, full, **args).device_gib

    assert gib(seq_len=2048) > gib()
    assert gib(gradient_checkpointing=True) < gib()
    assert gib(offload_optimizer=True) < gib()
    assert gib(offload_optimizer=True, offload_param=True) < gib(offload_optimizer=True)
    assert gib(world_size=8) < gib()
    lora = METHOD.validate_python({"method": "lora", "target_modules": ["query_key_value"]})
    layout = param_layout(arch, lora)
    # LoRA is charged optimizer state for its adapters only.
    assert layout.trainable_params == 28 * 8 * (4096 + 3 * 4096)


@pytest.mark.parametrize(
    "method",
    [
        {"method": "ptuning", "version": "v1", "pre_seq_len": 6},
        {"method": "ptuning", "version": "v1", "pre_seq_len": 6, "encoder_hidden_size": 32},
        {"method": "ptuning", "version": "v2", "pre_seq_len": 5, "prefix_projection": True},
        {"method": "lora", "r": 3, "target_modules": ["q_proj", "v_proj"]},
        {"method": "freeze", "trainable_patterns": [r"layers\.0\.mlp", "norm"]},
        {"method": "freeze", "trainable_layers": 2},
    ],
    ids=["ptuning-v1", "ptuning-v1-enc32", "ptuning-v2-projection", "lora-qv", "freeze-patterns", "freeze-2"],
)
def test_trainable_counts_match_what_the_trainer_builds(method: dict[str, Any]) -> None:
    """The layout the plan charges for equals what apply_method (peft) really makes trainable."""
    import torch
    from transformers import GlmForCausalLM

    from launcher.train.adapters import apply_method

    torch.manual_seed(0)
    spec = METHOD.validate_python(method)
    with torch.device("meta"):
        arch = arch_from_model(GlmForCausalLM(worker.glm_config()), "t")
    _, counts = apply_method(GlmForCausalLM(worker.glm_config()), spec)
    layout = param_layout(arch, spec)
    assert (layout.trainable_params, layout.total_params) == (counts.trainable, counts.total)


ACT_GLM = {**worker.TINY_GLM, "hidden_size": 128, "intermediate_size": 320, "head_dim": 32, "vocab_size": 256}


def _saved_activation_bytes(
    method: dict[str, Any], checkpointing: bool, batch: int, seq: int
) -> tuple[int, int]:
    """(bytes autograd really saves in one forward pass, the model's prediction) on a tiny GLM in fp32."""
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    from launcher.plan.memory_model import activation_bytes
    from launcher.train.adapters import apply_method

    torch.manual_seed(0)
    spec = METHOD.validate_python(method)
    model, _ = apply_method(
        GlmForCausalLM(GlmConfig(**ACT_GLM, attn_implementation="sdpa")),
        spec,
        gradient_checkpointing=checkpointing,
    )
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes():
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(4, ACT_GLM["vocab_size"], (batch, seq)))
    with torch.device("meta"):
        arch = arch_from_model(GlmForCausalLM(GlmConfig(**ACT_GLM)), "t")
    predicted = activation_bytes(
        arch,
        param_layout(arch, spec),
        micro_batch=batch,
        seq_len=seq,
        gradient_checkpointing=checkpointing,
        precision="fp32",
        on_cpu=True,  # CPU dropout keeps a float noise tensor and its input, not a 1-byte mask
    )
    return sum(saved.values()), predicted


@pytest.mark.parametrize(
    "method",
    [
        {"method": "full"},
        {"method": "lora", "r": 8},
        {"method": "freeze", "trainable_layers": 1},
        {"method": "ptuning", "version": "v2", "pre_seq_len": 8},
        {"method": "ptuning", "version": "v1", "pre_seq_len": 8},
    ],
    ids=lambda m: f"{m['method']}{m.get('version', '')}",
)
def test_activation_estimate_against_autograd_saved_tensors(method: dict[str, Any]) -> None:
    """What autograd keeps for backward (counted with saved_tensors_hooks) vs the activation model."""
    measured, predicted = _saved_activation_bytes(method, checkpointing=False, batch=2, seq=96)
    assert 0.9 <= measured / predicted <= 1.1, (measured, predicted)
    if method.get("version") != "v2":  # peft refuses prefix tuning with checkpointing
        saved, predicted_peak = _saved_activation_bytes(method, checkpointing=True, batch=2, seq=96)
        layer_inputs = 2 * 96 * ACT_GLM["hidden_size"] * 4 * ACT_GLM["num_hidden_layers"]
        # The forward pass keeps the layer inputs (and little else); the prediction adds the layer that is
        # recomputed during backward, so it must lie above what the forward pass saved.
        assert layer_inputs <= saved * 1.5 and saved <= predicted_peak, (saved, predicted_peak)


def test_a_runs_estimate_counts_logits_for_target_positions_only() -> None:
    from launcher.plan.methods import ResourceChoice
    from launcher.plan.resources import run_estimate
    from launcher.spec.schema import TrainingSpec

    arch = bundled_arch("chatglm-6b")
    training = TrainingSpec.model_validate(
        {"max_source_length": 512, "max_target_length": 128, "per_device_batch_size": 2, "precision": "bf16"}
    )
    lora = METHOD.validate_python({"method": "lora", "r": 8})
    ours = run_estimate(arch, lora, training, ResourceChoice(1, 1, 2, False, False, False))
    every_position = estimate(
        arch,
        lora,
        world_size=1,
        zero_stage=2,
        offload_optimizer=False,
        offload_param=False,
        gradient_checkpointing=False,
        precision="bf16",
        micro_batch=2,
        seq_len=640,
    )
    # response + eos; the logits (or their fp32 copy), the fp32 log-softmax and its fp32 gradient
    assert ours.logits == 2 * 129 * arch.vocab_size * 12
    # the model's own loss: every position, and the model's bf16 output logits stay alive too
    assert every_position.logits == 2 * 640 * arch.vocab_size * (2 + 12)
    # ours checks its loss once against the model's own (no grad, every position) before training
    assert ours.check_temp == 2 * 640 * arch.vocab_size * (2 + 8)

"""The planner against the published ChatGLM-6B fine-tuning memory table, at the table's own settings.

    .venv/bin/python bench/published_memory.py

The table (liucongg/ChatGLM-Finetuning, README, "所耗显存" per A40 GPU, so an ``nvidia-smi`` reading):
ChatGLM-6B, fp16 (DeepSpeed's loss-scaled fp16), micro-batch 1, the model's own loss over every position,
DeepSpeed configs that set no bucket sizes (DeepSpeed's defaults: 5e8-element reduce bucket, 5e7
prefetch, 1e9 reuse distance, overlap_comm only for ZeRO-3), the model built outside ``zero.Init``.
Freeze trains layers 24-27, LoRA r16 on query_key_value (dropout 0.1), P-Tuning is ChatGLM's own
P-Tuning v2 (prefix_projection, pre_seq_len 16: a 0.96 B-parameter prefix encoder), full is ZeRO-3 with
optimizer + parameter offload on 4 GPUs. ZeRO-2 without offload otherwise. Each row gives its GPUs,
gradient checkpointing and length as published.

Printed per row: the planner's allocated estimate, what ``nvidia-smi`` would show (reserved pool + CUDA
context), the published figure and the ratio of the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METHODS: dict[str, dict[str, Any]] = {
    "freeze": {"method": "freeze", "trainable_layers": 4},
    "ptuning": {"method": "ptuning", "version": "v2", "pre_seq_len": 16, "prefix_projection": True},
    "lora": {
        "method": "lora",
        "r": 16,
        "lora_alpha": 64,
        "lora_dropout": 0.1,
        "target_modules": ["query_key_value"],
    },
    "full": {"method": "full"},
}


@dataclass(frozen=True)
class Row:
    method: str
    gpus: int
    checkpointing: bool
    seq_len: int
    published_gib: float

    @property
    def zero_stage(self) -> int:
        return 3 if self.method == "full" else 2


ROWS = (
    Row("freeze", 1, True, 1560, 36),
    Row("freeze", 1, False, 1560, 38),
    Row("freeze", 4, True, 1560, 24),
    Row("freeze", 4, False, 1560, 29),
    Row("ptuning", 1, True, 768, 43),
    Row("ptuning", 1, False, 300, 44),
    Row("ptuning", 4, True, 1560, 37),
    Row("ptuning", 4, False, 1360, 44),
    Row("lora", 1, True, 1560, 20),
    Row("lora", 1, False, 1560, 45),
    Row("lora", 4, True, 1560, 20),
    Row("lora", 4, False, 1560, 45),
    Row("full", 4, True, 1560, 33),
)


def estimate_row(row: Row) -> Any:
    from pydantic import TypeAdapter

    from launcher.plan.archs import bundled_arch
    from launcher.plan.memory_model import ZeroSettings, estimate
    from launcher.spec.schema import MethodSpec

    full = row.method == "full"
    return estimate(
        bundled_arch("chatglm-6b"),
        TypeAdapter(MethodSpec).validate_python(METHODS[row.method]),
        world_size=row.gpus,
        zero_stage=row.zero_stage,
        offload_optimizer=full,
        offload_param=full,
        gradient_checkpointing=row.checkpointing,
        precision="fp16",
        micro_batch=1,
        seq_len=row.seq_len,
        zero_settings=ZeroSettings.deepspeed_defaults(row.zero_stage),
        zero_init=False,
    )


def table() -> list[dict[str, Any]]:
    from launcher.plan.memory_model import GIB

    out = []
    for row in ROWS:
        est = estimate_row(row)
        out.append(
            {
                "row": row,
                "estimate": est,
                "allocated_gib": est.allocated_bytes / GIB,
                "smi_gib": est.device_gib,
                "ratio": est.device_gib / row.published_gib,
            }
        )
    return out


def main() -> int:
    from launcher.plan.memory_model import GIB

    def gib(n: int) -> str:
        return f"{n / GIB:.1f}"

    print(
        "| method | GPUs | ckpt | length | states | activations | logits | bwd temp | buffers | step temp | "
        "load | allocated | nvidia-smi | published | ratio |"
    )
    print("|---" * 15 + "|")
    for item in table():
        r, e = item["row"], item["estimate"]
        print(
            f"| {r.method} | {r.gpus} | {'yes' if r.checkpointing else 'no'} | {r.seq_len} | "
            f"{gib(e.model_states_device)} | {gib(e.activations)} | {gib(e.logits)} | "
            f"{gib(e.backward_temp)} | "
            f"{gib(e.buffers)} | {gib(e.step_temp)} | {gib(e.load_temp)} | {item['allocated_gib']:.1f} | "
            f"**{item['smi_gib']:.1f}** | {r.published_gib:g}G | {item['ratio']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

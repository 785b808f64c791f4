"""One rank of the memory-model check: real DeepSpeed engines on CPU (gloo), bytes actually held.

usage: ds_memory_worker.py CASES_JSON OUT_DIR   (spawned on 2 ranks by test_memory_model.py)

For every case (method x ZeRO stage x optimizer offload) it builds a tiny GLM model, applies the method
with launcher.train.adapters.apply_method (peft for LoRA / P-Tuning), initialises a DeepSpeed engine
with the ds_config launcher.plan.dsconfig renders, and measures the unique tensor storages this rank holds:
parameters after initialize, gradient partitions after one backward, optimizer states (fp32 master +
Adam moments) after one step. Each rank writes its numbers to OUT_DIR/rank{N}.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

TINY_GLM = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
METHODS: dict[str, dict[str, Any]] = {
    "freeze": {"method": "freeze", "trainable_layers": 1},
    "lora": {"method": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
    "ptuning": {"method": "ptuning", "version": "v2", "pre_seq_len": 8},
    "full": {"method": "full"},
}


def glm_config() -> Any:
    from transformers import GlmConfig

    return GlmConfig(**TINY_GLM)


def run_config(
    method: dict[str, Any], zero_stage: int, offload_optimizer: bool, world_size: int, precision: str = "fp32"
) -> Any:
    from launcher.rundir.run_config import ResolvedResources, RunConfig
    from launcher.spec.schema import ClusterSpec, DataSpec, EvalSpec, ModelSpec, TokenizerSpec, TrainingSpec

    return RunConfig.model_validate(
        {
            "experiment": "memcheck",
            "name": f"{method['method']}-z{zero_stage}",
            "run_id": "x",
            "method": method,
            "model": ModelSpec(builtin="tiny-glm"),
            "tokenizer": TokenizerSpec(),
            "data": DataSpec(builtin="dialogue"),
            "template": "chatglm",
            "training": TrainingSpec(precision=precision, per_device_batch_size=2, learning_rate=1e-3),  # type: ignore[arg-type]
            "eval": EvalSpec(),
            "resources": ResolvedResources(
                nodes=1,
                gpus_per_node=world_size,
                zero_stage=zero_stage,  # type: ignore[arg-type]
                offload_optimizer=offload_optimizer,
                offload_param=False,
                gradient_checkpointing=False,
                est_mem_gib=0.0,
                fits=True,
            ),
            "cluster": ClusterSpec(),
        }
    )


class Storages:
    """Unique storages (a flat buffer shared by many views is counted once)."""

    def __init__(self, exclude: set[int] | None = None):
        self.seen: dict[int, int] = {}
        self.exclude = exclude or set()

    def add(self, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and ptr not in self.exclude:
                self.seen[ptr] = nbytes
        elif isinstance(obj, dict):
            for value in obj.values():
                self.add(value)
        elif isinstance(obj, list | tuple):
            for value in obj:
                self.add(value)

    @property
    def nbytes(self) -> int:
        return sum(self.seen.values())


def param_storages(engine: Any) -> Storages:
    found = Storages()
    for p in engine.module.parameters():
        if hasattr(p, "ds_tensor"):
            found.add(p.ds_tensor)
            if p.numel():  # a ZeRO-3 "persistent" small parameter is also kept whole on every rank
                found.add(p.data)
        else:
            found.add(p.data)
    return found


def grad_storages(engine: Any, exclude: set[int]) -> Storages:
    """Gradient partitions held by the ZeRO optimizer (communication buckets excluded)."""
    opt = engine.optimizer
    found = Storages(exclude)
    for name, value in vars(opt).items():
        lowered = name.lower()
        if "grad" in lowered and not any(skip in lowered for skip in ("ipg", "bucket", "norm", "acc_step")):
            found.add(value)
    for group in opt.optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                found.add(p.grad)
    for p in engine.module.parameters():
        if p.grad is not None:
            found.add(p.grad)
    return found


def optimizer_storages(engine: Any, exclude: set[int]) -> Storages:
    """fp32 master partitions (ZeRO-2: single_partition_of_fp32_groups, ZeRO-3: fp32_partitioned_groups_flat;
    ZeRO-3 empties the inner optimizer's param list between steps) plus Adam's moments."""
    opt = engine.optimizer
    inner = opt.optimizer
    found = Storages(exclude)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        found.add(getattr(opt, name, None))
    for group in inner.param_groups:
        for p in group["params"]:
            found.add(p.data)
    for state in inner.state.values():
        found.add({k: v for k, v in state.items() if k != "step"})
    return found


def measure(case: dict[str, Any], world_size: int) -> dict[str, Any]:
    import deepspeed
    from transformers import GlmForCausalLM

    from launcher.plan.dsconfig import render_ds_config
    from launcher.rundir.ds_config import fill_scheduler_auto
    from launcher.train.adapters import apply_method

    torch.manual_seed(0)
    precision = case.get("precision", "fp32")
    cfg = run_config(
        METHODS[case["method"]], case["zero_stage"], case["offload_optimizer"], world_size, precision
    )
    model, counts = apply_method(GlmForCausalLM(glm_config()), cfg.method)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    ds_config = fill_scheduler_auto(render_ds_config(cfg, TINY_GLM["hidden_size"]), 10, 0.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    params = param_storages(engine)
    ids = torch.randint(4, TINY_GLM["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    grads = grad_storages(engine, set(params.seen))
    grads_bytes = grads.nbytes
    engine.step()
    # Only live parameter storages are excluded: freed gradient buffers' addresses may be reused by the
    # optimizer states the step allocates.
    optim = optimizer_storages(engine, set(params.seen))
    result = {
        **case,
        "trainable": counts.trainable,
        "total": counts.total,
        "params_bytes": params.nbytes,
        "grads_bytes": grads_bytes,
        "optim_bytes": optim.nbytes,
        "loss": float(loss.item()),
    }
    engine.destroy()
    return result


def main() -> None:
    import deepspeed

    from launcher.train.distributed import skip_inference_shm_op

    torch.set_num_threads(1)
    cases = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    skip_inference_shm_op()  # as a rank does: no JIT build of an op training never uses
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    results = [measure(case, world_size) for case in cases]
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    from launcher.train.entry import exit_rank_process

    # no interpreter teardown after ZeRO-3 engines: gloo's threads can abort it (SIGABRT, seen in CI)
    exit_rank_process(0)

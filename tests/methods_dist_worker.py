"""One rank of the 2-rank evaluate / export tests (spawned by methods_helpers.spawn_ranks).

usage: methods_dist_worker.py evaluate|export MODEL_DIR EVAL_FILE OUT_DIR
Rank 0 writes results into OUT_DIR for the test to compare with a 1-rank run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from methods_helpers import EVAL_METHODS, EXPORT_METHODS, OFFLOADED, features, load, zero3_ds_config


def engine_for(model: Any, lr: float, world_size: int, offload: bool = False) -> Any:
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=trainable, config=zero3_ds_config(2, world_size, lr, offload)
    )
    return engine


def evaluate(model_dir: str, eval_file: str, out: Path, rank: int, world_size: int) -> None:
    from launcher.train.evaluate import eval_loss, generate_samples
    from launcher.train.export import is_zero3_partitioned

    results: dict[str, Any] = {}
    for method in EVAL_METHODS:
        model, tokenizer, cfg = load(model_dir, method)
        examples, encoded = features(eval_file, tokenizer, cfg, 9)
        pad = tokenizer.pad_token_id
        key = cfg.name
        results[f"{key}/plain/loss"] = eval_loss(model, encoded, pad, 2)
        results[f"{key}/plain/samples"] = generate_samples(model, tokenizer, examples, cfg, rank, world_size)
        engine = engine_for(model, 1e-3, world_size)
        assert is_zero3_partitioned(engine.module)
        assert any(p.numel() == 0 for p in engine.module.parameters()), "ZeRO-3 did not partition"
        results[f"{key}/zero3/loss"] = eval_loss(engine, encoded, pad, 2)
        results[f"{key}/zero3/samples"] = generate_samples(
            engine.module, tokenizer, examples, cfg, rank, world_size
        )
    if rank == 0:
        (out / "evaluate.json").write_text(json.dumps(results, ensure_ascii=False, indent=1))


def export(model_dir: str, eval_file: str, out: Path, rank: int, world_size: int) -> None:
    from launcher.train.data import collate
    from launcher.train.export import export_final

    for method in EXPORT_METHODS:
        model, tokenizer, cfg = load(model_dir, method)
        _, encoded = features(eval_file, tokenizer, cfg, 8)
        pad = tokenizer.pad_token_id
        engine = engine_for(model, 2e-2, world_size, offload=cfg.name in OFFLOADED)
        engine.train()
        for step in range(3):  # each rank its own micro-batch
            start = (step * world_size + rank) * 2 % len(encoded)
            batch = collate(encoded[start : start + 2], pad)
            engine.backward(engine(**batch).loss)
            engine.step()
        engine.eval()
        with torch.no_grad():  # every rank runs the forward: it is a collective under ZeRO-3
            logits = engine.module(**collate(encoded[:2], pad)).logits
        target = out / cfg.name
        export_final(engine.module, cfg.method, tokenizer, target / "final", zero_stage=3, is_rank0=rank == 0)
        if rank == 0:
            torch.save(logits.detach().cpu(), target / "logits.pt")


def main() -> None:
    import deepspeed

    from launcher.train.distributed import skip_inference_shm_op

    torch.set_num_threads(1)
    mode, model_dir, eval_file, out_dir = sys.argv[1:5]
    skip_inference_shm_op()  # as a rank does: no JIT build of an op training never uses
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out = Path(out_dir)
    {"evaluate": evaluate, "export": export}[mode](model_dir, eval_file, out, rank, world_size)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    from launcher.train.entry import exit_rank_process

    exit_rank_process(0)  # as a real rank does: no interpreter teardown after ZeRO-3 (see its docstring)

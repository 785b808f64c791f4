"""Batch-split invariance: the same examples per optimizer step, split as micro-batch x accumulation x
ranks in different ways, train the same model, through the real entrypoint (fp32, a few steps).

Every step's loss, gradient norm (before clipping) and real tokens, and the final eval loss, agree within
1e-5 relative: LoRA (dropout 0) as 8x1x1, 2x4x1 and 4x1x2 with the run's own AdamW; and with plain SGD,
LoRA in the same three splits, full fine-tuning under ZeRO-3 with optimizer + parameter offload as 8x1x1
and 2x2x2, packed LoRA as 8x1x1 and 4x1x2 (a packed step's rows depend on the rank count's product
with the micro-batch only), and P-Tuning v2 as 8x1x1 and 2x4x1.

The trained weights are compared within 1e-5 under SGD: there they are the initial weights minus the
(clipped) gradients of every step, so they check every gradient element. Adam divides each element by
its own running magnitude, so an element whose true gradient is zero (a key bias: softmax ignores it)
moves by the learning rate in the direction of last-bit rounding noise, which differs between splits:
AdamW weights are compared within a fifteenth of one step's update instead (2e-4: the splits were
2.3e-5 apart here, and 3.5e-3 without the token weighting). Adam and clipping would also hide a
gradient off by a constant factor (a forgotten rank count); the gradient norm shows it.

Without a global token weighting each micro-batch's mean counts the same, so a short micro-batch's
tokens weigh more: the losses of these splits then differ from step 1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from train_helpers import make_run_dir, metrics, rank_output, start_runs_in_one_process, wait_all

from launcher.rundir.paths import RunPaths, read_json, write_json_atomic

pytestmark = pytest.mark.slow

STEPS = 4
REL = 1e-5
ADAMW_ATOL = 2e-4  # a fifteenth of one AdamW step (learning rate 3e-3); rounding noise gave 2.3e-5
LORA = {"method": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}  # no dropout: same network
SGD = {"optimizer": "SGD", "learning_rate": 0.5}
# group -> (method spec, settings shared by its runs, {split name: (micro-batch, accumulation, ranks)})
GROUPS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, tuple[int, int, int]]]] = {
    "lora-adamw": (LORA, {}, {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "4x1x2": (4, 1, 2)}),
    "lora": (LORA, SGD, {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "4x1x2": (4, 1, 2)}),
    "full-zero3-offload": (
        {"method": "full"},
        {**SGD, "zero_stage": 3, "offload": True},
        {"8x1x1": (8, 1, 1), "2x2x2": (2, 2, 2)},
    ),
    "lora-packed": (LORA, {**SGD, "packing": True}, {"8x1x1": (8, 1, 1), "4x1x2": (4, 1, 2)}),
    "ptuning-v2": (
        {"method": "ptuning", "version": "v2", "pre_seq_len": 4},
        SGD,
        {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1)},
    ),
}


def _use_sgd(paths: RunPaths) -> None:
    """Plain SGD in the run's DeepSpeed config (the scheduler keeps setting its learning rate); ZeRO takes
    torch's optimizers when told that they are meant."""
    config = read_json(paths.ds_config)
    config["optimizer"] = {"type": "SGD", "params": {"lr": config["optimizer"]["params"]["lr"]}}
    config |= {"zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    write_json_atomic(paths.ds_config, config)


@pytest.fixture(scope="module")
def split_runs(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> dict[str, dict[str, RunPaths]]:
    """Every group's runs, trained in one process (1 rank) and one pair of processes (2 ranks) at once."""
    root = tmp_path_factory.mktemp("batch-split")
    runs: dict[str, dict[str, RunPaths]] = {}
    by_ranks: dict[int, list[RunPaths]] = {1: [], 2: []}
    for group, (method_spec, settings, splits) in GROUPS.items():
        for split, (micro, accumulation, ranks) in splits.items():
            paths = make_run_dir(
                root,
                name=f"{group}-{split}",
                method_spec=method_spec,
                world_size=ranks,
                micro_batch=micro,
                accumulation=accumulation,
                max_steps=STEPS,
                save_steps=100,
                train_examples=64,
                eval_examples=6,
                eval_settings={"num_samples": 1, "max_new_tokens": 1, "batch_size": 2},
                **{k: v for k, v in settings.items() if k != "optimizer"},
            )
            if settings.get("optimizer") == "SGD":
                _use_sgd(paths)
            runs.setdefault(group, {})[split] = paths
            by_ranks[ranks].append(paths)
    procs = {n: start_runs_in_one_process(paths, n, root / f"ranks{n}.json") for n, paths in by_ranks.items()}
    for n, group_procs in procs.items():
        codes = wait_all(group_procs, timeout_s=600)
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in root.glob(f"ranks{n}.json.rank*.log"))
        assert codes == [0] * n, logs
    return runs


def _weights(paths: RunPaths) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(paths.final.glob("*.safetensors"))
    assert files, f"nothing exported in {paths.final}"
    return {f"{f.name}/{k}": v for f in files for k, v in load_file(str(f)).items()}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-7)


@pytest.mark.parametrize("group", list(GROUPS))
def test_every_split_trains_the_same_model(group: str, split_runs: dict[str, dict[str, RunPaths]]) -> None:
    runs = split_runs[group]
    for paths in runs.values():
        assert read_json(paths.result_json)["state"] == "COMPLETED", rank_output(paths)
    (reference_split, reference), *others = runs.items()
    expected = metrics(reference)
    assert [m["step"] for m in expected] == list(range(1, STEPS + 1))
    reference_weights = _weights(reference)
    for split, paths in others:
        got = metrics(paths)
        # the same examples in every step: the same real tokens
        assert [m["tokens"] for m in got] == [m["tokens"] for m in expected], split
        for mine, theirs in zip(got, expected, strict=True):
            assert _close(mine["loss"], theirs["loss"]), (split, mine, theirs)
            assert _close(mine["grad_norm"], theirs["grad_norm"]), (split, mine, theirs)
        weights = _weights(paths)
        assert weights.keys() == reference_weights.keys()
        for name, value in weights.items():
            tolerance = ADAMW_ATOL if group.endswith("adamw") else REL
            torch.testing.assert_close(
                value, reference_weights[name], rtol=REL, atol=tolerance, msg=f"{split} {name}"
            )
        eval_losses = (
            read_json(paths.result_json)["eval_loss"],
            read_json(reference.result_json)["eval_loss"],
        )
        assert _close(*eval_losses), (split, reference_split, eval_losses)

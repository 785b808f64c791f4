"""training.attn_implementation and training.liger_kernel: sdpa (the CPU default) gives eager's losses for
every method, packed and padded, P-Tuning v2's prefix masks included; GPU-only options are refused at
validate on this CPU machine, with the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import TypeAdapter
from test_packing import GLM, METHODS, _examples, _token_losses

from launcher.errors import SpecError
from launcher.plan.planner import load_and_plan
from launcher.rundir.run_config import RunConfig
from launcher.spec.schema import MethodSpec
from launcher.train.attention import resolve_attn_implementation
from launcher.train.data import IGNORE_INDEX
from launcher.train.packing import collate_packed, pack_rows, virtual_tokens

TOLERANCE = 1e-5


def _model(method: dict[str, Any], attn: str) -> tuple[torch.nn.Module, Any]:
    from transformers import GlmConfig, GlmForCausalLM

    from launcher.train.adapters import apply_method
    from launcher.train.packing import prepare_model

    torch.manual_seed(0)  # the same weights for both kernels
    spec = TypeAdapter(MethodSpec).validate_python(method)
    base = GlmForCausalLM(GlmConfig(**GLM, attn_implementation=attn))
    base.config.use_cache = False
    model, _ = apply_method(base, spec)
    prepare_model(model, spec)
    model.eval()  # no dropout: both kernels see the same computation
    return model, spec


def _padded_batch(examples: list[Any]) -> dict[str, torch.Tensor]:
    """Right-padded rows with an attention mask, as the unpacked collator builds them."""
    width = max(len(e.input_ids) for e in examples)
    ids = [e.input_ids + [0] * (width - len(e.input_ids)) for e in examples]
    labels = [e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in examples]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(mask),
    }


def _losses(model: torch.nn.Module, spec: Any, packed: bool) -> torch.Tensor:
    examples = _examples()
    slots = virtual_tokens(spec)
    if packed:
        rows = pack_rows([len(e.input_ids) + slots for e in examples], 40)
        batch, _ = collate_packed([[examples[i] for i in row] for row in rows], pad_token_id=0, slots=slots)
    else:
        batch = _padded_batch(examples)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
    if not packed:
        logits = logits[:, slots:]  # peft puts P-Tuning v1's prompt in front of every row
    return _token_losses(logits, labels)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", list(METHODS))
def test_sdpa_gives_eager_losses(name: str, packed: bool) -> None:
    eager = _losses(*_model(METHODS[name], "eager"), packed=packed)
    sdpa = _losses(*_model(METHODS[name], "sdpa"), packed=packed)
    assert eager.abs().sum() > 0
    assert torch.allclose(sdpa, eager, atol=TOLERANCE, rtol=0), (name, (sdpa - eager).abs().max().item())


def _run_config(method: dict[str, Any], **training: Any) -> RunConfig:
    from launcher.rundir.identity import run_id_of

    data = {
        "experiment": "e",
        "name": "r",
        "run_id": "x",
        "method": method,
        "model": {"builtin": "tiny-glm"},
        "tokenizer": {},
        "data": {"builtin": "dialogue"},
        "template": "auto",
        "training": training,
        "eval": {},
        "resources": {
            **{"nodes": 1, "gpus_per_node": 1, "zero_stage": 2, "est_mem_gib": 1.0, "fits": True},
            **{"offload_optimizer": False, "offload_param": False, "gradient_checkpointing": False},
        },
        "cluster": {},
    }
    cfg = RunConfig.model_validate(data)
    assert run_id_of(cfg)  # hashable as planned runs are
    return cfg


def test_auto_picks_the_fastest_exact_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    lora, v2 = METHODS["lora"], METHODS["ptuning-v2"]
    assert resolve_attn_implementation(_run_config(lora), on_cuda=False) == "sdpa"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real_find_spec(n, *a)
    )
    assert resolve_attn_implementation(_run_config(lora), on_cuda=True) == "flash_attention_2"
    assert resolve_attn_implementation(_run_config(v2), on_cuda=True) == "sdpa"  # the prefix needs a mask
    assert resolve_attn_implementation(_run_config(lora, precision="fp32"), on_cuda=True) == "sdpa"
    assert (
        resolve_attn_implementation(_run_config(lora, attn_implementation="eager"), on_cuda=True) == "eager"
    )


def test_new_options_at_their_default_keep_existing_run_ids() -> None:
    from launcher.rundir.identity import identity_fields

    fields = identity_fields(_run_config(METHODS["lora"]))
    assert "attn_implementation" not in fields["training"] and "liger_kernel" not in fields["training"]
    chosen = identity_fields(_run_config(METHODS["lora"], attn_implementation="eager", liger_kernel=True))
    assert chosen["training"]["attn_implementation"] == "eager" and chosen["training"]["liger_kernel"] is True


SPEC = """\
experiment: t
model: {builtin: tiny-glm}
data: {builtin: dialogue}
training:
  precision: bf16
  OPTION
methods:
  - method: lora
  - method: ptuning
    version: v2
"""


@pytest.mark.parametrize(
    ("option", "needles"),
    [
        (
            "liger_kernel: true",
            ["training.liger_kernel", "Triton kernels for CUDA GPUs", "liger_kernel: false"],
        ),
        ("attn_implementation: flash_attention_2", ["training.attn_implementation", "flash-attn", "sdpa"]),
    ],
    ids=["liger", "flash"],
)
def test_gpu_only_options_are_refused_on_this_cpu_machine(
    tmp_path: Path, option: str, needles: list[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the options are allowed where their packages are installed")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("OPTION", option))
    with pytest.raises(SpecError) as info:
        load_and_plan(spec)
    problems = info.value.problems
    assert any(all(n in p for n in needles) and p.startswith(f"{spec}:6:") for p in problems), problems
    assert not (tmp_path / "runs").exists()  # nothing written

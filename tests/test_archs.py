"""The model is the source of truth: layer list, linear (and Conv1D) layers and KV width read from each
family's own model agree with what training builds (peft's wrapped modules, the real KV cache), and the
plan of a spec on such a model shows LoRA's resolved targets."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from families import FAMILIES

from launcher.plan.archs import arch_from_model_dir, short_module_names
from launcher.plan.memory_model import param_layout
from launcher.spec.schema import LoraMethod, PtuningMethod
from launcher.train.adapters import apply_method, find_layer_list

torch.set_num_threads(1)


def _load(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layers_linears_and_kv_width_come_from_the_model(family: str, family_dirs: dict[str, Path]) -> None:
    arch = arch_from_model_dir(str(family_dirs[family]))
    model = _load(family_dirs[family])
    path, blocks = find_layer_list(model)
    assert (path, len(blocks)) == (arch.layer_prefix, arch.num_layers) == (path, 2)
    # KV width: what a real forward puts into the cache
    out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    keys = out.cache.layers[0].keys
    assert (arch.num_key_value_heads, arch.head_dim) == (keys.shape[1], keys.shape[-1])
    # all-linear: the modules peft wraps are the planner's layer linears (Conv1D included)
    lora = LoraMethod(method="lora", r=4)
    peft_model, counts = apply_method(model, lora)
    wrapped = {
        name.split(f"{path}.0.", 1)[1] for name in peft_model.targeted_module_names if f"{path}.0." in name
    }
    assert wrapped == {lin.name for lin in arch.layer_linears} and wrapped
    assert param_layout(arch, lora).trainable_params == counts.trainable


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefix_size_from_the_measured_kv_width(family: str, family_dirs: dict[str, Path]) -> None:
    arch = arch_from_model_dir(str(family_dirs[family]))
    method = PtuningMethod(method="ptuning", version="v2", pre_seq_len=3)
    _, counts = apply_method(_load(family_dirs[family]), method)
    assert param_layout(arch, method).trainable_params == counts.trainable == 3 * 2 * 2 * arch.kv_dim


def test_gpt2_conv1d_is_a_lora_target(family_dirs: dict[str, Path]) -> None:
    arch = arch_from_model_dir(str(family_dirs["gpt2"]))
    names = [lin.name for lin in arch.layer_linears]
    assert names == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert short_module_names(names) == ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    assert [lin.name for lin in arch.lora_linears(["c_attn"])] == ["attn.c_attn"]
    # fan-in/out of Conv1D (weight stored (in, out)): c_attn 64 -> 3 x 64
    assert (arch.layer_linears[0].in_features, arch.layer_linears[0].out_features) == (64, 192)


def test_plan_shows_lora_targets_resolved_on_the_model(tmp_path: Path, family_dirs: dict[str, Path]) -> None:
    from launcher.plan.planner import load_and_plan

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        textwrap.dedent(
            f"""\
            experiment: archs
            model: {{path: {family_dirs["gpt2"]}}}
            data: {{builtin: dialogue}}
            methods:
              - {{method: lora}}
              - {{method: lora, name: attn, target_modules: [c_attn]}}
              - {{method: freeze, trainable_layers: 1}}
            """
        ),
        encoding="utf-8",
    )
    rows = load_and_plan(spec).rows()
    assert [row["lora_targets"] for row in rows] == [
        ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
        ["c_attn"],
        None,
    ]

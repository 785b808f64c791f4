"""Each fine-tuning method on a tiny GLM built from a config: which parameters train, counts, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import GlmConfig, GlmForCausalLM

from launcher.errors import UserError
from launcher.spec.schema import FreezeMethod, FullMethod, LoraMethod, PtuningMethod
from launcher.train.adapters import ParamCounts, apply_method, count_params, find_layer_list

torch.set_num_threads(1)

HIDDEN = 32
LAYERS = 3


def tiny_glm() -> GlmForCausalLM:
    torch.manual_seed(0)
    config = GlmConfig(
        vocab_size=96,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return GlmForCausalLM(config)


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_full_trains_everything() -> None:
    model = tiny_glm()
    total = sum(p.numel() for p in model.parameters())
    model, counts = apply_method(model, FullMethod(method="full"))
    assert counts == ParamCounts(trainable=total, total=total)
    assert (
        counts.describe() == f"trainable params: {total:,d} || all params: {total:,d} || trainable%: 100.0000"
    )


def test_freeze_last_layers() -> None:
    model = tiny_glm()
    model, counts = apply_method(model, FreezeMethod(method="freeze", trainable_layers=1))
    names = trainable_names(model)
    assert names and all(n.startswith("model.layers.2.") for n in names)
    assert len(names) == sum(1 for n, _ in model.named_parameters() if n.startswith("model.layers.2."))
    per_layer = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.2."))
    assert counts.trainable == per_layer
    assert counts.total == sum(p.numel() for p in model.parameters())


def test_freeze_patterns_union_with_layers() -> None:
    model = tiny_glm()
    method = FreezeMethod(
        method="freeze", trainable_layers=1, trainable_patterns=[r"mlp\.down_proj", "^lm_head"]
    )
    model, _ = apply_method(model, method)
    names = trainable_names(model)
    assert "lm_head.weight" in names
    assert {f"model.layers.{i}.mlp.down_proj.weight" for i in range(LAYERS)} <= names
    assert "model.layers.0.self_attn.q_proj.weight" not in names
    assert "model.layers.2.self_attn.q_proj.weight" in names
    assert "model.embed_tokens.weight" not in names


def test_freeze_pattern_matching_nothing_lists_real_names() -> None:
    with pytest.raises(UserError) as err:
        apply_method(tiny_glm(), FreezeMethod(method="freeze", trainable_patterns=["dense_h_to_4h"]))
    message = str(err.value)
    assert "'dense_h_to_4h' matches no parameter" in message
    assert "model.embed_tokens.weight" in message and "self_attn" in message


def test_freeze_bad_regex_and_too_many_layers() -> None:
    with pytest.raises(UserError, match="not a valid regex"):
        apply_method(tiny_glm(), FreezeMethod(method="freeze", trainable_patterns=["mlp("]))
    with pytest.raises(UserError, match="has only 3 layers"):
        apply_method(tiny_glm(), FreezeMethod(method="freeze", trainable_layers=4))


def test_layer_list_found_generically() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.ReLU()])
            self.backbone = torch.nn.Module()
            self.backbone.blocks = torch.nn.ModuleList([Block() for _ in range(5)])

    path, blocks = find_layer_list(Odd())
    assert path == "backbone.blocks" and len(blocks) == 5


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["self_attn.o_proj"]])
def test_lora_targets(targets: list[str] | str) -> None:
    model, counts = apply_method(tiny_glm(), LoraMethod(method="lora", r=4, target_modules=targets))
    names = trainable_names(model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    wanted = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    if targets != "all-linear":
        wanted = [t.split(".")[-1] for t in targets]
    hit = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert hit == set(wanted)
    assert not any("lm_head" in n for n in names)
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < counts.trainable < counts.total


def test_lora_unknown_target_lists_linear_names() -> None:
    with pytest.raises(UserError) as err:
        apply_method(tiny_glm(), LoraMethod(method="lora", target_modules=["query_key_value"]))
    message = str(err.value)
    assert "'query_key_value' is not a Linear module" in message
    for name in ("q_proj", "gate_up_proj", "down_proj", "lm_head"):
        assert name in message
    # a non-Linear module (the MLP block) is refused too, before peft's less clear error
    with pytest.raises(UserError, match="'mlp' is not a Linear module"):
        apply_method(tiny_glm(), LoraMethod(method="lora", target_modules=["mlp"]))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_ptuning(version: str) -> None:
    method = PtuningMethod(
        method="ptuning", version=version, pre_seq_len=5, prefix_projection=True, encoder_hidden_size=16
    )
    model, counts = apply_method(tiny_glm(), method)
    names = trainable_names(model)
    assert names and all(n.startswith("prompt_encoder.default.") for n in names)
    embedding = model.prompt_encoder["default"].embedding.weight
    if version == "v1":
        assert type(model.prompt_encoder["default"]).__name__ == "PromptEncoder"
        assert embedding.shape == (5, HIDDEN)
    else:
        assert type(model.prompt_encoder["default"]).__name__ == "PrefixEncoder"
        assert model.peft_config["default"].prefix_projection is True
        # projection: token_dim -> encoder_hidden_size -> layers * 2 * kv width
        transform = model.prompt_encoder["default"].transform
        assert transform[0].out_features == 16 and transform[2].out_features == LAYERS * 2 * 2 * 8
    base_total = sum(p.numel() for p in tiny_glm().parameters())
    assert counts.total == base_total + counts.trainable
    # the wrapped model still trains: a backward pass reaches the prompt encoder
    ids = torch.tensor([[5, 6, 7, 8]])
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0


def test_ptuning_v2_refuses_gradient_checkpointing_early() -> None:
    method = PtuningMethod(method="ptuning", version="v2")
    with pytest.raises(UserError, match=r"ptuning v2 .* does not work with gradient checkpointing"):
        apply_method(tiny_glm(), method, gradient_checkpointing=True)
    model = tiny_glm()
    model.activation_checkpointing_enable()
    with pytest.raises(UserError, match="gradient_checkpointing: false"):
        apply_method(model, method)
    # v1 works with it
    model, _ = apply_method(
        tiny_glm(), PtuningMethod(method="ptuning", version="v1"), gradient_checkpointing=True
    )
    assert model.get_base_model().is_activation_checkpointing


def test_gradient_checkpointing_freeze_gets_gradients() -> None:
    model, _ = apply_method(
        tiny_glm(), FreezeMethod(method="freeze", trainable_layers=1), gradient_checkpointing=True
    )
    model.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_count_params_zero3_uses_ds_numel() -> None:
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_numel = 1234  # type: ignore[attr-defined]
    module = torch.nn.Module()
    module.register_parameter("w", p)
    assert count_params(module) == ParamCounts(trainable=1234, total=1234)

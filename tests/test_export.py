"""Export: train a few steps, export to final/, reload on CPU the way users do, check the weights are the
trained ones (not the base, not empty) - in one process and under real DeepSpeed ZeRO-3 on 2 ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from methods_helpers import EXPORT_METHODS, OFFLOADED, features, load, spawn_ranks
from peft import PeftModel
from peft.utils import get_peft_model_state_dict, load_peft_weights
from transformers import AutoModelForCausalLM, AutoTokenizer

from launcher.train.data import collate
from launcher.train.export import MERGED_DIRNAME, export_final

torch.set_num_threads(1)
METHOD_IDS = [m.get("name") or m["method"] for m in EXPORT_METHODS]
ONE_PROCESS = [(m, name) for m, name in zip(EXPORT_METHODS, METHOD_IDS, strict=True) if name not in OFFLOADED]


def probe(tokenizer: Any, encoded: list[Any]) -> dict[str, torch.Tensor]:
    return collate(encoded[:2], tokenizer.pad_token_id)


def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def base_model(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def check_reloaded(
    method: dict[str, Any], final: Path, model_dir: Path, trained_logits: torch.Tensor
) -> None:
    """Reload ``final`` on CPU; its logits must be the trained model's and not the base model's."""
    tokenizer = AutoTokenizer.from_pretrained(str(final))  # the tokenizer travels with the export
    encoded = features_for(model_dir, tokenizer)
    batch = probe(tokenizer, encoded)
    base_logits = logits_of(base_model(model_dir), batch)
    if method["method"] in ("lora", "ptuning"):
        assert (final / "adapter_config.json").is_file() and not (final / "config.json").exists()
        saved = load_peft_weights(str(final), device="cpu")
        assert saved and all(t.numel() > 0 for t in saved.values()), "empty adapter tensors"
        reloaded = PeftModel.from_pretrained(base_model(model_dir), str(final))
    else:
        assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
        reloaded = AutoModelForCausalLM.from_pretrained(str(final))
    got = logits_of(reloaded, batch)
    torch.testing.assert_close(got, trained_logits, atol=2e-5, rtol=1e-5)
    # P-Tuning v1 returns logits for its virtual tokens too: compare the real positions with the base
    real = got[:, -base_logits.shape[1] :]
    assert (real - base_logits).abs().max() > 1e-3, "the export holds the base model, not the trained one"
    if method.get("merge"):
        merged = AutoModelForCausalLM.from_pretrained(str(final / MERGED_DIRNAME))
        assert not any("lora" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(logits_of(merged, batch), trained_logits, atol=2e-5, rtol=1e-5)


_FEATURES: dict[str, list[Any]] = {}


def features_for(model_dir: Path, tokenizer: Any) -> list[Any]:
    from methods_helpers import run_config

    from launcher.builtins.demo_data import ensure_builtin_data

    key = str(model_dir)
    if key not in _FEATURES:
        cfg = run_config(model_dir, {"method": "full"})
        _FEATURES[key] = features(str(ensure_builtin_data("dialogue")[1]), tokenizer, cfg, 8)[1]
    return _FEATURES[key]


@pytest.mark.parametrize("method", [m for m, _ in ONE_PROCESS], ids=[name for _, name in ONE_PROCESS])
def test_export_reload_one_process(method: dict[str, Any], tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tokenizer, cfg = load(str(tiny_model_dir), method)
    encoded = features_for(tiny_model_dir, tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step in range(3):
        batch = collate(encoded[2 * step : 2 * step + 2], tokenizer.pad_token_id)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed and all(p.requires_grad for n, p in model.named_parameters() if n in changed)
    trained_logits = logits_of(model, probe(tokenizer, encoded))

    final = tmp_path / "run" / "final"
    export_final(model, cfg.method, tokenizer, final, zero_stage=0, is_rank0=True)
    assert sorted(p.name for p in final.parent.iterdir()) == ["final"], "temporary export dirs left behind"
    check_reloaded(method, final, tiny_model_dir, trained_logits)

    if method["method"] == "lora":  # the adapter file holds exactly the trained LoRA tensors
        saved = load_peft_weights(str(final), device="cpu")
        expected = get_peft_model_state_dict(model)
        assert saved.keys() == expected.keys()
        assert all(torch.equal(saved[k], expected[k]) for k in saved)
    if method["method"] == "freeze":  # frozen layers are the base's, the trained layer is new
        reloaded = AutoModelForCausalLM.from_pretrained(str(final)).state_dict()
        base = base_model(tiny_model_dir).state_dict()
        assert torch.equal(
            reloaded["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"]
        )
        assert not torch.equal(
            reloaded["model.layers.1.mlp.down_proj.weight"], base["model.layers.1.mlp.down_proj.weight"]
        )


def test_export_replaces_previous_and_failure_keeps_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tokenizer, cfg = load(str(tiny_model_dir), {"method": "lora", "r": 2})
    final = tmp_path / "final"
    final.mkdir()
    (final / "stale.txt").write_text("from an earlier export")
    export_final(model, cfg.method, tokenizer, final, zero_stage=0, is_rank0=True)
    assert not (final / "stale.txt").exists() and (final / "adapter_model.safetensors").is_file()

    class BrokenTokenizer:
        def save_pretrained(self, path: str) -> None:
            raise OSError("disk full")

    before = sorted(p.name for p in final.iterdir())
    with pytest.raises(OSError, match="disk full"):
        export_final(model, cfg.method, BrokenTokenizer(), final, zero_stage=0, is_rank0=True)
    assert sorted(p.name for p in final.iterdir()) == before  # the previous export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no half-written temp dir


@pytest.mark.slow
def test_export_under_zero3_two_ranks(
    tiny_model_dir: Path, dialogue_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """Real DeepSpeed ZeRO-3 (every tensor partitioned) on 2 gloo ranks: the gathered export reloads
    to exactly the model the ranks were running."""
    spawn_ranks(["export", str(tiny_model_dir), str(dialogue_files[1]), str(tmp_path)], timeout_s=400)
    for method, name in zip(EXPORT_METHODS, METHOD_IDS, strict=True):
        trained_logits = torch.load(tmp_path / name / "logits.pt")
        check_reloaded(method, tmp_path / name / "final", tiny_model_dir, trained_logits)

"""The built-in tiny model: deterministic, cached, safe under concurrent builds, and actually pretrained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from launcher.builtins.cache import build_once, cache_dir
from launcher.builtins.demo_data import generate, pretraining_corpus
from launcher.builtins.tiny import (
    BUILD_INFO,
    TinyConfig,
    build_info,
    build_tiny_model,
    ensure_tiny_model,
    weights_sha256,
)
from launcher.cli import main
from launcher.train.data import Example, collate, encode_for_training

# A reduced build (a few pretraining steps on a small corpus) for the tests that build from scratch.
QUICK = TinyConfig(pretrain_steps=3, corpus_dialogues=200, batch_size=4)


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_build_is_deterministic(tmp_path: Path) -> None:
    first = build_tiny_model(_mkdir(tmp_path / "a"), QUICK)
    second = build_tiny_model(_mkdir(tmp_path / "b"), QUICK)
    assert first["weights_sha256"] == second["weights_sha256"]
    assert first["heldout_loss"] == second["heldout_loss"]
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_concurrent_builds_publish_one_directory(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; "
        "from launcher.builtins.tiny import TinyConfig, ensure_tiny_model; "
        "cfg = TinyConfig(pretrain_steps=3, corpus_dialogues=200, batch_size=4); "
        "print('BUILT', ensure_tiny_model(Path(sys.argv[1]), cfg))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].split("BUILT ")[-1].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1]
    built = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert built == [Path(outputs[0]).name]  # one directory, no temporary leftovers
    assert (Path(outputs[0]) / "config.json").is_file() and (Path(outputs[0]) / BUILD_INFO).is_file()
    # the cached build is reused, not rebuilt
    stamp = (Path(outputs[0]) / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path, QUICK) == Path(outputs[0])
    assert (Path(outputs[0]) / "model.safetensors").stat().st_mtime_ns == stamp


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def broken(out: Path) -> None:
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_once(tmp_path / "art", broken)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    assert build_once(tmp_path / "art", lambda out: (out / "ok").write_text("1")) == tmp_path / "art"


def test_cache_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LAUNCHER_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LAUNCHER_CACHE_DIR")
    assert cache_dir() == Path(__file__).resolve().parent.parent / ".cache" / "launcher"


def test_tokenizer_round_trips_chinese(tiny_model_dir: Path) -> None:
    tok = _tokenizer(tiny_model_dir)
    texts = [r["prompt"] + r["response"] for r in generate("dialogue", "eval", 50)]
    texts += [
        "[Round 0]\n问：我的宠物叫什么名字？\n答：你的猫叫咪咪。\n",
        "### Instruction:\n3加5等于多少？ abc",
    ]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
    assert tok(texts[0])["input_ids"][0] == tok.bos_token_id
    assert {tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id} == {0, 1, 2, 3}
    unseen = tok("龘😀", add_special_tokens=False)["input_ids"]
    assert unseen == [tok.unk_token_id, tok.unk_token_id]


def _sequence_loss(model: Any, batch: dict[str, Any]) -> float:
    import torch

    with torch.no_grad():
        return float(model(**batch).loss)


def test_pretrained_base_knows_the_language_but_not_the_task(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = _tokenizer(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    random_init = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir)).eval()

    # held-out sentences (a seed the pretraining never saw), plain text
    lines = pretraining_corpus(40, held_out=True)[:32]
    ids = [[*tok(line)["input_ids"], tok.eos_token_id] for line in lines]
    plain = collate([{"input_ids": x, "labels": x} for x in ids], tok.pad_token_id)
    base_loss, random_loss = _sequence_loss(base, plain), _sequence_loss(random_init, plain)
    assert base_loss < 0.3 * random_loss, (base_loss, random_loss)
    assert base_loss < 1.5

    # the fine-tuning task (answer after the chatglm template) is NOT solved yet: much higher loss
    records = generate("dialogue", "eval", 64)
    examples = [
        Example(str(i), [tuple(t) for t in r["history"]], r["prompt"], r["response"])
        for i, r in enumerate(records)
    ]
    task = collate([encode_for_training(e, tok, "chatglm", 512, 64) for e in examples], tok.pad_token_id)
    task_loss = _sequence_loss(base, task)
    assert task_loss > 1.3 * base_loss, (task_loss, base_loss)

    info = build_info(tiny_model_dir)
    assert info["heldout_loss"] < 0.3 * info["random_init_heldout_loss"]
    assert info["weights_sha256"] == weights_sha256(base)


def test_cli_build_and_info(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tiny", "build"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_model_dir)
    assert main(["tiny", "info", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["path"] == str(tiny_model_dir) and record["num_parameters"] > 100_000


def test_pretraining_corpus_has_no_prompt_template() -> None:
    dialogues = pretraining_corpus(200)
    assert len(dialogues) == 200 + 200 // 3  # dialogues + SPO sentences
    assert not any("问：" in t or "答：" in t or "[Round" in t or "###" in t for t in dialogues)
    assert sum("\n" in t for t in dialogues) == 200  # one multi-line text per dialogue
    assert pretraining_corpus(200) == dialogues  # deterministic
    held_out = [t for t in pretraining_corpus(200, held_out=True) if "\n" in t]
    assert set(held_out).isdisjoint(dialogues)
    assert not any("\n" in t for t in pretraining_corpus(50, style="sentences"))

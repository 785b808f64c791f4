"""`launcher convert chatglm`: tiny checkpoints in the original ChatGLM2/3 and GLM-4 layouts, converted
by the real command, against a reference of the original architecture and tokenizers
(tests/chatglm_reference.py): logits within 1e-5 on unpadded and left-padded batches, the same greedy
generations, the same token ids for plain text, chats and launcher's training layout; and the
command's contract (exit 2 naming the file and the reason, SRC only read, DST all or nothing)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import chatglm_reference as ref
import pytest
import torch
from chatglm_fixtures import Case, chatglm_cases

from launcher.cli import main

torch.set_num_threads(1)
PLAIN_TEXTS = [
    "你好，世界！今天天气怎么样？",
    "Hello world, a sophisticated tokenizer.",
    "  two leading spaces,  double  spaces and a trailing one ",
    "line one\nline two\n\n\nthree newlines",
    "tabs\tand digits 2024-11-30, 3.14159",
    "rare 龘 and an emoji 🙂 fall back to bytes",
    "",
]
_MODELS: dict[str, Any] = {}


@pytest.fixture(scope="session")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return chatglm_cases(tmp_path_factory.getbasetemp() / "chatglm")


def model_of(case: Case) -> Any:
    from transformers import AutoModelForCausalLM

    if case.name not in _MODELS:
        _MODELS[case.name] = AutoModelForCausalLM.from_pretrained(case.dst, dtype=torch.float32).eval()
    return _MODELS[case.name]


def tokenizer_of(case: Case) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(case.dst)  # no trust_remote_code: a native tokenizer


# --- the network ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chatglm3", "chatglm2_bin", "mha_rope", "glm4"])
def test_logits_match_the_original_within_1e_5(name: str, cases: dict[str, Case]) -> None:
    case = cases[name]
    model = model_of(case)
    assert type(model).__name__ == "GlmForCausalLM"
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, case.vocab, (3, 13), generator=gen)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    want = ref.forward(case.weights, case.cfg, ids)
    unpadded = float((got - want).abs().max())

    # Left padding as the original tokenizer pads: 0, 4 and 9 pads; positions count from each first token.
    mask = torch.ones_like(ids)
    for row, pads in enumerate((0, 4, 9)):
        mask[row, :pads] = 0
    padded_ids = ids.masked_fill(mask == 0, 0)
    positions = ref.tokenizer_positions(mask)
    with torch.no_grad():
        got_padded = model(input_ids=padded_ids, attention_mask=mask, position_ids=positions).logits
        alone = model(input_ids=padded_ids[2:, 9:]).logits  # row 2 without its padding
    want_padded = ref.forward(case.weights, case.cfg, padded_ids, mask, positions)
    real = mask.bool()
    padded = float((got_padded - want_padded).abs()[real].max())
    print(f"\n{name}: max |logit difference| {unpadded:.2e} unpadded, {padded:.2e} left-padded")
    assert unpadded < 1e-5 and padded < 1e-5
    torch.testing.assert_close(got_padded[2:, 9:], alone, atol=1e-5, rtol=0)  # padding changes nothing
    assert float(want.abs().max()) > 1.0  # the logits are not trivially small


@pytest.mark.parametrize("name", ["chatglm3", "glm4"])
def test_greedy_generation_matches_the_original(name: str, cases: dict[str, Case]) -> None:
    case = cases[name]
    model, tokenizer = model_of(case), tokenizer_of(case)
    prompts = ["你好，请介绍一下你自己。", "Hello", "巴西的首都是哪里？我平时喜欢打篮球。"]
    rows = [case.tokenizer.encode(p) for p in prompts]
    stop = list(model.generation_config.eos_token_id)
    want = ref.greedy(case.weights, case.cfg, rows, tokenizer.pad_token_id, max_new_tokens=12, stop_ids=stop)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)  # left padding, as the original
    assert batch["input_ids"][0].tolist()[-len(rows[0]) :] == rows[0]
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    got = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        got.append(row[:cut])
    assert got == want and any(want)


# --- the tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chatglm3", "chatglm2_bin", "glm4"])
def test_tokenizer_ids_match_the_original_on_plain_text(name: str, cases: dict[str, Case]) -> None:
    case = cases[name]
    tokenizer = tokenizer_of(case)
    for text in PLAIN_TEXTS:
        assert tokenizer(text)["input_ids"] == case.tokenizer.encode(text), text
        plain = case.tokenizer.encode_text(text)
        assert tokenizer.decode(plain) == case.tokenizer.decode(plain), text
    # the special tokens sit at the original ids and the pair form ends with eos, as the original's
    for special, original_id in case.tokenizer.special.items():
        assert tokenizer.convert_tokens_to_ids(special) == original_id, special
    pair = tokenizer("问", "答")["input_ids"]
    assert pair == case.tokenizer.encode("问") + case.tokenizer.encode_text("答") + [tokenizer.eos_token_id]


def test_stop_tokens_and_config_are_the_originals(cases: dict[str, Case]) -> None:
    for name, stops in (
        ("chatglm3", ["</s>", "<|user|>", "<|observation|>"]),
        ("chatglm2_bin", ["</s>"]),
        ("glm4", ["<|endoftext|>", "<|user|>", "<|observation|>"]),
    ):
        case = cases[name]
        tokenizer = tokenizer_of(case)
        generation = json.loads((case.dst / "generation_config.json").read_text())
        ids = [tokenizer.convert_tokens_to_ids(s) for s in stops]
        assert generation["eos_token_id"] == ids and tokenizer.eos_token_id == ids[0]
        config = json.loads((case.dst / "config.json").read_text())
        assert config["model_type"] == "glm" and "auto_map" not in config
        assert config["vocab_size"] == case.cfg.padded_vocab_size  # the padded vocabulary is kept
        assert config["rope_parameters"]["rope_theta"] == 10000.0 * case.cfg.rope_ratio
        record = json.loads((case.dst / "conversion.json").read_text())
        assert record["family"] == case.family


CHATGLM3_CHAT = [
    {
        "role": "system",
        "content": "你是一个助手。",
        "tools": [{"name": "weather", "parameters": {"city": "城市"}}],
    },
    {"role": "user", "content": "北京天气怎么样？"},
    {"role": "assistant", "metadata": "weather", "content": "tool_call(city='北京')"},
    {"role": "observation", "content": '{"temperature": 22}'},
    {"role": "assistant", "content": "北京今天 22 度。"},
    {"role": "user", "content": " leading space, then\nlines"},
    {"role": "assistant", "content": ""},
    {"role": "user", "content": "Hello again"},
]


def test_chat_template_reproduces_chatglm3_chat(cases: dict[str, Case]) -> None:
    case = cases["chatglm3"]
    tokenizer = tokenizer_of(case)
    for messages in (CHATGLM3_CHAT, CHATGLM3_CHAT[1:2]):
        got = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert got == case.tokenizer.chat(messages), messages
    with pytest.raises(Exception, match="roles are system, user, assistant and observation"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_reproduces_chatglm2_prompt(cases: dict[str, Case]) -> None:
    case = cases["chatglm2_bin"]
    tokenizer = tokenizer_of(case)
    history = [("你好", "你好！有什么可以帮你？"), ("1+1 等于几？", "等于 2。")]
    messages = [
        m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
    ]
    messages.append({"role": "user", "content": "谢谢"})
    got = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert got == case.tokenizer.chatglm2_prompt(history, "谢谢")
    with pytest.raises(Exception, match="no system role"):
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}])


def test_chat_template_reproduces_glm4_chat(cases: dict[str, Case]) -> None:
    case = cases["glm4"]
    tokenizer = tokenizer_of(case)
    messages = [dict(m) for m in CHATGLM3_CHAT if m["content"] and not m["content"].startswith(" ")]
    got = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert got == case.tokenizer.chat(messages)


@pytest.mark.parametrize(
    ("name", "template"), [("chatglm3", "chatglm3"), ("chatglm2_bin", "chatglm2"), ("glm4", "glm4")]
)
def test_named_template_lays_out_training_data_as_the_original(
    name: str, template: str, cases: dict[str, Case]
) -> None:
    """Source + target of launcher's data pipeline are the ids the original fine-tuning builds."""
    from launcher.train.data import IGNORE_INDEX, Example, encode_for_training

    case = cases[name]
    tokenizer = tokenizer_of(case)
    assert json.loads((case.dst / "conversion.json").read_text())["template"] == template
    example = Example(
        "x", history=[("第一个问题", "第一个回答")], query="第二个问题？", response="第二个回答。"
    )
    encoded = encode_for_training(example, tokenizer, template, 512, 128)
    original = case.tokenizer
    if template == "chatglm2":
        source = original.chatglm2_prompt(example.history, example.query)
    else:
        turns = [
            {"role": "user", "content": "第一个问题"},
            {"role": "assistant", "content": "第一个回答"},
            {"role": "user", "content": "第二个问题？"},
        ]
        # the reply's own "\n" after <|assistant|> is part of the prompt here
        source = original.chat(turns) + original.encode_text("\n")
    target = [*original.encode_text(example.response), tokenizer.eos_token_id]
    assert encoded.input_ids == source + target
    assert encoded.labels == [IGNORE_INDEX] * len(source) + target


# --- the command's contract --------------------------------------------------------------------


def _config(src: Path, **changes: Any) -> None:
    path = src / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _weights(src: Path, edit: Any) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


BAD_INPUTS: list[tuple[str, Any, list[str]]] = [
    ("no config", lambda s: (s / "config.json").unlink(), ["config.json: not found"]),
    ("bad json", lambda s: (s / "config.json").write_text("{\n  nope"), ["config.json:2: invalid JSON"]),
    (
        "chatglm-6b v1",
        lambda s: _config(s, position_encoding_2d=True, padded_vocab_size=None, vocab_size=130528),
        ["config.json", "ChatGLM-6B (v1)", "does not convert"],
    ),
    ("layernorm", lambda s: _config(s, rmsnorm=False), ["config.json", "rmsnorm is False", "LayerNorm"]),
    (
        "bad value",
        lambda s: _config(s, hidden_size="64"),
        ["config.json: hidden_size must be a positive integer, got '64'"],
    ),
    (
        "shape",
        lambda s: _config(s, ffn_hidden_size=100),
        ["model.safetensors", "mlp.dense_4h_to_h.weight has shape [64, 96]", "implies [64, 100]"],
    ),
    (
        "missing tensor",
        lambda s: _weights(s, lambda t: t.pop("transformer.encoder.final_layernorm.weight")),
        ["model.safetensors", "missing transformer.encoder.final_layernorm.weight"],
    ),
    (
        "p-tuning tensor",
        lambda s: _weights(
            s, lambda t: t.update({"transformer.prefix_encoder.embedding.weight": torch.zeros(2, 2)})
        ),
        ["model.safetensors", "unexpected tensor transformer.prefix_encoder", "P-Tuning v2"],
    ),
    (
        "corrupt weights",
        lambda s: (s / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage"),
        ["model.safetensors", "not a readable safetensors file"],
    ),
    ("no tokenizer", lambda s: (s / "tokenizer.model").unlink(), ["tokenizer.model: not found"]),
    (
        "not sentencepiece",
        lambda s: (s / "tokenizer.model").write_bytes(b"\xff\xfe not a model"),
        ["tokenizer.model", "not a sentencepiece model"],
    ),
    (
        "unknown family",
        lambda s: _config(s, _name_or_path=None),
        ["cannot tell ChatGLM2-6B from ChatGLM3-6B", "--family chatglm3"],
    ),
]


@pytest.mark.parametrize(("what", "breaks", "expected"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_exit_2_naming_the_file_and_the_reason(
    what: str, breaks: Any, expected: list[str], cases: dict[str, Case], tmp_path: Path, capsys: Any
) -> None:
    src, dst = tmp_path / "original", tmp_path / "out"
    shutil.copytree(cases["chatglm3"].src, src)
    breaks(src)
    assert main(["convert", "chatglm", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    for part in expected:
        assert part in err, err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line, no traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["original"]  # nothing written


def test_missing_shard_of_a_sharded_bin_checkpoint(
    cases: dict[str, Case], tmp_path: Path, capsys: Any
) -> None:
    src = tmp_path / "src"
    shutil.copytree(cases["chatglm2_bin"].src, src)
    (src / "pytorch_model-00002-of-00003.bin").unlink()
    assert main(["convert", "chatglm", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        "pytorch_model.bin.index.json: lists shard pytorch_model-00002-of-00003.bin, which is not in" in err
    )


def test_destination_rules(cases: dict[str, Case], tmp_path: Path, capsys: Any) -> None:
    src = cases["chatglm3"].src
    taken = tmp_path / "taken"
    taken.mkdir()
    assert main(["convert", "chatglm", str(src), str(taken)]) == 2
    assert "already exists" in capsys.readouterr().err and not any(taken.iterdir())
    assert main(["convert", "chatglm", str(src), str(src / "converted")]) == 2
    assert "never written to" in capsys.readouterr().err and not (src / "converted").exists()
    assert main(["convert", "chatglm", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _digest(directory: Path) -> dict[str, tuple[str, float]]:
    return {
        str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_source_is_only_read_and_destination_appears_whole(cases: dict[str, Case], tmp_path: Path) -> None:
    from launcher.convert.chatglm import convert_chatglm

    src = tmp_path / "src"
    shutil.copytree(cases["chatglm3"].src, src)
    before = _digest(src)  # contents and modification times
    out = tmp_path / "out" / "converted"
    written: list[str] = []

    def interrupt_after_first_shard(message: str) -> None:
        if message.startswith("wrote "):
            written.append(message)
            assert not out.exists()  # still being built beside it
            if len(written) == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_chatglm(src, out, max_shard_gib=0.0001, log=interrupt_after_first_shard)
    assert not out.exists() and [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []
    record = convert_chatglm(src, out, max_shard_gib=0.0001, log=lambda _: None)
    assert _digest(src) == before
    assert record["weight_files"] > 2 and (out / "model.safetensors.index.json").is_file()
    assert [p.name for p in out.parent.iterdir() if not p.name.endswith(".lock")] == ["converted"]


def test_special_token_named_like_an_ordinary_piece_keeps_its_id(tmp_path: Path, capsys: Any) -> None:
    """A sentencepiece model with an ordinary piece "eop": the special eop keeps the original id (and
    gets the name <eop>), text containing "eop" keeps the piece."""
    from transformers import AutoTokenizer

    src = tmp_path / "chatglm3-6b"
    src.mkdir()
    ref.train_sentencepiece(
        ["isopod isosceles people " * 5, "hello world eop peop people"] * 200, src / "tokenizer.model", 330
    )
    original = ref.SentencePieceReference(src / "tokenizer.model", ref.CHATGLM3_SPECIALS)
    assert original.sp.piece_to_id("eop") != original.sp.unk_id()  # the collision this test is about
    cfg = ref.OriginalConfig(padded_vocab_size=384)
    ref.save_checkpoint(src, cfg, ref.random_weights(cfg, 3), fmt="safetensors")
    assert main(["convert", "chatglm", str(src), str(tmp_path / "out")]) == 0
    assert "note: special token eop (id 334) is named <eop>" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.convert_tokens_to_ids("<eop>") == original.special["eop"] == 334
    for text in ("hello eop world", "people eop"):
        assert tokenizer(text)["input_ids"] == original.encode(text)


def test_validate_sentence_names_the_model_the_cause_and_the_way_out(
    cases: dict[str, Case], tmp_path: Path
) -> None:
    """Read from config.json as data (the remote code never runs); one line each."""
    import transformers

    from launcher.convert.detect import arch_unrunnable_reason, unrunnable_reason

    for name, title in (("chatglm3", "ChatGLM3-6B"), ("chatglm2_bin", "ChatGLM2-6B"), ("glm4", "GLM-4")):
        src = cases[name].src
        sentence = unrunnable_reason(src, trust_remote_code=True)
        assert sentence is not None and "\n" not in sentence
        assert f"{src} is {title} in its original layout" in sentence
        assert f"fails under the installed {transformers.__version__}" in sentence
        assert f"`launcher convert chatglm {src} {src}-glm`" in sentence
        assert unrunnable_reason(cases[name].dst) is None  # the converted model runs
    v1 = tmp_path / "chatglm-6b"
    v1.mkdir()
    (v1 / "config.json").write_text(
        json.dumps({"model_type": "chatglm", "position_encoding_2d": True, "vocab_size": 130528})
    )
    sentence = unrunnable_reason(v1, trust_remote_code=True) or ""
    assert (
        f"{v1} is ChatGLM-6B (v1)" in sentence
        and "does not convert" in sentence
        and "ChatGLM3-6B" in sentence
    )
    assert "ChatGLM-6B (v1)" in (arch_unrunnable_reason("chatglm-6b") or "")
    assert arch_unrunnable_reason("chatglm3-6b") is None
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "mine", "auto_map": {"AutoConfig": "c.C"}}))
    assert "model.trust_remote_code: true" in (unrunnable_reason(custom) or "")
    assert unrunnable_reason(custom, trust_remote_code=True) is None  # its code may run: planning tries it


@pytest.mark.parametrize("name", ["chatglm2-6b", "chatglm3-6b"])
def test_bundled_description_is_the_converted_model(name: str) -> None:
    """model.arch chatglm2-6b / chatglm3-6b plan exactly what `launcher convert chatglm` makes of the
    published config (6B dims), instantiated on the meta device."""
    from launcher.convert.chatglm_config import glm_config, parse_config
    from launcher.plan.archs import arch_from_config, bundled_arch

    published = ref.OriginalConfig(
        num_layers=28,
        hidden_size=4096,
        num_attention_heads=32,
        kv_channels=128,
        multi_query_group_num=2,
        ffn_hidden_size=13696,
        padded_vocab_size=65024,
    )
    native = glm_config(
        parse_config(Path("config.json"), published.config_json()), eos_token_ids=[2], pad_token_id=0
    )
    converted, bundled = arch_from_config(native, name), bundled_arch(name)
    assert dict(converted.param_names()) == dict(bundled.param_names())
    assert converted.total_params == bundled.total_params == 6_243_584_000
    assert {lin.name for lin in bundled.layer_linears} >= {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
    }


def test_validate_refuses_the_original_and_plans_the_converted(
    cases: dict[str, Case], tmp_path: Path, capsys: Any
) -> None:
    """No fallback that would fail inside the job: model.arch and trust_remote_code do not rescue it."""
    case = cases["chatglm3"]

    def validate(model: str) -> tuple[int, str]:
        spec = tmp_path / "s.yaml"
        spec.write_text(
            f"experiment: e\nmodel:\n{model}\ndata:\n  builtin: dialogue\ntemplate: chatglm3\n"
            "methods:\n  - method: lora\n    target_modules: [q_proj, v_proj]\n  - method: ptuning\n"
        )
        code = main(["validate", str(spec)])
        return code, capsys.readouterr().err

    code, err = validate(f"  path: {case.src}\n  arch: chatglm3-6b\n  trust_remote_code: true")
    assert code == 2 and f"{case.src} is ChatGLM3-6B in its original layout" in err
    assert f"`launcher convert chatglm {case.src} {case.src}-glm`" in err
    code, err = validate(f"  path: {case.src}")
    assert code == 2 and "s.yaml:3:" in err and "model.path" in err
    code, err = validate("  path: /nowhere/chatglm-6b\n  arch: chatglm-6b")
    assert code == 2 and "model.arch chatglm-6b is ChatGLM-6B (v1)" in err
    assert validate(f"  path: {case.dst}") == (0, "")
    assert (
        validate("  path: /nowhere/chatglm3-6b-glm\n  arch: chatglm3-6b")[0] == 0
    )  # plans the converted layout


def test_legacy_bin_converts_and_pickled_code_is_refused(
    cases: dict[str, Case], tmp_path: Path, capsys: Any
) -> None:
    """torch's pre-zip .bin format cannot be memory-mapped: it is read whole and converts the same;
    a .bin that pickles anything but tensors is refused (weights_only: its code never runs)."""
    from safetensors.torch import load_file

    case = cases["chatglm3"]
    src = tmp_path / "legacy"
    shutil.copytree(case.src, src)
    (src / "model.safetensors").unlink()
    torch.save(case.weights, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert main(["convert", "chatglm", str(src), str(tmp_path / "out")]) == 0
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(case.dst / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    torch.save({**case.weights, "extra": Path("x")}, src / "pytorch_model.bin")
    assert main(["convert", "chatglm", str(src), str(tmp_path / "out2")]) == 2
    assert "pytorch_model.bin: not a readable PyTorch weights file" in capsys.readouterr().err


def test_unwritable_destination_is_exit_2(cases: dict[str, Case], tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    dst = tmp_path / "a-file" / "out"  # its parent cannot be created, even by root
    assert main(["convert", "chatglm", str(cases["chatglm3"].src), str(dst)]) == 2
    assert f"{dst}: cannot be written" in capsys.readouterr().err
    assert (
        main(["convert", "chatglm", str(cases["chatglm3"].src), str(tmp_path / "o"), "--max-shard-gib", "0"])
        == 2
    )
    assert "--max-shard-gib must be a positive" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize(
    "settings",
    [
        {"normalization_rule_name": "nmt_nfkc", "remove_extra_whitespaces": True},
        {"model_type": "unigram"},
    ],
    ids=["nfkc-collapsed-spaces", "unigram"],
)
def test_tokenizer_follows_other_sentencepiece_settings(settings: dict[str, Any], tmp_path: Path) -> None:
    """The sentencepiece model's own normalizer and type are followed (the real ChatGLM files were not
    available here to read theirs): plain text and the ChatGLM3 chat give the original's ids."""
    from chatglm_fixtures import corpus

    from launcher.convert.chatglm_tokenizer import convert_sentencepiece
    from launcher.convert.families import CHATGLM3

    model = tmp_path / "tokenizer.model"
    ref.train_sentencepiece(corpus(), model, 1200, **settings)
    original = ref.SentencePieceReference(model, ref.CHATGLM3_SPECIALS)
    tokenizer = convert_sentencepiece(model, CHATGLM3, 512).tokenizer
    for text in PLAIN_TEXTS:
        assert tokenizer(text)["input_ids"] == original.encode(text), text
    chat = CHATGLM3_CHAT
    got = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert got == original.chat(chat)

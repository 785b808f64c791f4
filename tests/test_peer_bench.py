"""bench/peer_bench.py's pieces that need no LLaMA-Factory: arguments, the tiny Qwen2 and its tokenizer,
the data, both configs (ours goes through the real planner) and the token sequences our side trains on,
against LLaMA-Factory's vicuna layout as its template.py renders it. The bench itself is never run here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import peer_bench  # noqa: E402

SMALL = peer_bench.Settings(examples=40, eval_examples=8, repeats=1)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return peer_bench.build_qwen2(tmp_path_factory.mktemp("peer") / peer_bench.MODEL_DIR_NAME)


def test_arguments() -> None:
    args, settings = peer_bench.parse_args(["--quick"])
    assert settings.repeats == 1 and settings.examples == 592 and args.methods == ["lora", "full"]
    _, full = peer_bench.parse_args(["--methods", "lora"])
    assert full.repeats == 3 and full.examples == 2992
    with pytest.raises(SystemExit):
        peer_bench.parse_args(["--repeats", "0"])


def test_tokenizer_keeps_the_text(qwen2_dir: Path) -> None:
    """Our venv's transformers loads any ``model_type: qwen2`` tokenizer as Qwen2Tokenizer (byte-level):
    a tokenizer whose vocabulary is not byte-level lost every Chinese character and space there, while
    LLaMA-Factory's venv kept them."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    for record in [peer_bench._alpaca(r) for r in peer_bench._bundled_records("eval")[:20]]:
        text = f"USER: {record['instruction']} ASSISTANT:{record['output']}"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert len(ids) < len(text)  # BPE merges: fewer tokens than characters
    config = AutoConfig.from_pretrained(qwen2_dir)
    assert config.model_type == "qwen2" and config.num_hidden_layers == 2
    assert config.vocab_size == len(tokenizer) == peer_bench.VOCAB_SIZE


def _configs(tmp_path: Path, qwen2_dir: Path, method: str) -> tuple[dict, dict, Path]:
    train, eval_ = peer_bench.write_data(tmp_path, SMALL)
    theirs = peer_bench.llamafactory_config(SMALL, method, qwen2_dir, tmp_path / "data", tmp_path / "o", 7)
    ours = peer_bench.our_spec(SMALL, method, qwen2_dir, train, eval_, tmp_path / "runs", 7)
    spec = tmp_path / f"{method}.yaml"
    spec.write_text(yaml.safe_dump(ours))
    return ours, theirs, spec


def test_data_and_configs(tmp_path: Path, qwen2_dir: Path) -> None:
    from launcher.plan.planner import load_and_plan

    train, _ = peer_bench.write_data(tmp_path, SMALL)
    records = json.loads(train.read_text(encoding="utf-8"))
    assert len(records) == SMALL.examples and set(records[0]) == {"instruction", "input", "output"}
    lengths = sorted(len(r["instruction"]) + len(r["output"]) for r in records)
    assert lengths[-1] > 2 * lengths[0]  # varied lengths
    info = json.loads((tmp_path / "data" / "dataset_info.json").read_text())
    assert info["eval"] == {"file_name": "eval.json"}

    for method in ("lora", "full"):
        ours, theirs, spec = _configs(tmp_path, qwen2_dir, method)
        t = ours["training"]
        assert theirs["finetuning_type"] == ours["methods"][0]["method"] == method
        assert theirs["per_device_train_batch_size"] == t["per_device_batch_size"]
        assert theirs["gradient_accumulation_steps"] == t["gradient_accumulation_steps"]
        assert theirs["learning_rate"] == t["learning_rate"] and theirs["seed"] == t["seed"] == 7
        assert theirs["cutoff_len"] == t["max_length"] and theirs["num_train_epochs"] == t["num_epochs"] == 1
        assert theirs["lr_scheduler_type"] == t["lr_scheduler"] == "linear"
        assert theirs["warmup_ratio"] == t["warmup_ratio"] == 0.0
        assert theirs["weight_decay"] == t["weight_decay"] and theirs["max_grad_norm"] == t["max_grad_norm"]
        assert theirs["logging_steps"] == t["logging_steps"] == 1  # the bench averages per-step losses
        assert theirs["train_sampling_strategy"] == "group_by_length" and t["group_by_length"]
        # no system text on their side; their eval loss per token over the whole eval file, as ours
        assert theirs["template"] == "vicuna" and theirs["default_system"] == ""
        assert theirs["per_device_eval_batch_size"] == SMALL.eval_examples
        assert theirs["include_num_input_tokens_seen"] == "non_padding"
        axo = peer_bench.axolotl_config(SMALL, method, qwen2_dir, tmp_path / "data", tmp_path / "a", 7)
        assert axo["micro_batch_size"] == t["per_device_batch_size"] and axo["seed"] == 7
        assert axo["gradient_accumulation_steps"] == t["gradient_accumulation_steps"]
        assert axo["learning_rate"] == t["learning_rate"] and axo["lr_scheduler"] == "linear"
        assert axo["warmup_steps"] == 0 and axo["group_by_length"] and axo["logging_steps"] == 1
        assert axo["eval_batch_size"] == SMALL.eval_examples and axo["sequence_len"] == t["max_length"]
        assert axo["datasets"][0]["type"]["format"] == "USER: {instruction} ASSISTANT:"
        assert ("adapter" in axo) == (method == "lora")
        if method == "lora":
            lora = ours["methods"][0]
            assert theirs["lora_rank"] == axo["lora_r"] == lora["r"]
            assert theirs["lora_alpha"] == axo["lora_alpha"] == lora["lora_alpha"]
            assert theirs["lora_dropout"] == axo["lora_dropout"] == lora["lora_dropout"] == 0.0
            assert axo["lora_mlp_kernel"] is False  # axolotl's Triton kernels allocate on cuda
        plan = load_and_plan(spec)  # the spec we would train is valid for the real planner
        assert [r.name for r in plan.runs] == [method]
        assert (plan.runs[0].method.lora_dropout == 0.0) if method == "lora" else True


def test_our_sequences_are_llamafactory_vicuna_layout(tmp_path: Path, qwen2_dir: Path) -> None:
    """LLaMA-Factory's vicuna template (template.py) with ``default_system: ""`` encodes each slot
    separately without special tokens: ``USER: {q} ASSISTANT:`` as the masked prompt, then the answer and
    eos as labels. Our entrypoint's encoding of the same file must give those ids."""
    from transformers import AutoTokenizer

    _, _, spec = _configs(tmp_path, qwen2_dir, "lora")
    ours = peer_bench.our_sequences(spec)
    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    expected: peer_bench.Sequences = {}
    for split in ("train", "eval"):
        rows = json.loads((tmp_path / "data" / f"{split}.json").read_text(encoding="utf-8"))
        expected[split] = []
        for r in rows:
            prompt = tokenizer.encode(f"USER: {r['instruction']} ASSISTANT:", add_special_tokens=False)
            answer = [*tokenizer.encode(r["output"], add_special_tokens=False), tokenizer.eos_token_id]
            expected[split].append(([*prompt, *answer], [-100] * len(prompt) + answer))
    assert len(ours["train"]) == SMALL.examples and len(ours["eval"]) == SMALL.eval_examples
    assert peer_bench.sequence_mismatch(ours, expected) is None


def test_sequence_mismatch_says_what_differs() -> None:
    same = {"train": [([1, 2, 3], [-100, 2, 3])], "eval": []}
    assert peer_bench.sequence_mismatch(same, same) is None
    labels = {"train": [([1, 2, 3], [-100, -100, 3])], "eval": []}
    assert "train example 0: the labels differ" in str(peer_bench.sequence_mismatch(same, labels))
    ids = {"train": [([1, 2, 4], [-100, 2, 3])], "eval": []}
    message = str(peer_bench.sequence_mismatch(same, ids, decode=lambda x: "/".join(map(str, x))))
    assert "the input ids differ" in message and "'1/2/3'" in message and "'1/2/4'" in message
    assert "eval: ours has 0" in str(
        peer_bench.sequence_mismatch(same, {"train": same["train"], "eval": [([1], [1])]})
    )


def test_unordered_mismatch_for_a_peer_that_shuffles() -> None:
    ours = {"train": [([1, 2], [-100, 2]), ([3, 4], [-100, 4])], "eval": []}
    shuffled = {"train": [([3, 4], [-100, 4]), ([1, 2], [-100, 2])], "eval": []}
    assert peer_bench.sequence_mismatch(ours, shuffled, peer="axolotl", ordered=False) is None
    assert "example 0" in str(peer_bench.sequence_mismatch(ours, shuffled, peer="axolotl"))
    changed = {"train": [([3, 4], [-100, -100]), ([1, 2], [-100, 2])], "eval": []}
    message = str(peer_bench.sequence_mismatch(ours, changed, peer="axolotl", ordered=False))
    assert "the labels differ" in message and "axolotl" in message


def test_axolotl_log_parsing() -> None:
    log = (
        " 50%|##| 1/2 {'loss': '6.02', 'grad_norm': '0.4448', 'learning_rate': '0.002', 'epoch': '0.5'}\n"
        "{'eval_loss': '6.974', 'eval_runtime': '0.57', 'epoch': 0}\n"
        "{'loss': '5.5', 'learning_rate': '0.001', 'epoch': '1'}\n"
        "{'train_runtime': '32.19', 'train_loss': '6.18'}"
    )
    steps = peer_bench._logged_dicts(log, "loss")
    assert [h["loss"] for h in steps] == [6.02, 5.5] and steps[0]["learning_rate"] == 0.002
    assert peer_bench._logged_dicts(log, "train_runtime") == [{"train_runtime": 32.19, "train_loss": 6.18}]
    assert peer_bench._logged_dicts(log, "eval_loss")[0]["eval_loss"] == 6.974


def test_loss_window_and_lr_gap() -> None:
    losses = [float(x) for x in range(1, 21)]
    assert peer_bench.window_mean(losses) == sum(range(11, 21)) / 10
    assert peer_bench.window_mean([3.0]) == 3.0 and peer_bench.window_mean([]) is None
    # ours logs the next step's rate: [0.5, 0.0] after steps of 1.0 and 0.5, as theirs [1.0, 0.5]
    assert peer_bench.lr_gap({"lrs": [1.0, 0.5]}, {"lrs": [1.0, 0.5]}) == 0.0
    assert peer_bench.lr_gap({"lrs": [1.0, 0.4]}, {"lrs": [1.0, 0.5]}) == pytest.approx(0.1)
    assert peer_bench.lr_gap({"lrs": [1.0, 1.0]}, {"lrs": [1.0, 0.5]}) == pytest.approx(0.5)  # no decay
    assert peer_bench.lr_gap({"lrs": [1.0]}, {"lrs": [1.0, 0.5]}) is None

"""Benchmark: peak memory of `launcher convert chatglm` on a multi-shard checkpoint, against its size.

    .venv/bin/python bench/convert_memory.py [--layers 12] [--shards 6] [--max-shard-gib 0.25] [--keep DIR]

A synthetic ChatGLM3-shaped checkpoint in the original layout (hidden 2048, 2 key/value groups,
ffn 5504, padded vocabulary 65024, fp16; about 1.6 GB with 12 layers) is written as safetensors shards
and as .bin shards with their index. Each conversion runs in its own process, which reports its peak
resident set (VmHWM). Printed per format, all measured in this run:
- the conversion's peak RSS and the same for a tiny checkpoint with the same tokenizer (the fixed
  cost: interpreter, torch, transformers, the tokenizer);
- (peak - fixed) / checkpoint size, for two model sizes: the peak follows the output shard size
  (--max-shard-gib), not the model (target: well below 1, and the same peak for both sizes);
- the same ratio for loading the whole checkpoint at once, as a converter that is not streamed would.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import chatglm_reference as ref  # noqa: E402

GIB = 1024**3
_PEAK = "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
CONVERT = "import sys; from launcher.cli import main; assert main(sys.argv[1:]) == 0; " + _PEAK
LOAD_WHOLE = (  # what a converter that is not streamed holds at once
    "import sys, torch; from pathlib import Path; from safetensors.torch import load_file; "
    "files = sorted(Path(sys.argv[1]).glob('*.safetensors')) or sorted(Path(sys.argv[1]).glob('*.bin')); "
    "whole = {k: v.clone() for f in files for k, v in (load_file(f) if f.suffix == '.safetensors' "
    "else torch.load(f, weights_only=True)).items()}; " + _PEAK
)


BIG = {"hidden_size": 2048, "num_attention_heads": 16, "kv_channels": 128, "ffn_hidden_size": 5504}
TINY = {"hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16, "ffn_hidden_size": 96}


def write_checkpoint(
    directory: Path, dims: dict[str, int], vocab: int, layers: int, shards: int, fmt: str, tokenizer: Path
) -> int:
    """Random fp16 tensors, generated one at a time, in ``shards`` files; returns the bytes written."""
    import torch

    cfg = ref.OriginalConfig(
        num_layers=layers,
        multi_query_group_num=2,
        padded_vocab_size=vocab,
        extra={"_name_or_path": "THUDM/chatglm3-6b", "torch_dtype": "float16"},
        **dims,  # type: ignore[arg-type]
    )
    gen = torch.Generator().manual_seed(0)
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.kv_channels, cfg.groups * cfg.kv_channels
    vocab = cfg.padded_vocab_size
    layout: list[tuple[str, tuple[int, ...]]] = [("transformer.embedding.word_embeddings.weight", (vocab, h))]
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}."
        layout += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attention.query_key_value.weight", (q + 2 * kv, h)),
            (p + "self_attention.query_key_value.bias", (q + 2 * kv,)),
            (p + "self_attention.dense.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.dense_h_to_4h.weight", (2 * cfg.ffn_hidden_size, h)),
            (p + "mlp.dense_4h_to_h.weight", (h, cfg.ffn_hidden_size)),
        ]
    layout += [
        ("transformer.encoder.final_layernorm.weight", (h,)),
        ("transformer.output_layer.weight", (vocab, h)),
    ]
    total = sum(2 * _numel(shape) for _, shape in layout)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(cfg.config_json(), indent=2))
    shutil.copy(tokenizer, directory / "tokenizer.model")
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    per_shard, weight_map, part, index, size = total / shards, {}, {}, 0, 0

    def flush() -> None:
        nonlocal part, index, size
        name = f"{stem}-{index + 1:05d}-of-{shards:05d}.{suffix}"
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, str(directory / name), metadata={"format": "pt"})
        else:
            torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(part, name))
        part, index, size = {}, index + 1, 0

    for name, shape in layout:
        part[name] = (torch.randn(*shape, generator=gen) * 0.02).half()
        size += 2 * _numel(shape)
        if size >= per_shard and index < shards - 1:
            flush()
    flush()
    (directory / f"{stem}.{suffix}.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def peak_kib(code: str, *args: str) -> tuple[int, float]:
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(out.stdout + out.stderr)
    return int(out.stdout.strip().splitlines()[-1]), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--max-shard-gib", type=float, default=0.25, help="output shard size")
    parser.add_argument("--formats", default="safetensors,bin")
    parser.add_argument("--keep", type=Path, help="build here and keep it (default: a temporary directory)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="convert-memory-"))
    try:
        tokenizer = root / "sentencepiece.model"
        from launcher.builtins.demo_data import pretraining_corpus

        ref.train_sentencepiece(pretraining_corpus(400), tokenizer, vocab_size=1200)
        shard = ["--max-shard-gib", str(args.max_shard_gib)]
        header = ("format", "layers", "size GiB", "peak GiB", "fixed GiB", "streamed", "whole", "time s")
        print("{:<12} {:>6} {:>9} {:>9} {:>10} {:>9} {:>7} {:>7}".format(*header))
        for fmt in args.formats.split(","):
            tiny = root / f"tiny-{fmt}"
            write_checkpoint(tiny, TINY, 1280, 1, 1, fmt, tokenizer)
            fixed, _ = peak_kib(
                CONVERT, "convert", "chatglm", str(tiny), str(root / f"{tiny.name}-out"), *shard
            )
            load_fixed, _ = peak_kib(LOAD_WHOLE, str(tiny))
            for layers in (args.layers // 2, args.layers):  # the peak must not grow with the model
                big = root / f"big-{fmt}-{layers}"
                size = write_checkpoint(big, BIG, 65024, layers, args.shards, fmt, tokenizer)
                out = root / f"{big.name}-out"
                peak, seconds = peak_kib(CONVERT, "convert", "chatglm", str(big), str(out), *shard)
                whole, _ = peak_kib(LOAD_WHOLE, str(big))
                row = (fmt, layers, size / GIB, peak * 1024 / GIB, fixed * 1024 / GIB)
                ratios = ((peak - fixed) * 1024 / size, (whole - load_fixed) * 1024 / size, seconds)
                print(
                    "{:<12} {:>6} {:>9.2f} {:>9.2f} {:>10.2f} {:>9.3f} {:>7.3f} {:>7.1f}".format(
                        *row, *ratios
                    )
                )
                shutil.rmtree(big)
                shutil.rmtree(out)
        print(
            "streamed: (conversion peak - its fixed cost) / size; whole: the same for loading it all at once"
        )
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

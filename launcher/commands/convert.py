"""`launcher convert chatglm SRC DST`: an original ChatGLM2/3 or GLM-4 checkpoint as a native GLM model."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "convert a model to a format launcher trains natively (chatglm: ChatGLM2/3-6B, GLM-4 -> GLM)"


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="convert_kind", required=True, metavar="KIND")
    chatglm = sub.add_parser(
        "chatglm",
        help="ChatGLM2-6B / ChatGLM3-6B / GLM-4 (original remote-code layout) -> native GlmForCausalLM",
        description=(
            "Reads SRC's config.json, weights (safetensors or .bin, sharded or not) and tokenizer.model "
            "without running its code; writes DST (config, generation config, safetensors shards, "
            "tokenizer.json with the chat template). SRC is only read; DST must not exist and appears "
            "only when complete."
        ),
    )
    chatglm.add_argument("src", type=Path, help="the original model directory")
    chatglm.add_argument("dst", type=Path, help="the new directory for the converted model")
    chatglm.add_argument(
        "--family",
        choices=("chatglm2", "chatglm3", "glm4"),
        help="which model SRC is, when its files do not say (ChatGLM2/3 differ in chat format only)",
    )
    chatglm.add_argument(
        "--max-shard-gib",
        type=float,
        default=1.0,
        help="largest output weight file (default 1); peak memory is about 3 of them, any model size",
    )


def run(args: argparse.Namespace) -> int:
    # lazy: every command module is imported to build the parser; this loads when the command runs
    from launcher.convert.chatglm import convert_chatglm

    convert_chatglm(args.src, args.dst, family=args.family, max_shard_gib=args.max_shard_gib)
    return 0

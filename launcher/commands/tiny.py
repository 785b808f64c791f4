"""`launcher tiny build|info`: the built-in tiny GLM model (built locally from bundled data, cached)."""

from __future__ import annotations

import argparse
import json

HELP = "build (once, cached) or describe the built-in tiny GLM model used by `model: {builtin: tiny-glm}`"


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tiny_command", required=True, metavar="ACTION")
    sub.add_parser("build", help="build the model if it is not cached yet and print its directory")
    info = sub.add_parser("info", help="print the cached model's build record (config, losses, hashes)")
    info.add_argument("--json", action="store_true", help="print the record as JSON")


def run(args: argparse.Namespace) -> int:
    # lazy: every command module is imported to build the parser; this loads when the command runs
    from launcher.builtins.tiny import build_info, ensure_tiny_model

    model_dir = ensure_tiny_model()
    if args.tiny_command == "build":
        print(model_dir)
        return 0
    record = build_info(model_dir)
    if getattr(args, "json", False):
        print(json.dumps({"path": str(model_dir), **record}, indent=2, ensure_ascii=False))
        return 0
    print(f"path:              {model_dir}")
    for key in (
        "num_parameters",
        "vocab_size",
        "corpus_tokens",
        "heldout_loss",
        "random_init_heldout_loss",
        "build_time_s",
        "weights_sha256",
    ):
        print(f"{key + ':':<26} {record.get(key)}")
    print(f"{'config:':<26} {json.dumps(record.get('config', {}))}")
    return 0

"""Benchmark: the pre-flight of `validate --check-paths` / `plan` / `submit` on 100,000 records.

    .venv/bin/python bench/preflight_records.py [--records 100000] [--turns 3]

A spec on a tiny Qwen2-architecture model (tests/families.py: ChatML chat template, byte-level BPE) and
a messages-format .jsonl train file of ``--records`` conversations with ``--turns`` user/assistant turns
each. Timed: ``load_and_plan(spec, check_paths=True)`` the first time (every record parsed and rendered
twice through the chat template, the model's weight headers checked) and again (remembered: same files,
sizes and mtimes), against reading and JSON-parsing the file alone, measured in the same run.
Target: seconds, not minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["LAUNCHER_CACHE_DIR"] = str(root / "cache")
        from families import ensure_family_model

        from launcher.plan.planner import load_and_plan

        model = ensure_family_model("qwen2")
        train = root / "train.jsonl"
        with open(train, "w", encoding="utf-8") as out:
            for i in range(args.records):
                messages = []
                for turn in range(args.turns):
                    messages.append({"role": "user", "content": f"第{turn}个问题：请问记录{i}说的是什么？"})
                    messages.append({"role": "assistant", "content": f"记录{i}的第{turn}个回答，内容很短。"})
                out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        (root / "eval.jsonl").write_text(train.read_text(encoding="utf-8").split("\n", 100)[0] + "\n")
        spec = root / "spec.yaml"
        spec.write_text(
            f"experiment: bench\noutput_dir: {root / 'runs'}\nmodel: {{path: {model}}}\n"
            "data: {train_file: train.jsonl, eval_file: eval.jsonl}\nmethods:\n  - {method: lora}\n",
            encoding="utf-8",
        )
        started = time.perf_counter()
        with open(train, encoding="utf-8") as handle:
            parsed = sum(1 for line in handle if json.loads(line))
        parse_s = time.perf_counter() - started
        timings = []
        for label in ("first check", "unchanged files"):
            started = time.perf_counter()
            plan = load_and_plan(spec, check_paths=True)
            seconds = time.perf_counter() - started
            report = plan.preflight
            assert report is not None
            timings.append((label, seconds, report.records, report.cached))
        size_mib = train.stat().st_size / 2**20
        print(f"{parsed:,} records, {args.turns} turns each, {size_mib:.1f} MiB of JSON Lines")
        print(f"  read + json.loads alone (baseline):  {parse_s:6.2f} s")
        for label, seconds, records, cached in timings:
            print(
                f"  load_and_plan, {label + ':':17s} {seconds:6.2f} s  ({records:,} records rendered, "
                f"{cached} inputs remembered; {seconds / parse_s:.1f}x the baseline)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

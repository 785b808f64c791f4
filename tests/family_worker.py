"""Train several run dirs one after another in ONE process per rank, through the real entrypoint
(``launcher.train.entry.main``, what ``python -m launcher.train RUN_DIR`` runs): the imports (torch,
transformers, peft, DeepSpeed) and the process group are set up once per family instead of once per run.

    python tests/family_worker.py OUT_JSON RUN_DIR [RUN_DIR ...]

Every rank trains every run dir in the same order. The process group the first run creates is kept for
the next ones (DeepSpeed caches its groups per process, so a destroyed and re-created group would not be
the one it knows); it is destroyed at the end. Writes {run_dir: {"code", "wall_s"}} to OUT_JSON (rank 0).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    out_json, *run_dirs = sys.argv[1:]
    from launcher.train import distributed, entry

    shutdown_distributed = distributed.shutdown_distributed
    distributed.shutdown_distributed = lambda: None  # kept for the next run (entry imports it per call)
    results = {}
    try:
        for run_dir in run_dirs:
            started = time.monotonic()
            code = entry.main([run_dir])
            results[run_dir] = {"code": code, "wall_s": round(time.monotonic() - started, 2)}
    finally:
        shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        Path(out_json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    from launcher.train.entry import exit_rank_process

    exit_rank_process(main())

"""``python -m launcher.train RUN_DIR``: the same as ``launcher train RUN_DIR``."""

from __future__ import annotations

from launcher.train.entry import exit_rank_process, main

if __name__ == "__main__":
    exit_rank_process(main())

"""``python -m launcher.train RUN_DIR``: the same as ``launcher train RUN_DIR``."""

from __future__ import annotations

from launcher.train.entry import main

if __name__ == "__main__":
    raise SystemExit(main())

"""The optional metric trackers a spec may configure (``logging.wandb``, ``logging.mlflow``): which
module each needs, and which of them this Python cannot import. The spec's checks refuse a missing one
at validate; the ranks' loggers (launcher.train.loggers) import them by these names.
"""

from __future__ import annotations

import importlib.util
import sys

from launcher.spec.schema import LoggingSpec

# Optional trackers: spec key -> the module to import (also the name of the pyproject extra).
TRACKER_MODULES: dict[str, str] = {"wandb": "wandb", "mlflow": "mlflow"}


def missing_tracker_packages(spec: LoggingSpec) -> list[tuple[str, str]]:
    """(spec key, message) for every configured tracker whose package this Python cannot import."""
    missing = []
    for tracker, module in TRACKER_MODULES.items():
        if getattr(spec, tracker) is None or importlib.util.find_spec(module) is not None:
            continue
        missing.append(
            (
                tracker,
                f"{tracker} is configured but not installed for {sys.executable}; install it with "
                f"`pip install 'launcher[{tracker}]'`, or remove logging.{tracker}",
            )
        )
    return missing

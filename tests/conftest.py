"""Shared session fixtures: the built-in tiny model and the bundled dialogue data.

Both live in the default cache (``launcher.builtins.cache.cache_dir()``, i.e. ``<repo>/.cache/launcher`` or
``$LAUNCHER_CACHE_DIR``), so the model is built once (~1 min) and reused by later test runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from launcher.builtins.ops_cache import use_environment_ops_dir

# One thread per process: the CI box is small and shared, and one thread keeps CPU results reproducible.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# DeepSpeed ops built in-process by the tests go where the ranks' go: one directory per environment.
use_environment_ops_dir()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The built-in tiny GLM model directory (config.json, weights, tokenizer), built once and cached."""
    import torch

    from launcher.builtins.tiny import ensure_tiny_model

    torch.set_num_threads(1)
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def dialogue_files() -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl) of the bundled Chinese multi-turn dialogue data."""
    from launcher.builtins.demo_data import ensure_builtin_data

    return ensure_builtin_data("dialogue")


@pytest.fixture(scope="session")
def spo_files() -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl) of the bundled SPO triple-extraction data."""
    from launcher.builtins.demo_data import ensure_builtin_data

    return ensure_builtin_data("spo")


@pytest.fixture(scope="session")
def family_dirs() -> dict[str, Path]:
    """Tiny random-weight models of the families people fine-tune (tests/families.py), built once and
    cached next to the built-in model: family name -> model directory."""
    from families import FAMILIES, ensure_family_model

    return {name: ensure_family_model(name) for name in FAMILIES}

"""DeepSpeed's JIT ops are built once per environment (launcher/builtins/ops_cache.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from launcher.builtins import ops_cache

REPO = Path(__file__).resolve().parents[1]


def test_user_choice_is_kept_and_ours_is_recomputed(tmp_path: Path) -> None:
    mine = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "mine")}
    assert ops_cache.use_environment_ops_dir(mine) == tmp_path / "mine"
    assert mine["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")
    # Inherited from a parent that ran another interpreter: recomputed for this one.
    inherited = {"TORCH_EXTENSIONS_DIR": "/elsewhere/py311-x", "LAUNCHER_OPS_DIR_SET": "/elsewhere/py311-x"}
    chosen = ops_cache.use_environment_ops_dir(inherited)
    assert chosen == ops_cache.environment_ops_dir()
    assert inherited["TORCH_EXTENSIONS_DIR"] == str(chosen)
    assert ops_cache.environment_key() in chosen.name


def _make_venv(path: Path) -> Path:
    """Another environment without installing anything (well under a second): a bare venv whose
    site-packages reaches this one's through a link inside the venv, so torch's include and library
    paths (which each op's build.ninja names) differ per venv, as for two real installs."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site = Path(sysconfig.get_paths(vars={"base": str(path), "platbase": str(path)})["purelib"])
    link = path / "parent-site-packages"
    link.symlink_to(sysconfig.get_paths()["purelib"], target_is_directory=True)
    (site / "parent.pth").write_text(f"{link}\n", encoding="utf-8")
    return path / "bin" / "python"


def _start(python: Path, src: Path, cache_home: Path, timeout_s: float = 600) -> dict[str, object]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "PYTHONPATH": str(REPO)}
    for key in ("TORCH_EXTENSIONS_DIR", "LAUNCHER_OPS_DIR_SET"):
        env.pop(key, None)
    proc = subprocess.run(
        [str(python), str(REPO / "tests" / "ops_probe.py"), str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_two_venvs_alternately_build_nothing_the_second_time(tmp_path: Path) -> None:
    """venv A, venv B, venv A: each builds its own op once; A's second start-up builds nothing (its
    library is the same file), however often B built in between."""
    venv_a, venv_b = _make_venv(tmp_path / "a"), _make_venv(tmp_path / "b")
    src, cache_home = tmp_path / "src", tmp_path / "cache"
    first_a = _start(venv_a, src, cache_home)
    first_b = _start(venv_b, src, cache_home)
    second_a = _start(venv_a, src, cache_home)
    assert second_a["mtime_ns"] == first_a["mtime_ns"], "the second start-up in venv A rebuilt its op"
    assert second_a["ops_dir"] == first_a["ops_dir"] != first_b["ops_dir"]
    assert str(first_a["ops_dir"]).startswith(str(cache_home / "torch_extensions"))


def test_a_lock_left_by_a_killed_builder_does_not_block_later_runs(tmp_path: Path) -> None:
    """torch's lock file outlives a builder killed mid-build (time-out, Ctrl-C); plain torch would then
    wait on it forever. Our build holds a kernel lock too, so the next run sees the file is stale."""
    cache_home = tmp_path / "cache"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    env.pop("TORCH_EXTENSIONS_DIR", None)
    env.pop("LAUNCHER_OPS_DIR_SET", None)
    ops_dir = subprocess.run(
        [sys.executable, "-c", "import launcher.builtins.ops_cache as o; print(o.use_environment_ops_dir())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    stale = Path(ops_dir) / "launcher_ops_probe" / "lock"
    stale.parent.mkdir(parents=True)
    stale.touch()
    result = _start(Path(sys.executable), tmp_path / "src", cache_home, timeout_s=120)
    assert Path(str(result["library"])).is_file() and not stale.exists()

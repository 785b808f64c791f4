"""The installer behind `make install` (launcher/builtins/install.py): uv gets pip's indexes; pip
takes over where uv cannot be had or fails. Subprocesses are stood in for (no install runs here: the
fresh-clone `make demo` in the README runs the real one)."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import pytest

from launcher.builtins import install

# What `pip config list` printed on this machine (files and PIP_* variables).
PIP_CONFIG_LIST = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/old.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/srv/other-wheels'
install.index-url='https://mirror.example/simple'
"""


def test_pip_settings_take_the_value_pip_uses() -> None:
    settings = install.pip_settings(PIP_CONFIG_LIST)
    assert settings["cert"] == "/etc/ssl/certs/ca-certificates.crt"  # PIP_CERT beats the file
    assert settings["find-links"] == "/opt/wheels"
    assert settings["index-url"] == "https://mirror.example/simple"  # [install] applies to install
    assert settings["extra-index-url"] == "file:///opt/pypi/simple file:///opt/pypi-more/simple"


def test_uv_gets_every_index_constraint_and_certificate() -> None:
    flags, env = install.uv_arguments(install.pip_settings(PIP_CONFIG_LIST))
    pairs = set(itertools.pairwise(flags))  # each flag next to its value
    assert ("--index-url", "https://mirror.example/simple") in pairs
    assert ("--extra-index-url", "file:///opt/pypi/simple") in pairs
    assert ("--extra-index-url", "file:///opt/pypi-more/simple") in pairs
    assert ("--find-links", "/opt/wheels") in pairs
    assert ("--constraint", "/etc/xdg/pip/constraints.txt") in pairs
    assert ("--index-strategy", "unsafe-best-match") in pairs  # pip's rule: best version anywhere
    assert "--compile-bytecode" in flags
    assert env == {"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}
    assert install.uv_arguments({}) == (["--index-strategy", "unsafe-best-match", "--compile-bytecode"], {})


class _Recorder:
    """subprocess.run stand-in: records each command; ``fail`` names commands that exit 1."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.commands: list[list[str]] = []
        self.fail = fail

    def __call__(self, command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        self.commands.append(command)
        failed = any(word in command for word in self.fail)
        stdout = PIP_CONFIG_LIST if command[-2:] == ["config", "list"] else ""
        return subprocess.CompletedProcess(command, 1 if failed else 0, stdout=stdout)


def _fake_python(tmp_path: Path, with_uv: bool) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if with_uv:
        (bin_dir / "uv").write_text("#!/bin/sh\n")
        (bin_dir / "uv").chmod(0o755)
    return str(bin_dir / "python")


def test_uv_installs_with_pips_indexes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    python = _fake_python(tmp_path, with_uv=True)
    runs = _Recorder()
    monkeypatch.setattr(install.subprocess, "run", runs)
    assert install.install(["-c", "constraints.txt", "-e", "."], python=python) == 0
    uv_command = runs.commands[-1]
    assert uv_command[:3] == [str(tmp_path / "bin" / "uv"), "pip", "install"]
    assert uv_command[-4:] == ["-c", "constraints.txt", "-e", "."]
    assert "file:///opt/pypi-more/simple" in uv_command
    assert not any(c[1:4] == ["-m", "pip", "install"] for c in runs.commands)  # pip installed nothing


def test_pip_takes_over_when_uv_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    python = _fake_python(tmp_path, with_uv=True)
    runs = _Recorder(fail=(str(tmp_path / "bin" / "uv"),))
    monkeypatch.setattr(install.subprocess, "run", runs)
    assert install.install(["torch==2.13.0"], python=python) == 0
    assert runs.commands[-1] == [python, "-m", "pip", "install", "--quiet", "torch==2.13.0"]


def test_pip_installs_when_uv_cannot_be_had(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    python = _fake_python(tmp_path, with_uv=False)
    runs = _Recorder(fail=(f"uv=={install.UV_VERSION}",))  # e.g. an index without uv
    monkeypatch.setattr(install.subprocess, "run", runs)
    assert install.install(["torch==2.13.0"], python=python) == 0
    assert runs.commands == [
        [python, "-m", "pip", "install", "--quiet", f"uv=={install.UV_VERSION}"],
        [python, "-m", "pip", "install", "--quiet", "torch==2.13.0"],
    ]

"""One start-up of a process that JIT-builds an op, as a rank does (tests/test_ops_cache.py runs it in
two venvs alternately): picks the ops directory as a rank does, then builds or reuses a tiny
extension with torch's own JIT loader, the one DeepSpeed's op builders use. Prints one JSON line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SOURCE = r"""
#include <Python.h>
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "launcher_ops_probe", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_launcher_ops_probe(void) { return PyModule_Create(&module); }
"""


def main() -> None:
    from torch.utils.cpp_extension import load

    src_dir = Path(sys.argv[1])
    src_dir.mkdir(parents=True, exist_ok=True)
    source = src_dir / "probe.cpp"
    if not source.exists():
        source.write_text(SOURCE, encoding="utf-8")
    from launcher.builtins.ops_cache import use_environment_ops_dir
    from launcher.builtins.prebuild import build_under_lock

    module = build_under_lock(
        use_environment_ops_dir(),
        "launcher_ops_probe",
        lambda: load(name="launcher_ops_probe", sources=[str(source)]),
    )
    library = Path(str(module.__file__))
    print(
        json.dumps(
            {
                "ops_dir": str(library.parent.parent),
                "library": str(library),
                "mtime_ns": library.stat().st_mtime_ns,
            }
        )
    )


if __name__ == "__main__":
    main()

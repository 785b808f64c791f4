"""Errors in the user's terms. Anything raised as a UserError exits with code 2 and no traceback."""

from __future__ import annotations

import errno
import json
import re

USAGE_EXIT_CODE = 2
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
"""Newlines and other control characters: never safe in a script line or an argv word we print."""


def shown(value: str) -> str:
    """A user's string as an error message shows it: quoted, with newlines and the like visible."""
    return json.dumps(value, ensure_ascii=False)


class UserError(Exception):
    """A problem the user can fix (bad spec, missing file, wrong option). Printed as is, exit code 2."""

    exit_code = USAGE_EXIT_CODE


class SpecError(UserError):
    """One or more problems in a job spec, all reported at once.

    Each problem is already formatted as ``file:line:col: key.path: message``.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        count = len(self.problems)
        header = f"{count} problem{'s' if count != 1 else ''} in the job spec:"
        super().__init__("\n".join([header, *(f"  {p}" for p in self.problems)]))


class DiskFullError(OSError):
    """A write ran out of space (or quota); names the file, so the FAILED reason says where."""

    ERRNOS = (errno.ENOSPC, errno.EDQUOT)

    def __init__(self, path: object, code: int = errno.ENOSPC):
        what = "disk quota exceeded" if code == errno.EDQUOT else "no space left on device"
        super().__init__(code, f"disk full: {what} writing {path}", str(path))

    def __str__(self) -> str:
        return str(self.strerror)

"""The blind review sheet in a real browser (headless Chromium driven over the DevTools protocol on a
pipe): verdicts given in a tab survive closing it and restarting the browser, and the CSV the page
exports is what `launcher review import` reads."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from collect_fixtures import default_result, make_run, perturb, references, samples

from launcher.collect.review import export_review, import_review

CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium")
REQUIRE_ENV = "LAUNCHER_REQUIRE_CHROMIUM"  # CI sets it: a missing browser then fails instead of skipping

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get(REQUIRE_ENV),
    reason="no headless Chromium (Debian: apt-get install --no-install-recommends chromium-headless-shell)",
)


class Browser:
    """Chromium with ``--remote-debugging-pipe``: DevTools messages as NUL-terminated JSON on fds 3/4."""

    def __init__(self, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        command = (
            f"exec 3<&{to_browser_r} 4>&{from_browser_w}; exec {CHROMIUM} --headless --no-sandbox "
            f"--disable-gpu --no-first-run --remote-debugging-pipe --user-data-dir={profile} about:blank"
        )
        self.proc = subprocess.Popen(
            ["bash", "-c", command],
            pass_fds=(to_browser_r, from_browser_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._buffer = b""

    def call(self, method: str, session: str | None = None, timeout_s: float = 30, **params: Any) -> Any:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    assert "error" not in reply, reply
                    return reply["result"]
            ready, _, _ = select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no reply to {method} within {timeout_s} s"
            chunk = os.read(self._from_browser, 1 << 16)
            assert chunk, "the browser closed the pipe"
            self._buffer += chunk

    def open(self, url: str) -> tuple[str, str]:
        """A new tab on ``url``, loaded: (target id, session id)."""
        target = self.call("Target.createTarget", url=url)["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        deadline = time.monotonic() + 30
        loaded = f"document.readyState === 'complete' && location.href === {json.dumps(url)}"
        while not self.evaluate(session, loaded):
            assert time.monotonic() < deadline, "the page did not load"
            time.sleep(0.05)
        return target, session

    def evaluate(self, session: str, expression: str) -> Any:
        result = self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError):
            self.call("Browser.close", timeout_s=10)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


CHECKED = (
    "JSON.stringify({radios: [...document.querySelectorAll('input[type=radio]:checked')]"
    ".map(r => r.name + '=' + r.value), comment: document.querySelector('input[name=c2]').value, "
    "count: document.getElementById('count').textContent})"
)


def test_verdicts_survive_a_closed_tab_and_a_browser_restart(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    refs = references(6)
    for index, name in enumerate(("lora", "full")):
        preds = perturb(refs, 0.2 * (index + 1), seed=index)
        make_run(exp, name, result=default_result(name), samples=samples(refs, preds))
    sheet = export_review(exp, "lora", "full")
    url = sheet.html_path.resolve().as_uri()
    profile = tmp_path / "profile"

    browser = Browser(profile)
    try:
        target, tab = browser.open(url)
        assert json.loads(browser.evaluate(tab, CHECKED))["radios"] == []
        browser.evaluate(
            tab,
            "document.querySelector('input[name=v1][value=\"2\"]').click();"
            "document.querySelector('input[name=v3][value=tie]').click();"
            "const c = document.querySelector('input[name=c2]'); c.value = '第二个更好, \"quoted\"';"
            "c.dispatchEvent(new Event('input', {bubbles: true})); 0",
        )
        browser.call("Target.closeTarget", targetId=target)
        _, tab = browser.open(url)  # the same sheet in a new tab
        state = json.loads(browser.evaluate(tab, CHECKED))
        assert state["radios"] == ["v1=2", "v3=tie"]
        assert state["comment"] == '第二个更好, "quoted"'
        assert state["count"] == "2 of 6 rated, saved in this browser"
    finally:
        browser.close()

    browser = Browser(profile)  # a new browser process on the same profile
    try:
        _, tab = browser.open(url)
        assert json.loads(browser.evaluate(tab, CHECKED))["radios"] == ["v1=2", "v3=tie"]
        # The export is the file `launcher review import` reads.
        filled = tmp_path / "filled.csv"
        filled.write_text(browser.evaluate(tab, "csvText()"), encoding="utf-8")
    finally:
        browser.close()
    counts = import_review(exp, filled)
    assert (counts.wins_a + counts.wins_b, counts.ties, counts.unrated) == (1, 1, 4)
    record = json.loads(counts.path.read_text())
    assert [v["item"] for v in record["verdicts"]] == [1, 3]

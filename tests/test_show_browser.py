"""`chatmask show --html` in a real browser: headless Chromium (Debian's `chromium`; `.ci/run`
installs it when missing). The page must load with no console errors, hold one token element
per token of the row, and show the warning on a row whose reference mask is wrong.

Chromium prints the page's console messages to stderr with ``--enable-logging=stderr``
(``...:CONSOLE(line)] "message"``); a page with a script error proves the check sees them.
Outside CI a missing browser skips; under CI=true it fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import IN_CI

from chatmask.cli import main
from chatmask.demo import demo_conversations, demo_tokenizer

TOK = demo_tokenizer()
ROWS = demo_conversations()


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if IN_CI:
        pytest.fail("chromium is not installed (CI=true: .ci/run installs it)")
    pytest.skip("chromium is not installed")


def load(page: Path) -> tuple[str, list[str]]:
    """The DOM Chromium built from `page` and the console messages it logged."""
    with tempfile.TemporaryDirectory(prefix="chatmask-chromium-") as profile:
        proc = subprocess.run(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=2000",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


class Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.classes: list[list[str]] = []
        self.text_of: dict[str, list[str]] = {}
        self._open: list[str] = []

    def handle_starttag(self, tag, attrs):
        cls = (dict(attrs).get("class") or "").split()
        self.classes.append(cls)
        self._open.append("warning" if "warning" in cls else "")

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        if "warning" in self._open:
            self.text_of.setdefault("warning", []).append(data)

    def count(self, cls: str) -> int:
        return sum(1 for c in self.classes if cls in c)


def parse(dom: str) -> Elements:
    e = Elements()
    e.feed(dom)
    return e


def test_console_errors_are_seen(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>no_such_function()</script></body></html>")
    _, console = load(page)
    assert any("no_such_function" in line for line in console), console


def _flagged_row() -> int:
    batch = TOK.tokenize_batch([r["messages"] for r in ROWS], mode="all", on_error="skip", flag_reference=True)
    flagged = [int(batch.rows[i]) for i in range(len(batch)) if batch.reference_wrong[i]]
    assert flagged, "the demo corpus has a row the reference labels wrongly in mode all"
    return flagged[0]


@pytest.mark.parametrize("flagged", [False, True])
def test_show_html_in_chromium(tmp_path, capsys, flagged):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    mode = "all" if flagged else "last"
    row = _flagged_row() if flagged else 1
    page = tmp_path / "view.html"
    assert (
        main(
            [
                "show",
                str(src),
                "--row",
                str(row),
                "--tokenizer",
                "demo",
                "--mode",
                mode,
                "--html",
                str(page),
                "--no-color",
            ]
        )
        == 0
    )
    capsys.readouterr()
    batch = TOK.tokenize_batch([ROWS[row]["messages"]], mode=mode, flag_reference=True)
    dom, console = load(page)
    assert not console, console
    e = parse(dom)
    assert "<h1>" in dom and e.count("legend") == 1
    assert e.count("tok") == len(batch.input_ids)
    assert e.count("badge") >= 2  # per-message attribution
    if flagged:
        assert e.count("warning") == 1 and "wrong on this row" in "".join(e.text_of["warning"])
        assert e.count("differs") >= 1
    else:
        assert not bool(batch.reference_wrong[0])
        assert e.count("warning") == 0

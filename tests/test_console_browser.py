"""The web console in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright's Python package, which never downloads a browser of its own) against a real
daemon with real runs: a quick command, a command that fails into quarantine (twice: one
to release, one to drop), and an agent run parked for approval by the scripted model
server. It signs in with the API token, loads every page, releases, drops and approves
through the forms, and sees each change, one of them arrive by live update. A screenshot
of each page is written under the test's tmp dir.

Skips, saying why, only where no Chromium is installed (``make test`` installs Debian's
where it can: see the Makefile) or Playwright is missing.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Agentd

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import fake_llm
from agent_tools import SCRIPT
from fake_llm import ThreadedFakeLLM, call, tool_calls

pytestmark = pytest.mark.e2e

PY = sys.executable
TOKEN = "console-test-token-0123456789"
HOSTILE = '<img src=x onerror=alert(1)> & "quoted"'


def chromium() -> str:
    path = os.environ.get("AGENTD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.skip(f"no Chromium at {path}: apt-get install chromium (make test does, as root)")
    return path


@pytest.fixture
def browser() -> Iterator[Any]:
    path = chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed: pip install -e '.[dev]'")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def tasks(tmp_path: Path) -> str:
    words, marker = tmp_path / "words.txt", tmp_path / "failed-once"
    return f"""
    quick:
      description: '{HOSTILE}'
      schedule: {{manual: true}}
      command: {{argv: [echo, hello from quick]}}
    hourly:
      schedule: {{every: 1h}}
      command: {{argv: ["true"]}}
    flaky:
      schedule: {{manual: true}}
      command: {{shell: "test -e {marker} || {{ touch {marker}; echo boom >&2; exit 1; }}"}}
      retry: {{max_attempts: 1}}
    doomed:
      schedule: {{manual: true}}
      command: {{argv: ["false"]}}
      retry: {{max_attempts: 1}}
    guarded:
      schedule: {{manual: true}}
      agent:
        provider: fake
        prompt: Push the word.
        approval_timeout: 1h
        tools:
          - name: push
            sensitive: true
            parameters:
              type: object
              properties: {{word: {{type: string}}}}
              required: [word]
            command: {{argv: [{PY}, {SCRIPT}, {words}, "{{word}}"]}}
      budget: {{task: {{usd_per_day: 1.0}}}}
    """


def providers(url: str) -> str:
    return f"""
    providers:
      fake:
        base_url: {url}
        default_model: m1
        max_tokens: 50
        prices: {{m1: {{input: 1000, output: 2000}}}}
    """


class Shots:
    """Screenshots of each page, under the test's tmp dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()

    def take(self, page: Any, name: str) -> Path:
        path = self.root / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 1000
        return path


def check_accessible(page: Any) -> None:
    """Every control has a label, the page has one h1 and a viewport, and nothing
    scrolls sideways but the tables' own scrollers (a phone is 390 px wide)."""
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
            .map(e => e.outerHTML)"""
    )
    assert unlabelled == []
    assert page.locator("h1").count() == 1
    assert page.locator('meta[name="viewport"]').count() == 1
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")


def test_the_console_in_chromium(
    make_daemon: Any, tmp_path: Path, browser: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTD_CONSOLE_TOKEN", TOKEN)  # the daemon's and the CLI's
    with ThreadedFakeLLM() as llm:
        llm.queue(tool_calls(call("push", {"word": "prod"}, "c1")), fake_llm.ok("pushed"))
        d: Agentd = make_daemon("quick: {schedule: {manual: true}, command: {argv: [true]}}")
        d.top = providers(llm.url)
        d.write_config(
            tasks(tmp_path),
            f"http: {{host: 127.0.0.1, port: {d.port}, token_env: AGENTD_CONSOLE_TOKEN}}",
        )
        d.start()
        quick, flaky, doomed = d.trigger("quick"), d.trigger("flaky"), d.trigger("doomed")
        guarded = d.trigger("guarded")
        d.wait_status(quick, "succeeded")
        d.wait_status(flaky, "quarantined")
        d.wait_status(doomed, "quarantined")
        d.wait_status(guarded, "awaiting_approval")

        shots = Shots(tmp_path / "screenshots")
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
        page.on(
            "console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None
        )

        # Signing in: a page without the cookie sends the browser to the form.
        page.goto(d.url + "/ui/tasks")
        assert page.url.startswith(d.url + "/ui/login")
        shots.take(page, "login")
        page.get_by_label("API token").fill("not-the-token")
        page.get_by_role("button", name="Sign in").click()
        assert "not this agentd's token" in page.locator("[role=alert]").inner_text()
        page.get_by_label("API token").fill(TOKEN)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(d.url + "/ui/tasks")
        errors.clear()  # the wrong token's page was a 401: the one error expected
        assert "console: signed in grant=write" in d.log()
        assert TOKEN not in d.log()

        # Tasks: schedules, a ticking countdown, last outcomes; the hostile description
        # is text, not markup.
        assert page.locator("h1").inner_text() == "Tasks"
        row = page.locator("tr", has=page.locator("th a", has_text="hourly"))
        countdown = row.locator("[data-countdown]")
        first = countdown.inner_text()
        assert first.startswith("in ")
        page.wait_for_function(
            "t => document.querySelector('tr [data-countdown]').textContent !== t", arg=first
        )
        assert HOSTILE in page.locator("tr", has_text="quick").inner_text()
        assert page.locator("main img").count() == 0
        check_accessible(page)
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Skip to content"
        shots.take(page, "tasks")

        # Runs: every run, the charts, a filter by task and status.
        page.get_by_role("link", name="Runs", exact=True).click()
        page.wait_for_url(d.url + "/ui/runs")
        for run_id in (quick, flaky, doomed, guarded):
            assert page.locator(f"a[href='/ui/runs/{run_id}']").count() == 1
        assert page.locator("#chart-runs svg[role=img]").count() == 1
        assert page.locator("#chart-late svg").count() == 1
        shots.take(page, "runs")
        page.get_by_label("task").select_option("flaky")
        page.get_by_label("status").select_option("quarantined")
        page.get_by_role("button", name="Filter").click()
        page.wait_for_url("**/ui/runs?task=flaky&status=quarantined*")
        assert page.locator("tbody a.mono").all_inner_texts() == [flaky]
        check_accessible(page)
        shots.take(page, "runs-filtered")

        # A run's detail: attempts, events, the output's tail.
        page.goto(d.url + f"/ui/runs/{quick}")
        assert "hello from quick" in page.locator("main pre").first.inner_text()
        assert page.locator("#att-h").count() == 1 and page.locator("#ev-h").count() == 1
        shots.take(page, "run-quick")
        page.goto(d.url + f"/ui/runs/{flaky}")
        assert "boom" in page.locator("main").inner_text()
        shots.take(page, "run-flaky")

        # Live: the runs page, open, follows the approval made in another tab.
        page.goto(d.url + "/ui/runs")
        page.wait_for_function("document.getElementById('live').textContent.startsWith('live')")
        status_cell = f"tr:has(a[href='/ui/runs/{guarded}']) .badge"
        assert page.locator(status_cell).inner_text() == "awaiting approval"

        other = context.new_page()
        other.goto(d.url + "/ui/approvals")
        card = other.locator("section.card", has_text=guarded)
        assert '"word": "prod"' in card.locator("pre").inner_text()
        assert "sensitive" in card.inner_text()
        check_accessible(other)
        shots.take(other, "approvals")
        card.get_by_role("button", name="Approve").click()
        other.wait_for_url("**/ui/approvals?done=approve*")
        assert "Approved the call of run" in other.locator(".notice").inner_text()
        d.wait_status(guarded, "succeeded")
        page.locator(status_cell, has_text="succeeded").wait_for(timeout=30_000)
        assert "console: approval approve run=" in d.log()

        other.goto(d.url + f"/ui/runs/{guarded}")
        transcript = other.locator("ol.transcript").inner_text()
        assert "tool started" in transcript and "prod" in transcript
        assert "2 call(s)" in other.locator("main").inner_text()
        shots.take(other, "run-agent")

        # Quarantine: release (it then succeeds: it failed only once) and drop, each
        # after a confirmation page.
        other.goto(d.url + "/ui/quarantine")
        shots.take(other, "quarantine")
        other.get_by_role("link", name=f"Release… run {flaky}").click()
        assert other.locator("h1").inner_text() == f"Release run {flaky}?"
        shots.take(other, "quarantine-confirm")
        other.get_by_role("button", name=f"Yes, release run {flaky}").click()
        other.wait_for_url("**/ui/quarantine?done=release*")
        assert f"Released run {flaky}" in other.locator(".notice").inner_text()
        d.wait_status(flaky, "succeeded")
        other.get_by_role("link", name=f"Drop… run {doomed}").click()
        other.get_by_role("button", name=f"Yes, drop run {doomed}").click()
        other.wait_for_url("**/ui/quarantine?done=drop*")
        d.wait_status(doomed, "dropped")
        assert other.locator("tbody").inner_text().strip() == "nothing is in quarantine"
        other.goto(d.url + f"/ui/runs/{flaky}")
        assert other.locator("dl.kv .badge").first.inner_text() == "succeeded"

        # Spend (the agent's two calls against its budget), alerts, nodes.
        for path, title in (
            ("spend", "Spend"),
            ("alerts", "Alerts and outbox"),
            ("nodes", "Nodes"),
        ):
            other.goto(d.url + f"/ui/{path}")
            assert other.locator("h1").inner_text() == title
            check_accessible(other)
            shots.take(other, path)
        other.goto(d.url + "/ui/spend")
        spend_row = other.locator("table[aria-labelledby=sp-h] tr", has_text="guarded")
        assert spend_row.locator("meter").count() == 1  # a day budget; the month has none
        assert "(no limit)" in spend_row.inner_text()
        assert other.locator("#chart-spend rect").count() >= 1
        other.goto(d.url + "/ui/nodes")
        assert other.locator("tbody .badge", has_text="alive").count() == 1

        # A phone: the same pages fit its width.
        phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
        phone.add_cookies(context.cookies())
        small = phone.new_page()
        for path in ("tasks", "approvals", "spend", "runs"):
            small.goto(d.url + f"/ui/{path}")
            check_accessible(small)
        shots.take(small, "phone-runs")
        phone.close()

        assert errors == []  # no script error, no refused load (a CSP violation is one)
        # Signing out ends the session (and the open page's live stream gets 401s).
        page.close()
        other.get_by_role("button", name="Sign out").click()
        other.wait_for_url("**/ui/login")
        other.goto(d.url + "/ui/tasks")
        assert "/ui/login" in other.url
        context.close()
        print(f"console screenshots: {shots.root}")
        assert sorted(p.name for p in shots.root.iterdir()) == sorted(
            f"{n}.png"
            for n in (
                "login",
                "tasks",
                "runs",
                "runs-filtered",
                "run-quick",
                "run-flaky",
                "approvals",
                "run-agent",
                "quarantine",
                "quarantine-confirm",
                "spend",
                "alerts",
                "nodes",
                "phone-runs",
            )
        )
        assert d.stop() == 0

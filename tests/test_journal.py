"""Syslog priority prefixes on stderr when stderr is the journal stream: the formatter,
the stream check, and a real daemon whose stderr is the file ``JOURNAL_STREAM`` names
(as systemd sets it up) against one whose stderr is not."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from harness import wait_for

from agentd.journal import JournalFormatter, priority, stderr_is_journal


def _record(level: int, msg: str, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("agentd", level, __file__, 1, msg, None, info)


def test_every_line_of_a_record_carries_its_priority() -> None:
    fmt = JournalFormatter("%(levelname)s %(message)s")
    assert fmt.format(_record(logging.INFO, "started")) == "<6>INFO started"
    assert fmt.format(_record(logging.WARNING, "late")) == "<4>WARNING late"
    lines = fmt.format(_record(logging.ERROR, "failed", exc=True)).split("\n")
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ValueError: boom"
    assert (priority(logging.CRITICAL), priority(logging.DEBUG), priority(35)) == (2, 7, 4)


def test_stderr_is_the_journal_only_when_the_stream_is_the_one_named(tmp_path: Path) -> None:
    path = tmp_path / "stream"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        named = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stderr_is_journal(named, stream.fileno())
        with (tmp_path / "other").open("w") as other:
            assert not stderr_is_journal(named, other.fileno())  # redirected elsewhere
        assert not stderr_is_journal({}, stream.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, stream.fileno())


def _run_daemon_briefly(tmp_path: Path, name: str, journal_env: bool) -> str:
    root = tmp_path / name
    root.mkdir()
    config = root / "agentd.yaml"
    config.write_text(
        f"daemon: {{state_dir: {root / 'state'}, http: {{host: 127.0.0.1, port: 0}}}}\n"
        "tasks:\n  t: {schedule: {manual: true}, command: {argv: ['true']}}\n"
    )
    log = root / "stderr"
    with log.open("wb") as stream:
        st = os.fstat(stream.fileno())
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if journal_env:
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "agentd.cli", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stream,
            env=env,
        )
    try:
        wait_for(lambda: b"agentd started" in log.read_bytes(), what="the daemon to start")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return log.read_text()


def test_a_daemon_writing_to_the_journal_prefixes_its_lines_and_otherwise_not(
    tmp_path: Path,
) -> None:
    journal = _run_daemon_briefly(tmp_path, "journal", journal_env=True).splitlines()
    assert journal and all(line[:3] in ("<6>", "<4>", "<3>", "<7>") for line in journal)
    assert any(line.startswith("<6>INFO agentd agentd started") for line in journal)
    plain = _run_daemon_briefly(tmp_path, "plain", journal_env=False).splitlines()
    assert not any(line.startswith("<") for line in plain)

"""``daemon.log_format``: JSON lines with the text line's keys as fields, chosen by
``auto`` under Kubernetes only, and a real daemon writing them (secrets still scrubbed)."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

from harness import wait_for

from agentd.logformat import JsonFormatter, resolve


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            info = sys.exc_info()
    return logging.LogRecord("agentd", logging.INFO, __file__, 1, msg, args, info)


def test_a_json_line_carries_the_text_lines_keys_as_fields() -> None:
    line = JsonFormatter().format(
        _record("event=%s task=%s run=%s error=%s", "failure", "t", "r1", '"exit 3: no space"')
    )
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "info" and out["logger"] == "agentd"
    assert out["event"] == "failure" and out["task"] == "t" and out["run"] == "r1"
    assert out["error"] == "exit 3: no space"  # the quoted value, decoded
    assert out["msg"].startswith("event=failure task=t")
    assert out["ts"].endswith("+00:00")
    traced = json.loads(JsonFormatter().format(_record("failed level=x", exc=True)))
    assert "RuntimeError: boom" in traced["exc"] and traced["level"] == "info"  # reserved


def test_auto_is_json_under_kubernetes_off_a_terminal_only() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    k8s = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert resolve("auto", k8s, io.StringIO()) == "json"
    assert resolve("auto", k8s, Tty()) == "text"
    assert resolve("auto", {}, io.StringIO()) == "text"
    assert resolve("json", {}, Tty()) == "json" and resolve("text", k8s, io.StringIO()) == "text"


def test_a_daemon_logs_json_lines_and_a_reload_switches_back(
    make_daemon: Any, tmp_path: Path
) -> None:
    """JSON lines from a real daemon: each line one object with the event's keys; a
    secret in a failing command's error text is scrubbed there as in text lines; a
    reload to ``text`` switches back without a restart."""
    token = tmp_path / "token"
    secret = "s3cret-token-value-1234567"
    token.write_text(secret)
    tasks = f"""
    fail:
      schedule: {{manual: true}}
      command: {{shell: "cat {token} >&2; exit 3"}}
      retry: {{max_attempts: 1}}
    """
    d = make_daemon(tasks)
    http = f"http: {{host: 127.0.0.1, port: {d.port}, token_file: {token}}}"
    d.write_config(tasks, f"log_format: json\n{http}")
    d.start()
    run_id = d.trigger("fail")
    wait_for(lambda: '"event": "quarantine"' in d.log(), what="the run's last event")
    objects = [json.loads(ln) for ln in d.log().splitlines() if ln.strip()]
    [failure] = [o for o in objects if o.get("event") == "failure"]
    assert failure["run"] == run_id and failure["task"] == "fail"
    assert failure["exit_code"] == "3" and "exit" in failure["error"]
    assert secret not in d.log()
    d.write_config(tasks, f"log_format: text\n{http}")
    assert d.cli("reload", "--wait", check=False).returncode == 0
    wait_for(lambda: d.log().rstrip().splitlines()[-1][:1] != "{", what="text lines again")
    assert "reload: daemon.log_format changed; applied now" in d.log()
    assert d.stop() == 0

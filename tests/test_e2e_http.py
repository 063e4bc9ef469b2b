"""The HTTP surface of a real daemon process: probes, metrics, streams, and the CLI on top."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Agentd, agentd_cli, free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families

from agentd.state.sqlite.engine import SqliteStore

pytestmark = pytest.mark.e2e


def get(d: Agentd, path: str) -> httpx.Response | None:
    try:
        return httpx.get(d.url + path, timeout=5)
    except httpx.TransportError:
        return None


def status_of(d: Agentd, path: str) -> int | None:
    resp = get(d, path)
    return resp.status_code if resp is not None else None


def metric(d: Agentd, name: str, **labels: str) -> float | None:
    resp = get(d, "/metrics")
    assert resp is not None and resp.status_code == 200
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def test_liveness_stays_ok_while_the_llm_endpoint_is_down(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(
        """
        digest:
          schedule: {manual: true}
          agent:
            base_url: http://127.0.0.1:9/v1
            model: test-model
            prompt: "hello"
            request_timeout: 2s
          retry: {max_attempts: 5, backoff: 100ms}
        """
    ).start()
    run_id = d.trigger("digest")
    wait_for(lambda: len(d.events(run_id, "failure")) >= 2, what="two failed LLM attempts")
    resp = get(d, "/healthz")
    assert resp is not None and resp.status_code == 200, resp.text if resp else None
    assert resp.json()["status"] == "ok"
    assert status_of(d, "/readyz") == 200
    assert d.stop() == 0


def test_readiness_follows_startup_and_sigterm_while_liveness_holds(  # type: ignore[no-untyped-def]
    make_daemon, tmp_path
) -> None:
    go = tmp_path / "go"
    d = make_daemon(
        f"""
        slow:
          schedule: {{manual: true}}
          command: {{shell: "while [ ! -f {go} ]; do sleep 0.05; done"}}
        """
    )
    d.state_dir.mkdir(parents=True)
    SqliteStore(d.state_dir / "state.sqlite").close()  # the state DB, at this agentd's schema
    # Hold the state DB's write lock: startup cannot finish while we do.
    holder = sqlite3.connect(d.state_dir / "state.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        d.start(wait_ready=False)
        wait_for(lambda: status_of(d, "/readyz") == 503, what="readyz 503 during startup")
        body = get(d, "/readyz")
        assert body is not None and "starting" in body.json()["reason"]
        assert status_of(d, "/healthz") == 200
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_for(lambda: status_of(d, "/readyz") == 200, what="readyz 200 after startup")

    run_id = d.trigger("slow")
    d.wait_status(run_id, "running")
    d.signal(signal.SIGTERM)
    wait_for(lambda: status_of(d, "/readyz") == 503, what="readyz 503 after SIGTERM")
    resp = get(d, "/readyz")
    assert resp is not None and "shutting down" in resp.json()["reason"]
    assert status_of(d, "/healthz") == 200  # draining is alive, not dead
    go.write_text("go")
    assert d.proc is not None and d.proc.wait(timeout=60) == 0
    assert d.run_status(run_id) == "succeeded"


def test_wedged_main_loop_turns_liveness_503(make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    wedge = tmp_path / "wedge"
    d = make_daemon(
        """
        idle:
          schedule: {manual: true}
          command: {argv: ["true"]}
        """,
        "liveness_stale_after: 1s",
    ).start(env={"AGENTD_TEST_WEDGE_FILE": str(wedge)})
    wait_for(lambda: status_of(d, "/healthz") == 200)
    wedge.write_text("stuck")
    wait_for(lambda: status_of(d, "/healthz") == 503, what="liveness 503")
    resp = get(d, "/healthz")
    assert resp is not None and resp.json()["stale"] == ["main_loop"]
    wedge.unlink()
    wait_for(lambda: status_of(d, "/healthz") == 200, what="liveness back to 200")
    assert d.stop() == 0


def test_probe_port_answers_while_the_event_loop_is_blocked(make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``http.probe_port``: the probes on their own thread answer while the daemon's event
    loop is blocked (where the main port answers nothing), still judge the main loop
    (503 naming it once its ticks are stale), and say ready again when it moves."""
    wedge = tmp_path / "wedge"
    probe_port = free_port()
    tasks = """
        idle:
          schedule: {manual: true}
          command: {argv: ["true"]}
        """
    d = make_daemon(tasks)
    d.write_config(
        tasks,
        "liveness_stale_after: 2s\n"
        f"http: {{host: 127.0.0.1, port: {d.port}, probe_port: {probe_port}}}",
    )
    d.start(env={"AGENTD_TEST_WEDGE_FILE": str(wedge)})
    probes = f"http://127.0.0.1:{probe_port}"
    assert f"probes listening on 127.0.0.1:{probe_port}" in d.log()
    assert httpx.get(f"{probes}/healthz", timeout=5).json()["status"] == "ok"
    assert httpx.get(f"{probes}/readyz", timeout=5).json() == {"status": "ready"}
    assert httpx.get(f"{probes}/v1/tasks", timeout=5).status_code == 404  # probes only

    wedge.write_text("block")

    def main_port_stuck() -> bool:
        try:
            httpx.get(f"{d.url}/healthz", timeout=1.0)
        except httpx.TimeoutException:
            return True
        return False

    wait_for(main_port_stuck, what="the main port stuck behind the blocked loop")
    resp = httpx.get(f"{probes}/healthz", timeout=1.0)  # the probe thread answers meanwhile
    assert resp.status_code in (200, 503)
    resp = wait_for(
        lambda: (r := httpx.get(f"{probes}/healthz", timeout=1.0)).status_code == 503 and r,
        what="probe liveness 503 while the loop is blocked",
    )
    assert resp.json()["stale"] == ["main_loop"]
    assert resp.headers["Cache-Control"] == "no-store"
    wedge.unlink()
    wait_for(
        lambda: httpx.get(f"{probes}/healthz", timeout=5).status_code == 200,
        what="probe liveness 200 again",
    )
    assert status_of(d, "/healthz") == 200
    d.signal(signal.SIGTERM)
    assert d.proc is not None and d.proc.wait(timeout=60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{probes}/healthz", timeout=5)


def test_probe_port_in_use_is_a_clear_refusal(make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A probe port that cannot be bound stops startup with exit 69, naming the setting."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        d = make_daemon(
            """
            idle:
              schedule: {manual: true}
              command: {argv: ["true"]}
            """,
            f"http: {{host: 127.0.0.1, port: 0, probe_port: {port}}}",
        )
        d.start(wait_ready=False)
        assert d.proc is not None and d.proc.wait(timeout=60) == 69
        assert f"cannot listen on 127.0.0.1:{port}" in d.log()
        assert "daemon.http.host/probe_port" in d.log()
    finally:
        taken.close()


def test_metrics_parse_and_move_with_runs(make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(
        """
        ok:
          schedule: {manual: true}
          command: {argv: ["true"]}
        bad:
          schedule: {manual: true}
          command: {argv: ["false"]}
          retry: {max_attempts: 1}
        """
    ).start()
    # No series before a task's first activity (10,000 idle tasks, tiny scrape).
    assert metric(d, "agentd_runs_total", task="ok", outcome="success") is None
    d.wait_status(d.trigger("ok"), "succeeded")
    d.wait_status(d.trigger("bad"), "quarantined")
    wait_for(lambda: metric(d, "agentd_runs_total", task="ok", outcome="success") == 1)
    assert metric(d, "agentd_runs_total", task="bad", outcome="failure") == 1
    assert metric(d, "agentd_runs_total", task="bad", outcome="quarantined") == 1
    assert metric(d, "agentd_run_duration_seconds_count", task="ok") == 1
    assert metric(d, "agentd_run_start_lateness_seconds_count", task="ok") == 1
    wait_for(lambda: metric(d, "agentd_quarantined_runs") == 1, what="quarantine gauge")
    assert (metric(d, "agentd_task_last_success_timestamp_seconds", task="ok") or 0) > 0
    assert metric(d, "agentd_config_last_reload_successful") == 1
    assert metric(d, "process_resident_memory_bytes") is not None

    # A reload that removes a task removes its series; a broken one sets the gauge to 0.
    d.write_config(
        """
        ok:
          schedule: {manual: true}
          command: {argv: ["true"]}
        """
    )
    d.signal(signal.SIGHUP)
    wait_for(
        lambda: metric(d, "agentd_runs_total", task="bad", outcome="failure") is None,
        what="series of the removed task gone",
    )
    d.config.write_text(d.config.read_text().replace("manual: true", "cron: '99 * * * *'"))
    d.signal(signal.SIGHUP)
    wait_for(lambda: metric(d, "agentd_config_last_reload_successful") == 0)
    assert "reload failed, keeping the running config" in d.log()
    assert d.stop() == 0


def _read_sse(
    url: str,
    headers: dict[str, str],
    stop_after: int,
    out: list[dict[str, Any]],
    ready: threading.Event,
) -> None:
    with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(30, read=30)) as r:
        ready.set()
        data: list[str] = []
        for line in r.iter_lines():
            if line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                out.append(json.loads("".join(data)))
                data = []
                if len(out) >= stop_after:
                    return


def test_sse_reconnect_with_last_event_id_loses_and_duplicates_nothing(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(
        """
        job:
          schedule: {manual: true}
          command: {argv: ["true"]}
        """
    ).start()
    first: list[dict[str, Any]] = []
    ready = threading.Event()
    reader = threading.Thread(
        target=_read_sse, args=(d.url + "/v1/events/stream", {}, 3, first, ready), daemon=True
    )
    reader.start()
    assert ready.wait(30)
    run1 = d.trigger("job")
    reader.join(60)
    assert [e["kind"] for e in first] == ["enqueue", "claim", "start"]
    last_id = first[-1]["id"]
    # While disconnected: the rest of run 1 and a whole run 2 happen.
    d.wait_status(run1, "succeeded")
    run2 = d.trigger("job")
    d.wait_status(run2, "succeeded")
    expected = [e["id"] for e in d.events() if e["id"] > last_id]
    second: list[dict[str, Any]] = []
    ready2 = threading.Event()
    reader2 = threading.Thread(
        target=_read_sse,
        args=(
            d.url + "/v1/events/stream",
            {"Last-Event-ID": str(last_id)},
            len(expected),
            second,
            ready2,
        ),
        daemon=True,
    )
    reader2.start()
    reader2.join(60)
    assert [e["id"] for e in second] == expected
    assert d.stop() == 0


def test_cli_talks_to_the_daemon_api(make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(
        """
        job:
          schedule: {manual: true}
          command: {shell: "echo done"}
        """
    ).start()
    status = json.loads(d.cli("status", "--json").stdout)
    assert status["daemon"] == "running"
    assert status["readiness"]["status"] == "ready"
    run_id = d.trigger("job")
    watch = subprocess.run(
        [sys.executable, "-m", "agentd.cli", "runs", "watch", run_id, "--config", str(d.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert watch.returncode == 0, watch.stderr
    kinds = [line.split()[3] for line in watch.stdout.splitlines()]
    assert kinds[0] == "enqueue" and kinds[-1] == "success"
    # The API's own refusal comes through as the CLI's error.
    refused = d.cli("cancel", run_id, check=False)
    assert refused.returncode == 1 and "already ended" in refused.stderr
    assert d.stop() == 0
    stopped = d.cli("status", "--json", check=False)
    assert stopped.returncode == 3
    assert json.loads(stopped.stdout)["daemon"] == "not running"


def test_a_direct_cli_write_rings_the_running_daemon(make_daemon) -> None:  # type: ignore[no-untyped-def]
    """A CLI that cannot reach the API writes the DB itself and rings the doorbell: the
    daemon says so and runs the trigger, then removes its socket when it stops."""
    d = make_daemon(
        """
        job:
          schedule: {manual: true}
          command: {shell: "echo done"}
        """
    ).start()
    assert (d.state_dir / "agentd.wake").exists()
    # The same state, an API address where no daemon answers. (Not --url: a daemon
    # named by --url is the only one asked, and no state DB answers in its place.)
    elsewhere = d.root / "elsewhere.yaml"
    elsewhere.write_text(d.config.read_text().replace(f"port: {d.port}", f"port: {free_port()}"))
    out = agentd_cli("trigger", "job", "--json", config=elsewhere, check=True)
    run_id = json.loads(out.stdout)["run_id"]
    d.wait_log("doorbell: state DB changed by a CLI", "the daemon to hear the ring")
    d.wait_status(run_id, "succeeded")
    assert d.stop() == 0
    assert not (d.state_dir / "agentd.wake").exists()


def test_non_loopback_bind_without_token_refuses_to_start(tmp_path: Path) -> None:
    d = Agentd(
        tmp_path,
        """
        job:
          schedule: {manual: true}
          command: {argv: ["true"]}
        """,
    )
    d.config.write_text(d.config.read_text().replace("host: 127.0.0.1", "host: 0.0.0.0"))
    proc = subprocess.run(
        [sys.executable, "-m", "agentd.cli", "run", "--config", str(d.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 78
    assert "token" in proc.stderr


def test_the_node_registry_shows_the_running_daemon_and_then_its_stop(make_daemon) -> None:  # type: ignore[no-untyped-def]
    """``/v1/nodes`` and ``agentd nodes`` (through the API, and on the state directly
    once the daemon is gone) show this daemon: alive while it runs, with its version and
    config generation and the runs it holds; stopped after SIGTERM."""
    d = make_daemon(
        """
        slow:
          schedule: {manual: true}
          command: {argv: ["sleep", "30"]}
        """
    ).start()
    run_id = d.trigger("slow")
    d.wait_status(run_id, "running")
    resp = get(d, "/v1/nodes")
    assert resp is not None and resp.status_code == 200
    [node] = resp.json()["nodes"]
    assert node["alive"] is True and node["stopped_at"] is None
    assert node["pid"] == d.proc.pid and node["id"].endswith(f":{d.proc.pid}")
    assert node["runs_held"] == 1 and node["config_differs"] is False
    assert len(node["config_generation"]) == 12
    out = d.cli("nodes").stdout
    assert node["id"] in out and "alive" in out
    d.cli("cancel", run_id)
    d.wait_status(run_id, "cancelled")
    assert d.stop() == 0
    out = d.cli("nodes", "--json").stdout
    [after] = json.loads(out)
    assert after["id"] == node["id"] and after["stopped_at"] is not None
    assert after["alive"] is False and after["runs_held"] == 0

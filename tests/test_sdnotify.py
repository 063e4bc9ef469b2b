"""sd_notify without systemd: a real abstract unix datagram socket stands in for
systemd's NOTIFY_SOCKET, and a real daemon process talks to it.

These tests pin down the exact sequence systemd would see; the real-systemd tests in
test_systemd_real.py prove the same against systemd itself.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import Agentd, blocked, wait_for

from agentd.systemd import Notifier, ascii_status, watchdog_interval_s

pytestmark = pytest.mark.e2e


@dataclass
class Datagram:
    at: float  # time.monotonic() when received
    fields: dict[str, str]
    raw: str


class NotifySocket:
    """Collects every datagram sent to an abstract socket, with its arrival time."""

    def __init__(self) -> None:
        self.name = f"agentd-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(0.1)
        self.received: list[Datagram] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": "@" + self.name}

    def _collect(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            raw = data.decode("ascii")
            fields = dict(line.split("=", 1) for line in raw.split("\n") if line)
            with self._lock:
                self.received.append(Datagram(time.monotonic(), fields, raw))

    def messages(self) -> list[Datagram]:
        with self._lock:
            return list(self.received)

    def with_field(self, key: str) -> list[Datagram]:
        return [m for m in self.messages() if key in m.fields]

    def wait(self, predicate: Callable[[Datagram], bool], what: str, after: int = 0) -> Datagram:
        """The first datagram past index ``after`` that matches."""

        def find() -> Datagram | None:
            return next((m for m in self.messages()[after:] if predicate(m)), None)

        return wait_for(find, what=what)

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def http_status(d: Agentd, path: str) -> int | None:
    try:
        with urllib.request.urlopen(d.url + path, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


IDLE_TASK = """
idle:
  schedule: {cron: "0 9 * * *", timezone: Europe/Berlin}
  command: {argv: ["true"]}
"""


def test_ready_comes_after_readyz_is_200_and_stopping_before_exit_0(
    make_daemon: Callable[..., Agentd], notify: NotifySocket
) -> None:
    d = make_daemon(IDLE_TASK).start(wait_ready=False, env=notify.env)
    ready = notify.wait(lambda m: m.fields.get("READY") == "1", "READY=1")
    # The daemon marks itself ready before it tells systemd, so /readyz already agrees.
    assert http_status(d, "/readyz") == 200
    first = notify.messages()[0]
    assert first is ready, f"READY must be the first message: {notify.messages()}"
    status = ready.fields["STATUS"]
    assert status.startswith("1 tasks, 0 running, next: idle at ")
    assert status.endswith(" Europe/Berlin")
    assert "WATCHDOG" not in "".join(m.raw for m in notify.messages())  # not asked for

    count = len(notify.messages())
    d.signal(signal.SIGTERM)
    stopping = notify.wait(lambda m: m.fields.get("STOPPING") == "1", "STOPPING=1", count)
    assert stopping.fields["STATUS"].startswith("stopping: draining 0 run(s)")
    assert "EXTEND_TIMEOUT_USEC" not in stopping.fields  # nothing to drain, nothing to ask
    assert d.proc is not None and d.proc.wait(timeout=60) == 0
    # Both databases closed cleanly: their WALs folded back, a copy of the files is whole.
    for name in ("state.sqlite-wal", "schedule.sqlite-wal"):
        wal = d.state_dir / name
        assert not wal.exists() or wal.stat().st_size == 0, name


def test_watchdog_pings_every_half_interval_and_none_for_a_foreign_pid(
    make_daemon: Callable[..., Agentd], notify: NotifySocket, tmp_path: Path
) -> None:
    interval_s = 0.4
    d = make_daemon(IDLE_TASK).start(
        wait_ready=False, env={**notify.env, "WATCHDOG_USEC": str(int(interval_s * 1e6))}
    )
    notify.wait(lambda m: m.fields.get("READY") == "1", "READY=1")
    wait_for(lambda: len(notify.with_field("WATCHDOG")) >= 12, what="12 watchdog pings")
    times = [m.at for m in notify.with_field("WATCHDOG")]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Never faster than asked; typically at half the interval. Generous upper bound for
    # a loaded 2-core machine: lateness is a benchmark question, not a test one.
    assert min(gaps) > interval_s / 2 * 0.8, gaps
    assert statistics.median(gaps) < interval_s * 0.9, gaps
    assert all(m.fields == {"WATCHDOG": "1"} for m in notify.with_field("WATCHDOG"))
    metrics = urllib.request.urlopen(d.url + "/metrics", timeout=5).read().decode()
    pings = [ln for ln in metrics.splitlines() if ln.startswith("agentd_watchdog_pings_total ")]
    assert pings and float(pings[0].split()[1]) >= 12
    assert d.stop() == 0

    # Same daemon, watchdog meant for another process: not a single ping.
    foreign = NotifySocket()
    try:
        (tmp_path / "foreign").mkdir()
        other = Agentd(tmp_path / "foreign", IDLE_TASK)
        env = {**foreign.env, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}
        other.start(wait_ready=False, env=env)
        try:
            foreign.wait(lambda m: m.fields.get("READY") == "1", "READY=1 (foreign pid)")
            # Long enough for ten pings at the interval asked for, had it pinged.
            wait_for(lambda: "watchdog is for pid 1, not us" in other.log(), what="log line")
            time.sleep(1.0)  # a negative: nothing to await but the absence of pings
            assert other.stop() == 0
        finally:
            if other.proc and other.proc.poll() is None:
                other.proc.kill()
        assert not foreign.with_field("WATCHDOG"), foreign.messages()
        assert foreign.with_field("STOPPING")
    finally:
        foreign.close()


def test_wedged_loop_stops_the_watchdog_and_recovery_resumes_it(
    make_daemon: Callable[..., Agentd], notify: NotifySocket, tmp_path: Path
) -> None:
    wedge = tmp_path / "wedge"
    d = make_daemon(IDLE_TASK, "liveness_stale_after: 1s").start(
        wait_ready=False,
        env={**notify.env, "WATCHDOG_USEC": "200000", "AGENTD_TEST_WEDGE_FILE": str(wedge)},
    )
    wait_for(lambda: len(notify.with_field("WATCHDOG")) >= 3, what="pings while healthy")
    wedge.write_text("stuck")
    wait_for(lambda: "watchdog: not pinging, stale=main_loop" in d.log(), what="pings stop")
    silent_from = len(notify.messages())
    silent_at = time.monotonic()
    time.sleep(1.0)  # a negative again: in a second of wedge, at 0.1 s a ping, none came
    assert not [m for m in notify.messages()[silent_from:] if "WATCHDOG" in m.fields]
    wedge.unlink()
    resumed = notify.wait(lambda m: "WATCHDOG" in m.fields, "pings resume", silent_from)
    assert resumed.at - silent_at >= 1.0
    assert d.stop() == 0


RELOAD_TASKS = """
idle:
  schedule: {manual: true}
  command: {argv: ["true"]}
"""


def test_sighup_sends_reloading_with_monotonic_usec_then_ready(
    make_daemon: Callable[..., Agentd], notify: NotifySocket
) -> None:
    d = make_daemon(RELOAD_TASKS).start(wait_ready=False, env=notify.env)
    notify.wait(lambda m: m.fields.get("READY") == "1", "READY=1")

    d.write_config(RELOAD_TASKS + 'added:\n  schedule: {every: 1h}\n  command: {argv: ["true"]}\n')
    count = len(notify.messages())
    before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    d.signal(signal.SIGHUP)
    reloading = notify.wait(lambda m: "RELOADING" in m.fields, "RELOADING=1", count)
    assert reloading.fields["RELOADING"] == "1"
    after_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before_usec <= int(reloading.fields["MONOTONIC_USEC"]) <= after_usec
    ready = notify.wait(lambda m: "READY" in m.fields, "READY after reload", count)
    assert ready.at >= reloading.at
    assert notify.messages().index(ready) > notify.messages().index(reloading)
    assert ready.fields["STATUS"].startswith("2 tasks, 0 running, next: added at ")

    # A broken config: the same two messages, and the status says what happened.
    d.config.write_text(d.config.read_text().replace("every: 1h", "every: often"))
    count = len(notify.messages())
    d.signal(signal.SIGHUP)
    notify.wait(lambda m: "RELOADING" in m.fields, "RELOADING=1 (bad config)", count)
    failed = notify.wait(lambda m: "READY" in m.fields, "READY after failed reload", count)
    assert failed.fields["STATUS"].startswith("reload FAILED, running previous config")
    assert "2 tasks" in failed.fields["STATUS"]
    assert d.stop() == 0


def test_hups_that_arrive_while_busy_coalesce_into_one_reload(
    make_daemon: Callable[..., Agentd], notify: NotifySocket, tmp_path: Path
) -> None:
    wedge = tmp_path / "wedge"
    d = make_daemon(RELOAD_TASKS).start(
        wait_ready=False, env={**notify.env, "AGENTD_TEST_WEDGE_FILE": str(wedge)}
    )
    notify.wait(lambda m: m.fields.get("READY") == "1", "READY=1")
    d.write_config(RELOAD_TASKS + 'added:\n  schedule: {every: 1h}\n  command: {argv: ["true"]}\n')
    wedge.write_text("busy")  # the main loop is held, as if a reload were under way
    count = len(notify.messages())
    for seen in range(1, 6):  # one at a time: the kernel itself merges pending signals
        d.signal(signal.SIGHUP)
        wait_for(lambda n=seen: d.log().count("reload requested") == n, what=f"HUP {seen}")
    wedge.unlink()
    notify.wait(lambda m: "READY" in m.fields, "READY after the reload", count)
    assert d.stop() == 0
    assert d.log().count("reload ok generation=") == 1
    assert len([m for m in notify.messages()[count:] if "RELOADING" in m.fields]) == 1


def test_sigterm_with_a_run_in_flight_asks_systemd_for_more_time(
    make_daemon: Callable[..., Agentd], notify: NotifySocket, tmp_path: Path
) -> None:
    out = tmp_path / "steps.out"
    d = make_daemon(
        f"""
        long:
          schedule: {{manual: true}}
          python: {{callable: "e2e_tasks:steps"}}
          params: {{out: "{out}", total: 1000, step_s: 0.05}}
        """
    ).start(wait_ready=False, env=notify.env)
    notify.wait(lambda m: m.fields.get("READY") == "1", "READY=1")
    run_id = d.trigger("long")
    wait_for(lambda: out.exists() and len(out.read_text().split()) >= 2, what="run working")
    wait_for(lambda: "1 running" in (notify.messages()[-1].fields.get("STATUS", "")), what="1 run")
    count = len(notify.messages())
    d.signal(signal.SIGTERM)
    stopping = notify.wait(lambda m: "STOPPING" in m.fields, "STOPPING=1", count)
    assert stopping.fields["STATUS"] == "stopping: draining 1 run(s), grace 10s"
    extend = notify.wait(lambda m: "EXTEND_TIMEOUT_USEC" in m.fields, "EXTEND_TIMEOUT", count)
    # grace 10 s + kill_grace 1 s + the bounded waits after them
    assert int(extend.fields["EXTEND_TIMEOUT_USEC"]) == 26_000_000
    assert d.proc is not None and d.proc.wait(timeout=60) == 0
    # Interrupted, at no cost of an attempt: queued again, to resume from the checkpoint.
    attempts = d.query("SELECT outcome FROM attempts WHERE run_id=?", (run_id,))
    assert [a["outcome"] for a in attempts] == ["interrupted"]
    assert d.run_status(run_id) == "queued"
    saved = d.query("SELECT data FROM checkpoints WHERE run_id=?", (run_id,))
    assert saved and '"next"' in saved[0]["data"]


def test_status_text_is_one_ascii_line_under_the_limit() -> None:
    assert ascii_status("next: Übersicht at 09:00\nEurope/Berlin") == (
        "next: ?bersicht at 09:00 Europe/Berlin"
    )
    long = ascii_status("x" * 10_000)
    assert len(long) == 400 and long.endswith("...")


def test_watchdog_interval_is_only_ours() -> None:
    pid = os.getpid()
    assert watchdog_interval_s({}, pid) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, pid) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid)}, pid)
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, pid) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}, pid) is None


def test_notifier_is_a_no_op_without_notify_socket_and_strips_the_variables(
    monkeypatch: pytest.MonkeyPatch, notify: NotifySocket
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    quiet = Notifier()
    assert not quiet.enabled and quiet.ready("x") is False

    monkeypatch.setenv("NOTIFY_SOCKET", "@" + notify.name)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    loud = Notifier()
    # Taken out of the environment so commands agentd runs cannot ping for it.
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert loud.enabled and loud.watchdog_s == 1.0
    assert loud.send(STATUS="x" * 5000) is False  # would not fit one datagram
    assert loud.status("same") and not loud.status("same")  # only changes are sent
    notify.wait(lambda m: m.fields.get("STATUS") == "same", "STATUS=same")
    assert [m.fields for m in notify.messages()] == [{"STATUS": "same"}]


def test_watchdog_keeps_pinging_while_a_run_drains(
    make_daemon: Callable[..., Agentd], notify: NotifySocket, tmp_path: Path
) -> None:
    go, out = tmp_path / "go", tmp_path / "out"
    d = make_daemon(
        f"""
        blocker:
          schedule: {{manual: true}}
          python: {{callable: "e2e_tasks:batch"}}
          params: {{out: "{out}", go: "{go}", items: [a, b], block_at: 0}}
        """
    ).start(wait_ready=False, env={**notify.env, "WATCHDOG_USEC": "200000"})
    notify.wait(lambda m: m.fields.get("READY") == "1", "READY=1")
    run_id = d.trigger("blocker")
    wait_for(lambda: blocked(out), what="run blocked after its first item")
    count = len(notify.messages())
    d.signal(signal.SIGTERM)
    notify.wait(lambda m: "STOPPING" in m.fields, "STOPPING=1", count)
    # The run ignores the stop request until go exists: the daemon is draining, alive,
    # and must keep telling systemd so, or systemd would kill it mid-drain.
    since = len(notify.messages())
    wait_for(
        lambda: len([m for m in notify.messages()[since:] if "WATCHDOG" in m.fields]) >= 5,
        what="pings while draining",
    )
    assert d.proc is not None and d.proc.poll() is None
    go.write_text("go")
    assert d.proc.wait(timeout=60) == 0
    # It went on to its next checkpoint, and stopped there as asked.
    attempts = d.query("SELECT outcome FROM attempts WHERE run_id=?", (run_id,))
    assert [a["outcome"] for a in attempts] == ["interrupted"]

"""The CLI operators expect (issue 30, "What operators expect"), each against a real
daemon with the CLI run as a real subprocess: ``--version`` and ``python -m agentd``,
shell completion in a real bash, "did you mean", one ``-o`` switch with colour only on a
terminal and instants in the operator's zone, ``logs RUN [-f] [--stderr]``, ``tasks
show``, ``runs --since/--until``, ``events --task/--kind``, ``--watch``, and a
``--help`` that names the API call."""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from harness import Agentd, wait_for

import agentd

pytestmark = pytest.mark.e2e

SECRET = "sk-cli30-very-secret-value"

TASKS = """
hello:
  schedule: {every: 1h}
  command: {shell: "echo hi; echo oops >&2"}
bad:
  schedule: {manual: true}
  command: {shell: "echo the-error >&2; exit 3"}
  retry: {max_attempts: 1}
gated:
  schedule: {manual: true}
  command: {shell: "echo first; while [ ! -e \\"$GATE\\" ]; do sleep 0.05; done; echo second"}
many:
  schedule: {manual: true}
  command: {shell: "seq 1 2000"}
progressing:
  schedule: {manual: true}
  python: {callable: "e2e_tasks:progressing"}
  params: {total: 4, step_s: 0.1, hold_at: 2, gate: "${GATE}"}
keyed:
  description: "a task whose definition names a secret"
  schedule: {manual: true}
  http:
    url: "http://127.0.0.1:9/hook"
    headers: {Authorization: "Bearer ${LLM_KEY}", X-Echo: "${LLM_KEY}"}
"""
TOP = """
providers:
  p: {base_url: "http://127.0.0.1:9/v1", api_key_env: LLM_KEY, default_model: m}
"""


def base_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AGENTD_TOKEN", "AGENTD_CONFIG")}
    env.pop("NO_COLOR", None)
    return {**env, "LLM_KEY": SECRET, "GATE": str(tmp / "gate"), "TZ": "UTC"}


def cli(
    d: Agentd, *args: str, env: dict[str, str] | None = None, config: bool = True
) -> subprocess.CompletedProcess[str]:
    where = ["--config", str(d.config)] if config else []
    return subprocess.run(
        [sys.executable, "-m", "agentd.cli", args[0], *where, *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base_env(d.root), **(env or {})},
        cwd=Path(__file__).parent,
    )


@pytest.fixture
def daemon(make_daemon: Callable[..., Agentd], tmp_path: Path) -> Agentd:
    d = make_daemon(TASKS, top=TOP).start(env=base_env(tmp_path))
    wait_for(lambda: cli(d, "status").returncode == 0, what="the API answers")
    return d


def trigger(d: Agentd, task: str) -> str:
    out = cli(d, "trigger", task, "--json")
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["run_id"])


# ---------------------------------------------------------------- version, python -m


def test_version_and_python_m_agentd(daemon: Agentd) -> None:
    expected = f"agentd {agentd.__version__}"
    assert agentd.__version__ == importlib.metadata.version("agentd")
    for argv in (["-m", "agentd", "--version"], ["-m", "agentd.cli", "--version"]):
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == expected, (argv, out)
    tasks = subprocess.run(
        [sys.executable, "-m", "agentd", "tasks", "--config", str(daemon.config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=base_env(daemon.root),
    )
    assert tasks.returncode == 0, tasks.stderr
    assert "hello" in {t["task"] for t in json.loads(tasks.stdout)}


# ---------------------------------------------------------------- completion


def shim(tmp_path: Path) -> Path:
    """An ``agentd`` on PATH that is this checkout's (the completion scripts call the
    command by name)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "agentd"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} -m agentd "$@"\n')
    exe.chmod(0o755)
    return bin_dir


def bash_complete(tmp_path: Path, env: dict[str, str], line: str) -> list[str]:
    """What bash offers for ``line`` with TAB at its end: the script that ``agentd
    completion bash`` prints, sourced in a real bash, its function called as bash's
    programmable completion calls it."""
    script = tmp_path / "agentd.bash"
    script.write_text(
        subprocess.run(
            [sys.executable, "-m", "agentd", "completion", "bash"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    words = line.split(" ")
    driver = (
        f"source {script}\n"
        f"COMP_LINE={json.dumps(line)}; COMP_POINT=${{#COMP_LINE}}; COMP_TYPE=9\n"
        f"COMP_WORDS=({' '.join(json.dumps(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        '_python_argcomplete agentd "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    out = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", driver],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "PATH": f"{shim(tmp_path)}:{env['PATH']}"},
    )
    assert out.returncode == 0, out.stderr
    return [w.strip() for w in out.stdout.splitlines() if w.strip()]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash on this machine")
def test_bash_completes_commands_task_names_and_run_ids(daemon: Agentd, tmp_path: Path) -> None:
    run_id = trigger(daemon, "hello")
    daemon.wait_status(run_id, "succeeded")
    env = {**base_env(tmp_path), "AGENTD_CONFIG": str(daemon.config)}
    assert "tasks" in bash_complete(tmp_path, env, "agentd ta")
    assert bash_complete(tmp_path, env, "agentd trigger he") == ["hello"]
    offered = set(bash_complete(tmp_path, env, "agentd pause "))
    assert offered == {"hello", "bad", "gated", "many", "progressing", "keyed"}
    assert run_id in bash_complete(tmp_path, env, "agentd logs 20")
    assert bash_complete(tmp_path, env, "agentd runs sh") == ["show"]
    # Against the daemon's API alone (--url, no config file): the same names.
    bare = {k: v for k, v in env.items() if k != "AGENTD_CONFIG"}
    assert bash_complete(tmp_path, bare, f"agentd trigger --url {daemon.url} he") == ["hello"]
    # The daemon stopped: the config's tasks, and the runs from the state DB, read-only.
    assert daemon.stop() == 0
    db = daemon.state_dir / "state.sqlite"
    before = db.stat().st_mtime_ns
    assert bash_complete(tmp_path, env, "agentd trigger he") == ["hello"]
    assert run_id in bash_complete(tmp_path, env, "agentd runs show 20")
    assert db.stat().st_mtime_ns == before


def test_completion_scripts_for_zsh_and_fish(tmp_path: Path) -> None:
    for shell, marker in (("zsh", "compdef"), ("fish", "complete")):
        out = subprocess.run(
            [sys.executable, "-m", "agentd", "completion", shell],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert marker in out.stdout and "agentd" in out.stdout, out.stdout[:400]
        binary = shutil.which(shell)
        if binary is None:
            continue  # the script's text is all that can be checked here
        script = tmp_path / f"agentd.{shell}"
        script.write_text(out.stdout)
        check = [binary, "-n", str(script)]  # both shells parse without running
        assert subprocess.run(check, capture_output=True, timeout=60).returncode == 0
    bad = subprocess.run(
        [sys.executable, "-m", "agentd", "completion", "tcsh"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


# ---------------------------------------------------------------- did you mean


def test_a_typo_gets_a_did_you_mean(daemon: Agentd, tmp_path: Path) -> None:
    out = cli(daemon, "taks")
    assert out.returncode == 2 and "did you mean `tasks`?" in out.stderr, out.stderr
    out = cli(daemon, "runs", "shwo", "x")
    assert out.returncode == 2 and "did you mean `show`?" in out.stderr, out.stderr
    out = cli(daemon, "completion", "bahs")
    assert "did you mean `bash`?" in out.stderr, out.stderr
    for args in (("trigger", "helo"), ("pause", "helo"), ("tasks", "show", "hell")):
        out = cli(daemon, *args)
        assert out.returncode == 1, (args, out.stderr)
        assert "no task named" in out.stderr and "did you mean `hello`?" in out.stderr, out.stderr
    # Nothing close: no suggestion.
    out = cli(daemon, "trigger", "zzzzzz")
    assert out.returncode == 1 and "did you mean" not in out.stderr, out.stderr
    # With --url and no config file: the daemon's task names.
    out = cli(daemon, "trigger", "helo", "--url", daemon.url, config=False)
    assert "did you mean `hello`?" in out.stderr, out.stderr
    # No daemon: the config's names, on the state DB.
    assert daemon.stop() == 0
    out = cli(daemon, "trigger", "helo")
    assert out.returncode == 1 and "did you mean `hello`?" in out.stderr, out.stderr


# ---------------------------------------------------------------- -o, colour, zones


def test_one_output_switch_for_every_read_command(daemon: Agentd) -> None:
    run_id = trigger(daemon, "hello")
    daemon.wait_status(run_id, "succeeded")
    for args in (
        ("tasks",),
        ("runs",),
        ("runs", "show", run_id),
        ("status",),
        ("events", "--limit", "5"),
        ("quarantine",),
        ("spend",),
        ("alerts",),
        ("approvals",),
        ("tasks", "show", "hello"),
    ):
        as_json = cli(daemon, *args, "-o", "json")
        alias = cli(daemon, *args, "--json")
        as_yaml = cli(daemon, *args, "-o", "yaml")
        assert as_json.returncode == alias.returncode == as_yaml.returncode == 0, (
            args,
            as_json.stderr,
            as_yaml.stderr,
        )
        if args[0] == "events":  # one JSON document per line, as before
            data = [json.loads(line) for line in as_json.stdout.splitlines()]
        else:
            data = json.loads(as_json.stdout)
        if args[0] != "status":  # (its uptime and ages move between two calls)
            assert (
                [json.loads(line) for line in alias.stdout.splitlines()]
                if args[0] == "events"
                else json.loads(alias.stdout)
            ) == data, args
            assert yaml.safe_load(as_yaml.stdout) == data, args
        wide = cli(daemon, *args, "-o", "wide")
        assert wide.returncode == 0 and "\x1b[" not in wide.stdout, (args, wide.stderr)
    table = cli(daemon, "runs").stdout.splitlines()[0].split()
    wide = cli(daemon, "runs", "-o", "wide").stdout.splitlines()[0].split()
    assert table == wide[: len(table)] and {"STARTED_AT", "EXIT_CODE"} <= set(wide)
    clash = cli(daemon, "runs", "--json", "-o", "yaml")
    assert clash.returncode == 2 and "--json is -o json" in clash.stderr


def test_instants_in_the_operators_zone_or_utc(daemon: Agentd) -> None:
    run_id = trigger(daemon, "hello")
    daemon.wait_status(run_id, "succeeded")
    created = datetime.fromisoformat(
        json.loads(cli(daemon, "runs", "show", run_id, "--json").stdout)["created_at"]
    )

    def shown(*args: str, tz: str) -> str:
        out = cli(daemon, "runs", *args, env={"TZ": tz})
        row = next(line for line in out.stdout.splitlines() if line.startswith(run_id))
        return re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row)[0]

    tokyo = created.astimezone(timezone(timedelta(hours=9))).strftime("%Y-%m-%d %H:%M:%S")
    utc = created.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    assert shown(tz="Asia/Tokyo") == tokyo
    assert shown("--utc", tz="Asia/Tokyo") == utc
    # Events and details too; JSON keeps the API's UTC text whatever the zone.
    events = cli(daemon, "events", "--limit", "1", env={"TZ": "Asia/Tokyo"}).stdout
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  #", events), events
    detail = cli(daemon, "runs", "show", run_id, env={"TZ": "Asia/Tokyo"}).stdout
    assert f"created_at: {tokyo}" in detail, detail
    as_json = cli(daemon, "runs", "show", run_id, "--json", env={"TZ": "Asia/Tokyo"}).stdout
    assert datetime.fromisoformat(json.loads(as_json)["created_at"]) == created


def read_pty(
    args: list[str],
    env: dict[str, str],
    until: Callable[[bytes], bool],
    on: str = "stdout",
    then: Callable[[], object] | None = None,
) -> bytes:
    """Run the CLI with a pseudo-terminal as its stdout (``on`` "stderr": as its stderr);
    what it wrote there, once ``until`` holds for it (or it exits), within a deadline.
    Then ``then`` (if given) is called and the process is waited for; else ended."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentd.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=slave if on == "stdout" else subprocess.DEVNULL,
        stderr=slave if on == "stderr" else subprocess.DEVNULL,
        env=env,
    )
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    try:
        while not until(seen) and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the process closed its end
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        if then is not None:
            then()
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                if select.select([master], [], [], 0.2)[0]:
                    try:
                        seen += os.read(master, 65536)
                    except OSError:
                        break
            assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        os.close(master)
    return seen


def test_colour_only_on_a_terminal_and_never_with_no_color(daemon: Agentd) -> None:
    run_id = trigger(daemon, "hello")
    daemon.wait_status(run_id, "succeeded")
    env = base_env(daemon.root)
    args = ["runs", "--config", str(daemon.config)]

    def done(out: bytes) -> bool:
        return run_id.encode() in out and out.endswith(b"\n")

    coloured = read_pty(args, env, done)
    assert b"\x1b[32msucceeded\x1b[0m" in coloured, coloured
    plain = read_pty(args, {**env, "NO_COLOR": "1"}, done)
    assert run_id.encode() in plain and b"\x1b[" not in plain, plain
    piped = cli(daemon, "runs")
    assert run_id in piped.stdout and "\x1b[" not in piped.stdout
    as_json = read_pty([*args, "--json"], env, lambda out: out.rstrip().endswith(b"]"))
    assert b"\x1b[" not in as_json


# ---------------------------------------------------------------- logs


def test_logs_prints_a_runs_stdout_and_stderr(daemon: Agentd) -> None:
    run_id = trigger(daemon, "hello")
    daemon.wait_status(run_id, "succeeded")
    out = cli(daemon, "logs", run_id)
    assert out.returncode == 0 and out.stdout == "hi\n", (out.stdout, out.stderr)
    err = cli(daemon, "logs", run_id, "--stderr")
    assert err.returncode == 0 and err.stdout == "oops\n", (err.stdout, err.stderr)
    # Through the API alone (a port-forward: no state dir, no config here).
    remote = cli(daemon, "logs", run_id, "--url", daemon.url, config=False)
    assert remote.returncode == 0 and remote.stdout == "hi\n", remote.stderr
    # runs show ends with the tail of each.
    shown = cli(daemon, "runs", "show", run_id)
    assert shown.stdout.endswith("stdout:\n  | hi\nstderr:\n  | oops\n"), shown.stdout
    tails = json.loads(cli(daemon, "runs", "show", run_id, "--json").stdout)["output"]
    assert tails == {"stdout_tail": "hi\n", "stderr_tail": "oops\n"}
    long = trigger(daemon, "many")
    daemon.wait_status(long, "succeeded")
    shown = cli(daemon, "runs", "show", long).stdout
    assert "stdout (its last lines; agentd logs for all):\n" in shown, shown
    assert shown.endswith("".join(f"  | {n}\n" for n in range(1981, 2001))), shown[-400:]
    everything = cli(daemon, "logs", long).stdout
    assert everything == "".join(f"{n}\n" for n in range(1, 2001))
    missing = cli(daemon, "logs", "20260101T000000-000000000000000000")
    assert missing.returncode == 1 and "no run" in missing.stderr, missing.stderr
    # No daemon: from the run's workspace.
    assert daemon.stop() == 0
    direct = cli(daemon, "logs", run_id, "--stderr")
    assert direct.returncode == 0 and direct.stdout == "oops\n", direct.stderr


def test_logs_follow_streams_a_live_run_to_its_end(daemon: Agentd, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    run_id = trigger(daemon, "gated")
    sink = tmp_path / "followed.txt"
    with sink.open("w") as fh:
        follower = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agentd.cli",
                "logs",
                run_id,
                "-f",
                "--interval",
                "0.05",
                "--url",
                daemon.url,
            ],
            stdout=fh,
            stderr=subprocess.PIPE,
            text=True,
            env=base_env(tmp_path),
        )
    try:
        wait_for(lambda: sink.read_text() == "first\n", what="the first line, followed")
        assert daemon.run_status(run_id) == "running"  # seen live, not after the end
        assert follower.poll() is None
        gate.touch()
        assert follower.wait(timeout=60) == 0, follower.stderr.read() if follower.stderr else ""
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(timeout=30)
    assert sink.read_text() == "first\nsecond\n"
    assert daemon.run_status(run_id) == "succeeded"
    assert follower.stderr is not None and follower.stderr.read() == ""  # no progress line


ETA = re.compile(rb"\[#{10}-{10}\]  50% 2/4 ETA \d+(m\d\d)?s")


def test_runs_watch_and_logs_follow_show_progress_and_eta(daemon: Agentd, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    run_id = trigger(daemon, "progressing")
    sink = tmp_path / "watched.txt"
    with sink.open("w") as fh:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "agentd.cli", "runs", "watch", run_id, "--url", daemon.url],
            stdout=fh,
            stderr=subprocess.PIPE,
            env=base_env(tmp_path),
        )
    try:
        wait_for(lambda: ETA.search(sink.read_bytes()), what="the 2/4 progress line, with ETA")
        # logs -f: the same on stderr when it is a terminal, redrawn in place.
        args = ["logs", run_id, "-f", "--interval", "0.05", "--url", daemon.url]
        seen = read_pty(
            args, base_env(tmp_path), lambda out: ETA.search(out) is not None, "stderr", gate.touch
        )
        assert ETA.search(seen) and b"item 2" in seen and b"\r\x1b[K" in seen, seen
        assert watcher.wait(timeout=60) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(timeout=30)
    lines = sink.read_text().splitlines()
    done = next(line for line in lines if " 4/4 item 4" in line)
    assert done.endswith("[####################] 100% 4/4"), done  # no ETA when done


# ---------------------------------------------------------------- tasks show


def test_tasks_show_has_definition_next_fires_runs_spend_alerts(daemon: Agentd) -> None:
    run_id = trigger(daemon, "hello")
    daemon.wait_status(run_id, "succeeded")
    shown = cli(daemon, "tasks", "show", "hello", "--json")
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["id"] == "hello" and len(detail["next_runs"]) == 5
    assert detail["definition"]["command"]["shell"] == "echo hi; echo oops >&2"
    assert [r["id"] for r in detail["last_runs"]] == [run_id]
    assert "spend" in detail and "alerts" in detail
    text = cli(daemon, "tasks", "show", "hello").stdout
    assert "definition:" in text and "last_runs:" in text and run_id in text
    assert re.search(r"^next_runs:\n  - \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$", text, re.M), text
    # Secrets: masked by key (Authorization) and by value (X-Echo holds the key itself).
    keyed = cli(daemon, "tasks", "show", "keyed")
    assert keyed.returncode == 0, keyed.stderr
    assert SECRET not in keyed.stdout and "X-Echo" in keyed.stdout, keyed.stdout
    assert SECRET not in cli(daemon, "tasks", "show", "keyed", "-o", "yaml").stdout
    # A quarantined run is among its task's last runs.
    bad = trigger(daemon, "bad")
    daemon.wait_status(bad, "quarantined")
    failed = json.loads(cli(daemon, "tasks", "show", "bad", "--json").stdout)
    assert failed["last_runs"][0]["status"] == "quarantined"


# ---------------------------------------------------------------- runs --since/--until


def test_runs_since_and_until(daemon: Agentd) -> None:
    first = trigger(daemon, "hello")
    daemon.wait_status(first, "succeeded")
    shown = json.loads(cli(daemon, "runs", "show", first, "--json").stdout)
    between = datetime.fromisoformat(shown["created_at"]) + timedelta(microseconds=1)
    wait_for(lambda: datetime.now(UTC) > between, what="the clock to pass the first run")
    second = trigger(daemon, "bad")

    def listed(*args: str) -> list[str]:
        out = cli(daemon, "runs", *args, "--json")
        assert out.returncode == 0, out.stderr
        return [r["id"] for r in json.loads(out.stdout)]

    assert listed("--since", between.isoformat()) == [second]
    assert listed("--until", between.isoformat()) == [first]
    assert set(listed("--since", "1h")) == {first, second}
    assert listed("--until", "1h") == []
    # A time with no offset is the operator's local time (--utc: UTC).
    naive = between.astimezone(UTC).replace(tzinfo=None).isoformat()
    assert listed("--since", naive, "--utc") == [second]
    tokyo = between.astimezone(timezone(timedelta(hours=9))).replace(tzinfo=None).isoformat()
    out = cli(daemon, "runs", "--since", tokyo, "--json", env={"TZ": "Asia/Tokyo"})
    assert [r["id"] for r in json.loads(out.stdout)] == [second]
    bad = cli(daemon, "runs", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


# ---------------------------------------------------------------- events --task/--kind


def test_events_by_task_and_kind(daemon: Agentd) -> None:
    ok = trigger(daemon, "hello")
    daemon.wait_status(ok, "succeeded")
    bad = trigger(daemon, "bad")
    daemon.wait_status(bad, "quarantined")

    def events(*args: str) -> list[dict[str, object]]:
        out = cli(daemon, "events", *args, "--json")
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines()]

    by_task = events("--task", "bad")
    assert by_task and {e["task_id"] for e in by_task} == {"bad"}
    assert {e["kind"] for e in events("--kind", "success")} == {"success"}
    both = events("--task", "hello", "--kind", "success", "--kind", "enqueue")
    assert [e["kind"] for e in both] == ["enqueue", "success"]
    assert len(events("--task", "bad", "--limit", "2")) == 2
    assert events("--task", "bad", "--limit", "2") == by_task[-2:]
    assert events("--task", "nosuch") == []


# ---------------------------------------------------------------- --watch


def test_watch_prints_again_when_the_list_changes(daemon: Agentd, tmp_path: Path) -> None:
    sink = tmp_path / "watched.txt"
    with sink.open("w") as fh:
        watcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agentd.cli",
                "runs",
                "--watch",
                "--interval",
                "0.1",
                "--config",
                str(daemon.config),
            ],
            stdout=fh,
            stderr=subprocess.PIPE,
            env=base_env(tmp_path),
        )
    try:
        wait_for(lambda: "(none)" in sink.read_text(), what="the first (empty) list")
        run_id = trigger(daemon, "hello")
        wait_for(lambda: run_id in sink.read_text(), what="the new run in the watched list")
        daemon.wait_status(run_id, "succeeded")
        wait_for(
            lambda: re.search(rf"^{run_id}\s+hello\s+succeeded", sink.read_text(), re.M),
            what="the run's final status",
        )
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=30) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(timeout=30)
    text = sink.read_text()
    assert "\x1b[" not in text  # not a terminal: no redraw, no colour
    blocks = text.split("\n\n")
    assert blocks[0].strip() == "(none)"
    assert all(a != b for a, b in itertools.pairwise(blocks))  # only changes


def test_watch_redraws_in_place_on_a_terminal(daemon: Agentd) -> None:
    args = ["tasks", "--watch", "--interval", "0.1", "--config", str(daemon.config)]
    clear = b"\x1b[H\x1b[2J"
    seen = read_pty(args, base_env(daemon.root), lambda out: out.count(clear) >= 3)
    assert seen.count(clear) >= 3, seen
    frames = seen.split(clear)[1:]
    assert all(b"Every 0.1s: agentd tasks" in f and b"hello" in f for f in frames[:2]), frames


# ---------------------------------------------------------------- --help


READS_AND_WRITES = {
    "tasks": "GET /v1/tasks",
    "runs": "GET /v1/runs",
    "logs": "GET /v1/runs/RUN/output",
    "trigger": "POST /v1/tasks/TASK/trigger",
    "pause": "POST /v1/tasks/TASK/pause",
    "resume": "POST /v1/tasks/TASK/resume",
    "cancel": "POST /v1/runs/RUN/cancel",
    "approvals": "GET /v1/approvals",
    "approve": "POST /v1/approvals/RUN/",
    "deny": "POST /v1/approvals/RUN/deny",
    "quarantine": "GET /v1/quarantine",
    "status": "GET /v1/status",
    "reload": "GET /v1/status",
    "spend": "GET /v1/spend",
    "nodes": "GET /v1/nodes",
    "alerts": "GET /v1/alerts",
    "events": "GET /v1/events",
    "completion": "GET /v1/tasks",
    "backfill": "POST /v1/tasks/TASK/backfill",
}


def test_help_of_each_command_names_its_api_call() -> None:
    top = subprocess.run(
        [sys.executable, "-m", "agentd", "--help"], capture_output=True, text=True, timeout=60
    )
    listed = set(re.findall(r"^    ([a-z-]+)\s", top.stdout, re.M))
    assert set(READS_AND_WRITES) <= listed, listed
    for command in sorted(listed):
        out = subprocess.run(
            [sys.executable, "-m", "agentd", command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        text = " ".join(out.stdout.split())
        if command in READS_AND_WRITES:
            assert READS_AND_WRITES[command] in text, (command, text)
        elif command != "run":
            assert "no API call" in text, (command, text)

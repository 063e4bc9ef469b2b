"""agentd under a real systemd (PID 1 in private namespaces), driven with systemctl.

The shipped unit file is installed unchanged, plus a drop-in that shortens the watchdog
and restart delays so a wedge is seen in seconds. Skipped, with the reason printed,
where the host cannot run systemd this way (not root, no unshare, ...).
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import FIXTURES, wait_for
from systemd_ns import INSTALL, ROOT, SystemdNS, Unavailable, deps_venv, why_unavailable

UNIT = ROOT / "packaging" / "systemd" / "agentd.service"
PORT = 8787
URL = f"http://127.0.0.1:{PORT}"

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(300)]

TEST_DROP_IN = """\
[Service]
# Seconds, not minutes, so a test sees the watchdog and a restart quickly.
WatchdogSec=2s
RestartSec=200ms
"""

TICK_TASK = """
  tick:
    schedule: {every: 1s}
    command: {argv: ["true"]}
"""

LONG_TASK = """
  long:
    schedule: {manual: true}
    python: {callable: "e2e_tasks:steps"}
    params: {out: "${STATE_DIRECTORY:-/var/lib/agentd}/steps.out", total: 40, step_s: 0.1}
"""


def config_yaml(tasks: str) -> str:
    return (
        textwrap.dedent(
            f"""\
            daemon:
              state_dir: ${{STATE_DIRECTORY:-/var/lib/agentd}}
              poll_interval: 100ms
              shutdown_grace: 20s
              kill_grace: 2s
              python_path: [/etc/agentd/tasks]
              http: {{host: 127.0.0.1, port: {PORT}}}
            tasks:
            """
        )
        + tasks.strip("\n")
        + "\n"
    )


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdNS]:
    reason = why_unavailable()
    if reason:
        pytest.skip(f"real systemd unavailable: {reason}")
    venv = deps_venv()
    # The overlay shows the root filesystem, minus /tmp and /run (fresh tmpfs inside).
    hidden = ROOT.is_relative_to("/tmp") or ROOT.is_relative_to("/run")
    binds = [ROOT] if hidden or not _on_root_fs(ROOT) else []
    ns = SystemdNS(tmp_path_factory.mktemp("systemd"), binds=binds)
    try:
        ns.boot()
    except Unavailable as exc:
        ns.shutdown()
        pytest.skip(f"real systemd unavailable: {exc}")
    try:
        # Install as the packaging README says, from this checkout, inside the overlay.
        ns.sh(f"ln -sfn {venv} {INSTALL}")
        ns.sh(
            f"cd / && {INSTALL}/bin/pip install --quiet --no-deps --no-build-isolation "
            f"--no-cache-dir {ROOT}",
            timeout=300,
        )
        ns.write("/etc/systemd/system/agentd.service", UNIT.read_text())
        ns.write("/etc/systemd/system/agentd.service.d/test.conf", TEST_DROP_IN)
        ns.write("/etc/agentd/tasks/e2e_tasks.py", (FIXTURES / "e2e_tasks.py").read_text())
        ns.systemctl("daemon-reload")
        yield ns
    finally:
        ns.shutdown()


def _on_root_fs(path: Path) -> bool:
    out = subprocess.run(
        ["findmnt", "-n", "-o", "TARGET", "-T", str(path)], capture_output=True, text=True
    )
    return out.stdout.strip() == "/"


@pytest.fixture
def agentd(machine: SystemdNS) -> SystemdNS:
    """agentd stopped, its state gone, its failure count reset: each test starts clean."""
    machine.systemctl("stop", "agentd", check=False)
    machine.systemctl("reset-failed", "agentd", check=False)
    machine.sh("rm -rf /var/lib/private/agentd /var/lib/agentd")
    (machine.root / "etc/agentd/agentd.yaml").unlink(missing_ok=True)
    return machine


def api(ns: SystemdNS, path: str) -> object:
    status, body = ns.http_get(URL + path)
    assert status == 200, (path, status, body)
    return json.loads(body)


def runs_of(ns: SystemdNS, task: str) -> list[dict[str, object]]:
    data = api(ns, f"/v1/runs?task={task}&limit=100")
    assert isinstance(data, dict)
    runs = data["runs"]
    assert isinstance(runs, list)
    return runs


def test_systemd_analyze_verify_is_silent(machine: SystemdNS) -> None:
    out = machine.sh("systemd-analyze verify /etc/systemd/system/agentd.service", check=False)
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_start_returns_after_ready_with_status_text_and_healthz(agentd: SystemdNS) -> None:
    agentd.write("/etc/agentd/agentd.yaml", config_yaml(TICK_TASK + LONG_TASK))
    agentd.systemctl("start", "agentd")
    # No polling: `systemctl start` of a Type=notify unit returns only after READY=1,
    # and agentd says READY only once it is ready.
    status, body = agentd.http_get(URL + "/readyz")
    assert status == 200, body
    status, _ = agentd.http_get(URL + "/healthz")
    assert status == 200
    props = agentd.show("agentd", "ActiveState", "SubState", "StatusText", "Type")
    assert props["ActiveState"] == "active" and props["SubState"] == "running"
    assert props["StatusText"].startswith("2 tasks, "), props
    assert "running" in props["StatusText"]
    out = agentd.systemctl("status", "agentd", check=False).stdout
    assert 'Status: "2 tasks' in out


def test_reload_adds_a_task_and_a_broken_config_fails_visibly(agentd: SystemdNS) -> None:
    agentd.write("/etc/agentd/agentd.yaml", config_yaml(TICK_TASK))
    agentd.systemctl("start", "agentd")
    pid = agentd.show("agentd", "MainPID")["MainPID"]

    agentd.write("/etc/agentd/agentd.yaml", config_yaml(TICK_TASK + LONG_TASK))
    agentd.systemctl("reload", "agentd")
    # No waiting: `systemctl reload` returns once the new config is in force.
    assert "long" in {t["id"] for t in api(agentd, "/v1/tasks")["tasks"]}  # type: ignore[index]
    wait_for(lambda: "2 tasks" in agentd.show("agentd", "StatusText")["StatusText"])

    agentd.write("/etc/agentd/agentd.yaml", config_yaml(TICK_TASK + "  broken: {schedule: {}}\n"))
    failed = agentd.systemctl("reload", "agentd", check=False)
    assert failed.returncode != 0  # the operator sees it at once
    journal = agentd.journal("agentd")
    assert "tasks.broken" in journal, journal[-2000:]
    # ... and so does every place the daemon reports: it rejected the file itself.
    status = api(agentd, "/v1/status")
    assert isinstance(status, dict) and status["last_reload_ok"] is False
    assert "reload FAILED" in agentd.show("agentd", "StatusText")["StatusText"]
    props = agentd.show("agentd", "ActiveState", "MainPID")
    assert props == {"ActiveState": "active", "MainPID": pid}
    # The old tasks keep running: the every-second task goes on producing runs.
    seen = len(runs_of(agentd, "tick"))
    wait_for(
        lambda: len(runs_of(agentd, "tick")) >= seen + 2, what="tick runs after a failed reload"
    )
    assert {t["id"] for t in api(agentd, "/v1/tasks")["tasks"]} == {"tick", "long"}  # type: ignore[index]


def test_wedged_daemon_is_killed_by_the_watchdog_restarted_and_its_run_recovered(
    agentd: SystemdNS,
) -> None:
    agentd.write("/etc/agentd/agentd.yaml", config_yaml(LONG_TASK))
    agentd.systemctl("start", "agentd")
    pid = agentd.show("agentd", "MainPID")["MainPID"]
    agentd.sh(f"{INSTALL}/bin/agentd trigger long --config /etc/agentd/agentd.yaml")
    wait_for(lambda: _steps_done(agentd) >= 3, what="run under way")

    agentd.sh(f"kill -STOP {pid}")  # wedged: the loop no longer runs, so no pings
    wait_for(
        lambda: agentd.show("agentd", "NRestarts")["NRestarts"] == "1",
        timeout=60,
        what="watchdog kill and restart",
    )
    wait_for(lambda: agentd.show("agentd", "ActiveState")["ActiveState"] == "active")
    assert agentd.show("agentd", "MainPID")["MainPID"] != pid
    assert "Watchdog timeout" in agentd.journal("agentd")

    wait_for(lambda: runs_of(agentd, "long")[0]["status"] == "succeeded", timeout=60)
    run = runs_of(agentd, "long")[0]
    attempts = api(agentd, f"/v1/runs/{run['id']}")["attempts"]  # type: ignore[index]
    outcomes = [a["outcome"] for a in attempts]
    assert outcomes[0] == "lost" and outcomes[-1] == "success", outcomes
    # The journal files agentd's lines at their level: the recovery is a warning.
    warnings = agentd.sh("journalctl --no-pager -o cat -p warning -u agentd").stdout
    assert "recovered 1 run(s) left running by a previous process" in warnings, warnings
    assert "agentd started" not in warnings  # info, below -p warning
    # Resumed from its checkpoint: every step done, none twice... except at most the one
    # in flight when the process was killed (done, not yet checkpointed).
    steps = _steps(agentd)
    assert sorted(set(steps)) == list(range(40))
    assert len(steps) - 40 <= 1


def test_stop_checkpoints_the_run_exits_success_and_start_resumes_it(agentd: SystemdNS) -> None:
    agentd.write("/etc/agentd/agentd.yaml", config_yaml(LONG_TASK))
    agentd.systemctl("start", "agentd")
    agentd.sh(f"{INSTALL}/bin/agentd trigger long --config /etc/agentd/agentd.yaml")
    wait_for(lambda: _steps_done(agentd) >= 3, what="run under way")

    agentd.systemctl("stop", "agentd")
    props = agentd.show("agentd", "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    stopped_at = _steps_done(agentd)
    assert 3 <= stopped_at < 40
    journal = agentd.journal("agentd")
    assert 'error="stopped at checkpoint for shutdown"' in journal, journal[-3000:]

    agentd.systemctl("start", "agentd")
    wait_for(lambda: runs_of(agentd, "long")[0]["status"] == "succeeded", timeout=60)
    run = runs_of(agentd, "long")[0]
    detail = api(agentd, f"/v1/runs/{run['id']}")
    assert [a["outcome"] for a in detail["attempts"]] == ["interrupted", "success"]  # type: ignore[index]
    assert _steps(agentd) == list(range(40))  # resumed exactly after the last checkpoint


def test_hardened_unit_runs_the_shipped_config_as_a_dynamic_user(agentd: SystemdNS) -> None:
    """The install the packaging README describes, with the shipped example config: its
    command and python tasks work inside the sandbox, state lands in StateDirectory."""
    shipped = (ROOT / "config" / "agentd.yaml").read_text()
    agentd.write("/etc/agentd/agentd.yaml", shipped.replace("./var}", "/var/lib/agentd}"))
    agentd.systemctl("start", "agentd")
    conf = "--config /etc/agentd/agentd.yaml"
    agentd.sh(f"{INSTALL}/bin/agentd trigger config-manifest {conf}")
    wait_for(lambda: _statuses(agentd, "config-manifest") == ["succeeded"], timeout=60)
    wait_for(lambda: "succeeded" in _statuses(agentd, "host-report"), timeout=90)
    run = runs_of(agentd, "config-manifest")[0]
    manifest = wait_for(  # run.json follows the DB's record by a moment
        lambda: (
            agentd.sh(
                f"cat /var/lib/private/agentd/runs/config-manifest/{run['id']}/run.json",
                check=False,
            ).stdout
        ),
        what="the run's run.json",
    )
    assert "agentd.yaml" in manifest  # it read /etc/agentd through CONFIGURATION_DIRECTORY

    owner = agentd.sh("stat -c '%u %a' /var/lib/private/agentd/state.sqlite").stdout.split()
    uid = int(owner[0])
    assert 61184 <= uid <= 65519, f"state owned by uid {uid}, not a DynamicUser uid"
    assert owner[1] == "600"  # UMask=0077: nobody else reads the run history
    main_pid = agentd.show("agentd", "MainPID")["MainPID"]
    assert agentd.sh(f"stat -c %u /proc/{main_pid}").stdout.strip() == str(uid)
    assert api(agentd, "/v1/status")["config"] == "/etc/agentd/agentd.yaml"  # type: ignore[index]
    exposure = agentd.sh("systemd-analyze security agentd --no-pager").stdout
    assert "Overall exposure level for agentd.service: 1." in exposure, exposure[-500:]


def _statuses(ns: SystemdNS, task: str) -> list[object]:
    return [r["status"] for r in runs_of(ns, task)]


def _steps(ns: SystemdNS) -> list[int]:
    out = ns.sh("cat /var/lib/private/agentd/steps.out", check=False).stdout
    return [int(x) for x in out.split()]


def _steps_done(ns: SystemdNS) -> int:
    return len(_steps(ns))


def test_the_readmes_security_score_is_what_systemd_measures(agentd: SystemdNS) -> None:
    """The score the packaging README states is the one systemd gives the running unit
    (offline analysis of the file alone scores it differently)."""
    agentd.write("/etc/agentd/agentd.yaml", config_yaml(TICK_TASK))
    agentd.systemctl("start", "agentd")
    out = agentd.sh("systemd-analyze security --no-pager agentd", check=False).stdout
    match = re.search(r"Overall exposure level for agentd\.service: (\d+\.\d+) (\w+)", out)
    assert match, out[-2000:]
    readme = (ROOT / "packaging" / "systemd" / "README.md").read_text()
    assert f'sandbox scored {match.group(1)} ("{match.group(2)}")' in readme, match.group(0)

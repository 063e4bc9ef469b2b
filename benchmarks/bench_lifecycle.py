"""B8 (``kill -9`` in the middle of a burst, then restart) and B9 loaded (SIGTERM with
runs in flight that outlast the shutdown grace).

B8's check is the one that matters to users: every run that was running when the
process died gets exactly one ``recover`` event and then finishes, and no scheduled
fire is lost or doubled (one run per task, each succeeded).
"""

from __future__ import annotations

import shutil
import time
from functools import partial
from pathlib import Path

from benchmarks import prefill
from benchmarks.agentd_proc import AgentdProc, iso, py_task
from benchmarks.common import Lead, attempt_dir, check_ready, with_lead
from benchmarks.model import AGENTD, Target
from benchmarks.reps import Rep, Sample, Suite

KILL_AFTER_S = 0.1
"""The kill comes this long after the first run of the burst was seen running."""
SLEEP_MS = 300
GRACE_S = 1.0


def history_template(root: Path, n: int) -> Path:
    """A state dir with ``n`` finished runs, built once and copied into every rep."""
    d = AgentdProc(root, {"history": py_task({"manual": True})})
    prefill.history(d, "history", n)
    return d.state_dir


def agentd_crash(lead: Lead, template: Path, n: int, rep: Rep) -> Sample:
    def attempt(due: float) -> Sample:
        root = attempt_dir(rep)
        tasks = {"history": py_task({"manual": True})}
        tasks |= {
            f"t{i:05d}": py_task({"at": iso(due)}, "sleep", params={"ms": SLEEP_MS})
            for i in range(n)
        }
        d = AgentdProc(root, tasks, concurrency=256)
        shutil.copytree(template, d.state_dir)
        with d:
            d.start()
            check_ready(lead, "crash", d.wait_ready(), due)
            d.wait_runs("status='running'", 1, timeout=120 + n / 50)
            time.sleep(KILL_AFTER_S)
            d.kill9()
            running = {r[0] for r in d.query("SELECT id FROM runs WHERE status='running'")}
            d.start()
            ready = d.wait_ready()
            d.wait_runs("status='succeeded' AND task_id LIKE 't%'", n, timeout=120 + n / 20)
            rows = d.query(
                "SELECT run_id, COUNT(*) FROM events WHERE kind='recover' GROUP BY run_id"
            )
            recovers = {r[0]: r[1] for r in rows}
            per_task = d.query(
                "SELECT COUNT(*) FROM runs WHERE task_id LIKE 't%'"
                " GROUP BY task_id HAVING COUNT(*) <> 1"
            )
            done = d.count("task_id LIKE 't%' AND status='succeeded'")
        wrong = sum(1 for run_id in running if recovers.get(run_id) != 1)
        wrong += sum(1 for run_id in recovers if run_id not in running)
        return {
            "readyz_s": ready,
            "interrupted": float(len(running)),
            "not_reconciled_once": float(wrong),
            "lost_or_doubled": float(len(per_task) + (n - done)),
        }

    return with_lead(lead, "crash", 1.0 + n * 0.0012, attempt)


def agentd_loaded_stop(rep: Rep) -> Sample:
    tasks = {
        f"s{i}": {"schedule": {"manual": True}, "command": {"shell": "sleep 60"}} for i in range(4)
    }
    with AgentdProc(rep.tmp, tasks, shutdown_grace=f"{GRACE_S:g}s", kill_grace="1s") as d:
        d.start()
        d.wait_ready()
        for tid in tasks:
            d.post(f"/v1/tasks/{tid}/trigger")
        d.wait_runs("status='running'", 4, timeout=30)
        time.sleep(0.3)  # the shells have started
        return {"exit_s": d.sigterm_exit_s()}


def run(s: Suite) -> None:
    n, hist = s.mode.b8_tasks, s.mode.b8_history
    template = history_template(s.tmp_root / "b8-template", hist)
    runs = s.interleave("B8", {AGENTD: partial(agentd_crash, Lead(), template, n)}, warmup=0)
    what = f"{n:,} tasks, {hist:,} history rows"
    no_peer = {"peers": "not measured: no peer has an equivalent durable run history"}
    s.add(
        "B8",
        f"kill -9 mid-burst, restart to /readyz 200 ({what})",
        "s",
        runs,
        "readyz_s",
        target=Target("< 1 s", "<", 1),
        absent=no_peer,
    )
    s.add("B8", "runs in flight at the kill", "runs", runs, "interrupted")
    s.add(
        "B8",
        "interrupted runs not reconciled exactly once",
        "runs",
        runs,
        "not_reconciled_once",
        target=Target("every one once", "<=", 0),
    )
    s.add(
        "B8",
        "fires lost or doubled",
        "fires",
        runs,
        "lost_or_doubled",
        target=Target("none", "<=", 0),
    )
    runs = s.interleave("B9", {AGENTD: agentd_loaded_stop}, warmup=0)
    s.add(
        "B9",
        f"SIGTERM to exit, 4 runs outlasting a {GRACE_S:g} s grace",
        "s",
        runs,
        "exit_s",
        target=Target(f"<= grace + 100 ms ({GRACE_S + 0.1:g} s)", "<=", GRACE_S + 0.1),
    )

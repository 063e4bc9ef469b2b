"""The state gauges' refresh policy, stepped on explicit monotonic times."""

from __future__ import annotations

from agentd.gauges import GaugeSchedule, Version


class Db:
    """The DB's change counter as the daemon sees it, counting how often it is read."""

    def __init__(self) -> None:
        self.value: Version = (1, 0)
        self.reads = 0

    def version(self) -> Version:
        self.reads += 1
        return self.value

    def write(self) -> None:
        self.value = (self.value[0], self.value[1] + 1)


def refresh(g: GaugeSchedule, db: Db, now_mono: float) -> None:
    """What the daemon does before it reads the gauges."""
    g.reading(now_mono, db.write, db.version)


def test_an_idle_change_inside_the_throttle_is_shown_when_it_ends() -> None:
    g, db = GaugeSchedule(idle_refresh_s=5, probe_every_s=30), Db()
    assert g.due(0.0, busy=False, version=db.version)  # first look
    refresh(g, db, 0.0)
    assert not g.due(1.0, busy=False, version=db.version)
    assert g.wait_s(1.0) is None  # nothing changed: the loop may sleep its full poll

    db.write()  # e.g. a CLI paused a task 2 s after the last refresh
    assert not g.due(2.0, busy=False, version=db.version)
    assert g.wait_s(2.0) == 3.0  # the loop comes back when the throttle ends
    assert not g.due(4.5, busy=False, version=db.version)
    assert g.wait_s(4.5) == 0.5
    assert g.due(5.0, busy=False, version=db.version)
    refresh(g, db, 5.0)
    assert g.wait_s(5.0) is None
    assert not g.due(20.0, busy=False, version=db.version)  # no write since: no refresh


def test_busy_refreshes_every_second_and_turning_idle_refreshes_at_once() -> None:
    g, db = GaugeSchedule(busy_refresh_s=1, idle_refresh_s=5), Db()
    assert g.due(0.0, busy=False, version=db.version)
    refresh(g, db, 0.0)
    reads = db.reads
    assert g.due(0.2, busy=True, version=db.version)  # a run started: running moves
    assert not g.due(0.9, busy=True, version=db.version)
    assert g.due(1.2, busy=True, version=db.version)
    assert db.reads == reads  # busy, the DB's version is not even read
    assert g.due(1.3, busy=False, version=db.version)  # the last run ended: running -> 0
    assert g.wait_s(1.3) is None


def test_an_idle_daemon_still_probes_its_db() -> None:
    """With no write at all, the probe's period alone makes a refresh due."""
    g, db = GaugeSchedule(idle_refresh_s=5, probe_every_s=30), Db()
    assert g.due(0.0, busy=False, version=db.version)
    refresh(g, db, 0.0)
    assert g.last_probe == 0.0
    assert not g.due(29.9, busy=False, version=db.version)
    assert g.due(30.0, busy=False, version=db.version)
    refresh(g, db, 30.0)
    assert g.last_probe == 30.0
    assert not g.due(31.0, busy=False, version=db.version)  # the probe's own write is seen

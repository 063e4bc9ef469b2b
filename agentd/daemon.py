"""The daemon's lifecycle, in explicit phases: startup -> main loop -> shutdown.

This is the only module that wires the parts together. Signal handlers only set
flags (``should_exit``, ``force_exit``, ``reload_requested``) and wake the loop; all
work happens in the main loop, so a signal can never interrupt a half-written row.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import faulthandler
import gc
import json
import logging
import math
import os
import signal
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import prometheus_client

from agentd import __version__, exitcodes, logformat, procs, redact, tls
from agentd.clock import Backoff, Clock, SystemClock, from_iso
from agentd.config import (
    Config,
    ConfigError,
    DaemonConfig,
    TaskIndex,
    config_generation,
    secret_refs,
    task_index,
)
from agentd.configload import ConfigLoad
from agentd.control import Control
from agentd.events import Event, EventBus, OrderedFeed
from agentd.executors import ExecEnv, command
from agentd.gauges import GaugeSchedule
from agentd.health import Health
from agentd.http import BindRefused, HttpServer, check_bind, load_read_token, load_token
from agentd.metrics import Metrics
from agentd.models import Row
from agentd.oversight import Oversight
from agentd.policy import node_stale_after_s
from agentd.probes import ProbeServer
from agentd.providers import Gateway
from agentd.redact import Redactor, read_secrets
from agentd.runner import Runner
from agentd.scheduler import HEARTBEAT_S, Scheduler, SyncReport
from agentd.state.port import StorageError, StorageFault, Store
from agentd.state.retention import Pruner
from agentd.state.sqlite import statedir
from agentd.state.sqlite.engine import SqliteStore
from agentd.state.sqlite.statedir import StateLock, StateLocked, state_paths
from agentd.systemd import Notifier

log = logging.getLogger("agentd")

GAUGE_REFRESH_S = 1.0
IDLE_GAUGE_REFRESH_S = 5.0  # nothing running: only queued/quarantined/paused can move
# Idle, the loop polls only for what nobody announces: a CLI's direct write rings the
# doorbell, fires and API calls wake it. Each wake-up is most of an idle daemon's CPU.
IDLE_POLL_S = 5.0
LOOP_FIRST_SWITCH_S = 0.001  # see _loop_first
# An idle daemon's only write: an fsync. A busy daemon's real
# writes fail first and turn readiness off at once; idle, a full disk harms nothing
# until work arrives, and readiness still sees it within this.
WRITE_PROBE_S = 30.0
# On a shared database, how often event streams look for other nodes' events (they send
# no notice of their commits); only while a stream is open.
FEED_POLL_S = 0.25
# The node registry keeps a node this long after it was last seen (``agentd nodes``
# shows what left recently); a node starting forgets the older ones.
NODES_KEPT_S = 7 * 86400.0
# Fault injection for tests of /healthz: while this file exists the main loop stops
# ticking (as if an await inside it hung) but the event loop keeps serving HTTP; while
# it holds "block", the event loop itself is blocked (as by a CPU-bound burst or a
# blocking call), so only the probe listener (``agentd.probes``) can answer.
WEDGE_ENV = "AGENTD_TEST_WEDGE_FILE"


def _block_while_asked(wedge: str) -> None:
    """The ``block`` mode of ``WEDGE_ENV``: hold the event loop while the file says so."""
    while True:
        try:
            if Path(wedge).read_text().strip() != "block":
                return
        except OSError:
            return
        time.sleep(0.05)


class StartupStopped(Exception):
    """SIGTERM or SIGINT arrived while starting, before the state was opened."""


class ListenFailed(statedir.Refusal):
    """The HTTP address cannot be bound: in use, or not an address of this host."""

    exit_code = exitcodes.UNAVAILABLE

    def __init__(self, host: str, port: int, exc: OSError, setting: str = "port") -> None:
        super().__init__(
            f"cannot listen on {host or '*'}:{port}: {exc.strerror or exc}. Stop what "
            f"listens there (another agentd?) or set daemon.http.host/{setting} to a free "
            "address"
        )


class Daemon:
    def __init__(
        self,
        config_path: Path,
        config: Config,
        clock: Clock | None = None,
        index: TaskIndex | None = None,
        accept_empty_state: bool = False,
    ) -> None:
        self.config_path = config_path
        self.accept_empty_state = accept_empty_state
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.owner = f"{os.uname().nodename}:{os.getpid()}"
        """This process's node id: its leases' owner and its row in the node registry."""
        self._node_seen_mono = -math.inf
        self._nodes_forgotten = False
        self._absent_kept = False
        """A sync kept tasks this config lacks, for nodes on another generation."""
        self._watch_mono = -math.inf
        self._watch_stamps: dict[str, tuple[int, int, int, int] | None] | None = None
        """``config.watch``: the files as last seen (None until its first look)."""
        self._state_where = ""
        """Where the state is, for log lines: the SQLite file, or PostgreSQL's host/db."""
        self.should_exit = False
        self.force_exit = False
        self.reload_requested = False
        self.generation = 1
        self.last_reload_ok = True
        self.reloads_started = 0
        self.reloads_done = 0
        """Reloads begun and ended (either way) by this process: ``agentd reload --wait``
        waits for one begun after it sent SIGHUP to end."""
        self.last_reload_error: str | None = None
        """Why the last reload was refused (every problem, as logged), until one works."""
        self._reload_summary = ""
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_load: ConfigLoad | None = None
        self._probe = Backoff(first_s=0.5, max_s=5.0)
        """While the state DB fails writes: when to try a write again to see it work."""
        self._loop_errors: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._force = asyncio.Event()
        self.lock = StateLock(config.daemon.state_dir)
        self.store: Store | None = None
        self.scheduler: Scheduler | None = None
        self.runner: Runner | None = None
        self.control: Control | None = None
        self.http: HttpServer | None = None
        self.probes: ProbeServer | None = None
        self.oversight: Oversight | None = None
        self.gateway: Gateway | None = None
        self.pruner: Pruner | None = None  # retention (agentd.state.sqlite.retention)
        self.health = Health(stale_after_s=config.daemon.liveness_stale_after)
        self.bus = EventBus()
        self.feed: OrderedFeed | None = None
        """Feeds ``bus`` every committed event in id order, this node's and others'."""
        self.metrics = Metrics(__version__)
        self.notifier = Notifier()
        self._watchdog: asyncio.Task[None] | None = None
        self._watchdog_silent = False
        self.started_mono = self.clock.monotonic()
        self._last_db_tick = -IDLE_POLL_S
        self.gauges = GaugeSchedule(
            busy_refresh_s=GAUGE_REFRESH_S,
            idle_refresh_s=IDLE_GAUGE_REFRESH_S,
            probe_every_s=WRITE_PROBE_S,
        )
        self._index: TaskIndex = index or {}  # fingerprints of self.config's tasks
        self.redactor: Redactor = redact.NOTHING
        self.child_umask = -1  # the caller's umask, once ``serve`` has set the daemon's
        self.withheld_env: frozenset[str] = frozenset()
        self.reaper = procs.Reaper()
        """Waits for the orphans agentd adopts as a subreaper (see ``procs``)."""
        self._spawn_prefix: tuple[str, ...] = ()  # see command.pdeathsig_prefix

    # ------------------------------------------------------------ phases

    async def serve(self) -> int:
        # What agentd makes (state DBs and their WAL, the jobstore, the lock, workspaces,
        # run records) is the daemon's alone whatever the caller's umask: 0700 and 0600.
        # Commands get the caller's umask back (``ExecEnv.child_umask``).
        self.child_umask = os.umask(0o077)
        try:
            return await self._serve()
        finally:
            os.umask(self.child_umask)

    async def _serve(self) -> int:
        try:
            await self.startup()
        except StartupStopped:
            log.info("stopped during start-up, before the state was opened")
            await self._abandon_startup()
            log.info("agentd stopped exit=%d", exitcodes.OK)
            return exitcodes.OK
        except StateLocked as exc:
            log.error("%s", exc)
            return exitcodes.LOCKED
        except BindRefused as exc:
            log.error("refusing to start: %s", exc)
            return exitcodes.CONFIG
        except statedir.Refusal as exc:
            log.error("refusing to start: %s", exc)
            await self._abandon_startup()
            return exc.exit_code
        try:
            await self.main_loop()
        finally:
            code = await self.shutdown()
        return code

    async def startup(self) -> None:
        """Lock, then probes up (503 until ready), then state, scheduler, READY.

        The blocking parts (migrations, recovery over a large history) run in a thread so
        that /healthz and /readyz keep answering while they take their time.
        """
        cfg = self.config
        loop = asyncio.get_running_loop()
        # First: the loop's handlers take over from ``procs.EARLY``'s (no gap between
        # them), then what arrived before is replayed. A stop before the state is opened
        # ends start-up here (``StartupStopped``); after, the main loop exits at once.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        for early in procs.EARLY.take():
            self._on_signal(early)
        self.reaper.attach(loop)
        self._stop_if_asked()
        self._use_secrets(cfg)  # next: every line logged from here on is scrubbed
        root, _, jobs_path = state_paths(cfg)
        token = load_token(cfg.daemon.http)
        read_token = load_read_token(cfg.daemon.http)
        check_bind(cfg.daemon.http, token)
        statedir.prepare_state_dir(root)
        try:
            self.lock.acquire()
        except OSError as exc:
            raise statedir.StateUnusable(statedir.dir_problem(root, exc)) from None
        # Before anything opens the state: what SQLite would silently drop or replace.
        checked = self.clock.monotonic()
        for found in await asyncio.to_thread(
            partial(
                statedir.startup_guard,
                root,
                accept_empty_state=self.accept_empty_state,
                state_here=cfg.state.url is None,
            )
        ):
            level = logging.INFO if found.severity == "ok" else logging.WARNING
            log.log(level, "state: %s: %s", found.path, found.message)
        log.debug("state checked in %.1f ms", (self.clock.monotonic() - checked) * 1000)
        self._stop_if_asked()
        if self.notifier.watchdog_s:
            # Pinging starts now: migrations over a large history may outlast WatchdogSec.
            self._watchdog = asyncio.create_task(self._watchdog_loop(self.notifier.watchdog_s))
        for extra in cfg.daemon.python_path:
            if str(extra) not in sys.path:
                sys.path.insert(0, str(extra))
        self.store = await self._make_store(cfg, root)
        self.feed = OrderedFeed(
            self.bus,
            lambda after, limit: (
                cast(list[Event], self.store.events(None, after, limit)) if self.store else []
            ),
            loop,
            # Other nodes send no notice of their commits: look while anyone follows.
            poll_s=FEED_POLL_S if self.store.shared else None,
        )
        self.store.watch(loop, self._on_ring)
        self.store.redactor = self.redactor
        self.store.on_write = lambda exc: self.health.fault(
            "state DB", None if exc is None else str(exc)
        )
        self.control = Control(self.store, cfg, self.clock, on_change=self._api_wrote)
        self.http = HttpServer(
            control=self.control,
            health=self.health,
            registry=self.metrics.registry,
            bus=self.bus,
            status=self.status,
            clock=self.clock,
            token=token,
            read_token=read_token,
            settings=cfg.daemon.http,
            on_auth_failure=lambda surface: self.metrics.auth_failures.labels(surface).inc(),
        )
        try:
            port = await self.http.start(cfg.daemon.http.host, cfg.daemon.http.port)
        except OSError as exc:
            raise ListenFailed(cfg.daemon.http.host, cfg.daemon.http.port, exc) from None
        log.info(
            "http listening on %s:%d (not ready until startup completes)",
            cfg.daemon.http.host,
            port,
        )
        if cfg.daemon.http.probe_port is not None:
            self.probes = ProbeServer(
                self.health, self.clock.monotonic, client_timeout_s=cfg.daemon.http.client_timeout
            )
            try:
                self.probes.start(cfg.daemon.http.host, cfg.daemon.http.probe_port)
            except OSError as exc:
                self.probes = None
                raise ListenFailed(
                    cfg.daemon.http.host, cfg.daemon.http.probe_port, exc, "probe_port"
                ) from None
        self._stop_if_asked()
        # Known before recovery, so its "recover" events are counted.
        self.metrics.set_tasks(cfg.tasks)
        # State, metrics' last times and the scheduler's objects (SQLAlchemy engine,
        # jobstore table) are made off the loop, so probes are answered meanwhile.
        with _loop_first(), _refusing(root):
            self.scheduler = await asyncio.to_thread(self._prepare, cfg, jobs_path)
        self.feed.start(self.store.latest_event_id())
        self.gateway = Gateway(self.store, cfg, self.clock)
        self.oversight = Oversight(self.store, cfg, self.clock, self.metrics)
        self.store.fire_gate = self.oversight.budget_gate
        self.store.fire_admission = self.oversight.admission_gate
        self.oversight.outbox.withheld_env = self.withheld_env
        self.oversight.live = lambda: (
            self.health.liveness(self.clock.monotonic())[0] and not self.health.stopping
        )
        self.runner = Runner(
            self.store,
            self.clock,
            owner=self.owner,
            state_dir=root,
            concurrency=cfg.daemon.concurrency,
            lease_s=cfg.daemon.lease,
            exec_env=ExecEnv(
                kill_grace_s=cfg.daemon.kill_grace,
                output_max_bytes=cfg.daemon.output_max_bytes,
                inherited_env=command.inherited_env(),
                withheld_env=self._withheld_env_bytes(),
                child_umask=self.child_umask,
                spawn_prefix=self._spawn_prefix,
            ),
            on_change=self._wake.set,
            llm=self.gateway,
        )
        # The ledger's reservations and charges ride the runner's group commits.
        self.gateway.writes = self.runner.submit
        self.runner.set_tasks(cfg.tasks)
        self.scheduler.on_tick = lambda: self.health.tick("scheduler", self.clock.monotonic())
        self.scheduler.on_jobstore_fault(
            lambda exc: self.health.fault("schedule DB", None if exc is None else str(exc))
        )
        self.scheduler.before_commit = self.runner.tick
        self.scheduler.start_paused()
        with _refusing(root):
            report = await self.scheduler.sync_async(cfg)  # in slices: probes are answered
        self.scheduler.resume()
        self._step(partial(self._node_step, self.clock.monotonic()))
        self.health.tick("main_loop", self.clock.monotonic())
        self.health.started = True
        # What startup built (modules, config, jobs) lives as long as the daemon: out of
        # the collector's generations, a full collection no longer walks 10,000 tasks'
        # objects (a stall of tens of ms, and idle CPU) to find nothing.
        gc.freeze()
        # Config valid, DB migrated, scheduler started, HTTP bound: now, and only now.
        self.notifier.ready(self.status_line())
        log.info(
            "agentd started pid=%d version=%s config=%s state_dir=%s tasks=%d jobs_added=%d "
            "jobs_rescheduled=%d jobs_removed=%d schedules_ended=%d concurrency=%d http=%s:%d",
            os.getpid(),
            __version__,
            self.config_path,
            root,
            len(cfg.tasks),
            len(report.added),
            len(report.rescheduled),
            len(report.removed),
            len(report.ended),
            cfg.daemon.concurrency,
            cfg.daemon.http.host,
            port,
        )
        # --- retention: prunes history on its own thread and connection; it reads
        # self.config.history at each pass, so a reload applies without a restart.
        # On PostgreSQL one node at a time prunes the shared history (the others skip
        # that pass) and every node sweeps its own workspaces (state.postgres.retention).
        if cfg.state.url is None:
            from agentd.state.sqlite.retention import Pruner as SqlitePruner

            self.pruner = SqlitePruner(
                state_paths(cfg)[1],
                root,
                lambda: self.config.history,
                self.clock,
                on_pruned=self.metrics.pruned_history,
            )
        else:
            from agentd.state.postgres.retention import Pruner as PostgresPruner

            try:
                password = redact.read_secret(
                    cfg.state.password_env, cfg.state.password_file, "state password"
                )
            except redact.SecretUnavailable as exc:
                log.error("retention: not started, the history is kept whole: state: %s", exc)
                return
            self.pruner = PostgresPruner(
                cfg.state.url,
                password,
                root,
                lambda: self.config.history,
                self.clock,
                on_pruned=self.metrics.pruned_history,
            )
        self.pruner.start()
        # --- end retention

    def _stop_if_asked(self) -> None:
        """During start-up, before the state is opened: stop now if told to."""
        if self.should_exit:
            raise StartupStopped

    async def _make_store(self, cfg: Config, root: Path) -> Store:
        """The engine ``state:`` names: the embedded SQLite file in the state dir (opened
        later, in ``_open_state``, off the loop), or PostgreSQL (connected and migrated
        here, off the loop, before the probes answer). A PostgreSQL that cannot be reached
        or refuses is a refusal to start, naming the server and the cause, never the
        password."""
        if cfg.state.url is None:
            _, db_path, _ = state_paths(cfg)
            self._state_where = str(db_path)
            with _refusing(root):
                return SqliteStore(db_path, event_sink=self._on_event, defer_open=True)
        from agentd.state.postgres.engine import PostgresStore  # only when configured

        where = _url_without_credentials(cfg.state.url)
        self._state_where = where
        try:
            password = redact.read_secret(
                cfg.state.password_env, cfg.state.password_file, "state password"
            )
        except redact.SecretUnavailable as exc:
            raise statedir.StateUnusable(f"state: {exc}") from None
        try:
            store: Store = await asyncio.to_thread(
                PostgresStore, cfg.state.url, self._on_event, password=password
            )
        except StorageError as exc:
            raise statedir.StateUnusable(
                f"state: PostgreSQL at {where} cannot be used: {self.redactor.text(str(exc))}"
            ) from None
        log.info("state: PostgreSQL at %s (shared by every node pointed at it)", where)
        return store

    def _open_state(self, store: Store) -> None:
        if isinstance(store, SqliteStore):
            store.open()
        now = self.clock.now()
        # Under the lock every running row is a dead daemon's (on a shared state, a
        # node's the registry has not seen for a lease): a command group of one that
        # still runs is ended before its run is queued again (procs.end_groups).
        live = (
            store.live_nodes(now, node_stale_after_s(self.config.daemon.lease)) | {self.owner}
            if store.shared
            else None
        )
        ended = procs.end_groups(store.lost_groups(now, live), self.config.daemon.kill_grace)
        recovered = store.recover(self.clock.now(), self.owner, live, ended=ended)
        if recovered:
            log.warning(
                "recovered %d run(s) left running by a previous process: %s",
                len(recovered),
                " ".join(recovered),
            )
        if not self._index:  # unless run_daemon brought it from the config's child
            self._index = task_index(self.config)
        self._sync_tasks(self._index)

    def _sync_tasks(self, index: TaskIndex, synced: TaskIndex | None = None) -> None:
        """Record the config's tasks in the state. On a shared state where another live
        node runs another config generation (a rollout half done, a host whose file is
        older), a task this config lacks is kept as it is: that node may define it, and
        removing it would stop it there. Once every live node runs this generation, the
        kept ones are removed (``_removals_owed``, from ``_node_step``)."""
        assert self.store is not None and self.config is not None
        others = self._other_generations(index)
        self.store.sync_tasks(index, self.clock.now(), synced=synced, keep_absent=bool(others))
        if others and not self._absent_kept:
            log.warning(
                "tasks: the ones this config lacks are kept while %d other live node(s)"
                " run another config generation: %s",
                len(others),
                " ".join(sorted(others)),
            )
        self._absent_kept = self._absent_kept or bool(others)

    def _other_generations(self, index: TaskIndex) -> list[str]:
        """The live nodes, other than this one, whose config generation is not
        ``index``'s (none on a state of one node)."""
        assert self.store is not None and self.config is not None
        if not self.store.shared:
            return []
        live = self.store.live_nodes(self.clock.now(), node_stale_after_s(self.config.daemon.lease))
        mine = config_generation(index)
        return [
            node["id"]
            for node in self.store.nodes()
            if node["id"] in live and node["id"] != self.owner and node["config_generation"] != mine
        ]

    def _removals_owed(self) -> None:
        """Tasks kept for another generation's nodes (``_sync_tasks``) are removed once
        every live node runs this one."""
        if not self._absent_kept or self._other_generations(self._index):
            return
        assert self.store is not None
        self.store.sync_tasks(self._index, self.clock.now())
        self._absent_kept = False
        log.info(
            "tasks: every live node runs this config generation; the ones it lacks are removed"
        )

    def _prepare(self, cfg: Config, jobs_path: Path) -> Scheduler:
        """In a thread, before anything else uses the store (see ``startup``)."""
        assert self.store is not None
        self._open_state(self.store)
        self._spawn_prefix = command.pdeathsig_prefix()
        log.info(
            "commands: %s; subreaper=%s",
            "leader gets SIGTERM if agentd dies (setpriv --pdeathsig)"
            if self._spawn_prefix
            else "no death signal (AGENTD_PDEATHSIG=1 and setpriv --pdeathsig enable it)",
            procs.is_subreaper(),
        )
        self._seed_metrics(cfg)
        scheduler = Scheduler(
            self.store,
            self.clock,
            jobs_path,
            on_enqueue=self._wake.set,
            heartbeat_s=min(HEARTBEAT_S, self.health.tick_within_s),
        )
        scheduler.prepare()
        return scheduler

    def _seed_metrics(self, cfg: Config) -> None:
        assert self.store is not None
        for row in self.store.task_rows():
            self.metrics.set_last_times(
                row["id"],
                last_run=_ts(row["last_run_at"]),
                last_success=_ts(row["last_success_at"]),
            )
        self.metrics.config_reload(True, self.clock.now().timestamp())

    async def main_loop(self) -> None:
        """Tick until told to stop. Nothing that goes wrong in a tick ends the loop: a
        storage fault has been reported by the store (readiness, one log line) and is
        retried; any other error is logged (once a minute per kind) and the loop goes on."""
        assert self.runner is not None and self.store is not None
        wedge = os.environ.get(WEDGE_ENV)
        while not self.should_exit:
            poll_s = self.config.daemon.poll_interval  # a reload may change it
            if wedge and os.path.exists(wedge):
                _block_while_asked(wedge)
                await asyncio.sleep(poll_s)
                continue
            now_mono = self.clock.monotonic()
            self.health.tick("main_loop", now_mono)
            if self.reload_requested and self._reload_task is None:
                # In its own task: the loop goes on ticking (probes, runs, fires) while
                # the config is read and checked.
                self.reload_requested = False
                self._reload_task = asyncio.create_task(self._reload_task_main(), name="reload")
            if self.store.committing and now_mono - self._last_db_tick < poll_s:
                # Woken by a finish while the runner's next group commits: reading the
                # DB now would hold the loop for that fsync. The flush that started
                # the commit already claimed, heartbeated and looked for cancels in its
                # group, and the commit's end wakes this loop again.
                await self._sleep(poll_s)
                continue
            self._last_db_tick = now_mono
            if self.store.write_error is not None:
                self._probe_writes(now_mono)
            # Each step on its own: one that fails (a full disk) must not starve the rest.
            self._step(self.runner.tick)
            if self.oversight:
                self._step(partial(self.oversight.tick, self.clock.now()))
            self._step(partial(self._gauges_step, now_mono))
            self._step(partial(self._node_step, now_mono))
            self._step(partial(self._watch_step, now_mono))
            await self._sleep(self._wait_s(poll_s))

    def _node_step(self, now_mono: float) -> None:
        """Tell the node registry this daemon is alive, every third of a lease (and at
        once after a reload, with the new config's generation)."""
        assert self.store is not None and self.config is not None
        if now_mono - self._node_seen_mono < self.config.daemon.lease / 3:
            return
        now = self.clock.now()
        first = not self._nodes_forgotten
        self.store.node_seen(
            self.owner,
            now,
            host=os.uname().nodename,
            pid=os.getpid(),
            version=__version__,
            config_generation=config_generation(self._index),
        )
        self._node_seen_mono = now_mono
        self._removals_owed()
        if first:
            self._nodes_forgotten = True
            gone = self.store.forget_nodes(now - timedelta(seconds=NODES_KEPT_S))
            if gone:
                log.info("node registry: forgot %d node(s) not seen for a week", gone)

    def _watched_files(self) -> dict[str, tuple[int, int, int, int] | None]:
        """What ``config.watch`` compares: the config file (as its path resolves now: a
        ConfigMap's ``..data`` swap changes the inode) and every secret file the config
        names, each by ``(dev, inode, size, mtime)``; None for one that cannot be read."""
        paths = [str(self.config_path)]
        paths += [str(ref.file) for ref in secret_refs(self.config) if ref.file]
        stamps: dict[str, tuple[int, int, int, int] | None] = {}
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                stamps[path] = None
                continue
            stamps[path] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return stamps

    def _watch_step(self, now_mono: float) -> None:
        """``config.watch``: every ``watch_interval``, a changed file requests a reload,
        exactly as SIGHUP does (a broken update is refused and the running config
        stays). A reload records what it read (``_reload_task_main``), so the change it
        applied or refused does not request another."""
        watch = self.config.config
        if not watch.watching(os.environ):
            return
        if now_mono - self._watch_mono < watch.watch_interval:
            return
        self._watch_mono = now_mono
        stamps = self._watched_files()
        if self._watch_stamps is None:
            self._watch_stamps = stamps
            log.info("config watch: on, every %gs (%d file(s))", watch.watch_interval, len(stamps))
            return
        changed = sorted(p for p in stamps.keys() | self._watch_stamps.keys()
                         if stamps.get(p) != self._watch_stamps.get(p))  # fmt: skip
        if changed and not self.reload_requested and self._reload_task is None:
            log.info("config watch: %s changed; reloading", ", ".join(changed))
            self._watch_stamps = stamps
            self.reload_requested = True
            self._wake.set()

    def _step(self, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception as exc:
            if not isinstance(exc, StorageFault):
                self._log_loop_error(exc)

    def _gauges_step(self, now_mono: float) -> None:
        assert self.runner and self.store
        if self.gauges.due(now_mono, bool(self.runner.active), self.store.version):
            self._refresh_gauges()

    def _probe_writes(self, now_mono: float) -> None:
        """While writes fail, try one now and then (backing off to every 5 s): the one
        that works turns readiness back on, and the runner claims again."""
        assert self.store is not None
        if self._probe.waiting(now_mono):
            return
        try:
            self.store.probe_write(self.clock.now())
        except Exception:
            self._probe.failed(now_mono)
        else:
            self._probe.ok()

    def _log_loop_error(self, exc: Exception) -> None:
        """A bug, not a fault of the storage: the traceback once a minute per kind."""
        key = f"{type(exc).__name__}: {exc}"
        now_mono = self.clock.monotonic()
        if now_mono - self._loop_errors.get(key, -math.inf) >= 60.0:
            self._loop_errors[key] = now_mono
            log.error("main loop step failed (retried next tick): %s", key, exc_info=exc)

    async def _sleep(self, timeout_s: float) -> None:
        """Until woken or ``timeout_s``. A timer that sets the wake event, not
        ``wait_for``: that wraps the wait in a task and cancels it on every timeout, a
        third of an idle iteration's CPU."""
        self._wake.clear()
        timer = asyncio.get_running_loop().call_later(timeout_s, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            timer.cancel()

    def _wait_s(self, poll_s: float) -> float:
        """How long the loop may sleep unless woken. Local fires, finishes and API calls
        wake it at once; polling is for what they cannot announce: leases and cancels
        of runs in flight (every ``poll_interval``), retries falling due (exactly then),
        and, idle, a write whose doorbell ring was lost or could not be sent (within
        IDLE_POLL_S, and often enough for /healthz's main-loop liveness). Wake-ups with
        nothing to do were most of an idle daemon's CPU: four a second once, then one."""
        assert self.runner and self.store
        if self.runner.active or self.reload_requested:
            return poll_s
        if self.store.write_error is not None or self.runner.unrecorded:
            return poll_s
        wait_s = max(poll_s, min(IDLE_POLL_S, self.health.tick_within_s))
        due = self.runner.next_due_at  # from this iteration's tick
        if due is not None:
            wait_s = min(wait_s, max(0.0, (due - self.clock.now()).total_seconds()))
        soon = self.oversight.wait_s() if self.oversight else None
        if soon is not None:
            wait_s = min(wait_s, soon)
        pending = self.gauges.wait_s(self.clock.monotonic())
        if pending is not None:
            wait_s = min(wait_s, pending)
        if self.store.shared and self.config is not None:
            # The registry beat (``_node_step``) is due every third of a lease: the other
            # nodes take a node not seen for a while as dead and recover its runs.
            beat_due = self._node_seen_mono + self.config.daemon.lease / 3
            wait_s = min(wait_s, max(0.0, beat_due - self.clock.monotonic()))
        return wait_s

    def _refresh_gauges(self) -> None:
        """A few indexed reads a second, so that a scrape never touches the DB. Nothing
        here may be O(tasks) or O(history): it runs every second for the daemon's life,
        and with 10,000 tasks idle CPU is what it costs."""
        assert self.store and self.runner
        store = self.store
        self.gauges.reading(
            self.clock.monotonic(), lambda: store.probe_write(self.clock.now()), store.version
        )
        queued, quarantined = self.store.gauge_counts()
        running: dict[str, int] = {}
        for active in self.runner.active.values():
            running[active.task.id] = running.get(active.task.id, 0) + 1
        paused = self.store.paused_tasks()
        self.metrics.set_state(
            running=running, queued=queued, quarantined=quarantined, paused=paused
        )
        self._refresh_schedule_gauges(paused)
        if self.notifier.enabled:
            self.notifier.status(self.status_line(queued))

    def _refresh_schedule_gauges(self, paused: set[str]) -> None:
        """Next fire times of the tasks that fired (or got series) since the last look,
        by primary key in the jobstore, and which tasks are overdue: one range read on
        the jobstore's ``next_run_time`` index (empty while the scheduler keeps up) and
        one of the alert state. Neither grows with the number of tasks."""
        if self.scheduler is None or self.oversight is None:
            return
        stale = self.metrics.stale_next_fires()
        if stale:
            times = self.scheduler.next_fire_times(stale)
            self.metrics.set_next_fires(stale, times)
        now = self.clock.now()
        due = self.scheduler.overdue_jobs(now - self.oversight.min_misfire_grace())
        self.metrics.set_overdue(self.oversight.overdue_tasks(now, due, paused))

    def status_line(self, queued: int | None = None) -> str:
        """The one line ``systemctl status`` shows, e.g.
        ``12 tasks, 2 running, next: digest at 09:00 Europe/Berlin``."""
        parts = [f"{len(self.config.tasks)} tasks"]
        parts.append(f"{len(self.runner.active) if self.runner else 0} running")
        if queued:
            parts.append(f"{queued} queued")
        due = self.scheduler.next_due() if self.scheduler else None
        if due is not None and due[0] in self.config.tasks:
            task_id, when = due
            tz = self.config.tasks[task_id].schedule.timezone or self.config.daemon.timezone
            local = when.astimezone(ZoneInfo(tz))
            today = self.clock.now().astimezone(ZoneInfo(tz)).date()
            fmt = "%H:%M" if local.second == 0 else "%H:%M:%S"
            fmt = fmt if local.date() == today else "%Y-%m-%d " + fmt
            parts.append(f"next: {task_id} at {local.strftime(fmt)} {tz}")
        if self.health.faults:
            parts.insert(
                0, "NOT READY: " + "; ".join(f"{w} not writable" for w in self.health.faults)
            )
        line = ", ".join(parts)
        if not self.last_reload_ok:
            line = (
                f"reload FAILED, running previous config: {self._reload_summary} "
                f"(see journal); {line}"
            )
        return line

    async def _watchdog_loop(self, interval_s: float) -> None:
        """Ping every half interval, from the event loop itself, and only while the
        daemon is doing its job: a stopped or wedged process stops pinging, and systemd
        kills and restarts it. Healthy means what ``/healthz`` means (main loop and
        scheduler ticked recently), so a wedge is noticed within
        ``liveness_stale_after`` + ``WatchdogSec``. While starting (migrations) and while
        draining, the loop answering is all that is asked."""
        period_s = interval_s / 2
        log.info("watchdog on: interval=%gs ping_every=%gs", interval_s, period_s)
        while True:
            healthy, body = self.health.liveness(self.clock.monotonic())
            if healthy or not self.health.started or self.should_exit:
                if self._watchdog_silent:
                    log.warning("watchdog: healthy again, pinging resumed")
                    self._watchdog_silent = False
                if self.notifier.watchdog():
                    self.metrics.watchdog_ping()
            elif not self._watchdog_silent:
                log.error("watchdog: not pinging, stale=%s", ",".join(body.get("stale", [])))
                self._watchdog_silent = True
            await asyncio.sleep(period_s)

    async def shutdown(self) -> int:
        self.health.stopping = True
        self.should_exit = True  # also when the main loop ended by an error
        in_flight = len(self.runner.active) if self.runner else 0
        grace = 0.0 if self.force_exit else self.config.daemon.shutdown_grace
        log.info(
            "agentd stopping: no new fires or claims, draining %d run(s) grace=%gs",
            in_flight,
            grace,
        )
        self.notifier.stopping(f"stopping: draining {in_flight} run(s), grace {grace:g}s")
        if in_flight:
            # systemd cannot tell us its TimeoutStopSec; asking for what the drain may
            # take is harmless when the unit allows more, and saves the runs when not.
            self.notifier.extend_timeout(self._drain_budget_s(grace))
        await self._cancel_reload()
        if self.scheduler:
            self.scheduler.pause()
        if self.pruner:  # retention: its thread ends within one batch, off the loop
            await asyncio.to_thread(self.pruner.stop)
        unrecorded = 0
        if self.runner:
            stopped = await self.runner.drain(grace, self._force)
            if stopped:
                log.warning("stopped %d run(s) at shutdown; they resume on next start", stopped)
            unrecorded = self.runner.record_unrecorded_now()
        if self.oversight:
            await self.oversight.aclose()
        if self.gateway:
            await self.gateway.aclose()
        if self.http:
            # After the drain, so probes kept answering (ready=503, live=200) meanwhile;
            # before the store closes, so no request meets a closed connection.
            await self.http.stop(timeout_s=3.0)
        if self.probes:
            self.probes.stop()
        if self.scheduler:
            self.scheduler.shutdown()
        unwritten = self._close_store() if self.store else None
        if self._watchdog:
            self._watchdog.cancel()
        if self.store:
            self.store.unwatch()  # before the lock: only the lock holder watches
        if self.feed:
            self.feed.stop()
        self.lock.release()
        self.reaper.detach()
        code = exitcodes.FORCED if self.force_exit else exitcodes.OK
        if (unrecorded or unwritten) and not self.force_exit:
            code = exitcodes.STATE_WRITE_FAILED
        log.info("agentd stopped exit=%d", code)
        return code

    def _close_store(self) -> str | None:
        """Close the state DB after the drain. Returns None when every record made it, else
        says (once, in the log) what could not be written: runs the runner is done with
        but the DB still has ``running`` under this process (their outcome or
        interruption did not commit), which the next start recovers. (A run the drain had
        to abandon is still the runner's: not a write that failed.) A WAL that cannot be
        folded into the file at the end loses nothing."""
        assert self.store is not None
        store, unwritten = self.store, None
        try:
            store.flush()
            left = store.running_ids(self.owner) - set(self.runner.active if self.runner else ())
            if left:
                unwritten = f"{len(left)} run(s) still recorded as running ({' '.join(left)})"
        except StorageError as exc:
            unwritten = f"its last commit failed ({exc})"
        if unwritten is None:
            try:
                store.node_stopped(self.owner, self.clock.now())
            except StorageError as exc:  # the registry marks it not seen after a lease
                log.warning("node registry: could not record this node's stop: %s", exc)
        try:
            store.close()
        except StorageError as exc:
            if not unwritten:
                log.warning(
                    "state DB: could not fold the WAL into %s at stop (%s); nothing is lost, "
                    "the next start replays it",
                    self._state_where,
                    exc,
                )
        if unwritten:
            log.error(
                "state DB: could not write the last records at stop: %s; the runs concerned "
                "are recovered at next start (state dir read-only or full?)",
                unwritten,
            )
        return unwritten

    async def _abandon_startup(self) -> None:
        """After a refusal to start: undo what startup began, writing no state."""
        self.reaper.detach()
        if self.http:
            await self.http.stop(timeout_s=1.0)
        if self.probes:
            self.probes.stop()
        if self._watchdog:
            self._watchdog.cancel()
        if self.store:
            self.store.unwatch()
        self.lock.release()

    def _drain_budget_s(self, grace_s: float) -> float:
        """Worst case from STOPPING to exit: the grace, the kill grace, and the bounded
        waits after it (runner, HTTP, closing the DB)."""
        return grace_s + self.config.daemon.kill_grace + 15.0

    # ------------------------------------------------------------ signals and reload

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            log.info("signal %s: reload requested", name)
            self.reload_requested = True
        elif not self.should_exit:
            log.info("signal %s: shutting down gracefully", name)
            self.should_exit = True
            self.health.stopping = True
        elif signum == signal.SIGINT:
            log.warning("signal %s again: forcing exit, interrupting runs now", name)
            self.force_exit = True
            self._force.set()
        else:
            log.info("signal %s again: already shutting down, ignored", name)
        self._wake.set()

    def _api_wrote(self) -> None:
        """An API call changed the state: this node looks now, and on a shared database
        so do the others (a cancel reaches the run's holder, a pause every scheduler)."""
        self._wake.set()
        if self.store is not None and self.store.shared:
            self.store.announce_change()

    def _on_ring(self) -> None:
        """Another process changed the state: a CLI that wrote the state DB itself
        (SQLite's doorbell), or on a shared database another node or CLI (a notice).
        Look now."""
        if self.store is not None and self.store.shared:
            log.info("change notice: another node or a CLI changed the state, looking now")
        else:
            log.info("doorbell: state DB changed by a CLI, looking now")
        self._wake.set()
        if self.feed:
            self.feed.remote()

    async def _reload_task_main(self) -> None:
        """One reload in its own task, RELOADING to READY; whatever happens in it, the
        daemon goes on with a config it can run (the new one, or the old one)."""
        self.reloads_started += 1
        if self._watch_stamps is not None:
            self._watch_stamps = self._watched_files()  # what this reload reads
        self.notifier.reloading()
        try:
            await self.reload()
        except Exception as exc:  # reload() handles its failures; this is the backstop
            log.exception("reload failed unexpectedly")
            self._reload_failed(f"internal error: {type(exc).__name__}: {exc}", str(exc))
        finally:
            self.reloads_done += 1
            self._reload_task = None
            self.notifier.ready(self.status_line())
            self._wake.set()

    async def _cancel_reload(self) -> None:
        """At shutdown: a reload still reading its config is dropped (its child killed)."""
        task = self._reload_task
        if task is None:
            return
        if self._reload_load is not None:
            self._reload_load.kill()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def reload(self) -> bool:
        """Apply a changed config file, or keep the running one and say why.

        The file is read, validated and fingerprinted in a child process (see
        ``configload``), and its result unpickled in a thread: with 10,000 tasks the
        parse is over half a second the event loop (probes, fires, runs) must not wait
        for, nor share the GIL with. A reload that fails for any reason -- an invalid
        file, the child killed or out of time, a state write that fails while applying --
        leaves the running config in force: in the log, ``/v1/status``, STATUS= and
        ``agentd_config_last_reload_success``."""
        self.reload_requested = False
        assert self.store and self.scheduler and self.runner
        try:
            load = self._reload_load = ConfigLoad(self.config_path, (self.config, self._index))
            with _loop_first():
                new, after = await asyncio.to_thread(load.result)
                # Before collection is back on: its first pass would walk all of them.
                gc.freeze()
        except ConfigError as exc:
            first = exc.problems[0] if exc.problems else None
            summary = f"{first.path or '<top>'}: {first.message}" if first else str(exc)
            self._reload_failed(exc.render(), summary)
            return False
        except Exception as exc:
            self._reload_failed(f"cannot read {self.config_path}: {exc}", str(exc))
            return False
        finally:
            self._reload_load = None
        for key in RESTART_SETTINGS:
            if getattr(new.daemon, key) != getattr(self.config.daemon, key):
                log.warning("reload: daemon.%s changed; it takes effect after a restart", key)
        for key in LIVE_SETTINGS:
            if getattr(new.daemon, key) != getattr(self.config.daemon, key):
                log.info("reload: daemon.%s changed; applied now", key)
        if new.state != self.config.state:
            log.warning("reload: state changed; it takes effect after a restart")
        old, before = self.config, self._index
        changed = sorted(t for t in before.keys() & after.keys() if before[t] != after[t])
        try:
            report = await self._apply(new, after, before)
        except Exception as exc:
            log.error("reload: applying the new config failed, restoring the running one: %s", exc)
            try:
                await self._apply(old, before, after)
            except Exception:
                log.exception("reload: restoring the running config failed; restart agentd")
            self._reload_failed(f"cannot apply the new config: {exc}", str(exc))
            return False
        self.config, self._index = new, after
        self._node_seen_mono = -math.inf  # the registry shows the new generation at once
        # As at startup: the new config lives until the next reload; out of the
        # collector's generations (frozen right after parsing, and what applying it
        # made, now), no collection walks its objects: with 10,000 tasks a million,
        # allocated while collection was off (see _loop_first). The old config, frozen
        # before, goes by reference counting: a parsed config holds no cycles.
        gc.freeze()
        tls.forget()  # clients made from now on read the CA bundle again
        self.generation += 1
        self.last_reload_ok, self.last_reload_error, self._reload_summary = True, None, ""
        self.metrics.config_reload(True, self.clock.now().timestamp())
        log.info(
            "reload ok generation=%d tasks=%d added=%s changed=%s removed=%s "
            "jobs_added=%d jobs_rescheduled=%s jobs_removed=%d schedules_ended=%d",
            self.generation,
            len(new.tasks),
            _names(sorted(after.keys() - before.keys())),
            _names(changed),
            _names(sorted(before.keys() - after.keys())),
            len(report.added),
            _names(list(report.rescheduled)),
            len(report.removed),
            len(report.ended),
        )
        return True

    async def _apply(self, new: Config, index: TaskIndex, synced: TaskIndex) -> SyncReport:
        """Bring state, schedule and every part's view of the tasks to ``new``. The state
        DB's task rows go first: if they cannot be written, nothing else has changed."""
        assert self.store and self.scheduler and self.runner
        self._sync_tasks(index, synced)
        report = await self.scheduler.sync_async(new)
        self.runner.set_tasks(new.tasks)
        self.metrics.set_tasks(new.tasks)
        if self.gateway:
            self.gateway.set_config(new)
        if self.oversight:
            self.oversight.set_config(new)
        if self.control:
            self.control.config = new
        self._use_secrets(new)
        self._use_daemon_settings(new.daemon)
        return report

    def _use_daemon_settings(self, daemon: DaemonConfig) -> None:
        """The ``daemon:`` settings a running daemon can change (``LIVE_SETTINGS``); the
        main loop reads ``poll_interval`` and the drain reads ``shutdown_grace`` from the
        config in force each time. A ``python_path`` entry removed stays on ``sys.path``
        (what was imported from it stays imported) until a restart."""
        set_log_level(daemon.log_level)
        logformat.apply(logformat.resolve(daemon.log_format, os.environ, sys.stderr))
        self.health.stale_after_s = daemon.liveness_stale_after
        for extra in daemon.python_path:
            if str(extra) not in sys.path:
                sys.path.insert(0, str(extra))
        if self.runner:
            self.runner.exec_env = dataclasses.replace(
                self.runner.exec_env,
                kill_grace_s=daemon.kill_grace,
                output_max_bytes=daemon.output_max_bytes,
            )

    def _withheld_env_bytes(self) -> frozenset[bytes]:
        """``withheld_env`` as commands' environments are keyed (bytes)."""
        return frozenset(os.fsencode(name) for name in self.withheld_env)

    def _use_secrets(self, cfg: Config) -> None:
        """Read what ``cfg``'s secret variables and files hold (``config.secret_refs``):
        from now on those values are scrubbed from the state DB's texts and the log,
        and those variables (and systemd's ``CREDENTIALS_DIRECTORY``) are withheld from
        every command a task or an alert channel runs."""
        refs = secret_refs(cfg)
        self.redactor = read_secrets(refs)
        redact.install(self.redactor)
        self.withheld_env = frozenset({r.env for r in refs if r.env} | {"CREDENTIALS_DIRECTORY"})
        if self.store:
            self.store.redactor = self.redactor
        if self.runner:
            self.runner.exec_env = dataclasses.replace(
                self.runner.exec_env, withheld_env=self._withheld_env_bytes()
            )
        if self.oversight:
            self.oversight.outbox.withheld_env = self.withheld_env
        for where in self.redactor.too_short:
            log.warning(
                "secret named by %s is shorter than %d characters: not scrubbed from texts",
                where,
                redact.MIN_LENGTH,
            )
        log.info(
            "secrets: %s; %d variable(s) withheld from commands",
            self.redactor.describe(),
            len(self.withheld_env),
        )

    def _reload_failed(self, reason: str, summary: str) -> None:
        """Keep the running config and say why everywhere an operator looks."""
        self.last_reload_ok = False
        self.last_reload_error = reason
        summary = " ".join(summary.split())
        self._reload_summary = summary if len(summary) <= 120 else summary[:117] + "..."
        self.metrics.config_reload(False, self.clock.now().timestamp())
        for line in reason.splitlines():
            log.error("reload failed, keeping the running config: %s", line)
        if self.oversight:
            try:
                self.oversight.reload_failed(reason)
            except Exception as exc:  # the alert is a courtesy; the log line above is not
                log.warning("reload failure not recorded as an alert: %s", exc)
        if self.notifier.enabled:
            self.notifier.status(self.status_line())

    # ------------------------------------------------------------ events

    def status(self) -> dict[str, Any]:
        counts = self.store.counts() if self.store else {}
        ready, why = self.health.readiness()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(self.clock.monotonic() - self.started_mono, 3),
            "config": str(self.config_path),
            "config_generation": self.generation,
            "last_reload_ok": self.last_reload_ok,
            "last_reload_error": self.last_reload_error,
            "reloads_started": self.reloads_started,
            "reloads_done": self.reloads_done,
            "ready": ready,
            "ready_reason": why.get("reason"),
            "tasks": len(self.config.tasks),
            "running": sorted(self.runner.active) if self.runner else [],
            "counts": counts,
        }

    def _on_event(self, event: Row) -> None:
        """One grep-able line per state change, then metrics and live streams. (The run's
        workspace gets its events.jsonl from the runner when an attempt ends: one file
        write per attempt, not one per event.)"""
        self.metrics.on_event(event)
        if self.oversight:
            self.oversight.on_event(event)
        if self.feed:
            self.feed.local(event)
        data: dict[str, Any] = event["data"]
        extras = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(data.items()) if v is not None)
        log.info(
            "event=%s task=%s run=%s %s",
            event["kind"],
            event["task_id"] or "-",
            event["run_id"] or "-",
            extras,
        )


RESTART_SETTINGS = ("state_dir", "http", "concurrency", "lease")
"""``daemon:`` settings a reload cannot apply: it says so, and they wait for a restart."""
LIVE_SETTINGS = (
    "timezone",
    "shutdown_grace",
    "kill_grace",
    "poll_interval",
    "log_level",
    "log_format",
    "output_max_bytes",
    "liveness_stale_after",
    "python_path",
    "heartbeat",
)
"""``daemon:`` settings a reload applies at once (``Daemon._use_daemon_settings``; the
heartbeat ping reads its settings from the config in force before each ping, and a
reload that adds one starts it at the next tick)."""

RELOAD_NAMES_SHOWN = 20
"""How many task names a reload's log line lists per kind of change; the rest are
counted (a reload of 10,000 new tasks is one readable line, not a page)."""


def _names(names: list[str]) -> str:
    """``a,b,c``; past ``RELOAD_NAMES_SHOWN``, ``a,...,t,+9980 more``; ``-`` for none."""
    if not names:
        return "-"
    shown = ",".join(names[:RELOAD_NAMES_SHOWN])
    more = len(names) - RELOAD_NAMES_SHOWN
    return f"{shown},+{more} more" if more > 0 else shown


def _url_without_credentials(url: str) -> str:
    """``host:port/db`` of a libpq URL, for log lines and refusals."""
    parts = urllib.parse.urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.hostname or 'localhost'}{port}{parts.path or ''}"


@contextlib.contextmanager
def _refusing(root: Path) -> Iterator[None]:
    """Errors that say a state file is damaged or cannot be used become a ``Refusal``."""
    try:
        yield
    except Exception as exc:
        refusal = statedir.classify(exc, root)
        if refusal is None:
            raise
        raise refusal from None


@contextlib.contextmanager
def _loop_first() -> Iterator[None]:
    """While a thread does long pure-Python work (unpickling a reloaded config, or
    parsing it when its child failed; startup's state), the loop gets the GIL back at
    each switch interval, after each of its DB calls: a shorter interval meanwhile, so
    requests answered during a reload wait less; only meanwhile, because a short
    interval costs throughput for good."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, LOOP_FIRST_SWITCH_S))
    try:
        with _no_cyclic_gc():
            yield
    finally:
        sys.setswitchinterval(interval)


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """No cyclic GC while a config is parsed or unpickled: with 10,000 tasks a parse
    allocates a million objects, which set off full collections (every one holding the
    GIL) that find nothing to free: a parsed config holds no reference cycles."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _ts(text: str | None) -> float | None:
    return from_iso(text).timestamp() if text else None


def _fmt(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


def set_log_level(level: str) -> None:
    """The root logger's level; httpx's own line per request ("HTTP Request: POST ...")
    only at debug: every model call is in the ledger and an ``llm_call`` event already,
    and at hundreds of calls a minute the line is a measurable share of the loop."""
    logging.getLogger().setLevel(level.upper())
    debug = level.upper() == "DEBUG"
    logging.getLogger("httpx").setLevel(logging.NOTSET if debug else logging.WARNING)


def run_daemon(
    config_path: Path, load: ConfigLoad | None = None, *, accept_empty_state: bool = False
) -> int:
    """Entry point for ``agentd run``: exit codes from ``agentd.exitcodes``.

    ``load`` is the config's parse, begun (by ``cli``) before this module's imports;
    ``accept_empty_state`` is ``--accept-empty-state`` (see ``statedir``)."""
    # One *_created series per counter doubles the series count for no question anyone
    # asks at 3 a.m.; process-wide, so it is decided here.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    # When systemd's watchdog kills a wedged daemon (SIGABRT), the journal then shows
    # every thread's Python stack: where it was stuck, not just that it was.
    faulthandler.enable()
    procs.EARLY.install()  # (``cli`` did, for ``agentd run``; this is for other callers)
    # Orphaned descendants of commands become ours to reap (``Daemon.reaper``), not
    # init's, and not zombies for good when we are PID 1 ourselves.
    subreaper = procs.set_subreaper()
    try:
        with _no_cyclic_gc():
            config, index = (load or ConfigLoad(config_path)).result()
            gc.freeze()  # lives until the first reload; no collection need walk it
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return exitcodes.CONFIG
    if procs.EARLY.stop_requested:  # nothing taken yet: no lock, no state, no port
        log.info("signal during start-up: stopping before the state dir is touched")
        log.info("agentd stopped exit=%d", exitcodes.OK)
        return exitcodes.OK
    log.debug("subreaper=%s pid1=%s", subreaper, os.getpid() == 1)
    set_log_level(config.daemon.log_level)
    logformat.apply(logformat.resolve(config.daemon.log_format, os.environ, sys.stderr))
    daemon = Daemon(config_path, config, index=index, accept_empty_state=accept_empty_state)
    command.use_pidfd_child_watcher()  # attached to the loop asyncio.run creates
    return asyncio.run(daemon.serve())

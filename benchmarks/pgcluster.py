"""A throwaway PostgreSQL cluster: ``initdb`` in a temp dir, ``pg_ctl`` start on a free
loopback port, stopped and removed at the end. The tests (``tests/pgcluster.py``,
fixtures in ``tests/conftest.py``) and the benchmarks (section ``PG``) both start theirs
here, differing only in durability.

PostgreSQL refuses to run as root, so under root (CI, these machines) the server runs
as ``nobody`` (``setpriv``), owning only its data dir. The cluster trusts local
connections from the user ``agentd`` (a superuser): it holds nothing but throwaway data.

Durability is the caller's choice, fixed at construction: ``durable=False`` (the tests:
``fsync=off``, ``synchronous_commit=off``, ``full_page_writes=off``; they test agentd's
logic, not the disk) or ``durable=True`` (the benchmarks: all three on, PostgreSQL's
production defaults, so a commit reported to a client is on the disk). ``initdb`` runs
with ``--no-sync`` either way: that only skips flushing the fresh data dir once, which a
crash during setup could not make matter.

Found on PATH (``initdb``, ``pg_ctl``, ``postgres``), else in Debian's
``/usr/lib/postgresql/<version>/bin``; a test that needs the cluster fails (never
skips) when neither is there, saying what to install.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

SUPERUSER = "agentd"
UNPRIVILEGED = "nobody"


def pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for version_dir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        candidate = version_dir / name
        if candidate.exists():
            return str(candidate)
    raise RuntimeError(
        f"PostgreSQL's {name} is not on PATH nor in /usr/lib/postgresql/*/bin: "
        "install the server (apt-get install postgresql) to run these tests"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgCluster:
    """One running cluster. ``url(db)`` is a libpq URL for ``db`` (default: ``postgres``)."""

    def __init__(self, root: Path, durable: bool = False) -> None:
        self.root = root
        self.durable = durable
        self.data = root / "data"
        self.sockets = root / "sockets"
        self.log = root / "server.log"
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam(UNPRIVILEGED)
            self._as = [
                "setpriv",
                f"--reuid={user.pw_uid}",
                f"--regid={user.pw_gid}",
                "--clear-groups",
                "--",
            ]
            self._uid, self._gid = user.pw_uid, user.pw_gid
        else:
            self._uid, self._gid = os.geteuid(), os.getegid()

    def _run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._as, *argv],
            check=True,
            capture_output=True,
            text=True,
            cwd=self.root,
            timeout=120,
        )

    def start(self) -> None:
        self.root.chmod(0o755)  # the server's user must reach its dirs
        for path in (self.data, self.sockets):
            path.mkdir(mode=0o700)
            os.chown(path, self._uid, self._gid)
        self.log.touch()
        os.chown(self.log, self._uid, self._gid)
        self._run(
            [
                pg_bin("initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ]
        )
        self._pg_ctl_start()

    def _pg_ctl_start(self) -> None:
        durability = "on" if self.durable else "off"
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} "
            f"-c fsync={durability} -c synchronous_commit={durability} "
            f"-c full_page_writes={durability} -c max_connections=200"
        )
        try:
            self._run(
                [
                    *(pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log)),
                    *("-o", options, "-w", "-t", "60", "start"),
                ]
            )
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(
                f"PostgreSQL did not start: {exc.stderr}\n{self.log.read_text()[-4000:]}"
            ) from None

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run([pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def start_again(self) -> None:
        """Start a stopped cluster again, on the same port."""
        self._pg_ctl_start()

    def restart(self) -> None:
        """Stop (``fast``: connections are cut) and start again on the same port."""
        self.stop()
        self._pg_ctl_start()

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{db}"

    def psql(self, sql: str, db: str = "postgres") -> str:
        out = subprocess.run(
            [pg_bin("psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", self.url(db), "-c", sql],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def server_pids(self) -> list[int]:
        """The postmaster and every process it forked (backends, background workers):
        read from ``postmaster.pid`` and ``/proc``, for their CPU time."""
        pid_file = self.data / "postmaster.pid"
        main = int(pid_file.read_text().split()[0])
        pids = [main]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # gone between listing and reading
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == main:
                pids.append(int(entry.name))
        return pids


@contextlib.contextmanager
def running_cluster(durable: bool = False) -> Iterator[PgCluster]:
    """A started cluster, stopped (``immediate``) and removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="agentd-pg-"))
    cluster = PgCluster(root, durable)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)

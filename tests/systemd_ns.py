"""A real systemd as PID 1 in private namespaces, for tests that drive agentd the way an
operator does: ``systemctl start|reload|stop``, ``systemctl show``, the journal.

No VM: ``unshare`` gives systemd its own PID, mount, UTS, IPC and network namespaces; its
root is an overlay whose lower layer is this machine's ``/`` and whose upper layer is a
tmpfs, so whatever the test or systemd writes (the unit, the config, agentd's state, a
``pip install``) vanishes with it and the host is never touched.

agentd is installed as the packaging README says: a virtualenv made with the
distribution's ``/usr/bin/python3`` (a DynamicUser service cannot read ``/root``, where
pyenv's Python lives), outside ``/tmp`` (``PrivateTmp`` hides it). The dependencies go
into a virtualenv cached on the host under ``/opt/agentd-test`` (keyed by the dependency
list); agentd itself is ``pip install``-ed from the checkout inside the overlay, so every
test session runs the code under test and concurrent sessions cannot disturb each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DISTRO_PYTHON = Path("/usr/bin/python3")
SYSTEMD = Path("/lib/systemd/systemd")
CACHE = Path("/opt/agentd-test")
INSTALL = Path("/opt/agentd")  # where the shipped unit expects agentd

BOOT_SCRIPT = r"""
set -e
base="$1"
mount -t tmpfs -o mode=0755 agentd-test "$base"
mkdir -p "$base/upper" "$base/work" "$base/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$base/upper,workdir=$base/work" "$base/root"
r="$base/root"
mount -t proc proc "$r/proc"
mount --rbind /sys "$r/sys"
mount --rbind /dev "$r/dev"
mount -t tmpfs -o mode=0755 tmpfs "$r/run"
mount -t tmpfs -o mode=1777 tmpfs "$r/tmp"
%(binds)s
ip link set lo up
cd "$r"
exec chroot "$r" /usr/bin/env -i container=other PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --system --unit=basic.target
"""


class Unavailable(Exception):
    """This host cannot run the real-systemd tests; the message says why."""


def why_unavailable() -> str | None:
    if sys.platform != "linux":
        return "not Linux"
    if os.geteuid() != 0:
        return "needs root (unshare of mount and PID namespaces)"
    for tool in ("unshare", "nsenter", "ip", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} not found"
    if not DISTRO_PYTHON.exists():
        return f"{DISTRO_PYTHON} not found (the distribution's Python, for the install)"
    probe = subprocess.run(
        [str(DISTRO_PYTHON), "-c", "import venv, ensurepip"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"{DISTRO_PYTHON} lacks venv/ensurepip (apt-get install python3-venv)"
    return None


def deps_venv() -> Path:
    """A virtualenv with agentd's runtime dependencies, built once per dependency list.

    The build takes a lock, so parallel test sessions wait rather than race."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = sorted(project["project"]["dependencies"]) + list(
        project["build-system"]["requires"]
    )
    digest = hashlib.sha256("\n".join([*requires, str(DISTRO_PYTHON)]).encode()).hexdigest()
    venv = CACHE / f"venv-{digest[:12]}"
    CACHE.mkdir(mode=0o755, parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / ".complete").exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        run([str(DISTRO_PYTHON), "-m", "venv", str(venv)], timeout=300)
        run(
            [str(venv / "bin/pip"), "install", "--quiet", "--upgrade", "pip", *requires],
            timeout=900,
        )
        os.chmod(venv, 0o755)
        (venv / ".complete").write_text("\n".join(requires))
    return venv


def run(
    cmd: list[str], timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


class SystemdNS:
    """One booted systemd; ``sh()`` and ``systemctl()`` run inside its namespaces."""

    def __init__(self, base: Path, binds: list[Path] | None = None) -> None:
        self.base = base
        self.binds = binds or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0

    @property
    def root(self) -> Path:
        """The overlay as the host sees it: write files into the machine through this."""
        return Path(f"/proc/{self.pid}/root")

    def boot(self, timeout_s: float = 60) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        binds = "\n".join(f'mkdir -p "$r{p}" && mount --bind "{p}" "$r{p}"' for p in self.binds)
        self.proc = subprocess.Popen(
            [
                "unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--net",
                "--propagation", "private",
                "/bin/sh", "-c", BOOT_SCRIPT % {"binds": binds}, "boot", str(self.base),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not self.pid:
            self.pid = self._find_pid1()
            self._check_deadline(deadline, "systemd to start")
        while True:
            state = self.sh("systemctl is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            self._check_deadline(deadline, f"boot to finish (state {state!r})")

    def _find_pid1(self) -> int:
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            child = children.read_text().split()
        except OSError:
            child = []
        if child:
            # PID 1 of the new namespace: the shell that becomes systemd by exec.
            try:
                if Path(f"/proc/{child[0]}/comm").read_text().strip() == "systemd":
                    return int(child[0])
            except OSError:
                pass
        return 0

    def _check_deadline(self, deadline: float, what: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
            raise Unavailable(
                f"systemd exited {self.proc.returncode} while waiting for {what}: {out}"
            )
        if time.monotonic() > deadline:
            raise Unavailable(f"timed out waiting for {what}")
        time.sleep(0.05)

    def sh(
        self, script: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            "nsenter", "-t", str(self.pid), "-p", "-m", "-u", "-i", "-n", "-r", "-w",
            "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_PAGER=",
            "/bin/sh", "-c", script,
        ]  # fmt: skip
        return run(cmd, timeout=timeout, check=check)

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.sh("systemctl --no-pager " + " ".join(args), check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.sh(f"journalctl --no-pager -o cat -u {unit}", check=False).stdout

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def http_get(self, url: str) -> tuple[int, str]:
        """GET from inside the network namespace; (0, error) when nothing answers."""
        code = (
            "import sys, urllib.request, urllib.error\n"
            "try:\n"
            "    r = urllib.request.urlopen(sys.argv[1], timeout=5)\n"
            "    print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code); print(e.read().decode())\n"
            "except OSError as e:\n"
            "    print(0); print(e)\n"
        )
        out = run(
            ["nsenter", "-t", str(self.pid), "-n", str(DISTRO_PYTHON), "-c", code, url],
            timeout=30,
        ).stdout
        status, _, body = out.partition("\n")
        return int(status), body

    def shutdown(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGRTMIN + 4)  # systemd: halt
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)

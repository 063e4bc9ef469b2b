"""What the kernel knows about a process: CPU time, resident memory, wake-ups.

Read from ``/proc`` so that the same numbers come out for agentd and for every peer,
whatever runtime they use, without any cooperation from the measured program.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; everything after its ")" is plain.
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU of all the process's threads; with ``children`` also of the
    children it has reaped (a shell task's ``true`` is a reaped child)."""
    fields = _stat_fields(pid)
    # After the ")" field 3 (state) is index 0, so utime (14) is index 11.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICK


def thread_cpu_seconds(pid: int) -> float:
    """CPU time of the process's live threads from ``schedstat``, in nanoseconds: the
    clock-tick figures of ``cpu_seconds`` come in 10 ms steps, which over B7's 15 s
    window is a resolution of 0.67 ms/s, coarser than the figure being measured.
    Threads that exit in between take their time with them, so this is for idle
    windows, where none do."""
    total_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total_ns += int((task / "schedstat").read_text().split()[0])
        except OSError:  # the thread ended between listing and reading
            continue
    return total_ns / 1e9


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def peak_rss_mib(pid: int) -> float:
    """The process's resident high-water mark (``VmHWM``) so far, in MiB: its peak RSS
    over its whole life, start-up included, with no sampling to miss a short peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def wakeups(pid: int) -> int:
    """Voluntary context switches summed over the process's threads: each is one sleep
    that ended, i.e. one wake-up (a timer, a poll, a lock hand-off)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:  # the thread ended between listing and reading
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def machine() -> dict[str, object]:
    """The facts a reader needs to compare a figure with one from another machine."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": os.uname().release,
        "loadavg": loadavg(),
    }


def loadavg() -> list[float]:
    """Busy neighbours on a shared machine show up here; reported beside the results."""
    return [round(x, 2) for x in os.getloadavg()]

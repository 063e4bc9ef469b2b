"""Count the SQL a program runs: ``python -m benchmarks.sqltrace OUT.json -m MOD ARGS...``.

Every ``sqlite3`` connection the program opens (its own, SQLAlchemy's, huey's) gets a
trace callback, then ``MOD`` runs as ``__main__`` in this same process. At exit the
counts go to ``OUT.json``. The callback sees each statement as SQLite starts it, so the
counts are exact, including the ``BEGIN``/``COMMIT`` that Python's driver issues
implicitly. A *commit* is a ``COMMIT``/``END`` statement, or a write run outside any
transaction (SQLite commits that one on its own); ``write_commits`` only counts those
that changed rows. The counts are also rewritten every 50 ms while they change, so the
harness can take the difference over a window (e.g. from the due instant to the last
finished run) and leave start-up and shutdown out. The callback costs about a
microsecond per statement, which is why timed repetitions run without it (see
``benchmarks/README.md``).

Standard library only: it also runs inside the peers' virtualenvs.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sqlite3
import sys
import threading
import time
from collections import Counter
from typing import Any

_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER")
_counts: Counter[str] = Counter()
_lock = threading.Lock()


def _install() -> None:
    original = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = original(*args, **kwargs)
        changes_at_begin = [conn.total_changes]

        def trace(sql: str) -> None:
            head = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
            with _lock:
                _counts["statements"] += 1
                if head == "BEGIN":
                    changes_at_begin[0] = conn.total_changes
                elif head in ("COMMIT", "END"):
                    _counts["commits"] += 1
                    if conn.total_changes != changes_at_begin[0]:
                        _counts["write_commits"] += 1
                elif head in _WRITES and not conn.in_transaction:
                    _counts["commits"] += 1  # autocommit: SQLite commits this one itself
                    _counts["write_commits"] += 1
                if head == "SELECT":
                    _counts["selects"] += 1

        conn.set_trace_callback(trace)
        return conn

    sqlite3.connect = connect  # type: ignore[assignment]
    sqlite3.dbapi2.connect = connect  # type: ignore[assignment]  # SQLAlchemy's handle


def _dump(out: str) -> None:
    with _lock:
        text = json.dumps(dict(_counts))
    with open(out + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(out + ".tmp", out)


def _dumper(out: str) -> None:
    last = -1
    while True:
        time.sleep(0.05)
        if _counts["statements"] != last:
            last = _counts["statements"]
            _dump(out)


def main() -> None:
    out, flag, module, *rest = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: python -m benchmarks.sqltrace OUT.json -m MODULE [ARGS...]")
    _dump(out)
    atexit.register(_dump, out)
    threading.Thread(target=_dumper, args=(out,), name="sqltrace", daemon=True).start()
    _install()
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

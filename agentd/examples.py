"""Example Python tasks and agent tools shipped with agentd; the shipped config runs
them offline (the agent's model excepted).

The tasks show the run context's contract: read ``ctx.params``, resume from
``ctx.checkpoint.load()``, save a checkpoint after every item (a restart resumes at the
next item, and a shutdown stops right there), report progress, write into the workspace.
A tool is ``function(ctx, arguments)``: its arguments already match its JSON schema, and
what it returns is what the model reads.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from agentd.context import RunContext


def checksum_files(ctx: RunContext) -> dict[str, Any]:
    """Write a SHA-256 manifest of the files under ``params.root`` matching ``params.glob``."""
    root = Path(ctx.params.get("root", "."))
    pattern = str(ctx.params.get("glob", "*"))
    files = sorted(str(p) for p in root.glob(pattern) if p.is_file())
    state = ctx.checkpoint.load({"next": 0})
    start = int(state["next"])
    out = ctx.workspace / "manifest.jsonl"
    with out.open("a", encoding="utf-8") as fh:
        for index in range(start, len(files)):
            digest = hashlib.sha256(Path(files[index]).read_bytes()).hexdigest()
            fh.write(json.dumps({"path": files[index], "sha256": digest}) + "\n")
            fh.flush()
            ctx.progress(index + 1, len(files), files[index])
            ctx.checkpoint.save({"next": index + 1})
    return {"files": len(files), "resumed_from": start}


def disk_usage(ctx: RunContext, arguments: dict[str, Any]) -> dict[str, Any]:
    """An agent tool (read-only, so idempotent): the space of the filesystem holding
    ``arguments["path"]``."""
    path = str(arguments["path"])
    usage = shutil.disk_usage(path)
    gib = 1 << 30
    return {
        "path": path,
        "total_gib": round(usage.total / gib, 1),
        "free_gib": round(usage.free / gib, 1),
        "used_pct": round(100 * usage.used / usage.total, 1) if usage.total else None,
    }

"""Example Python tasks shipped with agentd; the shipped config runs them offline.

They show the run context's contract: read ``ctx.params``, resume from
``ctx.checkpoint.load()``, save a checkpoint after every item (a restart resumes at the
next item, and a shutdown stops right there), report progress, write into the workspace.
"""

from __future__ import annotations

import hashlib
import json
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

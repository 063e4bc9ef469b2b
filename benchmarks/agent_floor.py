"""B11's floor: the least a program can do to hold N tool-calling conversations.

``python -m benchmarks.agent_floor --url URL --n 200 --concurrency 8`` runs ``n``
conversations against ``URL`` (``benchmarks.fake_provider``), at most ``concurrency``
at once (an ``asyncio.Semaphore``), on one ``httpx.AsyncClient`` with httpx's default
limits (agentd's provider client has the same). Each conversation posts the messages
and the tool list, runs every tool call the reply asks for in process
(``benchmarks.payload.lookup``, the function agentd's tool calls) and appends its
result as a ``tool`` message, until a reply asks for none: the same requests agentd
makes, with the same bodies. Prints one JSON line: wall seconds from the first
conversation's start to the last one's end, the process's CPU over that window
(``getrusage``), its peak RSS (``VmHWM``) and the number of model calls made.

It is the floor, not a peer: nothing is durable (no run record, no step record, no
ledger, no transcript), nothing survives a crash, and there is no scheduler, budget or
API. The constants below are shared with agentd's side (``bench_agent``), so both
send the same conversation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.payload import lookup

MODEL = "m1"
MAX_TOKENS = 50
SYSTEM = "Use the lookup tool until it has been called twice, then answer."
PROMPT = "Look up two values, then say done."
TOOL_NAME = "lookup"
TOOL_DESCRIPTION = "Look up the value for a number"
TOOL_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"n": {"type": "integer"}},
    "required": ["n"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": TOOL_NAME,
            "description": TOOL_DESCRIPTION,
            "parameters": TOOL_PARAMETERS,
        },
    }
]
MAX_STEPS = 8
"""agentd's default ``max_steps``: a conversation that needs more is a failure."""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


async def conversation(client: httpx.AsyncClient, gate: asyncio.Semaphore) -> int:
    """One conversation to its plain answer; returns the model calls it made."""
    async with gate:
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": PROMPT},
        ]
        for step in range(1, MAX_STEPS + 1):
            body = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "tools": TOOLS}
            resp = await client.post("/chat/completions", json=body)
            resp.raise_for_status()
            message = resp.json()["choices"][0]["message"]
            calls = message.get("tool_calls") or []
            if not calls:
                return step
            messages.append({"role": "assistant", "content": None, "tool_calls": calls})
            for call in calls:
                arguments = json.loads(call["function"]["arguments"])
                messages.append(
                    {"role": "tool", "tool_call_id": call["id"], "content": lookup(None, arguments)}
                )
        raise RuntimeError(f"no answer after {MAX_STEPS} model calls")


async def run(url: str, n: int, concurrency: int) -> dict[str, float]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        cpu0, t0 = _cpu(), time.time()
        calls = await asyncio.gather(*(conversation(client, gate) for _ in range(n)))
        wall, cpu = time.time() - t0, _cpu() - cpu0
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak_rss_mib(), "calls": sum(calls)}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.agent_floor")
    p.add_argument("--url", required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    a = p.parse_args()
    print(json.dumps(asyncio.run(run(a.url, a.n, a.concurrency))))


if __name__ == "__main__":
    main()

"""B11's model: an OpenAI-compatible chat-completions server in a process of its own.

``python -m benchmarks.fake_provider [--delay 0.2] [--tool-steps 2]`` binds a free port
on 127.0.0.1, prints one JSON line ``{"url": ...}`` on stdout, answers until SIGTERM,
then prints ``{"requests": N, "bad": M}`` and exits.

Every ``POST /chat/completions`` is answered ``--delay`` seconds after its body arrived
(a provider's think time). The reply depends only on the request, so the server keeps
no state and any number of conversations can share it: with fewer than
``--tool-steps`` ``tool`` messages in ``messages`` it asks for one call of the tool
``lookup`` (``{"n": k}``, call id ``call_k``); after that it answers plainly. A
conversation therefore takes ``tool-steps + 1`` calls. A request without ``tools`` or
``messages`` is answered 400 and counted as ``bad``: a contender that made it is broken.

It runs in its own process so that its CPU is counted for neither contender (both
share it). Only aiohttp and the standard library; nothing of agentd.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

from aiohttp import web

TOOL = "lookup"
ANSWER = "done"


def reply(body: Any, tool_steps: int) -> dict[str, Any] | None:
    """The completion for one request body, or None if it is not one to answer. Pure."""
    if not isinstance(body, dict) or not body.get("tools"):
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    done = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "tool")
    message: dict[str, Any]
    if done < tool_steps:
        k = done + 1
        call = {
            "id": f"call_{k}",
            "type": "function",
            "function": {"name": TOOL, "arguments": json.dumps({"n": k})},
        }
        message, finish = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
    else:
        message, finish = {"role": "assistant", "content": ANSWER}, "stop"
    return {
        "id": f"chatcmpl-bench-{done}",
        "object": "chat.completion",
        "model": body.get("model", "m1"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25},
    }


class Server:
    def __init__(self, delay: float, tool_steps: int) -> None:
        self.delay = delay
        self.tool_steps = tool_steps
        self.requests = 0
        self.bad = 0

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests += 1
        await asyncio.sleep(self.delay)
        answer = reply(body, self.tool_steps)
        if answer is None:
            self.bad += 1
            refusal = {"error": {"message": "tools and messages needed"}}
            return web.json_response(refusal, status=400)
        return web.json_response(answer)

    async def serve(self) -> None:
        app = web.Application()
        app.router.add_post("/chat/completions", self.chat)
        app.router.add_post("/v1/chat/completions", self.chat)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        host, port = runner.addresses[0][:2]
        print(json.dumps({"url": f"http://{host}:{port}"}), flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()
        print(json.dumps({"requests": self.requests, "bad": self.bad}), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fake_provider")
    p.add_argument("--delay", type=float, default=0.2, help="seconds before each answer")
    p.add_argument("--tool-steps", type=int, default=2, help="tool calls per conversation")
    a = p.parse_args(argv)
    asyncio.run(Server(a.delay, a.tool_steps).serve())
    sys.exit(0)


if __name__ == "__main__":
    main()

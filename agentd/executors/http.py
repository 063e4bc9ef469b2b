"""Make one HTTP request and judge it by its status.

The body is streamed to ``response.body`` and reading stops at the output cap: only the
status decides the outcome, so there is no reason to download the rest. Redirects are
not followed, so a moved endpoint shows up as its 3xx instead of silently changing.
Request headers may hold credentials, so they never reach the result, the log or disk.
"""

from __future__ import annotations

import time
from typing import Any

from agentd import tls
from agentd.clock import parse_retry_after
from agentd.config import TaskConfig
from agentd.context import RunContext
from agentd.executors import ExecEnv
from agentd.models import Result


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def execute(task: TaskConfig, ctx: RunContext, env: ExecEnv) -> Result:
    await tls.prepare()
    import httpx  # not at the top: providers imports this module for its helpers

    cfg = task.http
    assert cfg is not None
    cap = task.output_max_bytes or env.output_max_bytes
    ctx.workspace.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"headers": cfg.headers}
    if cfg.body is not None:
        kwargs["content"] = cfg.body
    elif cfg.json_body is not None:
        kwargs["json"] = cfg.json_body
    started = time.monotonic()
    saved = 0
    truncated = False
    try:
        async with (
            httpx.AsyncClient(timeout=cfg.timeout, verify=tls.context()) as client,
            client.stream(cfg.method, cfg.url, **kwargs) as resp,
        ):
            with (ctx.workspace / "response.body").open("wb") as fh:
                async for chunk in resp.aiter_bytes():
                    part = chunk[: cap - saved]
                    fh.write(part)
                    saved += len(part)
                    if len(part) < len(chunk):
                        truncated = True
                        break
    except httpx.TimeoutException as exc:
        error = f"timed out after {cfg.timeout:g}s ({type(exc).__name__})"
        return Result(ok=False, error=error, retryable=True)
    except httpx.TransportError as exc:
        return Result(ok=False, error=describe(exc), retryable=True)
    except httpx.HTTPError as exc:
        return Result(ok=False, error=describe(exc))

    status = resp.status_code
    detail: dict[str, Any] = {
        "status": status,
        "elapsed_s": round(time.monotonic() - started, 3),
        "body_bytes": saved,
    }
    if truncated:
        detail["truncated"] = True
    ok = status in cfg.expect_status if cfg.expect_status is not None else 200 <= status < 300
    if ok:
        return Result(ok=True, http_status=status, detail=detail)
    return Result(
        ok=False,
        error=f"HTTP {status}",
        http_status=status,
        retry_after_s=parse_retry_after(resp.headers.get("retry-after")),
        detail=detail,
    )

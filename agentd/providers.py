"""LLM calls, metered: one shared client per provider, a budget check before every call.

``Gateway`` belongs to the daemon; ``RunLLM`` is what a run sees as ``ctx.llm`` (the
agent executor uses it too, so custom Python agents are metered the same way). Each
call:

1. reads the API key from its variable or file (rotating it needs no restart);
2. reserves its worst case in the ledger against the run, task-window and global
   budgets, or raises ``BudgetExhausted`` without calling;
3. POSTs ``/chat/completions`` on the provider's shared ``httpx.AsyncClient``;
4. commits what the provider reports, or the worst case when it reports nothing
   usable (a timeout or a malformed answer may still have been billed);
5. returns a ``Reply`` or raises ``LLMError`` classified for the retry policy.

The key never leaves the Authorization header: it is scrubbed from provider messages,
and it is in no ledger row, event or log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from agentd import examplemodel, tls
from agentd.budget import Need, Scope, call_scopes, cost_usd, estimate_prompt_tokens, worst_case
from agentd.clock import Clock, parse_retry_after
from agentd.config import Config, ProviderConfig, TaskConfig
from agentd.ledger import Refusal, commit, reserve
from agentd.models import Result
from agentd.redact import SecretUnavailable, read_secret
from agentd.state.port import Store

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("agentd.providers")
T = TypeVar("T")

_CONTEXT_RE = re.compile(r"context.?length|maximum context|too many tokens|context window", re.I)
_POLICY_RE = re.compile(r"content.?(policy|filter|management)|safety system|flagged", re.I)


class LLMError(Exception):
    """A call that failed; ``retryable`` is the provider's meaning, for ``runner.decide``."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        category: str,
        http_status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.category = category
        self.http_status = http_status
        self.retry_after_s = retry_after_s

    def result(self, detail: dict[str, Any] | None = None) -> Result:
        return Result(
            ok=False,
            error=self.message,
            http_status=self.http_status,
            retry_after_s=self.retry_after_s,
            retryable=self.retryable,
            detail={"llm_error": self.category, **(detail or {})},
        )


class BudgetExhausted(Exception):
    """The next call does not fit a budget; it was not made."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message())
        self.refusal = refusal

    def result(self, detail: dict[str, Any] | None = None) -> Result:
        return Result(
            ok=False,
            error=str(self),
            retryable=False,
            budget_exhausted=True,
            detail={"budget_scope": self.refusal.scope.label, **(detail or {})},
        )


@dataclass(frozen=True)
class ToolCall:
    """One function call the model asked for; ``arguments`` is its JSON text, as sent
    (the model's, so not necessarily valid JSON)."""

    id: str
    name: str
    arguments: str

    def message(self) -> dict[str, Any]:
        """As it goes back to the provider in the assistant message."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class Reply:
    content: str
    """The answer's text; "" for a reply that holds only tool calls."""
    model: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    usage_missing: bool = False
    tool_calls: tuple[ToolCall, ...] = ()
    """The calls the model asked for (only when the request offered ``tools``)."""

    def usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": round(self.cost_usd, 9),
        }
        if self.usage_missing:
            usage["usage_missing"] = True
        return usage


def classify(status: int, message: str) -> tuple[bool, str]:
    """(retryable, category) of an HTTP error from a chat-completions provider."""
    if status == 429:
        return True, "rate_limited"
    if status in (408, 409, 425) or status >= 500:
        return True, "server_error" if status >= 500 else "transient"
    if status in (401, 403):
        return False, "auth"
    if status == 404:
        return False, "model_not_found"
    if status == 402:
        return False, "payment_required"
    if status in (400, 413, 422) and _CONTEXT_RE.search(message):
        return False, "context_length"
    if status == 400 and _POLICY_RE.search(message):
        return False, "content_policy"
    return False, "bad_request"


def api_key(provider: ProviderConfig) -> str | None:
    try:
        return read_secret(provider.api_key_env, provider.api_key_file, "API key")
    except SecretUnavailable as exc:
        raise LLMError(str(exc), retryable=False, category="auth") from None


def _scrub(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


def _error_message(data: Any) -> str | None:
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return error if isinstance(error, str) else None


def _provider_message(resp: httpx.Response, key: str | None) -> str:
    try:
        message = _error_message(resp.json())
    except ValueError:
        message = None
    text = _scrub(message if message is not None else resp.text, key)
    return " ".join(text[:300].split())  # one line, even from an HTML error page


def parse_message(
    resp: httpx.Response,
) -> tuple[str, tuple[ToolCall, ...], int | None, int | None]:
    """(content, tool calls, prompt_tokens, completion_tokens); ValueError when it is not
    an answer. A message may leave out its content (null) only when it calls tools."""
    try:
        data = resp.json()
    except ValueError as exc:
        raise ValueError(f"body is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("top level is not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        error = _error_message(data)  # some proxies answer 200 with an error object
        raise ValueError(f"no choices (error: {error})" if error else "no choices")
    message = choices[0].get("message")
    message = message if isinstance(message, dict) else {}
    calls = _tool_calls(message.get("tool_calls"))
    content = message.get("content")
    if content is None and calls:
        content = ""
    if not isinstance(content, str):
        raise ValueError(f"choices[0].message.content is {type(content).__name__}, not a string")
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}

    def count(name: str) -> int | None:
        value = usage.get(name)
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return value if ok else None

    return content, calls, count("prompt_tokens"), count("completion_tokens")


def _tool_calls(raw: Any) -> tuple[ToolCall, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"choices[0].message.tool_calls is {type(raw).__name__}, not a list")
    calls = []
    for i, call in enumerate(raw):
        fn = call.get("function") if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        arguments = fn.get("arguments", "") if isinstance(fn, dict) else None
        call_id = call.get("id") if isinstance(call, dict) else None
        if not isinstance(call_id, str) or not call_id or not isinstance(name, str):
            raise ValueError(f"tool_calls[{i}] has no id or no function name")
        if isinstance(arguments, (dict, list)):  # some servers send the object itself
            arguments = json.dumps(arguments)
        if not isinstance(arguments, str):
            raise ValueError(f"tool_calls[{i}].function.arguments is not a string")
        calls.append(ToolCall(call_id, name, arguments))
    ids = [c.id for c in calls]
    if len(set(ids)) != len(ids):
        raise ValueError("tool_calls repeat an id")
    return tuple(calls)


def new_client(provider: ProviderConfig) -> httpx.AsyncClient:
    """A client for ``provider``: its URL, its timeouts, agentd's trust store
    (``tls.prepare()`` first, on the loop)."""
    import httpx  # on first use: a daemon that sends no HTTP never loads it

    timeout = httpx.Timeout(
        connect=provider.connect_timeout,
        read=provider.read_timeout,
        write=provider.read_timeout,
        pool=provider.connect_timeout,
    )
    if provider.base_url == examplemodel.URL:
        return httpx.AsyncClient(
            base_url="http://example-model.invalid", timeout=timeout, transport=_example_transport()
        )
    return httpx.AsyncClient(
        base_url=provider.base_url.rstrip("/"), timeout=timeout, verify=tls.context()
    )


def _body(
    model: str,
    messages: list[dict[str, Any]],
    cap: int,
    temperature: float | None,
    tools: list[dict[str, Any]] | None,
    response_format: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``/chat/completions`` request."""
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": cap}
    if temperature is not None:
        body["temperature"] = temperature
    if tools:
        body["tools"] = tools
    if response_format is not None:
        body["response_format"] = response_format
    return body


class Gateway:
    """The daemon's LLM side: config, ledger (the store), clock, and one shared
    ``httpx.AsyncClient`` per provider, made on first use on the running loop."""

    def __init__(self, store: Store, config: Config, clock: Clock) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self._clients: dict[tuple[Any, ...], httpx.AsyncClient] = {}
        self.writes: Callable[[Callable[[], Any]], asyncio.Future[Any]] | None = None
        """Where the ledger's writes go: the runner's group commit (``Runner.submit``,
        wired by the daemon), so that a reservation or a charge costs the loop no fsync
        of its own; None: each in a transaction of its own, now."""

    def write(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """``fn`` (ledger verbs) in the next group commit, or now; the future gives its
        value once durable."""
        if self.writes is not None:
            return self.writes(fn)
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        try:
            fut.set_result(fn())
        except Exception as exc:
            fut.set_exception(exc)
        return fut

    def set_config(self, config: Config) -> None:
        self.config = config

    def client(self, name: str, provider: ProviderConfig) -> httpx.AsyncClient:
        """Shared per provider; a reload that changes its URL or timeouts gets a new one.
        ``builtin:example`` gets a client whose transport is the example model, in this
        process: no request leaves it."""
        key = (name, provider.base_url, provider.connect_timeout, provider.read_timeout)
        client = self._clients.get(key)
        if client is None:
            if provider.base_url == examplemodel.URL:
                log.info("provider %s is the built-in example model (not an LLM)", name)
            client = self._clients[key] = new_client(provider)
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    def for_run(
        self, task: TaskConfig, run_id: str, loop: asyncio.AbstractEventLoop | None = None
    ) -> RunLLM:
        return RunLLM(self, task, run_id, loop or asyncio.get_running_loop())


class RunLLM:
    """``ctx.llm``: chat completions for one run, metered against its budgets.

    ``await ctx.llm.achat(...)`` in async code; ``ctx.llm.chat(...)`` from a sync
    callable (which runs in a worker thread).
    """

    def __init__(
        self, gateway: Gateway, task: TaskConfig, run_id: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._gw = gateway
        self.task = task
        self.run_id = run_id
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def chat(self, prompt: str | None = None, **kwargs: Any) -> Reply:
        """The blocking form, for sync callables in their worker thread."""
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError("ctx.llm.chat() blocks: use `await ctx.llm.achat()` on the loop")
        return asyncio.run_coroutine_threadsafe(self.achat(prompt, **kwargs), self._loop).result()

    async def achat(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        system: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        read_timeout: float | None = None,
        item: int | None = None,
        tools: list[dict[str, Any]] | None = None,
        response_format: dict[str, Any] | None = None,
    ) -> Reply:
        """One metered call. ``messages`` replaces ``prompt``/``system``; ``tools`` (the
        OpenAI ``tools`` list) lets the model answer with ``Reply.tool_calls``;
        ``response_format`` is sent as it is (``ResponseFormatConfig.wire()``): checking
        the answer against it is the caller's business."""
        config, task = self._gw.config, self.task
        name, prov, default_model, default_max = self._target(provider)
        model = model or default_model
        if not model:
            message = "no model given and the provider has no default_model"
            raise LLMError(message, retryable=False, category="bad_request")
        if messages is None:
            if prompt is None:
                raise ValueError("give a prompt or messages")
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": prompt})
        cap = max_tokens or default_max or prov.max_tokens
        now = self._gw.clock.now()
        scopes = call_scopes(config, task, now)
        price = prov.prices.get(model)
        if price is None and any(s.usd is not None for s in scopes):
            raise LLMError(
                f"model {model!r} has no price in providers.{name}.prices, so a USD budget"
                " cannot be enforced; the call was not made",
                retryable=False,
                category="unpriced",
            )
        key = api_key(prov)
        need = worst_case(price, _prompt_estimate(messages, tools, response_format), cap)
        reservation = self._gw.write(
            partial(
                reserve,
                self._gw.store,
                now,
                run_id=self.run_id,
                task_id=task.id,
                provider=name,
                model=model,
                item=item,
                need=need,
                scopes=scopes,
            )
        )
        try:
            # Durable before the request leaves: a crash after it is charged (worst case).
            entry = await asyncio.shield(reservation)
        except asyncio.CancelledError:
            # Cancelled while the reservation commits: it is released once it has,
            # charged nothing (no request was sent).
            def release(done: asyncio.Future[int | Refusal]) -> None:
                if not done.cancelled() and done.exception() is None:
                    held = done.result()
                    if not isinstance(held, Refusal):
                        _Call(self._gw, held, scopes, need, price, model).charge("cancelled", 0, 0)

            reservation.add_done_callback(release)
            raise
        if isinstance(entry, Refusal):
            raise BudgetExhausted(entry)
        body = _body(model, messages, cap, temperature, tools, response_format)
        call = _Call(self._gw, entry, scopes, need, price, model)
        return await call.post(self._gw.client(name, prov), body, key, read_timeout)

    def _target(self, provider: str | None) -> tuple[str, ProviderConfig, str, int | None]:
        config = self._gw.config
        if provider is not None:
            if provider not in config.providers:
                message = f"unknown provider {provider!r}"
                raise LLMError(message, retryable=False, category="bad_request")
            return provider, config.providers[provider], "", None
        target = config.llm_target(self.task)
        if target is None:
            message = (
                "this task has no LLM provider: name one (provider=...) or declare"
                " exactly one under providers:"
            )
            raise LLMError(message, retryable=False, category="bad_request")
        name, prov, model, cap = target
        return name, config.providers.get(name, prov), model, cap


def _prompt_estimate(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    response_format: dict[str, Any] | None = None,
) -> int:
    """``estimate_prompt_tokens`` with the tools' schemas, earlier tool calls and the
    response format's schema, which the provider may count as prompt too (a message's
    ``content`` is all the estimate reads; reserving too much is the safe side)."""
    tokens = estimate_prompt_tokens(messages)
    extra: list[Any] = [m["tool_calls"] for m in messages if m.get("tool_calls")]
    if tools:
        extra.append(tools)
    if response_format:
        extra.append(response_format)
    if extra:
        tokens += estimate_prompt_tokens([{"content": json.dumps(extra)}])
    return tokens


def _example_transport() -> httpx.AsyncBaseTransport:
    """An httpx transport that answers ``/chat/completions`` with the example model
    (``agentd.examplemodel``); made lazily, like every httpx object here."""
    import httpx

    class ExampleTransport(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.method != "POST" or not request.url.path.endswith("/chat/completions"):
                return httpx.Response(404, json={"error": {"message": "not found"}})
            try:
                body = json.loads(await request.aread())
                if not isinstance(body, dict):
                    raise ValueError("the body is not a JSON object")
                return httpx.Response(200, json=examplemodel.answer(body))
            except ValueError as exc:
                return httpx.Response(400, json={"error": {"message": str(exc)}})

    return ExampleTransport()


class _Exchange:
    """One HTTP exchange with a provider, and what it cost (``charge``): metered by a
    subclass (``_Call``), or by nobody (``DirectLLM``'s)."""

    def __init__(self, need: Need, price: Any, model: str) -> None:
        self.need, self.price, self.model = need, price, model
        self.started = time.monotonic()

    def usage(self, input_tokens: int | None, output_tokens: int | None) -> tuple[int, int, bool]:
        """(input, output, missing): unknown usage is the worst case reserved."""
        if input_tokens is None or output_tokens is None:
            return self.need.input_tokens, self.need.output_tokens, True
        return input_tokens, output_tokens, False

    def charge(self, status: str, input_tokens: int | None, output_tokens: int | None) -> float:
        """What the exchange cost at the model's price (unknown usage at the worst case)."""
        used_in, used_out, _ = self.usage(input_tokens, output_tokens)
        return cost_usd(self.price, used_in, used_out)

    async def post(
        self,
        client: httpx.AsyncClient,
        body: dict[str, Any],
        key: str | None,
        read_timeout: float | None,
    ) -> Reply:
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        kwargs: dict[str, Any] = {"json": body, "headers": headers}
        if read_timeout is not None:
            kwargs["timeout"] = httpx.Timeout(client.timeout.connect, read=read_timeout)
        try:
            resp = await client.post("/chat/completions", **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self.charge("connect_error", 0, 0)  # nothing reached the provider
            raise LLMError(f"cannot connect: {exc}", retryable=True, category="connect") from None
        except httpx.TimeoutException:
            self.charge("timeout", None, None)
            seconds = read_timeout or client.timeout.read or 0
            message = f"request timed out after {seconds:g}s"
            raise LLMError(message, retryable=True, category="timeout") from None
        except httpx.HTTPError as exc:
            self.charge("transport_error", None, None)
            message = _scrub(f"{type(exc).__name__}: {exc}", key)
            raise LLMError(message, retryable=True, category="transport") from None
        except asyncio.CancelledError:
            self.charge("cancelled", None, None)
            raise
        status = resp.status_code
        if not resp.is_success:
            self.charge(str(status), 0, 0)  # providers do not bill refused requests
            message = _provider_message(resp, key)
            retryable, category = classify(status, message)
            raise LLMError(
                f"HTTP {status}: {message}" if message else f"HTTP {status}",
                retryable=retryable,
                category=category,
                http_status=status,
                retry_after_s=parse_retry_after(resp.headers.get("retry-after")),
            )
        try:
            content, calls, prompt_tokens, completion_tokens = parse_message(resp)
        except ValueError as exc:
            self.charge("malformed", None, None)
            message = f"malformed response: {_scrub(str(exc), key)[:300]}"
            raise LLMError(
                message, retryable=True, category="malformed", http_status=status
            ) from None
        cost = self.charge(str(status), prompt_tokens, completion_tokens)
        missing = prompt_tokens is None or completion_tokens is None
        return Reply(
            content=content,
            model=self.model,
            input_tokens=self.need.input_tokens if missing else prompt_tokens or 0,
            output_tokens=self.need.output_tokens if missing else completion_tokens or 0,
            cost_usd=cost,
            usage_missing=missing,
            tool_calls=calls,
        )


class _Call(_Exchange):
    """One HTTP exchange and the ledger entry that pays for it."""

    def __init__(
        self,
        gateway: Gateway,
        entry: int,
        scopes: list[Scope],
        need: Need,
        price: Any,
        model: str,
    ) -> None:
        super().__init__(need, price, model)
        self.gw, self.entry, self.scopes = gateway, entry, scopes

    def charge(self, status: str, input_tokens: int | None, output_tokens: int | None) -> float:
        """Commit actual usage (unknown usage at the reserved worst case) with the next
        group commit, waited for by nobody: the run's next durable write (its step, its
        outcome) comes after it in the same group or a later one; should it be lost
        with its group, the reservation is charged at its worst case at the next start."""
        used_in, used_out, missing = self.usage(input_tokens, output_tokens)
        cost = cost_usd(self.price, used_in, used_out)
        written = self.gw.write(
            partial(
                commit,
                self.gw.store,
                self.gw.clock.now(),
                self.entry,
                input_tokens=used_in,
                output_tokens=used_out,
                cost=cost,
                status=status,
                duration_s=round(time.monotonic() - self.started, 3),
                usage_missing=missing,
                scopes=self.scopes,
            )
        )
        written.add_done_callback(_charged)
        return cost


def _charged(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning(
            "ledger charge not recorded (charged at its worst case at the next start): %s",
            fut.exception(),
        )


class DirectLLM:
    """Chat completions for one task, straight to its provider: no budget, no ledger, no
    run. ``agentd runs replay`` asks the model with it (a replay is not a run: its calls
    are in no ledger and count against no budget). The provider, model, output cap and
    key are the task's, resolved as for a run (``Config.llm_target``); the key is read
    from its variable or file at each call and sent only in the Authorization header."""

    def __init__(self, config: Config, task: TaskConfig) -> None:
        target = config.llm_target(task)
        if target is None:
            raise ValueError(f"task {task.id!r} has no LLM provider")
        name, provider, self.model, self.max_tokens = target
        self.provider = config.providers.get(name, provider)
        self.name = name
        self._client: httpx.AsyncClient | None = None

    async def achat(
        self,
        *,
        messages: list[dict[str, Any]],
        max_tokens: int | None = None,
        temperature: float | None = None,
        read_timeout: float | None = None,
        tools: list[dict[str, Any]] | None = None,
        response_format: dict[str, Any] | None = None,
    ) -> Reply:
        """One call, unmetered; ``LLMError`` as ``RunLLM.achat`` raises it."""
        prov = self.provider
        if not self.model:
            message = "no model given and the provider has no default_model"
            raise LLMError(message, retryable=False, category="bad_request")
        key = api_key(prov)
        cap = max_tokens or self.max_tokens or prov.max_tokens
        estimate = _prompt_estimate(messages, tools, response_format)
        need = worst_case(prov.prices.get(self.model), estimate, cap)
        if self._client is None:
            await tls.prepare()
            self._client = new_client(prov)
        exchange = _Exchange(need, prov.prices.get(self.model), self.model)
        body = _body(self.model, messages, cap, temperature, tools, response_format)
        return await exchange.post(self._client, body, key, read_timeout)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

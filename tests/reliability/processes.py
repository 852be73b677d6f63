"""The processes the reliability suite runs: a redis-server with an append-only file, the mock
upstream and the gateways (uvicorn). Each is started by a fixture and stopped by it, by PID, even
when the test fails; each one's output goes to a log file that a failing test can show."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import redis

import llmfence

__all__ = ["AofRedis", "Process", "free_port", "uvicorn"]

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Process:
    """One child process, its output in `log`; `stop()` ends it by its PID.

    Args:
        argv: The command.
        log: Where its stdout and stderr go.
        env: More environment variables.
    """

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.log = log
        self.env = {**os.environ, **(env or {})}
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return self.popen.pid

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT
            )

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, signum: signal.Signals) -> None:
        """Send `signum` to this process (only while it runs)."""
        if self.running():
            os.kill(self.pid, signum)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (after a SIGCONT, in case it was stopped), then SIGKILL if it lingers."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGCONT)
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        self.popen = None

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.popen is not None:
            self.popen.kill()
            self.popen.wait(timeout=10)
            self.popen = None

    def tail(self, lines: int = 40) -> str:
        """The end of its log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def uvicorn(
    target: str, port: int, log: Path, env: dict[str, str] | None = None, *, factory: bool = False
) -> Process:
    """A uvicorn process serving `target` on 127.0.0.1:`port` (not started yet)."""
    argv = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "5"]
    if factory:
        argv.append("--factory")
    # The children import the llmfence the test process imported, and this repository's tests.
    path = os.pathsep.join([str(ROOT), str(Path(llmfence.__file__).resolve().parents[1])])
    return Process(argv, log, {"PYTHONPATH": path, **(env or {})})


def wait_until_serving(processes: Sequence[tuple[Process, str]], timeout: float = 60.0) -> None:
    """Wait until each process answers any HTTP request at its URL (its lifespan has started).

    Raises:
        RuntimeError: A process exited or did not answer in time (with its log's tail).
    """
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        for process, url in processes:
            while True:
                try:
                    client.get(url)
                    break
                except httpx.TransportError:
                    if not process.running() or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"{process.argv} did not serve {url}:\n{process.tail()}"
                        ) from None
                    time.sleep(0.1)


class AofRedis:
    """A redis-server of this suite's own on 127.0.0.1, with `appendonly yes` and
    `appendfsync always` in `directory`, so that a restart on the same port keeps every write
    it acknowledged. The suite stalls it (SIGSTOP/SIGCONT) and kills it (SIGKILL).

    Args:
        binary: The `redis-server` to run.
        directory: Its working directory (the append-only files).
    """

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        """Start it (again) on its port and directory, and wait until it answers a PING."""
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.directory)]
        self.process = Process(argv, self.directory / "redis.log")
        self.process.start()
        deadline = time.monotonic() + timeout
        with redis.Redis(port=self.port, socket_timeout=1.0) as client:
            while True:
                try:
                    client.ping()
                    return
                except redis.exceptions.BusyLoadingError:  # replaying the AOF
                    time.sleep(0.05)
                except redis.ConnectionError:
                    if not self.process.running() or time.monotonic() > deadline:
                        log = self.process.tail()
                        self.stop()
                        raise RuntimeError(f"redis-server did not start:\n{log}") from None
                    time.sleep(0.05)

    def stall(self) -> None:
        """SIGSTOP: the server holds every connection and answers nothing."""
        assert self.process is not None
        self.process.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: the server answers again, starting with what queued up."""
        assert self.process is not None
        self.process.signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: every connection drops; the AOF keeps what it acknowledged."""
        assert self.process is not None
        self.process.kill()

    def restart(self) -> None:
        """Stop it gracefully (SIGTERM) and start it again on the same port and directory."""
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

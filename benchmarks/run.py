"""Every comparison of issue 15 in one run: tables on stdout, JSON in `benchmarks/results/`.

Runs, each in a process of its own (its own event loop, servers and garbage collector) and in
this order:

1. `peers`: `bench_peers.py`, in-process ASGI: the bare app, llmfence on `MemoryStore`,
   `SQLiteStore` and `RedisStore`, slowapi and the naive middleware; a small chat, a 4k-token
   prompt first seen, a 20-turn history resent with one new message, a 200-chunk SSE stream.
2. `http`: `bench_http.py`, the same variants under uvicorn driven by wrk (or the Python
   generator): req/s, p50 and p99 at 1 and 32 connections, ratios to the bare app.
3. `gateway`: `bench_gateway.py`, `examples/fastapi_gateway.py` bare and with llmfence beside
   the LiteLLM proxy (`--litellm-python`), forwarding to one mock upstream.
4. `growth`: `bench_growth.py`, µs per request as the prompt grows and as the store holds more
   keys and end users.
5. `fairness`: `bench_fairness.py`, small requests' p99 while 50k-token prompts arrive.
6. `roundtrips`: `bench_roundtrips.py`, Redis commands per guarded request counted by the
   server (one node and a Cluster), beside a PING.

Every figure is a ratio measured within one of those runs (interleaved repeats, medians). Each
script writes its JSON; this one gathers them into `benchmarks/results/run-<UTC time>.json`
(and `latest.json`), with the machine, the commit and the command line. `--quick` passes on
to every script: a rough pass in a minute or two, no verdicts.

Run: `python benchmarks/run.py [--quick] [--only peers,http,…] [--litellm-python PATH]
[--results DIR]`; `nox -s bench [-- --quick]` makes the LiteLLM virtualenv and runs this.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PIECES = {
    "peers": "bench_peers.py",
    "http": "bench_http.py",
    "gateway": "bench_gateway.py",
    "growth": "bench_growth.py",
    "fairness": "bench_fairness.py",
    "roundtrips": "bench_roundtrips.py",
}
TIMEOUT = 3 * 3600  # seconds any one piece may take


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a rough pass, no verdicts")
    parser.add_argument(
        "--only", default=",".join(PIECES), help="comma-separated pieces: " + ",".join(PIECES)
    )
    parser.add_argument(
        "--litellm-python", metavar="PATH", default=None,
        help="the Python of a virtualenv with litellm[proxy], for the gateway's LiteLLM column",
    )  # fmt: skip
    parser.add_argument(
        "--results", metavar="DIR", default=str(HERE / "results"), help="where the JSON goes"
    )
    parser.add_argument(
        "--extra", action="append", default=[], metavar="PIECE:ARG",
        help="an argument for one piece, e.g. --extra http:--requests=20000 (repeatable)",
    )  # fmt: skip
    return parser.parse_args()


def main() -> None:
    args = options()
    pieces = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in pieces if p not in PIECES]
    if unknown:
        raise SystemExit(f"--only: unknown {unknown}; know {','.join(PIECES)}")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    started = time.perf_counter()
    gathered: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started": stamp,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs visible",
        "python": platform.python_version(),
        "quick": args.quick,
        "pieces": {},
        "failed": {},
    }
    for piece in pieces:
        path = results / f"{piece}-{stamp}.json"
        command = [sys.executable, str(HERE / PIECES[piece]), "--json", str(path)]
        if args.quick:
            command.append("--quick")
        if piece == "gateway" and args.litellm_python:
            command += ["--litellm-python", args.litellm_python]
        command += [e.split(":", 1)[1] for e in args.extra if e.startswith(piece + ":")]
        print(f"\n## {piece}: {' '.join(command[1:])}\n", flush=True)
        done = subprocess.run(command, timeout=TIMEOUT, check=False)
        if done.returncode != 0 or not path.exists():
            gathered["failed"][piece] = f"exit status {done.returncode}"
            print(f"{piece}: failed (exit status {done.returncode})", flush=True)
            continue
        gathered["pieces"][piece] = json.loads(path.read_text())
        path.unlink()
    gathered["seconds"] = time.perf_counter() - started
    text = json.dumps(gathered, indent=2) + "\n"
    out = results / f"run-{stamp}.json"
    out.write_text(text)
    (results / "latest.json").write_text(text)
    print(f"\nall results in {out} (and {results / 'latest.json'})")
    if gathered["pieces"].get("peers", {}).get("revision"):
        print(f"llmfence at {gathered['pieces']['peers']['revision']}")
    print(f"done in {gathered['seconds']:.1f} s")
    if gathered["failed"]:
        raise SystemExit(f"failed: {', '.join(gathered['failed'])}")


if __name__ == "__main__":
    main()

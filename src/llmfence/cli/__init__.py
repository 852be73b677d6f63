"""`llmfence`, the command line: keys, users, teams and spend, in a store or through a
running app's admin API.

```console
$ export LLMFENCE_STORE=sqlite:///var/lib/llmfence.db      # or redis://…, redis+cluster://…
$ llmfence keys create --alias ci --max-budget 10 --budget-duration 30d --rpm-limit 60
$ llmfence spend --by team --since 7d
$ LLMFENCE_URL=http://localhost:8000 LLMFENCE_MASTER_KEY=sk-… llmfence keys list
```

With `--store` the commands run `Fence`'s operations on the store itself (no app needed);
with `--url` and `--master-key` they call the app's admin API (`fence.install(app,
admin=True)`), with httpx. Both print the same fields.

Why argparse and not typer: the grammar is five groups of a few subcommands with flat
options, which argparse states in one module with no dependency; typer would add typer,
click and (for its help) rich to every install of a middleware library, and its
annotations-as-grammar buys nothing a table of options does not. Plain aligned text for
tables, for the same reason (`_output`).

Exit status: 0 done, 1 the operation failed (not found, refused, unreachable), 2 the
command line is wrong (or names no store and no URL). Errors are one line on stderr, never
a traceback and never a key.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from ._ops import Backend, OperationError
from ._parser import UsageError, build_parser

__all__ = ["main"]

# Anything shaped like an API key or a key hash, kept out of error lines.
_SECRET = re.compile(r"sk-[A-Za-z0-9_\-]{6,}|\b[0-9a-fA-F]{64}\b")


def _fail(message: str, status: int) -> int:
    sys.stderr.write(f"llmfence: error: {_SECRET.sub('<redacted>', message)}\n")
    return status


def _backend(args: argparse.Namespace) -> Backend:
    store = args.store or os.environ.get("LLMFENCE_STORE")
    url = args.url or os.environ.get("LLMFENCE_URL")
    if args.store and args.url:
        raise UsageError("give --store or --url, not both")
    if args.url or (url and not args.store):
        assert url is not None
        key = args.master_key or os.environ.get("LLMFENCE_MASTER_KEY")
        if not key:
            raise UsageError("--url needs the master key: --master-key or LLMFENCE_MASTER_KEY")
        from ._http import HttpBackend

        return HttpBackend(url, key)
    if store:
        from llmfence.stores import store_from_url

        from ._store import StoreBackend

        try:
            return StoreBackend(store_from_url(store))
        except ImportError as error:
            raise OperationError(
                f"this store needs {error.name or 'a package'}: pip install 'llmfence[redis]'"
            ) from error
        except ValueError as error:  # ConfigurationError: an unknown scheme, no path
            raise UsageError(str(error)) from error
    raise UsageError(
        "name a store (--store sqlite:///file.db, or LLMFENCE_STORE) or a running app "
        "(--url http://host:port with --master-key, or LLMFENCE_URL and LLMFENCE_MASTER_KEY)"
    )


async def _main(args: argparse.Namespace) -> None:
    from ._commands import run

    backend = _backend(args)
    try:
        await run(args, backend)
    finally:
        await backend.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line (default `sys.argv[1:]`); returns the exit status.

    Args:
        argv: The arguments after the program's name.
    """
    try:
        args = build_parser().parse_args(argv)
        import anyio

        anyio.run(_main, args)
    except UsageError as error:
        return _fail(str(error), 2)
    except OperationError as error:
        return _fail(str(error), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except SystemExit as exit_:  # --help, --version
        return exit_.code if isinstance(exit_.code, int) else 0
    except Exception as error:  # a store down, a bug: still one line, still no traceback
        from llmfence.exceptions import LLMFenceError

        if isinstance(error, LLMFenceError):
            return _fail(error.message, 1)
        return _fail(f"{type(error).__name__}: {error}", 1)
    return 0

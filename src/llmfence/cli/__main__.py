"""`python -m llmfence.cli`: the `llmfence` command."""

from llmfence.cli import main

raise SystemExit(main())

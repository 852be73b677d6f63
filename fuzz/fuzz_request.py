"""A bounded atheris run over what clients control: the request body parser (with every later
stage that works on what it accepts), the SSE usage scanner and the path classifier.

`nox -s fuzz` runs it (coverage-guided, libFuzzer under atheris); by hand:
`python fuzz/fuzz_request.py -atheris_runs=200000`. A finding is any exception other than
llmfence's own refusal (`InvalidRequestError` and the other `LLMFenceError`s, which the
middlewares render as 4xx): libFuzzer stops, prints the input and writes it to `crash-*`.
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports(include=["llmfence"]):
    from llmfence._request import amend, parse_request
    from llmfence._tokens import TokenCounter
    from llmfence._usage import StreamUsageScanner
    from llmfence.exceptions import LLMFenceError
    from llmfence.middleware._paths import PathRules

PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/openai/deployments/gpt-4o/chat/completions",
)
# Bodies a client would send: the fuzzer splices its bytes into them, so most inputs get past
# the JSON decoder and reach the field checks behind it.
TEMPLATES = (
    b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"user":"u1","max_tokens":9}',
    b'{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"a"}]}],'
    b'"stream":true,"n":2,"tools":[{"type":"function","function":{"name":"f"}}]}',
    b'{"model":"gpt-3.5-turbo-instruct","prompt":["a","b"],"max_tokens":5}',
    b'{"model":"text-embedding-3-small","input":[[1,2,3],"x"]}',
    b'{"model":"gpt-4o","input":[{"role":"user","content":"x"}],"max_output_tokens":4}',
    b'{"model":"claude-3-5-sonnet-latest","system":"s","max_tokens":8,'
    b'"messages":[{"role":"user","content":"x"}],"metadata":{"user_id":"e"}}',
)
STREAM = (
    b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    b'data: {"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
    b"data: [DONE]\n\n"
)
COUNTER = TokenCounter()
RULES = PathRules()


def one_input(data: bytes) -> None:
    """Feed one input to each stage; only llmfence's own refusals may come out."""
    fdp = atheris.FuzzedDataProvider(data)
    path = PATHS[fdp.ConsumeIntInRange(0, len(PATHS) - 1)]
    template = TEMPLATES[fdp.ConsumeIntInRange(0, len(TEMPLATES) - 1)]
    at = fdp.ConsumeIntInRange(0, len(template))
    cut = fdp.ConsumeIntInRange(0, 64)
    body = template[:at] + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 1024)) + template[at + cut :]
    try:
        request = parse_request(body, path)
    except LLMFenceError:
        pass
    else:
        COUNTER.count(request)
        _, amended = amend(request, max_tokens=5, stream_options={"include_usage": True})
        assert parse_request(amended, path).model == request.model
        request.model.encode()
        if request.end_user is not None:
            request.end_user.encode()
    scanner = StreamUsageScanner()
    at = fdp.ConsumeIntInRange(0, len(STREAM))
    stream = STREAM[:at] + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 1024)) + STREAM[at:]
    cut = fdp.ConsumeIntInRange(0, len(stream))
    scanner.feed(stream[:cut])
    scanner.feed(stream[cut:])
    scanner.finish()
    raw = fdp.ConsumeBytes(256)
    with contextlib.suppress(LLMFenceError):
        RULES.classify(raw.decode("latin-1"), raw)


def main() -> None:
    """Run libFuzzer over `one_input` with the command line's options."""
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

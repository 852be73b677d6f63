"""One path truth: llmfence meters the path an HTTP router or client would reach, and refuses
(400) a path whose readings disagree on a metered route rather than guess; the endpoint comes
from the path, and a body that names another API's prompt field is refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmfence._request import parse_request
from llmfence.exceptions import InvalidRequestError

CHAT_MESSAGES = [{"role": "user", "content": "hi"}]


# -- the endpoint comes from the path --------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"prompt": "x"}, "prompt"),
        ("/v1/chat/completions", {"messages": CHAT_MESSAGES, "prompt": "x"}, "prompt"),
        ("/v1/chat/completions", {"messages": CHAT_MESSAGES, "input": "x"}, "input"),
        ("/v1/completions", {"prompt": "x", "messages": CHAT_MESSAGES}, "messages"),
        ("/v1/embeddings", {"input": "x", "prompt": "y"}, "prompt"),
        ("/v1/messages", {"messages": CHAT_MESSAGES, "prompt": "x"}, "prompt"),
        ("/v1/responses", {"input": "x", "messages": CHAT_MESSAGES}, "messages"),
        # A custom metered path: the body decides, and must decide one way.
        ("/summarize", {"messages": CHAT_MESSAGES, "prompt": "x"}, "prompt"),
    ],
)
def test_a_body_that_contradicts_the_path_is_refused(
    path: str, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_request(json.dumps({"model": "gpt-4o", **body}).encode(), path)
    assert caught.value.status_code == 400
    assert caught.value.param == param


def test_fields_of_the_paths_own_api_and_nulls_still_parse() -> None:
    chat = {"model": "gpt-4o", "messages": CHAT_MESSAGES, "prompt": None}
    assert parse_request(json.dumps(chat).encode(), "/v1/chat/completions").endpoint == "chat"
    # The Responses API has a `prompt` of its own (a stored prompt's reference).
    responses = {"model": "gpt-4o", "input": "x", "prompt": {"id": "pmpt_1"}}
    assert parse_request(json.dumps(responses).encode(), "/v1/responses").endpoint == "responses"

"""``/v1/chat/completions`` as a transparent relay to an OpenAI-compatible upstream (SPEC §7).

The official ``openai`` SDK (and, where the bytes matter, a raw httpx client) talks to an
in-process sseserver with ``--provider openai``, once per ``--openai-client``; behind it,
the fake upstream of ``tests.upstreams.openai_wire`` answers as the real API does (tool
calls, JSON mode, ``n``, logprobs) and keeps both every request body it received and every
byte it wrote. So each test checks both ends: the upstream got exactly the fields the
client sent (only sseserver's own fields and a ``openai/`` model prefix taken out), and
the client got exactly what the upstream wrote.

Everything shares one event loop per module (servers are module-scoped); all on loopback.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from sseserver.config import UPSTREAM_CLIENTS
from tests.support.servers import running_server
from tests.support.sse_parser import parse
from tests.upstreams import RequestRecord, expected_text
from tests.upstreams.openai_wire import OpenAIWire, SentAnswer, error_body

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

MODEL = "gpt-4o-mini"
# A 1x1 PNG, as clients send images: a data URL in an ``image_url`` content part.
PNG_DATA_URL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8"
    "z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def _function(name: str, properties: dict[str, Any]) -> dict[str, Any]:
    """A strict function tool (the SDK's stream helper accumulates strict tools only)."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} of a place",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": list(properties),
                "additionalProperties": False,
            },
        },
    }


TOOLS: list[Any] = [
    _function("get_time", {"zone": {"type": "string"}}),
    _function(
        "get_weather",
        {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "kelvin"]}},
    ),
]
# Names the second tool: the fake calls the first one unless tool_choice says otherwise.
TOOL_CHOICE: Any = {"type": "function", "function": {"name": "get_weather"}}
QUESTION: list[Any] = [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "What is the weather in Paris?"},
]
TOOL_RESULT = '{"temperature": 18, "sky": "clear"}'


@dataclass
class Env:
    up: OpenAIWire
    port: int
    client: AsyncOpenAI
    http: httpx.AsyncClient
    openai_client: str

    def one_request(self, since: int) -> RequestRecord:
        """The one request the upstream received since it had ``since``."""
        new = self.up.requests[since:]
        assert len(new) == 1, [r.target for r in new]
        assert self.up.errors == []
        return new[0]

    async def finished(self, req: RequestRecord) -> SentAnswer:
        """The upstream's whole answer to ``req`` (its handler has returned)."""
        sent = self.up.answer_to(req)
        done = await self.up.wait_until(lambda: not self._answering(req), within=5)
        assert done, "the upstream is still answering"
        return sent

    def _answering(self, req: RequestRecord) -> bool:
        sent = self.up.answer_to(req)
        if sent.status != 200 or req.json().get("stream") is not True:
            return sent.status is None
        return not sent.body.endswith(b"data: [DONE]\n\n")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def upstream() -> AsyncIterator[OpenAIWire]:
    up = OpenAIWire()
    await up.start()
    try:
        yield up
    finally:
        await up.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=UPSTREAM_CLIENTS["openai"])
async def env(request: pytest.FixtureRequest, upstream: OpenAIWire) -> AsyncIterator[Env]:
    async with running_server(
        provider="openai",
        openai_base_url=upstream.base_url,
        openai_client=request.param,
        upstream_timeout_s=5.0,
    ) as server:
        base = f"http://127.0.0.1:{server.port}"
        client = AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            try:
                yield Env(upstream, server.port, client, http, str(request.param))
            finally:
                await client.close()


def _sent_without_model(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "model"}


# -- 1. tools --------------------------------------------------------------------------


async def test_tool_call_round_trip_streamed(env: Env) -> None:
    """The SDK's stream helper accumulates the streamed call; the tool's result goes back
    and the answer quotes it. The upstream got tools, tool_choice, parallel_tool_calls and
    the assistant + tool messages exactly as sent."""
    since = len(env.up.requests)
    async with env.client.chat.completions.stream(
        model=MODEL,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice=TOOL_CHOICE,
        parallel_tool_calls=False,
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_completion()
    got = env.one_request(since).json()
    assert got["tools"] == TOOLS
    assert got["tool_choice"] == TOOL_CHOICE
    assert got["parallel_tool_calls"] is False
    assert got["messages"] == QUESTION
    assert got["stream"] is True

    assert kinds.count("tool_calls.function.arguments.delta") > 1  # streamed in pieces
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    call = calls[0]
    assert call.id == "call_fake1"
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert call.function.parsed_arguments == {"city": "Paris", "unit": "celsius"}

    follow_up: list[Any] = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT},
    ]
    since = len(env.up.requests)
    answer = await env.client.chat.completions.create(
        model=MODEL, messages=follow_up, tools=TOOLS, stream=True
    )
    chunks = [chunk async for chunk in answer]
    got = env.one_request(since).json()
    assert got["messages"] == follow_up
    assert got["tools"] == TOOLS
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"The tool said: {TOOL_RESULT}"
    assert chunks[-1].choices[0].finish_reason == "stop"


# -- 2. content parts and roles ----------------------------------------------------------


async def test_image_part_and_developer_role_reach_the_upstream_unchanged(env: Env) -> None:
    messages: list[Any] = [
        {"role": "developer", "content": "Describe pictures in five words."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": PNG_DATA_URL, "detail": "low"}},
            ],
        },
    ]
    since = len(env.up.requests)
    stream = await env.client.chat.completions.create(model=MODEL, messages=messages, stream=True)
    chunks = [chunk async for chunk in stream]
    got = env.one_request(since).json()
    assert got["messages"] == messages
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_text(5)


# -- 3. JSON output ----------------------------------------------------------------------

JSON_SCHEMA: Any = {
    "type": "json_schema",
    "json_schema": {
        "name": "reply",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"reply": {"type": "string"}, "words": {"type": "integer"}},
            "required": ["reply", "words"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "json_object"}, {"answer": expected_text(5)}),
        (JSON_SCHEMA, {"reply": expected_text(5), "words": 1}),
    ],
    ids=["json_object", "json_schema"],
)
async def test_json_mode_text_parses_as_json(
    env: Env, response_format: Any, expected: dict[str, Any]
) -> None:
    messages: list[Any] = [{"role": "user", "content": "Answer in JSON."}]
    since = len(env.up.requests)
    stream = await env.client.chat.completions.create(
        model=MODEL, messages=messages, response_format=response_format, stream=True
    )
    pieces = [c.choices[0].delta.content async for c in stream if c.choices]
    got = env.one_request(since).json()
    assert got["response_format"] == response_format
    assert len([p for p in pieces if p]) > 2  # streamed in pieces, not one
    assert json.loads("".join(p or "" for p in pieces)) == expected


# -- 4. n --------------------------------------------------------------------------------


async def test_n_choices_streamed_interleaved_and_whole(env: Env) -> None:
    messages: list[Any] = [{"role": "user", "content": "Two answers please."}]
    since = len(env.up.requests)
    stream = await env.client.chat.completions.create(
        model=MODEL, messages=messages, n=2, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert env.one_request(since).json()["n"] == 2
    texts: dict[int, str] = {}
    finishes: dict[int, str | None] = {}
    order = []
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                finishes[choice.index] = choice.finish_reason
            if choice.delta.content:
                order.append(choice.index)
    assert texts == {0: expected_text(5), 1: expected_text(5)}
    assert finishes == {0: "stop", 1: "stop"}
    assert order == [0, 1] * 5  # interleaved, as the upstream sent them

    whole = await env.client.chat.completions.create(model=MODEL, messages=messages, n=2)
    assert [c.index for c in whole.choices] == [0, 1]
    assert [c.message.content for c in whole.choices] == [expected_text(5)] * 2


# -- 5. logprobs -------------------------------------------------------------------------


async def test_logprobs_reach_the_client(env: Env) -> None:
    messages: list[Any] = [{"role": "user", "content": "How sure are you?"}]
    since = len(env.up.requests)
    stream = await env.client.chat.completions.create(
        model=MODEL, messages=messages, logprobs=True, top_logprobs=2, stream=True
    )
    chunks = [chunk async for chunk in stream]
    got = env.one_request(since).json()
    assert got["logprobs"] is True
    assert got["top_logprobs"] == 2
    content = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 5
    for i, choice in enumerate(content):
        assert choice.logprobs is not None and choice.logprobs.content is not None
        [entry] = choice.logprobs.content
        assert entry.token == choice.delta.content == f"tok{i} "
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob < 0
        assert [t.token for t in entry.top_logprobs] == [entry.token, "alt1"]


# -- 6. every other field ----------------------------------------------------------------

OTHER_FIELDS: dict[str, Any] = {
    "stop": ["\n\nEND", "STOP"],
    "top_p": 0.9,
    "seed": 1234,
    "user": "user-42",
    "temperature": 0.3,
    "max_tokens": 64,
    "frequency_penalty": 0.5,
    "presence_penalty": -0.25,
    "metadata": {"trace": "relay-test", "team": "sse"},
    "store": False,
    "logit_bias": {"50256": -100},
    "stream_options": {"include_usage": True},
}


@pytest.mark.parametrize(
    ("model", "extra"),
    [("openai/" + MODEL, {}), (MODEL, {"provider": "openai"})],
    ids=["model-prefix", "provider-field"],
)
async def test_every_field_reaches_the_upstream(env: Env, model: str, extra: Any) -> None:
    """The upstream's body is what the SDK sent, field for field: only the ``openai/``
    prefix and sseserver's own ``provider`` field are gone. An unknown vendor field
    passes too. The client gets the usage chunk ``include_usage`` asks for."""
    messages: list[Any] = [{"role": "user", "content": "Tell me everything."}]
    vendor = {"vendor_option": {"nested": [1, "two", None]}}
    since = len(env.up.requests)
    stream = await env.client.chat.completions.create(
        model=model,
        messages=messages,
        stream=True,
        extra_body={**extra, **vendor},
        **OTHER_FIELDS,
    )
    chunks = [chunk async for chunk in stream]
    got = env.one_request(since).json()
    assert got == {
        "model": MODEL,
        "messages": messages,
        "stream": True,
        **OTHER_FIELDS,
        **vendor,
    }
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        expected_text(5)
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5
    assert all(c.usage is None for c in chunks[:-1])


# -- 7. byte for byte ----------------------------------------------------------------------

BYTE_CASES: dict[str, dict[str, Any]] = {
    "text": {"messages": [{"role": "user", "content": "Plain text [fake tokens=7]"}]},
    "tool-call-n2": {"messages": QUESTION, "tools": TOOLS, "n": 2},
    "tool-result-unicode": {
        "messages": [
            {"role": "user", "content": "Grüße?"},
            {"role": "tool", "tool_call_id": "call_x", "content": "Grüße ☕ «ok»"},
        ]
    },
    "logprobs-json-usage": {
        "messages": [{"role": "user", "content": "json"}],
        "logprobs": True,
        "top_logprobs": 3,
        "response_format": {"type": "json_object"},
        "stream_options": {"include_usage": True},
    },
}


@pytest.mark.parametrize("case", list(BYTE_CASES))
async def test_stream_passes_byte_for_byte(env: Env, case: str) -> None:
    """What a raw client reads is the stream's opening comment, then exactly the bytes
    the upstream wrote; the ``data`` of the events is the same list, in order."""
    body = {"model": MODEL, "stream": True, **BYTE_CASES[case]}
    since = len(env.up.requests)
    async with env.http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = b"".join([piece async for piece in resp.aiter_raw()])
    req = env.one_request(since)
    assert req.json() == body
    sent = await env.finished(req)
    assert sent.data()[-1] == "[DONE]"
    assert [e.data for e in parse(raw)] == sent.data()
    assert raw.endswith(sent.body)
    prefix = raw[: len(raw) - len(sent.body)]
    assert all(line.startswith(b":") for line in prefix.split(b"\n") if line), prefix


# -- 8. whole answers ---------------------------------------------------------------------


async def test_whole_answer_is_the_upstreams_object(env: Env) -> None:
    """Not streamed: the JSON the client gets is the upstream's, byte for byte (its id,
    system_fingerprint, tool_calls, usage), and the SDK reads it as such."""
    since = len(env.up.requests)
    raw = await env.client.chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=TOOL_CHOICE, n=2
    )
    req = env.one_request(since)
    sent = await env.finished(req)
    assert raw.status_code == 200
    assert raw.http_response.content == sent.body
    upstream_obj = json.loads(sent.body)
    completion = raw.parse()
    assert completion.model_dump(mode="json", exclude_unset=True) == upstream_obj
    assert completion.id == upstream_obj["id"]
    assert completion.id.startswith("chatcmpl-fake")
    assert completion.system_fingerprint == "fp_fake"
    assert [c.finish_reason for c in completion.choices] == ["tool_calls", "tool_calls"]
    for index, choice in enumerate(completion.choices):
        [call] = choice.message.tool_calls or []
        assert call.id == f"call_fake{index + 1}"
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        assert json.loads(call.function.arguments) == {  # type: ignore[union-attr]
            "city": "Paris",
            "unit": "celsius",
        }
    assert req.json() == {
        "model": MODEL,
        "messages": QUESTION,
        "tools": TOOLS,
        "tool_choice": TOOL_CHOICE,
        "n": 2,
    }


# -- 9. refusals ------------------------------------------------------------------------

REFUSED: dict[str, list[Any]] = {
    # the fake's directive: a 400 with the API's generic error
    "directive": [{"role": "user", "content": "no [fake fail=400]"}],
    # what the API itself refuses: a role it does not have (sseserver does not check)
    "bad-role": [{"role": "robot", "content": "beep"}],
}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("why", list(REFUSED))
async def test_upstream_400_comes_back_as_is(env: Env, why: str, stream: bool) -> None:
    """The upstream's 400 reaches the client with its status and its JSON body, byte for
    byte; the SDK raises ``BadRequestError`` carrying the upstream's error."""
    messages = REFUSED[why]
    since = len(env.up.requests)
    with pytest.raises(openai.BadRequestError) as caught:
        await env.client.chat.completions.create(model=MODEL, messages=messages, stream=stream)
    req = env.one_request(since)
    sent = await env.finished(req)
    assert sent.status == 400
    upstream_error = json.loads(sent.body)["error"]
    assert caught.value.status_code == 400
    assert caught.value.body == upstream_error
    assert caught.value.message.endswith(upstream_error["message"])
    if why == "directive":
        assert upstream_error == error_body(400)["error"]
    else:
        assert upstream_error["param"] == "messages[0].role"

    since = len(env.up.requests)
    body = {"model": MODEL, "messages": messages, "stream": stream}
    resp = await env.http.post("/v1/chat/completions", json=body)
    sent = await env.finished(env.one_request(since))
    assert resp.status_code == 400
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.content == sent.body


async def test_upstream_401_is_not_passed_on(env: Env) -> None:
    """The upstream refusing sseserver's own key is not the caller's fault: a 502 of
    sseserver's, not the upstream's 401 (which would tell the SDK its key is wrong)."""
    since = len(env.up.requests)
    with pytest.raises(openai.APIStatusError) as caught:
        await env.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "[fake fail=401]"}], stream=True
        )
    assert env.one_request(since).json()["stream"] is True
    assert caught.value.status_code == 502
    assert not isinstance(caught.value, openai.AuthenticationError)

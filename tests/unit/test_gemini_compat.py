"""OpenAI chat requests to the Gemini API and Gemini answers back (``/v1/chat/completions``
with Gemini behind it): text, images, tools and tool calls, JSON output, sampling."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sseserver.providers.base import BadRequest
from sseserver.providers.gemini_compat import ChunkTranslator, to_completion, to_gemini

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_a_tool_round_trip_in_gemini_terms() -> None:
    body: dict[str, Any] = {
        "messages": [
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
        ],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 50,
        "stop": "END",
        "seed": 7,
    }
    out = to_gemini(body)
    assert out["systemInstruction"] == {"parts": [{"text": "Answer briefly."}], "role": "user"}
    assert out["contents"] == [
        {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
        {
            "role": "model",
            "parts": [{"functionCall": {"name": "weather", "args": {"city": "Paris"}}}],
        },
        {
            "role": "user",
            "parts": [{"functionResponse": {"name": "weather", "response": {"temp_c": 21}}}],
        },
    ]
    assert out["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "weather",
                    "description": "Weather in a city",
                    "parametersJsonSchema": WEATHER["function"]["parameters"],
                }
            ]
        }
    ]
    assert out["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["weather"]}
    }
    assert out["generationConfig"] == {
        "temperature": 0.2,
        "topP": 0.9,
        "seed": 7,
        "maxOutputTokens": 50,
        "stopSequences": ["END"],
    }


def test_images_and_json_output() -> None:
    out = to_gemini(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                    ],
                }
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object"}},
            },
            "n": 2,
        }
    )
    assert out["contents"][0]["parts"] == [
        {"text": "What is this?"},
        {"inlineData": {"mimeType": "image/png", "data": "iVBO"}},
    ]
    assert out["generationConfig"] == {
        "candidateCount": 2,
        "responseMimeType": "application/json",
        "responseJsonSchema": {"type": "object"},
    }


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]},
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
                }
            ]
        },
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "retrieval"}]},
        {"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"},
    ],
)
def test_what_gemini_cannot_honour_is_refused(body: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        to_gemini(body)


def gemini_chunk(
    parts: list[dict[str, Any]], finish: str | None = None, **meta: int
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    chunk: dict[str, Any] = {"candidates": [candidate]}
    if meta:
        chunk["usageMetadata"] = meta
    return chunk


def test_stream_chunks_translate_to_openai_chunks() -> None:
    t = ChunkTranslator("gemini-2.5-flash", include_usage=True)
    out = t.feed(gemini_chunk([{"text": "Hel"}]))
    out += t.feed(gemini_chunk([{"text": "thinking", "thought": True}, {"text": "lo"}]))
    out += t.feed(
        gemini_chunk(
            [{"functionCall": {"name": "weather", "args": {"city": "Paris"}}}],
            "STOP",
            promptTokenCount=4,
            candidatesTokenCount=3,
            totalTokenCount=7,
        )
    )
    out += t.end()
    deltas = [c["choices"][0]["delta"] for c in out if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content") or "" for d in deltas) == "Hello"
    (call,) = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert call["function"] == {"name": "weather", "arguments": json.dumps({"city": "Paris"})}
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call_")
    assert out[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert out[-1]["choices"] == []
    assert out[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert {c["object"] for c in out} == {"chat.completion.chunk"}
    assert len({c["id"] for c in out}) == 1


def test_a_whole_answer_translates_to_a_completion() -> None:
    answer = gemini_chunk(
        [{"text": "Hi"}],
        "MAX_TOKENS",
        promptTokenCount=1,
        candidatesTokenCount=1,
        totalTokenCount=2,
    )
    completion = to_completion(answer, "gemini-2.5-flash")
    assert completion["object"] == "chat.completion"
    assert completion["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "length"}
    ]
    assert completion["usage"] == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}

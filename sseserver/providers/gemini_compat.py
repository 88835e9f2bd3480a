"""OpenAI's Chat Completions format to the Gemini API and back, for ``/v1/chat/completions``
with Gemini behind it (SPEC §7): text, image parts, tools and tool calls, JSON output, and
the sampling fields Gemini has. Pure functions on JSON-shaped values: no I/O, no SDK.

What Gemini cannot express is refused with ``BadRequest`` naming the field, never dropped
silently: a remote image URL (Gemini takes inline data or its own file URIs), ``n`` with
tools, a tool result for a call the conversation never made.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from typing import Any

from ..wire import ids
from .base import BadRequest
from .gemini_wire import FINISH_REASONS

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)", re.S)
_TOOL_CHOICE = {"auto": "AUTO", "none": "NONE", "required": "ANY"}


def to_gemini(body: Mapping[str, Any]) -> dict[str, Any]:
    """The ``generateContent`` body for an OpenAI chat request.

    Raises:
        BadRequest: a field Gemini cannot honour.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for tool results
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_parts(message.get("content"), f"messages[{i}]"))
        elif role == "user":
            contents.append(
                {"role": "user", "parts": _parts(message.get("content"), f"messages[{i}]")}
            )
        elif role == "assistant":
            parts = _parts(message.get("content"), f"messages[{i}]", optional=True)
            for call in message.get("tool_calls") or []:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise BadRequest(f"messages[{i}].tool_calls: each needs a function name")
                call_names[str(call.get("id"))] = function["name"]
                parts.append({"functionCall": {"name": function["name"], "args": _args(function)}})
            contents.append({"role": "model", "parts": parts or [{"text": ""}]})
        elif role == "tool":
            name = call_names.get(str(message.get("tool_call_id")))
            if name is None:
                raise BadRequest(f"messages[{i}]: a tool result for an unknown tool_call_id")
            content = message.get("content")
            text = (
                "".join(p.get("text", "") for p in content if isinstance(p, dict))
                if isinstance(content, list)
                else content
            )
            response = _json_or_text(text)
            part = {"functionResponse": {"name": name, "response": response}}
            if (
                contents
                and contents[-1]["role"] == "user"
                and "functionResponse" in contents[-1]["parts"][0]
            ):
                contents[-1]["parts"].append(part)  # parallel calls answered together
            else:
                contents.append({"role": "user", "parts": [part]})
        else:
            raise BadRequest(f"messages[{i}].role {role!r} has no Gemini equivalent")
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system, "role": "user"}
    config = _generation_config(body)
    tools = body.get("tools")
    if tools:
        out["tools"] = [{"functionDeclarations": [_declaration(t, i) for i, t in enumerate(tools)]}]
        if config.get("candidateCount", 1) > 1:
            raise BadRequest("n > 1 with tools is not supported by Gemini")
    choice = body.get("tool_choice")
    if choice is not None:
        out["toolConfig"] = {"functionCallingConfig": _calling_config(choice)}
    out["generationConfig"] = config
    return out


def _parts(content: Any, where: str, *, optional: bool = False) -> list[dict[str, Any]]:
    if content is None and optional:
        return []
    if isinstance(content, str):
        return [{"text": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or a list of parts")
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            match = _DATA_URL.fullmatch(url) if isinstance(url, str) else None
            if match is None:
                raise BadRequest(f"{where}: Gemini takes images as data: URLs (base64)")
            parts.append({"inlineData": {"mimeType": match["mime"], "data": match["data"]}})
        else:
            raise BadRequest(f"{where}: content part {kind!r} has no Gemini equivalent")
    return parts


def _args(function: Mapping[str, Any]) -> Any:
    arguments = function.get("arguments") or "{}"
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        raise BadRequest("tool_calls: arguments must be JSON") from None


def _json_or_text(text: Any) -> dict[str, Any]:
    """A tool result as Gemini's ``response`` object (it must be an object)."""
    if isinstance(text, str):
        try:
            value = json.loads(text)
        except ValueError:
            return {"content": text}
        return value if isinstance(value, dict) else {"content": value}
    return {"content": text}


def _declaration(tool: Any, i: int) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) else None
    if (
        not isinstance(tool, dict)
        or tool.get("type") != "function"
        or not isinstance(function, dict)
    ):
        raise BadRequest(f"tools[{i}] must be a function tool")
    if not isinstance(function.get("name"), str):
        raise BadRequest(f"tools[{i}].function.name must be a string")
    out: dict[str, Any] = {"name": function["name"]}
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    if isinstance(function.get("parameters"), dict):
        out["parametersJsonSchema"] = function["parameters"]
    return out


def _calling_config(choice: Any) -> dict[str, Any]:
    if isinstance(choice, str) and choice in _TOOL_CHOICE:
        return {"mode": _TOOL_CHOICE[choice]}
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return {"mode": "ANY", "allowedFunctionNames": [function["name"]]}
    raise BadRequest("tool_choice must be auto, none, required or a function")


def _generation_config(body: Mapping[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ):
        if body.get(ours) is not None:
            config[theirs] = body[ours]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit is not None:
        config["maxOutputTokens"] = limit
    stop = body.get("stop")
    if stop is not None:
        config["stopSequences"] = [stop] if isinstance(stop, str) else stop
    n = body.get("n")
    if n is not None and n != 1:
        config["candidateCount"] = n
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        schema = (fmt.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict):
            config["responseJsonSchema"] = schema
    return config


class ChunkTranslator:
    """Gemini stream chunks as OpenAI ``chat.completion.chunk`` objects, one answer's worth:
    the role first, text as content deltas, function calls as whole tool calls, the
    finish reason (``tool_calls`` when the model called one), usage at the end when asked
    (``stream_options.include_usage``)."""

    def __init__(self, model: str, *, include_usage: bool) -> None:
        self.id = "chatcmpl-" + ids.token_hex(12)
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self._started: set[int] = set()
        self._calls: dict[int, int] = {}  # choice -> tool calls so far
        self._finish: dict[int, str] = {}
        self.usage: dict[str, int] | None = None

    def feed(self, chunk: Mapping[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for candidate in chunk.get("candidates") or []:
            index = int(candidate.get("index") or 0)
            if index not in self._started:
                self._started.add(index)
                out.append(self._chunk(index, {"role": "assistant", "content": ""}))
            for part in (candidate.get("content") or {}).get("parts") or []:
                if part.get("thought"):
                    continue
                if isinstance(part.get("text"), str) and part["text"]:
                    out.append(self._chunk(index, {"content": part["text"]}))
                call = part.get("functionCall")
                if isinstance(call, dict):
                    n = self._calls.get(index, 0)
                    self._calls[index] = n + 1
                    tool_call = {
                        "index": n,
                        "id": "call_" + ids.token_hex(12),
                        "type": "function",
                        "function": {
                            "name": call.get("name", ""),
                            "arguments": json.dumps(call.get("args") or {}, ensure_ascii=False),
                        },
                    }
                    out.append(self._chunk(index, {"tool_calls": [tool_call]}))
            reason = candidate.get("finishReason")
            if reason is not None:
                name = str(reason)
                self._finish[index] = FINISH_REASONS.get(name, name.lower())
        meta = chunk.get("usageMetadata")
        if isinstance(meta, dict):
            self.usage = usage_of(meta)
        return out

    def end(self) -> list[dict[str, Any]]:
        out = []
        for index in sorted(self._started):
            finish = "tool_calls" if self._calls.get(index) else self._finish.get(index, "stop")
            out.append(self._chunk(index, {}, finish))
        if self.include_usage:
            last = self._base()
            last["choices"] = []
            last["usage"] = self.usage or {
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": 0,
            }
            out.append(last)
        return out

    def _base(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }

    def _chunk(
        self, index: int, delta: dict[str, Any], finish: str | None = None
    ) -> dict[str, Any]:
        chunk = self._base()
        chunk["choices"] = [{"index": index, "delta": delta, "finish_reason": finish}]
        return chunk


def usage_of(meta: Mapping[str, Any]) -> dict[str, int]:
    completion = int(meta.get("candidatesTokenCount") or 0) + int(
        meta.get("thoughtsTokenCount") or 0
    )
    prompt = int(meta.get("promptTokenCount") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": int(meta.get("totalTokenCount") or prompt + completion),
    }


def to_completion(answer: Mapping[str, Any], model: str) -> dict[str, Any]:
    """A whole ``generateContent`` answer as an OpenAI ``chat.completion``."""
    chunks = ChunkTranslator(model, include_usage=False)
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks.feed(answer) + chunks.end():
        for choice in chunk["choices"]:
            message = choices.setdefault(
                choice["index"],
                {"index": choice["index"], "message": {"role": "assistant", "content": None}},
            )
            delta = choice["delta"]
            if delta.get("content"):
                message["message"]["content"] = (message["message"]["content"] or "") + delta[
                    "content"
                ]
            if delta.get("tool_calls"):
                calls = message["message"].setdefault("tool_calls", [])
                calls.extend(
                    {k: v for k, v in c.items() if k != "index"} for c in delta["tool_calls"]
                )
            if choice["finish_reason"] is not None:
                message["finish_reason"] = choice["finish_reason"]
    return {
        "id": chunks.id,
        "object": "chat.completion",
        "created": chunks.created,
        "model": model,
        "choices": [choices[i] for i in sorted(choices)],
        "usage": chunks.usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }

"""A local OpenAI Chat Completions API: ``POST /v1/chat/completions``.

Wire format, as api.openai.com sends it (and vLLM, Ollama, Groq, OpenRouter copy it):
- ``stream: true``: ``200``, ``Content-Type: text/event-stream``, chunked body of
  ``data: {chat.completion.chunk}\\n\\n`` events: first a delta with ``role`` and empty
  ``content``, one event per content delta, one with ``finish_reason`` and an empty delta,
  then, when ``stream_options.include_usage``, one with ``choices: []`` and ``usage`` (all
  others then carry ``"usage": null``), and last ``data: [DONE]``;
- ``stream: false``: one ``chat.completion`` JSON object;
- errors: ``{"error": {"message", "type", "param", "code"}}`` with the status, and
  ``Retry-After`` on 429.

Behaviour is controlled per request (see ``tests.upstreams``): put ``[fake tokens=3
fail=drop after=1]`` in the prompt or send ``X-Fake-Control: tokens=3 ...``. ``max_tokens``
/ ``max_completion_tokens`` below the number of deltas cut the answer with
``finish_reason: length``.

What the answer is, from the request (as the real API shapes it; every piece deterministic):
- the last message has role ``tool``: the text ``The tool said: <its content>``, one delta
  per word, so a tool round trip can be checked end to end;
- else ``tools`` and a ``tool_choice`` other than ``"none"``: a call to the named tool (or
  the first one), id ``call_fake1``; its arguments are a JSON object built from the tool's
  parameter schema (a string is the last word of the last user message, an ``enum`` its
  first value, an integer ``1``...), streamed in ``tokens`` pieces after a first delta
  that names the function, and ``finish_reason: "tool_calls"``;
- else ``tokens`` deltas ``token_text(i)``.
``response_format`` ``json_object`` / ``json_schema`` wraps a text answer in a JSON object
(``{"answer": TEXT}``, or the schema's properties with TEXT in its first string one),
streamed in pieces; ``n`` > 1 gives that many identical choices, streamed interleaved, each
with its own finish event; ``logprobs`` (with ``top_logprobs``) adds OpenAI's
``logprobs.content`` entries to every content delta (whole answers: all of them). Content
parts (text, ``image_url``...) are accepted; their text parts are the text. Roles are
checked as the API checks them (``system``, ``developer``, ``user``, ``assistant``,
``tool``, ``function``; a ``tool`` message needs ``tool_call_id``), and so are ``n``,
``top_logprobs`` and ``tools``: a 400 with the API's error shape otherwise.

Every answer is kept as written (``answers``, ``answer_to(request)``; over HTTP, ``GET
/_fake/answers``), so a test can compare what a relay passed on with what was sent.

Run alone: ``python -m tests.upstreams.openai_wire --port 0``; base URL ``http://HOST:PORT/v1``
(``https://`` with ``--tls-cert server.pem --tls-key server.key``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tests.upstreams import (
    CONTROL_PREFIX,
    Behaviour,
    FakeUpstream,
    RequestRecord,
    Responder,
    main,
    prompt_words,
    sse,
    token_text,
)

_ERRORS: dict[int, tuple[str, str, str | None]] = {
    # status: (message, type, code) as api.openai.com words them
    400: ("Invalid request.", "invalid_request_error", None),
    401: (
        "Incorrect API key provided: sk-fake***. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        "invalid_api_key",
    ),
    404: (
        "The model does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    ),
    429: (
        "Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 3, Used 3, "
        "Requested 1. Please try again in 20s.",
        "requests",
        "rate_limit_exceeded",
    ),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}

ROLES = ("system", "assistant", "user", "function", "tool", "developer")
MAX_N = 128
MAX_TOP_LOGPROBS = 20
TOOL_CALL_ID = "call_fake{}"  # choice i calls with id call_fake{i + 1}
_FAKE_BLOCK = re.compile(r"\[fake[^\]]*\]")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_PIECE = re.compile(r"\S+\s*|\s+")
_SLOT = "\x00TEXT\x00"  # where the text goes in a JSON answer


def error_body(status: int) -> dict[str, Any]:
    message, type_, code = _ERRORS.get(status, (f"Fake error {status}.", "server_error", None))
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class InvalidRequest(Exception):
    """A request the API refuses with 400, in its words."""

    def __init__(self, message: str, param: str | None, code: str | None = "invalid_value"):
        super().__init__(message)
        self.body = {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": param,
                "code": code,
            }
        }


def _text_of(content: Any) -> str:
    """A message's text: a string, or the ``text`` parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _check(body: dict[str, Any]) -> None:
    """Refuse what the API refuses (the part of it these tests meet).

    Raises:
        InvalidRequest: naming the parameter.
    """
    for i, message in enumerate(body["messages"]):
        role = message.get("role")
        if role not in ROLES:
            allowed = ", ".join(f"'{r}'" for r in ROLES[:-1]) + f", and '{ROLES[-1]}'"
            raise InvalidRequest(
                f"Invalid value: '{role}'. Supported values are: {allowed}.",
                f"messages[{i}].role",
            )
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise InvalidRequest(
                f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                f"messages[{i}].tool_call_id",
                "missing_required_parameter",
            )
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or not 1 <= n <= MAX_N):
        raise InvalidRequest(
            f"Invalid 'n': integer between 1 and {MAX_N} expected, got {n!r}.", "n"
        )
    top = body.get("top_logprobs")
    if top is not None:
        if not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(
                f"Invalid 'top_logprobs': integer between 0 and {MAX_TOP_LOGPROBS} expected.",
                "top_logprobs",
            )
        if not body.get("logprobs"):
            raise InvalidRequest(
                "Invalid value for 'top_logprobs': 'logprobs' must be set to true.",
                "top_logprobs",
            )
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise InvalidRequest("Invalid 'tools': expected an array.", "tools", "invalid_type")
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise InvalidRequest(
                    f"Missing required parameter: 'tools[{i}].function.name'.",
                    f"tools[{i}].function.name",
                    "missing_required_parameter",
                )


def _last_word(messages: list[dict[str, Any]]) -> str:
    """The last word of the last user message (directives left out): what a string
    argument of a tool call is, so ``weather in Paris?`` calls with ``"Paris"``."""
    for message in reversed(messages):
        if message.get("role") == "user":
            words = _WORD.findall(_FAKE_BLOCK.sub(" ", _text_of(message.get("content"))))
            if words:
                return str(words[-1])
    return "fake"


def _value(schema: Any, word: str) -> Any:
    """A deterministic value that fits a JSON schema (the part of it tools use)."""
    if not isinstance(schema, dict):
        return word
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type", "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return _object(schema, word)
    return {
        "integer": 1,
        "number": 1.5,
        "boolean": True,
        "array": [],
        "null": None,
    }.get(kind, word)


def _object(schema: dict[str, Any], word: str) -> dict[str, Any]:
    props = schema.get("properties")
    if not isinstance(props, dict):
        return {}
    required = schema.get("required")
    names = [p for p in props if not isinstance(required, list) or p in required]
    return {name: _value(props[name], word) for name in names}


def _split(text: str, parts: int) -> list[str]:
    """``text`` in ``parts`` nearly equal pieces (fewer when it is shorter)."""
    parts = max(1, min(parts, len(text)))
    size, extra = divmod(len(text), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(text[start:end])
        start = end
    return out


def _json_pieces(response_format: Any, pieces: list[str], word: str) -> list[str] | None:
    """A text answer as a JSON object's pieces, when ``response_format`` asks for JSON."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        obj: dict[str, Any] = {"answer": _SLOT}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        obj = _object(schema, word) if isinstance(schema, dict) else {}
        key = next((k for k, v in obj.items() if isinstance(v, str)), None)
        if key is None:
            key = "answer"
        obj[key] = _SLOT
    else:
        return None
    head, _, tail = json.dumps(obj).partition(json.dumps(_SLOT)[1:-1])
    return [head, *(json.dumps(p)[1:-1] for p in pieces), tail]


def _logprob(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def _logprobs_entry(token: str, i: int, top: int) -> dict[str, Any]:
    """OpenAI's ``logprobs.content[]`` item for output token ``i``: the token first among
    its ``top`` alternatives, then ``alt1``, ``alt2``... each one nat less likely."""
    lp = round(-0.01 * (i + 1), 6)
    alternatives = [_logprob(token, lp)] + [_logprob(f"alt{k}", lp - k) for k in range(1, top)]
    return {**_logprob(token, lp), "top_logprobs": alternatives[:top]}


@dataclass(frozen=True, slots=True)
class _Plan:
    """What to answer: ``pieces`` of text, or of a call's arguments when ``tool`` is set."""

    pieces: list[str]
    tool: str | None = None  # the function called

    @property
    def finish(self) -> str:
        return "tool_calls" if self.tool else "stop"


def _plan(body: dict[str, Any], b: Behaviour) -> _Plan:
    messages: list[dict[str, Any]] = body["messages"]
    word = _last_word(messages)
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if messages[-1].get("role") == "tool":
        text = f"The tool said: {_text_of(messages[-1].get('content'))}"
        pieces = _PIECE.findall(text)
    elif tools and choice != "none":
        fns = [t["function"] for t in tools]
        named = choice.get("function") if isinstance(choice, dict) else None
        wanted = named.get("name") if isinstance(named, dict) else None
        fn = next((f for f in fns if f["name"] == wanted), fns[0])
        arguments = json.dumps(_object(fn.get("parameters") or {}, word), separators=(",", ":"))
        return _Plan(_split(arguments, b.tokens), tool=fn["name"])
    else:
        pieces = [token_text(i) for i in range(b.tokens)]
    return _Plan(_json_pieces(body.get("response_format"), pieces, word) or pieces)


@dataclass(slots=True)
class SentAnswer:
    """One answer as the fake wrote it: status and body bytes, in the order written."""

    request: RequestRecord
    status: int | None = None
    chunks: list[bytes] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def data(self) -> list[str]:
        """The ``data`` of each event of a streamed answer, in order."""
        out = []
        for block in self.body.decode("utf-8", "replace").split("\n\n"):
            lines = [ln[len("data: ") :] for ln in block.split("\n") if ln.startswith("data: ")]
            if lines:
                out.append("\n".join(lines))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.request.target,
            "status": self.status,
            "body": self.body.decode("utf-8", "replace"),
        }


class _Recorded(Responder):
    """A ``Responder`` that keeps what it writes in a ``SentAnswer``."""

    def __init__(self, resp: Responder, sent: SentAnswer) -> None:
        super().__init__(resp._conn)
        self.sent = sent

    async def send_json(
        self, status: int, obj: Any, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        await super().send_json(status, obj, headers)
        self.sent.status = status
        self.sent.chunks.append(json.dumps(obj).encode())  # what send_json wrote

    def start_stream(self, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().start_stream(headers)
        self.sent.status = 200

    async def send_chunk(self, data: bytes) -> None:
        await super().send_chunk(data)
        self.sent.chunks.append(data)


class OpenAIWire(FakeUpstream):
    api_name: ClassVar[str] = "openai"
    _completion_ids = itertools.count(1)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.answers: list[SentAnswer] = []

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def answer_to(self, req: RequestRecord) -> SentAnswer:
        """What was written in answer to ``req`` (so far)."""
        return next(a for a in self.answers if a.request is req)

    def reset(self) -> None:
        super().reset()
        self.answers.clear()

    async def _control(self, req: RequestRecord, resp: Responder) -> None:
        if req.method == "GET" and req.path == f"{CONTROL_PREFIX}answers":
            await resp.send_json(200, [a.as_dict() for a in self.answers])
        else:
            await super()._control(req, resp)

    async def handle(self, req: RequestRecord, resp: Responder) -> None:
        sent = SentAnswer(req)
        self.answers.append(sent)
        await self._answer(req, _Recorded(resp, sent))

    async def _answer(self, req: RequestRecord, resp: Responder) -> None:
        if req.method != "POST" or req.path not in ("/v1/chat/completions", "/chat/completions"):
            await resp.send_json(404, error_body(404))
            return
        if self.api_key is not None and req.headers.get("authorization") != (
            f"Bearer {self.api_key}"
        ):
            await resp.send_json(401, error_body(401))
            return
        try:
            body = req.json()
            messages = body["messages"]
            texts = [_text_of(m.get("content")) for m in messages]
            b = self.behaviour(req, "\n".join(texts))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            err = error_body(400)
            err["error"]["message"] = f"Invalid request: {exc}"
            await resp.send_json(400, err)
            return

        if b.status is not None:
            headers: list[tuple[str, str]] = []
            retry_after = b.retry_after or ("1" if b.status == 429 else None)
            if retry_after is not None:
                headers.append(("retry-after", retry_after))
            await resp.send_json(b.status, error_body(b.status), headers)
            return
        try:
            if not messages:
                raise InvalidRequest(
                    "Invalid 'messages': empty array. Expected an array with minimum length "
                    "1, but got an empty array instead.",
                    "messages",
                    "empty_array",
                )
            _check(body)
        except InvalidRequest as exc:
            await resp.send_json(400, exc.body)
            return
        if b.fail == "hang":
            await resp.hang()
            return

        plan = _plan(body, b)
        pieces = plan.pieces
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = plan.finish
        if isinstance(limit, int) and limit < len(pieces):
            pieces, finish = pieces[:limit], "length"
        b = dataclasses.replace(b, tokens=len(pieces))
        n = body.get("n") or 1
        top = (body.get("top_logprobs") or 0) if body.get("logprobs") else None
        usage = {
            "prompt_tokens": prompt_words(texts),
            "completion_tokens": len(pieces) * n,
            "total_tokens": prompt_words(texts) + len(pieces) * n,
        }
        cid = f"chatcmpl-fake{next(self._completion_ids)}"
        created = int(time.time())
        model = body.get("model", "gpt-4o-mini")
        if not body.get("stream"):
            await self._complete(resp, b, plan, pieces, n, top, cid, created, model, finish, usage)
            return

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(
            delta: dict[str, Any],
            finish_reason: str | None = None,
            index: int = 0,
            logprobs: dict[str, Any] | None = None,
        ) -> dict[str, Any]:
            obj: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {
                        "index": index,
                        "delta": delta,
                        "logprobs": logprobs,
                        "finish_reason": finish_reason,
                    }
                ],
            }
            if include_usage:
                obj["usage"] = None
            return obj

        def first(index: int) -> dict[str, Any]:
            if plan.tool is None:
                return chunk({"role": "assistant", "content": "", "refusal": None}, index=index)
            call = {
                "index": 0,
                "id": TOOL_CALL_ID.format(index + 1),
                "type": "function",
                "function": {"name": plan.tool, "arguments": ""},
            }
            delta = {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}
            return chunk(delta, index=index)

        def step(i: int) -> bytes:
            """Delta ``i`` of every choice, interleaved."""
            events = []
            for index in range(n):
                if plan.tool is not None:
                    call = {"index": 0, "function": {"arguments": pieces[i]}}
                    events.append(sse(chunk({"tool_calls": [call]}, index=index)))
                    continue
                logprobs = None
                if top is not None:
                    entry = _logprobs_entry(pieces[i], i, top)
                    logprobs = {"content": [entry], "refusal": None}
                events.append(sse(chunk({"content": pieces[i]}, index=index, logprobs=logprobs)))
            return b"".join(events)

        resp.start_stream([("x-request-id", cid)])
        for index in range(n):
            await resp.send_chunk(sse(first(index)))
        extra = (
            sse({"id": cid, "object": "chat.completion.chunk", "choices": "not-a-list"})
            if b.fail == "shape"
            else sse({"error": {"message": "The server had an error.", "type": "server_error"}})
        )
        if not await self.stream_events(resp, b, step, extra):
            return
        for index in range(n):
            await resp.send_chunk(sse(chunk({}, finish, index=index)))
        if include_usage:
            last = chunk({})
            last["choices"] = []
            last["usage"] = usage
            await resp.send_chunk(sse(last))
        await resp.send_chunk(b"data: [DONE]\n\n")
        resp.end_stream()

    async def _complete(
        self,
        resp: Responder,
        b: Behaviour,
        plan: _Plan,
        pieces: list[str],
        n: int,
        top: int | None,
        cid: str,
        created: int,
        model: str,
        finish: str,
        usage: dict[str, int],
    ) -> None:
        await resp.sleep_until(time.monotonic() + b.ttft_ms / 1000)
        text = "".join(pieces)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        logprobs: dict[str, Any] | None = None
        if plan.tool is not None:
            message["content"] = None
        elif top is not None:
            entries = [_logprobs_entry(p, i, top) for i, p in enumerate(pieces)]
            logprobs = {"content": entries, "refusal": None}

        def choice(index: int) -> dict[str, Any]:
            msg = dict(message)
            if plan.tool is not None:
                msg["tool_calls"] = [
                    {
                        "id": TOOL_CALL_ID.format(index + 1),
                        "type": "function",
                        "function": {"name": plan.tool, "arguments": text},
                    }
                ]
            return {"index": index, "message": msg, "logprobs": logprobs, "finish_reason": finish}

        await resp.send_json(
            200,
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [choice(index) for index in range(n)],
                "usage": usage,
            },
        )


if __name__ == "__main__":
    raise SystemExit(main(OpenAIWire))

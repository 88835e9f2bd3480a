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
/ ``max_completion_tokens`` below ``tokens`` cut the answer with ``finish_reason: length``.

Run alone: ``python -m tests.upstreams.openai_wire --port 0``; base URL ``http://HOST:PORT/v1``
(``https://`` with ``--tls-cert server.pem --tls-key server.key``).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, ClassVar

from tests.upstreams import (
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


def error_body(status: int) -> dict[str, Any]:
    message, type_, code = _ERRORS.get(status, (f"Fake error {status}.", "server_error", None))
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _text_of(content: Any) -> str:
    """A message's text: a string, or the ``text`` parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class OpenAIWire(FakeUpstream):
    api_name: ClassVar[str] = "openai"
    _completion_ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    async def handle(self, req: RequestRecord, resp: Responder) -> None:
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
        if b.fail == "hang":
            await resp.hang()
            return

        model = body.get("model", "gpt-4o-mini")
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        tokens = min(b.tokens, limit) if isinstance(limit, int) else b.tokens
        finish = "length" if tokens < b.tokens else "stop"
        b = dataclasses.replace(b, tokens=tokens)
        usage = {
            "prompt_tokens": prompt_words(texts),
            "completion_tokens": tokens,
            "total_tokens": prompt_words(texts) + tokens,
        }
        cid = f"chatcmpl-fake{next(self._completion_ids)}"
        created = int(time.time())
        if not body.get("stream"):
            await self._complete(resp, b, cid, created, model, finish, usage)
            return

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            obj: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                ],
            }
            if include_usage:
                obj["usage"] = None
            return obj

        resp.start_stream([("x-request-id", cid)])
        await resp.send_chunk(sse(chunk({"role": "assistant", "content": "", "refusal": None})))
        extra = (
            sse({"id": cid, "object": "chat.completion.chunk", "choices": "not-a-list"})
            if b.fail == "shape"
            else sse({"error": {"message": "The server had an error.", "type": "server_error"}})
        )
        if not await self.stream_events(
            resp, b, lambda i: sse(chunk({"content": token_text(i)})), extra
        ):
            return
        await resp.send_chunk(sse(chunk({}, finish)))
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
        cid: str,
        created: int,
        model: str,
        finish: str,
        usage: dict[str, int],
    ) -> None:
        await resp.sleep_until(time.monotonic() + b.ttft_ms / 1000)
        text = "".join(token_text(i) for i in range(b.tokens))
        await resp.send_json(
            200,
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            },
        )


if __name__ == "__main__":
    raise SystemExit(main(OpenAIWire))

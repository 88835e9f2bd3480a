"""A local Gemini API: ``POST /v1beta/models/{model}:streamGenerateContent?alt=sse`` and
``:generateContent``.

Wire format, as generativelanguage.googleapis.com sends it:
- streaming: ``200``, ``Content-Type: text/event-stream``, chunked body of
  ``data: {GenerateContentResponse}\\r\\n\\r\\n`` events. Each has
  ``candidates[0].content`` (``role: "model"``, ``parts: [{"text"}]``), ``usageMetadata``
  with running totals, ``modelVersion`` and ``responseId``; the last candidate also has
  ``finishReason`` (``STOP``, or ``MAX_TOKENS`` when ``maxOutputTokens`` cut it). No
  ``[DONE]``: the body just ends;
- non-streaming: one ``GenerateContentResponse`` JSON object;
- errors: ``{"error": {"code", "message", "status", "details"}}``; a 429 carries a
  ``google.rpc.RetryInfo`` detail (``retryDelay: "7s"``), and ``Retry-After`` when asked.

Behaviour is controlled per request (see ``tests.upstreams``): put ``[fake tokens=3
fail=drop after=1]`` in the prompt or send ``X-Fake-Control: tokens=3 ...``.

Run alone: ``python -m tests.upstreams.gemini_wire --port 0``; base URL ``http://HOST:PORT/``
(``https://`` with ``--tls-cert server.pem --tls-key server.key``).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import time
from typing import Any, ClassVar

from tests.upstreams import (
    FakeUpstream,
    RequestRecord,
    Responder,
    main,
    prompt_words,
    sse,
    token_text,
)

_PATH = re.compile(
    r"^/(?P<version>v1|v1beta|v1alpha)/models/(?P<model>[^/:]+)"
    r":(?P<method>streamGenerateContent|generateContent)$"
)
_STATUS_NAMES = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "Request had invalid authentication credentials."),
    403: ("PERMISSION_DENIED", "Method doesn't allow unregistered callers."),
    404: ("NOT_FOUND", "models/unknown is not found for API version v1beta."),
    429: (
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    500: ("INTERNAL", "An internal error has occurred. Please retry or report."),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
}
SEP = b"\r\n\r\n"  # Google's SSE events end with CRLF CRLF


def error_body(status: int, retry_delay_s: str | None = None) -> dict[str, Any]:
    name, message = _STATUS_NAMES.get(status, ("UNKNOWN", f"Fake error {status}."))
    error: dict[str, Any] = {"code": status, "message": message, "status": name}
    if status == 429:
        error["details"] = [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_delay_s}s"}
        ]
    return {"error": error}


def _texts(body: dict[str, Any]) -> list[str]:
    """Every text of the prompt: the system instruction's, then the turns'."""
    texts = []
    system = body.get("systemInstruction")
    for content in [system] if isinstance(system, dict) else []:
        for part in content.get("parts", []):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
    for content in body.get("contents", []):
        for part in content.get("parts", []):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
    return texts


class GeminiWire(FakeUpstream):
    api_name: ClassVar[str] = "gemini"
    _response_ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        return f"{self.url}/"

    async def handle(self, req: RequestRecord, resp: Responder) -> None:
        match = _PATH.match(req.path)
        if req.method != "POST" or match is None:
            await resp.send_json(404, error_body(404))
            return
        streaming = match["method"] == "streamGenerateContent"
        if streaming and "alt=sse" not in req.query.split("&"):
            await resp.send_json(400, error_body(400))  # the JSON-array stream isn't faked
            return
        if self.api_key is not None and req.headers.get("x-goog-api-key") != self.api_key:
            err = error_body(400)
            err["error"]["message"] = "API key not valid. Please pass a valid API key."
            await resp.send_json(400, err)
            return
        try:
            body = req.json()
            texts = _texts(body)
            b = self.behaviour(req, "\n".join(texts))
            limit = (body.get("generationConfig") or {}).get("maxOutputTokens")
        except (ValueError, KeyError, TypeError, AttributeError):
            await resp.send_json(400, error_body(400))
            return

        if b.status is not None:
            headers = [("retry-after", b.retry_after)] if b.retry_after else []
            await resp.send_json(b.status, error_body(b.status, b.retry_after or "1"), headers)
            return
        if b.fail == "hang":
            await resp.hang()
            return

        model = match["model"]
        tokens = min(b.tokens, limit) if isinstance(limit, int) else b.tokens
        finish = "MAX_TOKENS" if tokens < b.tokens else "STOP"
        prompt = prompt_words(texts)
        rid = f"fake-{next(self._response_ids)}"

        def response(text: str, n: int, finish_reason: str | None) -> dict[str, Any]:
            candidate: dict[str, Any] = {
                "content": {"parts": [{"text": text}], "role": "model"},
                "index": 0,
            }
            if finish_reason is not None:
                candidate["finishReason"] = finish_reason
            return {
                "candidates": [candidate],
                "usageMetadata": {
                    "promptTokenCount": prompt,
                    "candidatesTokenCount": n,
                    "totalTokenCount": prompt + n,
                    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
                },
                "modelVersion": model,
                "responseId": rid,
            }

        if not streaming:
            await resp.sleep_until(time.monotonic() + b.ttft_ms / 1000)
            text = "".join(token_text(i) for i in range(tokens))
            await resp.send_json(200, response(text, tokens, finish))
            return

        resp.start_stream()
        extra = (
            # a part whose text is a number: what a buggy proxy re-encoding JSON sends
            sse({"candidates": [{"content": {"parts": [{"text": 42}], "role": "model"}}]}, SEP)
            if b.fail == "shape"
            else sse(error_body(500), SEP)
        )
        last = tokens - 1
        if not await self.stream_events(
            resp,
            dataclasses.replace(b, tokens=tokens),
            lambda i: sse(response(token_text(i), i + 1, finish if i == last else None), SEP),
            extra,
        ):
            return
        if tokens == 0 or b.fail in ("malformed", "shape", "error_event"):
            await resp.send_chunk(sse(response("", tokens, finish), SEP))
        resp.end_stream()


if __name__ == "__main__":
    raise SystemExit(main(GeminiWire))

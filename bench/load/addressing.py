"""How each kind of server is addressed: the flavours, the request targets and the
complete HTTP requests the scenarios send (prebuilt bytes, so the hot paths only write)."""

from __future__ import annotations

from collections.abc import Callable

# sseserver: Mercure on /.well-known/mercure; peers: /sub?topic + POST /pub (same form);
# nchan: /sub/<topic> + POST /pub/<topic> with the raw data as body.
FLAVORS = ("sseserver", "peer", "nchan")


def stream_target(tokens: int, interval_ms: float, ttft_ms: float, size: int = 0) -> str:
    """A synthetic /v1/stream generation on a fixed schedule (every server serves it)."""
    return f"/v1/stream?tokens={tokens}&interval_ms={interval_ms:g}&ttft_ms={ttft_ms:g}&size={size}"


def sub_target(flavor: str, topic: str) -> str:
    """The subscription to ``topic`` in ``flavor``'s URL scheme."""
    if flavor == "sseserver":
        return f"/.well-known/mercure?topic={topic}"
    if flavor == "nchan":
        return f"/sub/{topic}"
    return f"/sub?topic={topic}"


def get_request(host: str, port: int, target: str) -> bytes:
    """A complete SSE GET, built once and written as is on every connection."""
    return (
        f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    ).encode()


def post_json_request(host: str, port: int, target: str, body: bytes) -> bytes:
    """A complete JSON POST answered with SSE (an OpenAI-style chat request)."""
    return (
        f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Accept: text/event-stream\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer sk-fake\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def publish_builder(flavor: str, host: str, port: int, topic: str) -> Callable[[bytes], bytes]:
    """A function from the payload (``@<time>#``) to a complete POST request."""
    if flavor == "nchan":
        head = (
            f"POST /pub/{topic} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: text/plain\r\nContent-Length: "
        ).encode()

        def build_nchan(payload: bytes) -> bytes:
            return b"%b%d\r\n\r\n%b" % (head, len(payload), payload)

        return build_nchan
    path = "/.well-known/mercure" if flavor == "sseserver" else "/pub"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: "
    ).encode()
    prefix = f"topic={topic}&data=".encode()

    def build_form(payload: bytes) -> bytes:
        body = prefix + payload.replace(b"@", b"%40").replace(b"#", b"%23")
        return b"%b%d\r\n\r\n%b" % (head, len(body), body)

    return build_form
